//! The node-to-node transport: an opaque request to node X and its reply, over a
//! direct TCP connection (one hop; why TCP and not Redis pub/sub: the
//! [module doc](super)). The chat layer defines what the bytes mean.
//!
//! # Wire
//! Every frame is `len: u32 BE | kind: u8 | id: u64 BE | payload`, `len` counting
//! everything after itself. Kinds: `HELLO` (client -> server, payload
//! `imshard-link/1 <to-node> <from-node>`), `HELLO_OK`, `REQUEST`, `REPLY`, `ERROR`
//! (payload: a UTF-8 reason; id 0 = the connection is refused). The client sends
//! `HELLO` first; a server whose node id is not `<to-node>` (a stale address in the
//! live set: another node now listens there) answers `ERROR` and closes.
//!
//! # What [`Links`] guarantees
//! - **One hop, one connection per peer** per [`Links`] (per shard), made on first
//!   use and again after a failure; requests to a peer share it.
//! - **One write per loop turn**: a request only appends its frame to the peer's
//!   output buffer and wakes its writer, which runs after the turn's other tasks, so
//!   the requests of one turn to one peer go out in one write (the server's replies
//!   likewise). [`LinkStats::writes`] counts them.
//! - **Correlation by id**: replies may come in any order; each goes to its request.
//!   A late reply (its request timed out) is dropped; a timeout does not break the
//!   connection.
//! - **Every request ends**: with the reply, or an error saying whether the peer may
//!   have run it ([`LinkError::outcome_unknown`]): `Unreachable` (never sent),
//!   `Disconnected`/`Timeout` (may have run), `NodeGone` (the peer left the live
//!   set: may have run), `Refused` (the peer's handler dropped it without a reply, or
//!   the peer is not the node named). Requests that must not run twice carry their
//!   own idempotency key (a send carries its client_msg_id).
//! - **Backoff**: after a failed connection attempt, requests to that peer fail at
//!   once with `Unreachable` until the backoff (jittered, doubling from
//!   [`LinkConfig::backoff_min`] to [`LinkConfig::backoff_max`]) has passed.
//!
//! Not done: TLS or authentication of peers (node-to-node traffic belongs on a
//! private network), flow control beyond the timeout (a peer that stops reading is
//! found by the timeouts of the requests queued behind), priorities. A payload is
//! copied once into the output buffer; received payloads are [`Bytes`] slices of the
//! read buffer, without a copy.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use local_sync::oneshot;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};

use super::NodeId;
use crate::store::redis::conn::{jitter, Signal};

/// The protocol name and version in `HELLO`.
pub const LINK_VERSION: &str = "imshard-link/1";

/// Bytes of a frame before its payload: length, kind, id.
pub const FRAME_HEADER: usize = 4 + 1 + 8;

const KIND_HELLO: u8 = 1;
const KIND_HELLO_OK: u8 = 2;
const KIND_REQUEST: u8 = 3;
const KIND_REPLY: u8 = 4;
const KIND_ERROR: u8 = 5;

/// Bytes asked of each socket read.
const READ_CHUNK: usize = 64 * 1024;

/// An output buffer that grew past this is not kept for reuse.
const KEEP_WRITE_BUFFER: usize = 1024 * 1024;

/// Timeouts and limits of the links of one shard (and of its server side).
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// A request with no reply after this fails with [`LinkError::Timeout`].
    pub timeout: Duration,
    /// Limit for one connection attempt, TCP connect plus `HELLO`.
    pub connect_timeout: Duration,
    /// The largest payload sent or accepted; a bigger incoming frame breaks the
    /// connection (protocol error).
    pub max_payload: usize,
    /// The first wait after a failed connection attempt; it doubles after each.
    pub backoff_min: Duration,
    /// The longest wait between attempts.
    pub backoff_max: Duration,
}

impl Default for LinkConfig {
    /// 2 s per request, 1 s per connection attempt, 16 MiB payloads, backoff 50 ms
    /// to 2 s.
    fn default() -> LinkConfig {
        LinkConfig {
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            max_payload: 16 << 20,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Why a request got no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The node is not in the peer table ([`Links::set_peers`]). Nothing was sent.
    UnknownNode(NodeId),
    /// No connection to the node could be made (or the last attempt failed less than
    /// a backoff ago). Nothing was sent. Retryable.
    Unreachable { node: NodeId, reason: String },
    /// The connection broke with the request queued or sent: it may have run.
    /// Retryable.
    Disconnected { node: NodeId, reason: String },
    /// No reply within [`LinkConfig::timeout`]: it may have run. Retryable.
    Timeout { node: NodeId, after: Duration },
    /// The node left the peer table while the request waited: it may have run.
    /// Retry on the slot's new owner.
    NodeGone(NodeId),
    /// The peer answered with an error instead of a reply (its handler dropped the
    /// request, or it is not the node named). Not retryable as is.
    Refused { node: NodeId, reason: String },
    /// The payload is larger than [`LinkConfig::max_payload`]. Nothing was sent.
    TooLarge { len: usize, max: usize },
}

impl LinkError {
    /// Whether the same request may succeed later (here or on a new owner).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LinkError::Unreachable { .. }
                | LinkError::Disconnected { .. }
                | LinkError::Timeout { .. }
                | LinkError::NodeGone(_)
        )
    }

    /// Whether the peer may have run the request although no reply came.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            LinkError::Disconnected { .. } | LinkError::Timeout { .. } | LinkError::NodeGone(_)
        )
    }
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::UnknownNode(n) => write!(f, "node {n} is not live"),
            LinkError::Unreachable { node, reason } => {
                write!(f, "node {node} unreachable: {reason}")
            }
            LinkError::Disconnected { node, reason } => {
                write!(f, "connection to node {node} lost: {reason}")
            }
            LinkError::Timeout { node, after } => {
                write!(f, "node {node} did not answer within {after:?}")
            }
            LinkError::NodeGone(n) => write!(f, "node {n} left the cluster"),
            LinkError::Refused { node, reason } => write!(f, "node {node} refused: {reason}"),
            LinkError::TooLarge { len, max } => {
                write!(f, "payload of {len} bytes is over the {max}-byte limit")
            }
        }
    }
}

impl std::error::Error for LinkError {}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Frame {
    kind: u8,
    id: u64,
    payload: Bytes,
}

/// Appends one frame to `out`.
fn encode(out: &mut Vec<u8>, kind: u8, id: u64, payload: &[u8]) {
    let len = (FRAME_HEADER - 4 + payload.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Takes one complete frame off the front of `buf`, `None` if it is not all there
/// yet; `Err` for a frame over `max_payload` or shorter than its header.
fn decode(buf: &mut BytesMut, max_payload: usize) -> Result<Option<Frame>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let Some(payload_len) = len.checked_sub(FRAME_HEADER - 4) else {
        return Err(format!("frame length {len} is shorter than a header"));
    };
    if payload_len > max_payload {
        return Err(format!(
            "frame of {payload_len} payload bytes is over the {max_payload}-byte limit"
        ));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(4 + len).freeze();
    frame.advance(4);
    let kind = frame.get_u8();
    let id = frame.get_u64();
    Ok(Some(Frame {
        kind,
        id,
        payload: frame,
    }))
}

/// Reads until one complete frame is in `buf` and returns it.
async fn next_frame<R: AsyncReadRent>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_payload: usize,
) -> Result<Frame, String> {
    loop {
        if let Some(f) = decode(buf, max_payload)? {
            return Ok(f);
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let len = buf.len();
        let cap = buf.capacity();
        let (res, slice) = reader.read(std::mem::take(buf).slice_mut(len..cap)).await;
        *buf = slice.into_inner();
        match res {
            Ok(0) => return Err("the peer closed the connection".to_string()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Counters for `/metrics` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Requests made (including those that failed at once).
    pub requests: u64,
    /// Replies delivered.
    pub replies: u64,
    /// Requests that failed (any error).
    pub failures: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Socket writes (client side: of requests; server side: of replies).
    pub writes: u64,
    /// Connections made (client side) or accepted and greeted (server side).
    pub connects: u64,
    /// Connection attempts that failed (client side) or were refused (server side).
    pub connect_failures: u64,
}

fn bump(stats: &Cell<LinkStats>, f: impl FnOnce(&mut LinkStats)) {
    let mut s = stats.get();
    f(&mut s);
    stats.set(s);
}

// ---------------------------------------------------------------------------------
// Client side.

/// This shard's links to the other nodes. Cheap to clone; not `Send`. Dropping the
/// last handle closes every connection and fails what waits.
#[derive(Clone)]
pub struct Links {
    shared: Rc<LinksShared>,
    _owner: Rc<LinksOwner>,
}

struct LinksOwner(Rc<LinksShared>);

impl Drop for LinksOwner {
    fn drop(&mut self) {
        let peers: Vec<Rc<Peer>> = self.0.peers.borrow_mut().drain().map(|(_, p)| p).collect();
        for p in peers {
            p.close(|node| LinkError::NodeGone(node.clone()));
        }
    }
}

struct LinksShared {
    me: NodeId,
    config: LinkConfig,
    peers: RefCell<HashMap<NodeId, Rc<Peer>>>,
    /// The next request id (ids are unique per `Links`, so per connection).
    next_id: Cell<u64>,
    stats: Rc<Cell<LinkStats>>,
}

/// One peer node and its connection.
struct Peer {
    id: NodeId,
    addr: SocketAddr,
    me: NodeId,
    config: LinkConfig,
    state: RefCell<PeerState>,
    writer_wake: Signal,
    stats: Rc<Cell<LinkStats>>,
}

struct PeerState {
    /// The live connection's socket (taken out and shut down by whoever breaks it).
    socket: Option<RawFd>,
    /// A connection attempt is under way; requests queue in `out`.
    connecting: bool,
    /// Increases with every connection; tasks of an older one stop.
    epoch: u64,
    /// Removed from the peer table: nothing more is sent.
    removed: bool,
    /// Frames not yet handed to the writer.
    out: Vec<u8>,
    /// Requests waiting for a reply, by id.
    waiting: HashMap<u64, oneshot::Sender<Result<Bytes, LinkError>>>,
    /// After a failed attempt: no new attempt before this.
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: String,
}

impl Links {
    /// Links of node `me` (sent in `HELLO`), with no peers yet.
    pub fn new(me: NodeId, config: LinkConfig) -> Links {
        let shared = Rc::new(LinksShared {
            me,
            config,
            peers: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
            stats: Rc::new(Cell::new(LinkStats::default())),
        });
        Links {
            _owner: Rc::new(LinksOwner(shared.clone())),
            shared,
        }
    }

    /// Makes the peer table equal to `peers` (this node is skipped): new peers are
    /// added (connected on first use), peers not listed are removed (their requests
    /// fail with [`LinkError::NodeGone`]), a peer whose address changed is replaced.
    pub fn set_peers(&self, peers: impl IntoIterator<Item = (NodeId, SocketAddr)>) {
        let mut next: HashMap<NodeId, SocketAddr> = peers.into_iter().collect();
        next.remove(&self.shared.me);
        let mut gone = Vec::new();
        {
            let mut table = self.shared.peers.borrow_mut();
            table.retain(|id, p| {
                let keep = next.get(id) == Some(&p.addr);
                if !keep {
                    gone.push(p.clone());
                }
                keep
            });
            for (id, addr) in next {
                table.entry(id.clone()).or_insert_with(|| {
                    Rc::new(Peer {
                        id,
                        addr,
                        me: self.shared.me.clone(),
                        config: self.shared.config.clone(),
                        state: RefCell::new(PeerState {
                            socket: None,
                            connecting: false,
                            epoch: 0,
                            removed: false,
                            out: Vec::new(),
                            waiting: HashMap::new(),
                            retry_at: None,
                            backoff: self.shared.config.backoff_min,
                            last_error: String::new(),
                        }),
                        writer_wake: Signal::default(),
                        stats: self.shared.stats.clone(),
                    })
                });
            }
        }
        for p in gone {
            p.close(|node| LinkError::NodeGone(node.clone()));
        }
    }

    /// The peers known now, sorted by id.
    pub fn peers(&self) -> Vec<(NodeId, SocketAddr)> {
        let mut v: Vec<_> = self
            .shared
            .peers
            .borrow()
            .values()
            .map(|p| (p.id.clone(), p.addr))
            .collect();
        v.sort();
        v
    }

    /// Whether a connection to `node` is up now.
    pub fn is_connected(&self, node: &NodeId) -> bool {
        self.shared
            .peers
            .borrow()
            .get(node)
            .is_some_and(|p| p.state.borrow().socket.is_some())
    }

    pub fn stats(&self) -> LinkStats {
        self.shared.stats.get()
    }

    /// Sends `payload` to `node` (in the same write as the turn's other requests to
    /// it) and waits for the reply.
    pub async fn request(&self, node: &NodeId, payload: &[u8]) -> Result<Bytes, LinkError> {
        let shared = &self.shared;
        bump(&shared.stats, |s| s.requests += 1);
        let result = self.request_inner(node, payload).await;
        match &result {
            Ok(_) => bump(&shared.stats, |s| s.replies += 1),
            Err(e) => bump(&shared.stats, |s| {
                s.failures += 1;
                if matches!(e, LinkError::Timeout { .. }) {
                    s.timeouts += 1;
                }
            }),
        }
        result
    }

    async fn request_inner(&self, node: &NodeId, payload: &[u8]) -> Result<Bytes, LinkError> {
        let shared = &self.shared;
        let max = shared.config.max_payload;
        if payload.len() > max {
            return Err(LinkError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let peer = shared
            .peers
            .borrow()
            .get(node)
            .cloned()
            .ok_or_else(|| LinkError::UnknownNode(node.clone()))?;
        let id = shared.next_id.get();
        shared.next_id.set(id + 1);
        let (done, answer) = oneshot::channel();
        {
            let mut st = peer.state.borrow_mut();
            if st.socket.is_none() && !st.connecting {
                if st.retry_at.is_some_and(|t| Instant::now() < t) {
                    return Err(LinkError::Unreachable {
                        node: node.clone(),
                        reason: st.last_error.clone(),
                    });
                }
                st.connecting = true;
                monoio::spawn(connect_and_serve(peer.clone()));
            }
            encode(&mut st.out, KIND_REQUEST, id, payload);
            st.waiting.insert(id, done);
        }
        peer.writer_wake.wake();
        let timeout = shared.config.timeout;
        match monoio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(LinkError::Disconnected {
                node: node.clone(),
                reason: "the connection was dropped".to_string(),
            }),
            Err(_) => {
                peer.state.borrow_mut().waiting.remove(&id);
                Err(LinkError::Timeout {
                    node: node.clone(),
                    after: timeout,
                })
            }
        }
    }
}

impl Peer {
    /// Removed from the table: breaks the connection and fails every waiter with
    /// `error(node)`.
    fn close(&self, error: impl Fn(&NodeId) -> LinkError) {
        let waiters = {
            let mut st = self.state.borrow_mut();
            st.removed = true;
            st.epoch += 1;
            if let Some(fd) = st.socket.take() {
                // SAFETY: the stream's halves are dropped only after their tasks see
                // `socket` gone (epoch changed); shutdown does not close the fd.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            st.out.clear();
            std::mem::take(&mut st.waiting)
        };
        self.writer_wake.wake();
        for (_, w) in waiters {
            let _ = w.send(Err(error(&self.id)));
        }
    }

    /// Connection `epoch` broke (or never came up): fails every waiter.
    fn fail(&self, epoch: u64, error: impl Fn(&NodeId) -> LinkError, failed_attempt: bool) {
        let waiters = {
            let mut st = self.state.borrow_mut();
            if st.epoch != epoch {
                return;
            }
            st.epoch += 1;
            st.connecting = false;
            if let Some(fd) = st.socket.take() {
                // SAFETY: as in `close`.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            st.out.clear();
            if failed_attempt {
                st.retry_at = Some(Instant::now() + jitter(st.backoff));
                st.backoff =
                    (st.backoff * 2).min(self.config.backoff_max.max(self.config.backoff_min));
            }
            std::mem::take(&mut st.waiting)
        };
        self.writer_wake.wake();
        for (_, w) in waiters {
            let _ = w.send(Err(error(&self.id)));
        }
    }

    /// Hands a reply (or error frame) to its waiter; a late one is dropped.
    fn deliver(&self, frame: Frame) -> Result<(), String> {
        let result = match frame.kind {
            KIND_REPLY => Ok(frame.payload),
            KIND_ERROR => Err(LinkError::Refused {
                node: self.id.clone(),
                reason: String::from_utf8_lossy(&frame.payload).into_owned(),
            }),
            other => return Err(format!("unexpected frame kind {other} from the server")),
        };
        let waiter = self.state.borrow_mut().waiting.remove(&frame.id);
        if let Some(w) = waiter {
            let _ = w.send(result);
        }
        Ok(())
    }
}

/// Connects to the peer, greets it, then runs the writer and reads replies until the
/// connection breaks.
async fn connect_and_serve(peer: Rc<Peer>) {
    let epoch = peer.state.borrow().epoch;
    let mut buf = BytesMut::new();
    let attempt = async {
        let mut stream = TcpStream::connect(peer.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", peer.addr))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let mut hello = Vec::new();
        let greeting = format!("{LINK_VERSION} {} {}", peer.id, peer.me);
        encode(&mut hello, KIND_HELLO, 0, greeting.as_bytes());
        let (res, _) = stream.write_all(hello).await;
        res.map_err(|e| format!("hello: {e}"))?;
        let answer = next_frame(&mut stream, &mut buf, peer.config.max_payload).await?;
        match answer.kind {
            KIND_HELLO_OK => Ok(stream),
            KIND_ERROR => Err(format!(
                "refused: {}",
                String::from_utf8_lossy(&answer.payload)
            )),
            other => Err(format!("answered hello with frame kind {other}")),
        }
    };
    let stream = match monoio::time::timeout(peer.config.connect_timeout, attempt).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(reason)) => return connect_failed(&peer, epoch, reason),
        Err(_) => {
            let reason = format!("no hello answer within {:?}", peer.config.connect_timeout);
            return connect_failed(&peer, epoch, reason);
        }
    };
    {
        let mut st = peer.state.borrow_mut();
        if st.epoch != epoch || st.removed {
            return;
        }
        st.connecting = false;
        st.socket = Some(stream.as_raw_fd());
        st.retry_at = None;
        st.backoff = peer.config.backoff_min;
    }
    bump(&peer.stats, |s| s.connects += 1);
    let (mut reader, writer) = stream.into_split();
    monoio::spawn(write_loop(peer.clone(), epoch, writer));
    let reason = loop {
        match next_frame(&mut reader, &mut buf, peer.config.max_payload).await {
            Ok(frame) => {
                if let Err(e) = peer.deliver(frame) {
                    break e;
                }
            }
            Err(e) => break e,
        }
        if peer.state.borrow().epoch != epoch {
            return;
        }
    };
    tracing::debug!(node = %peer.id, %reason, "cluster link lost");
    peer.fail(
        epoch,
        |node| LinkError::Disconnected {
            node: node.clone(),
            reason: reason.clone(),
        },
        false,
    );
}

fn connect_failed(peer: &Peer, epoch: u64, reason: String) {
    bump(&peer.stats, |s| s.connect_failures += 1);
    tracing::debug!(node = %peer.id, addr = %peer.addr, %reason, "cluster link connect failed");
    peer.state.borrow_mut().last_error = reason.clone();
    peer.fail(
        epoch,
        |node| LinkError::Unreachable {
            node: node.clone(),
            reason: reason.clone(),
        },
        true,
    );
}

impl Outbox for Peer {
    fn take_out(&self, epoch: u64, batch: &mut Vec<u8>) -> Option<bool> {
        let mut st = self.state.borrow_mut();
        if st.epoch != epoch || st.socket.is_none() {
            None
        } else if st.out.is_empty() {
            Some(false)
        } else {
            std::mem::swap(&mut st.out, batch);
            Some(true)
        }
    }

    fn signal(&self) -> &Signal {
        &self.writer_wake
    }

    fn write_failed(&self, epoch: u64, reason: String) {
        self.fail(
            epoch,
            |node| LinkError::Disconnected {
                node: node.clone(),
                reason: reason.clone(),
            },
            false,
        );
    }

    fn stats(&self) -> &Cell<LinkStats> {
        &self.stats
    }
}

/// A connection's output side, as the shared [`write_loop`] sees it.
trait Outbox {
    /// `None`: connection `epoch` is over. `Some(true)`: the queued frames were
    /// swapped into `batch` (empty on entry). `Some(false)`: nothing queued.
    fn take_out(&self, epoch: u64, batch: &mut Vec<u8>) -> Option<bool>;
    /// Woken when frames are queued or the connection ends.
    fn signal(&self) -> &Signal;
    fn write_failed(&self, epoch: u64, reason: String);
    fn stats(&self) -> &Cell<LinkStats>;
}

/// Writes what is queued, one write per wake-up, until connection `epoch` ends.
async fn write_loop<O: Outbox>(
    outbox: Rc<O>,
    epoch: u64,
    mut writer: monoio::io::OwnedWriteHalf<TcpStream>,
) {
    let mut batch = Vec::new();
    loop {
        let live = std::future::poll_fn(|cx| match outbox.take_out(epoch, &mut batch) {
            None => Poll::Ready(false),
            Some(true) => Poll::Ready(true),
            Some(false) => {
                outbox.signal().register(cx.waker());
                Poll::Pending
            }
        })
        .await;
        if !live {
            return;
        }
        bump(outbox.stats(), |s| s.writes += 1);
        let (res, b) = writer.write_all(batch).await;
        batch = b;
        if let Err(e) = res {
            outbox.write_failed(epoch, format!("write: {e}"));
            return;
        }
        batch.clear();
        if batch.capacity() > KEEP_WRITE_BUFFER {
            batch = Vec::new();
        }
        // Let the tasks woken in the turn the write completed queue theirs first.
        crate::rt::yield_now().await;
    }
}

// ---------------------------------------------------------------------------------
// Server side.

/// The handler of incoming requests: gets the payload and the [`Responder`] to
/// answer with (now or later, from any task of this thread).
type Handler = Box<dyn FnMut(Bytes, Responder)>;

/// Accepts links from other nodes on one listener and hands their requests to a
/// handler, on this shard's loop. Dropping it stops accepting and closes every
/// connection (their callers see `Disconnected`).
pub struct LinkServer {
    shared: Rc<ServerShared>,
}

struct ServerShared {
    me: NodeId,
    config: LinkConfig,
    local_addr: SocketAddr,
    listener_fd: RawFd,
    closed: Cell<bool>,
    handler: RefCell<Handler>,
    conns: RefCell<HashMap<u64, Rc<ServerConn>>>,
    next_conn: Cell<u64>,
    stats: Cell<LinkStats>,
}

/// One accepted connection.
struct ServerConn {
    /// The node at the other end, from its `HELLO`.
    from: NodeId,
    max_payload: usize,
    state: RefCell<ServerConnState>,
    writer_wake: Signal,
    server: Rc<ServerShared>,
}

struct ServerConnState {
    /// Taken out (and shut down) when the connection ends.
    socket: Option<RawFd>,
    /// Replies not yet handed to the writer.
    out: Vec<u8>,
}

impl LinkServer {
    /// Binds `addr` without `SO_REUSEPORT` (monoio's default turns it on, which would
    /// let two nodes on one host silently share a port and each other's requests),
    /// then [`LinkServer::start`]s.
    pub fn bind(
        addr: SocketAddr,
        me: NodeId,
        config: LinkConfig,
        handler: impl FnMut(Bytes, Responder) + 'static,
    ) -> std::io::Result<LinkServer> {
        let opts = monoio::net::ListenerOpts::new().reuse_port(false);
        let listener = TcpListener::bind_with_config(addr, &opts)?;
        LinkServer::start(listener, me, config, handler)
    }

    /// Serves `listener` as node `me`; `handler` gets every request.
    pub fn start(
        listener: TcpListener,
        me: NodeId,
        config: LinkConfig,
        handler: impl FnMut(Bytes, Responder) + 'static,
    ) -> std::io::Result<LinkServer> {
        let local_addr = listener.local_addr()?;
        let shared = Rc::new(ServerShared {
            me,
            config,
            local_addr,
            listener_fd: listener.as_raw_fd(),
            closed: Cell::new(false),
            handler: RefCell::new(Box::new(handler)),
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(0),
            stats: Cell::new(LinkStats::default()),
        });
        monoio::spawn(accept_loop(shared.clone(), listener));
        Ok(LinkServer { shared })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.conns.borrow().len()
    }

    pub fn stats(&self) -> LinkStats {
        self.shared.stats.get()
    }
}

impl Drop for LinkServer {
    fn drop(&mut self) {
        let shared = &self.shared;
        shared.closed.set(true);
        // SAFETY: the listener is owned by the accept task, which stops on the error
        // this causes and only then drops (closes) it.
        unsafe { libc::shutdown(shared.listener_fd, libc::SHUT_RDWR) };
        let conns: Vec<Rc<ServerConn>> =
            shared.conns.borrow_mut().drain().map(|(_, c)| c).collect();
        for c in conns {
            c.close();
        }
    }
}

async fn accept_loop(server: Rc<ServerShared>, listener: TcpListener) {
    while !server.closed.get() {
        match listener.accept().await {
            Ok((stream, _)) => {
                if server.closed.get() {
                    break;
                }
                monoio::spawn(serve_conn(server.clone(), stream));
            }
            Err(e) if server.closed.get() => {
                tracing::debug!(error = %e, "cluster link server stopped");
                break;
            }
            Err(e) => {
                // EMFILE and the like: wait a little instead of spinning.
                tracing::warn!(error = %e, "cluster link accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Checks a `HELLO`: returns the caller's node id, or why it is refused.
fn check_hello(frame: &Frame, me: &NodeId) -> Result<NodeId, String> {
    if frame.kind != KIND_HELLO {
        return Err(format!("expected HELLO, got frame kind {}", frame.kind));
    }
    let text = std::str::from_utf8(&frame.payload).map_err(|_| "HELLO is not UTF-8".to_string())?;
    let mut words = text.split(' ');
    let (Some(version), Some(to), Some(from), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(format!("malformed HELLO {text:?}"));
    };
    if version != LINK_VERSION {
        return Err(format!(
            "protocol {version:?}, this node speaks {LINK_VERSION}"
        ));
    }
    if to != me.as_str() {
        return Err(format!("this is node {me}, not {to}"));
    }
    NodeId::new(from)
}

async fn serve_conn(server: Rc<ServerShared>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::new();
    let hello = monoio::time::timeout(
        server.config.connect_timeout,
        next_frame(&mut stream, &mut buf, 4096),
    )
    .await;
    let checked = match hello {
        Ok(Ok(frame)) => check_hello(&frame, &server.me),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no HELLO in time".to_string()),
    };
    let mut greeting = Vec::new();
    let from = match checked {
        Ok(from) => {
            encode(&mut greeting, KIND_HELLO_OK, 0, b"");
            from
        }
        Err(reason) => {
            bump(&server.stats, |s| s.connect_failures += 1);
            tracing::warn!(%reason, "cluster link refused");
            encode(&mut greeting, KIND_ERROR, 0, reason.as_bytes());
            let _ = stream.write_all(greeting).await;
            return;
        }
    };
    let (res, _) = stream.write_all(greeting).await;
    if res.is_err() || server.closed.get() {
        return;
    }
    bump(&server.stats, |s| s.connects += 1);
    let key = server.next_conn.get();
    server.next_conn.set(key + 1);
    let conn = Rc::new(ServerConn {
        from,
        max_payload: server.config.max_payload,
        state: RefCell::new(ServerConnState {
            socket: Some(stream.as_raw_fd()),
            out: Vec::new(),
        }),
        writer_wake: Signal::default(),
        server: server.clone(),
    });
    server.conns.borrow_mut().insert(key, conn.clone());
    let (mut reader, writer) = stream.into_split();
    monoio::spawn(write_loop(conn.clone(), 0, writer));
    let reason = loop {
        match next_frame(&mut reader, &mut buf, server.config.max_payload).await {
            Ok(frame) if frame.kind == KIND_REQUEST => {
                let responder = Responder {
                    conn: conn.clone(),
                    id: frame.id,
                    answered: false,
                };
                (server.handler.borrow_mut())(frame.payload, responder);
            }
            Ok(frame) => break format!("unexpected frame kind {} from a client", frame.kind),
            Err(e) => break e,
        }
        if conn.state.borrow().socket.is_none() {
            break "closed".to_string();
        }
    };
    tracing::debug!(from = %conn.from, %reason, "cluster link connection ended");
    conn.close();
    server.conns.borrow_mut().remove(&key);
}

impl ServerConn {
    fn close(&self) {
        let mut st = self.state.borrow_mut();
        if let Some(fd) = st.socket.take() {
            // SAFETY: the halves are dropped only after their tasks see `socket` gone.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        st.out.clear();
        drop(st);
        self.writer_wake.wake();
    }

    fn queue(&self, kind: u8, id: u64, payload: &[u8]) {
        let mut st = self.state.borrow_mut();
        if st.socket.is_none() {
            return;
        }
        encode(&mut st.out, kind, id, payload);
        drop(st);
        self.writer_wake.wake();
    }
}

impl Outbox for ServerConn {
    fn take_out(&self, _epoch: u64, batch: &mut Vec<u8>) -> Option<bool> {
        let mut st = self.state.borrow_mut();
        if st.socket.is_none() {
            None
        } else if st.out.is_empty() {
            Some(false)
        } else {
            std::mem::swap(&mut st.out, batch);
            Some(true)
        }
    }

    fn signal(&self) -> &Signal {
        &self.writer_wake
    }

    fn write_failed(&self, _epoch: u64, reason: String) {
        tracing::debug!(from = %self.from, %reason, "cluster link write failed");
        self.close();
    }

    fn stats(&self) -> &Cell<LinkStats> {
        &self.server.stats
    }
}

/// The way to answer one request. Answer with [`Responder::reply`] or
/// [`Responder::refuse`]; dropping it unanswered refuses the request (the caller gets
/// [`LinkError::Refused`] at once instead of waiting for its timeout). Answering after
/// the connection closed does nothing.
pub struct Responder {
    conn: Rc<ServerConn>,
    id: u64,
    answered: bool,
}

impl Responder {
    /// The node that sent the request.
    pub fn from(&self) -> &NodeId {
        &self.conn.from
    }

    /// Sends `payload` as the reply (in the same write as the turn's other replies on
    /// this connection). A reply over the payload limit is sent as a refusal.
    pub fn reply(mut self, payload: &[u8]) {
        self.answered = true;
        if payload.len() > self.conn.max_payload {
            let reason = format!(
                "reply of {} bytes is over the {}-byte limit",
                payload.len(),
                self.conn.max_payload
            );
            self.conn.queue(KIND_ERROR, self.id, reason.as_bytes());
        } else {
            self.conn.queue(KIND_REPLY, self.id, payload);
        }
    }

    /// Answers with an error: the caller gets [`LinkError::Refused`] with `reason`.
    pub fn refuse(mut self, reason: &str) {
        self.answered = true;
        self.conn.queue(KIND_ERROR, self.id, reason.as_bytes());
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.answered {
            self.conn
                .queue(KIND_ERROR, self.id, b"dropped without a reply");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_split_anywhere() {
        let mut wire = Vec::new();
        encode(&mut wire, KIND_REQUEST, 7, b"hello");
        encode(&mut wire, KIND_REPLY, u64::MAX, b"");
        encode(&mut wire, KIND_ERROR, 1, &vec![b'x'; 100_000]);
        for cut in [1usize, 3, 13, 4096, wire.len()] {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                buf.extend_from_slice(chunk);
                while let Some(f) = decode(&mut buf, 1 << 20).unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got.len(), 3, "cut {cut}");
            assert_eq!(
                (got[0].kind, got[0].id, &got[0].payload[..]),
                (KIND_REQUEST, 7, &b"hello"[..])
            );
            assert_eq!(
                (got[1].kind, got[1].id, got[1].payload.len()),
                (KIND_REPLY, u64::MAX, 0)
            );
            assert_eq!(got[2].payload.len(), 100_000);
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 1, 2, 3][..]);
        assert!(decode(&mut buf, 100).is_err());
        let mut wire = Vec::new();
        encode(&mut wire, KIND_REQUEST, 1, &[0u8; 101]);
        let mut buf = BytesMut::from(&wire[..20]);
        assert!(decode(&mut buf, 100)
            .unwrap_err()
            .contains("over the 100-byte limit"));
    }

    #[test]
    fn random_bytes_never_panic_and_never_overrun() {
        use rand::{Rng, RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..20_000 {
            let mut input = vec![0u8; rng.random_range(0..64)];
            rng.fill_bytes(&mut input);
            if rng.random_bool(0.5) && input.len() >= 4 {
                // A plausible length prefix, so whole frames come out too.
                let len = rng.random_range(0..input.len() as u32);
                input[..4].copy_from_slice(&len.to_be_bytes());
            }
            let mut buf = BytesMut::from(&input[..]);
            let mut taken = 0;
            while let Ok(Some(f)) = decode(&mut buf, 32) {
                taken += FRAME_HEADER + f.payload.len();
                assert!(f.payload.len() <= 32);
            }
            assert!(taken + buf.len() == input.len());
        }
    }

    #[test]
    fn hello_checks() {
        let me = NodeId::new("n1").unwrap();
        let hello = |text: &str| Frame {
            kind: KIND_HELLO,
            id: 0,
            payload: Bytes::copy_from_slice(text.as_bytes()),
        };
        assert_eq!(
            check_hello(&hello("imshard-link/1 n1 n2"), &me),
            Ok(NodeId::new("n2").unwrap())
        );
        assert!(check_hello(&hello("imshard-link/1 n3 n2"), &me)
            .unwrap_err()
            .contains("not n3"));
        assert!(check_hello(&hello("imshard-link/9 n1 n2"), &me).is_err());
        assert!(check_hello(&hello("imshard-link/1 n1"), &me).is_err());
        assert!(check_hello(&hello("imshard-link/1 n1 bad!id"), &me).is_err());
    }
}
