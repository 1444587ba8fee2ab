//! One loadgen thread's connections: connect (bind-before-connect, upgrade with a
//! token), a reader task per connection that decodes envelopes and feeds the stats and
//! the checker, and a coalescing writer task per connection.
//!
//! Everything here lives on one thread ([`Ctx`] is `Rc`-shared between that thread's
//! tasks); no locks, no atomics on the hot path.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use imshard::proto::pb::{self, client_frame::Body, ClientFrame, MessageEnvelope, MsgItem};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use prost::Message as _;

use crate::checker::{Checker, StreamId};
use crate::stats::{record_ns, Stats};
use crate::sys::{self, now_ns};
use crate::ws;

/// Largest server frame the reader accepts.
const MAX_FRAME: u64 = 16 << 20;

/// Where the run is; tasks look at it to know when to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and creating groups.
    Setup,
    /// Sending.
    Load,
    /// No new sends; waiting for outstanding acks and pushes.
    Drain,
    /// Closing: disconnects are no longer failures.
    Done,
}

/// A server (or cluster node) the loadgen connects to.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Host header value (the address as given).
    pub host: String,
}

/// Settings every connection of a run shares.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    /// Never empty: user i connects to `targets[i % len]` ([`ConnSettings::target_for`]).
    pub targets: Vec<Target>,
    /// WebSocket path, `/ws`.
    pub path: String,
    pub connect_timeout: Duration,
    /// Acknowledge pushes with PushAcks, as a real client does.
    pub push_ack: bool,
    /// PushAcks are cumulative per conversation (docs/PROTOCOL.md): a connection sends
    /// one ack per conversation with the highest seq it got, once `ack_batch` pushes
    /// are unacknowledged or every `ack_interval` (by [`ack_ticker`]), whichever
    /// comes first. `ack_batch` 1 = one ack per push.
    pub ack_batch: u32,
    pub ack_interval: Duration,
    /// Initial read buffer per connection (grows for large frames).
    pub read_chunk: usize,
}

impl ConnSettings {
    /// The target of the user with global index `i`: round robin over the targets.
    pub fn target_for(&self, i: usize) -> &Target {
        &self.targets[i % self.targets.len().max(1)]
    }
}

/// One thread's shared state: its stats, its checker and its connections.
pub struct Ctx {
    pub settings: ConnSettings,
    pub stats: RefCell<Stats>,
    pub checker: RefCell<Checker>,
    pub phase: Cell<Phase>,
    pub conns: RefCell<Vec<Rc<Conn>>>,
    /// Seed for connection mask generators.
    seed: Cell<u64>,
}

impl Ctx {
    pub fn new(settings: ConnSettings, seed: u64) -> Rc<Ctx> {
        Rc::new(Ctx {
            settings,
            stats: RefCell::new(Stats::default()),
            checker: RefCell::new(Checker::new()),
            phase: Cell::new(Phase::Setup),
            conns: RefCell::new(Vec::new()),
            seed: Cell::new(seed | 1),
        })
    }

    fn next_seed(&self) -> u64 {
        let s = xorshift(self.seed.get());
        self.seed.set(s);
        s
    }

    /// Sends and heartbeats still waiting for their RESPONSE, over all connections.
    pub fn pending_requests(&self) -> u64 {
        self.conns
            .borrow()
            .iter()
            .map(|c| c.pending.borrow().len() as u64)
            .sum()
    }

    /// Wakes every sender waiting for window room (used when the phase changes).
    pub fn wake_senders(&self) {
        for c in self.conns.borrow().iter() {
            if let Some(w) = c.window_waker.take() {
                w.wake();
            }
        }
    }

    /// Ends the run: shuts every socket so readers and writers return.
    pub fn close_all(&self) {
        self.phase.set(Phase::Done);
        for c in self.conns.borrow().iter() {
            c.close();
        }
    }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A request waiting for its RESPONSE.
enum Pending {
    Send {
        /// When the send was due (its slot in the schedule; with `--rate 0`, when it
        /// was written): latency counts from here, so a loadgen or server that falls
        /// behind its schedule shows up in the numbers (no coordinated omission).
        due_ns: u64,
        stream: StreamId,
    },
    Heartbeat {
        sent_ns: u64,
    },
    /// A setup request (CreateGroup) whose caller awaits the answer.
    Call(Rc<Slot>),
}

/// A RESPONSE handed to a waiting caller.
#[derive(Default)]
pub struct Slot {
    value: RefCell<Option<pb::Response>>,
    waker: Cell<Option<Waker>>,
}

impl Slot {
    fn fill(&self, r: pb::Response) {
        *self.value.borrow_mut() = Some(r);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// One authenticated WebSocket connection (one user, one device).
pub struct Conn {
    pub user: String,
    fd: i32,
    /// Frames waiting for the writer task; appended to, taken whole.
    out: RefCell<Vec<u8>>,
    out_waker: Cell<Option<Waker>>,
    closed: Cell<bool>,
    mask_state: Cell<u64>,
    next_req: Cell<u64>,
    pending: RefCell<HashMap<u64, Pending>>,
    /// Sends not yet answered (the window of a sender).
    pub in_flight: Cell<u32>,
    window_waker: Cell<Option<Waker>>,
    /// conv_id -> this connection's receiving stream in the checker.
    streams: RefCell<Vec<(String, StreamId)>>,
    /// conv_id -> highest seq pushed and not yet acknowledged; pushes since the last
    /// acks went out.
    acks_due: RefCell<Vec<(String, i64)>>,
    unacked: Cell<u32>,
}

/// Why a connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    Tcp(std::io::Error),
    Upgrade(ws::WsError),
    /// The server closed before answering the upgrade.
    ClosedEarly,
    Timeout,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Tcp(e) => write!(f, "TCP connect: {e}"),
            ConnectError::Upgrade(e) => write!(f, "{e}"),
            ConnectError::ClosedEarly => write!(f, "server closed before answering the upgrade"),
            ConnectError::Timeout => write!(f, "connect + upgrade timed out"),
        }
    }
}

/// TCP connect from `source` plus the WebSocket upgrade; returns the stream and any
/// bytes read past the upgrade answer.
async fn open(
    settings: &ConnSettings,
    target: &Target,
    source: Option<IpAddr>,
    token: &str,
    key_bytes: [u8; 16],
) -> Result<(TcpStream, Vec<u8>), ConnectError> {
    let std_stream = sys::start_connect(target.addr, source).map_err(ConnectError::Tcp)?;
    let mut stream = TcpStream::from_std(std_stream).map_err(ConnectError::Tcp)?;
    stream.writable(false).await.map_err(ConnectError::Tcp)?;
    sys::take_socket_error(stream.as_raw_fd()).map_err(ConnectError::Tcp)?;
    let key = ws::key_from_bytes(key_bytes);
    let req = ws::upgrade_request(&target.host, &settings.path, token, &key);
    let (res, _) = stream.write_all(req).await;
    res.map_err(ConnectError::Tcp)?;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        if let Some(n) = ws::parse_upgrade_response(&buf, &key).map_err(ConnectError::Upgrade)? {
            buf.drain(..n);
            return Ok((stream, buf));
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(1024);
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = stream.read(buf.slice_mut(len..cap)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => return Err(ConnectError::ClosedEarly),
            Ok(_) => {}
            Err(e) => return Err(ConnectError::Tcp(e)),
        }
    }
}

/// Connects one user to `target` and starts its reader and writer tasks. On failure
/// the error is counted in the stats and returned.
pub async fn connect(
    ctx: &Rc<Ctx>,
    user: String,
    target: &Target,
    source: Option<IpAddr>,
    token: &str,
) -> Result<Rc<Conn>, ConnectError> {
    let started = now_ns();
    let a = ctx.next_seed();
    let b = xorshift(a);
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&a.to_le_bytes());
    key[8..].copy_from_slice(&b.to_le_bytes());
    let result = match monoio::time::timeout(
        ctx.settings.connect_timeout,
        open(&ctx.settings, target, source, token, key),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    };
    let (stream, leftover) = match result {
        Ok(s) => s,
        Err(e) => {
            let mut st = ctx.stats.borrow_mut();
            st.connects_failed += 1;
            st.note_failure(|| format!("connect {user}: {e}"));
            return Err(e);
        }
    };
    let done = now_ns();
    {
        let mut st = ctx.stats.borrow_mut();
        record_ns(&mut st.connect_us, done - started);
        st.connected(started, done);
    }
    let conn = Rc::new(Conn {
        user,
        fd: stream.as_raw_fd(),
        out: RefCell::new(Vec::new()),
        out_waker: Cell::new(None),
        closed: Cell::new(false),
        mask_state: Cell::new(xorshift(b) | 1),
        next_req: Cell::new(1),
        pending: RefCell::new(HashMap::new()),
        in_flight: Cell::new(0),
        window_waker: Cell::new(None),
        streams: RefCell::new(Vec::new()),
        acks_due: RefCell::new(Vec::new()),
        unacked: Cell::new(0),
    });
    ctx.conns.borrow_mut().push(conn.clone());
    let (rd, wr) = stream.into_split();
    monoio::spawn(reader(ctx.clone(), conn.clone(), rd, leftover));
    monoio::spawn(writer(ctx.clone(), conn.clone(), wr));
    Ok(conn)
}

impl Conn {
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Makes this connection a receiver of `conv_id` in the checker.
    pub fn add_stream(&self, conv_id: String, stream: StreamId) {
        self.streams.borrow_mut().push((conv_id, stream));
    }

    fn stream_of(&self, conv_id: &str) -> Option<StreamId> {
        self.streams
            .borrow()
            .iter()
            .find(|(c, _)| c == conv_id)
            .map(|(_, s)| *s)
    }

    fn mask(&self) -> [u8; 4] {
        let s = xorshift(self.mask_state.get());
        self.mask_state.set(s);
        (s as u32).to_le_bytes()
    }

    fn push_frame(&self, opcode: u8, payload: &[u8]) {
        if self.closed.get() {
            return;
        }
        let mask = self.mask();
        ws::put_frame(&mut self.out.borrow_mut(), opcode, payload, mask);
        if let Some(w) = self.out_waker.take() {
            w.wake();
        }
    }

    fn send_body(&self, body: Body, pending: Option<Pending>) -> u64 {
        let req_id = match pending {
            Some(p) => {
                let id = self.next_req.get();
                self.next_req.set(id + 1);
                self.pending.borrow_mut().insert(id, p);
                id
            }
            None => 0,
        };
        let frame = ClientFrame {
            req_id,
            body: Some(body),
        };
        self.push_frame(ws::OP_BINARY, &frame.encode_to_vec());
        req_id
    }

    /// Sends a message carrying the time it was due (`due_ns`, its slot in the
    /// sender's schedule; `None` = now) and the time it was written; its ack and
    /// pushes are tracked.
    pub fn send_message(
        &self,
        ctx: &Ctx,
        stream: StreamId,
        conv_type: pb::ConvType,
        target: &str,
        pad: &str,
        due_ns: Option<u64>,
    ) {
        let sent_ns = now_ns();
        let due_ns = due_ns.unwrap_or(sent_ns).min(sent_ns);
        let req_id = self.next_req.get();
        let content = format!("{{\"t\":{due_ns},\"w\":{sent_ns},\"p\":\"{pad}\"}}");
        self.in_flight.set(self.in_flight.get() + 1);
        ctx.stats.borrow_mut().sends += 1;
        self.send_body(
            Body::Send(pb::SendMessageRequest {
                conv_type: conv_type as i32,
                target: target.to_string(),
                client_msg_id: format!("c{req_id}"),
                content,
                ..Default::default()
            }),
            Some(Pending::Send { due_ns, stream }),
        );
    }

    /// Sends a heartbeat that asks for a RESPONSE (its round trip is measured).
    pub fn heartbeat(&self, ctx: &Ctx) {
        if self.closed.get() {
            return;
        }
        let sent_ns = now_ns();
        ctx.stats.borrow_mut().heartbeats += 1;
        self.send_body(
            Body::Heartbeat(pb::Heartbeat {
                client_ts: sys::unix_ms() as i64,
            }),
            Some(Pending::Heartbeat { sent_ns }),
        );
    }

    /// Sends a request and waits for its RESPONSE (None if the connection closed).
    pub async fn call(&self, body: Body, wait: Duration) -> Option<pb::Response> {
        let slot = Rc::new(Slot::default());
        self.send_body(body, Some(Pending::Call(slot.clone())));
        let answer = poll_fn(|cx| {
            if let Some(r) = slot.value.borrow_mut().take() {
                return Poll::Ready(Some(r));
            }
            if self.closed.get() {
                return Poll::Ready(None);
            }
            slot.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        });
        monoio::time::timeout(wait, answer).await.ok().flatten()
    }

    /// Waits until fewer than `window` sends are in flight or the load phase is over.
    pub async fn window_room(&self, ctx: &Ctx, window: u32) {
        poll_fn(|cx| {
            if self.in_flight.get() < window || ctx.phase.get() != Phase::Load || self.closed.get()
            {
                return Poll::Ready(());
            }
            self.window_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }

    fn close(&self) {
        if !self.closed.replace(true) {
            sys::shutdown(self.fd);
            if let Some(w) = self.out_waker.take() {
                w.wake();
            }
            if let Some(w) = self.window_waker.take() {
                w.wake();
            }
        }
    }
}

/// Reads frames until the connection ends.
async fn reader(ctx: Rc<Ctx>, conn: Rc<Conn>, mut rd: OwnedReadHalf<TcpStream>, mut buf: Vec<u8>) {
    let chunk = ctx.settings.read_chunk;
    buf.reserve(chunk);
    let mut fragments: Option<(u8, Vec<u8>)> = None;
    loop {
        let mut used = 0;
        loop {
            match ws::parse_frame(&buf[used..], MAX_FRAME) {
                Ok(Some((frame, n))) => {
                    used += n;
                    if !on_frame(&ctx, &conn, frame, &mut fragments) {
                        return ended(&ctx, &conn, None);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    ctx.stats.borrow_mut().bad_frames += 1;
                    return ended(&ctx, &conn, Some(e.to_string()));
                }
            }
        }
        buf.drain(..used);
        if buf.is_empty() && buf.capacity() > 4 * chunk {
            buf = Vec::with_capacity(chunk);
        } else if buf.capacity() - buf.len() < chunk / 2 {
            buf.reserve(chunk);
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = rd.read(buf.slice_mut(len..cap)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => return ended(&ctx, &conn, Some("server closed the connection".into())),
            Ok(_) => {}
            Err(e) => return ended(&ctx, &conn, Some(format!("read: {e}"))),
        }
    }
}

/// The connection is over: a failure unless the run is closing it.
fn ended(ctx: &Ctx, conn: &Conn, why: Option<String>) {
    if ctx.phase.get() != Phase::Done && !conn.closed.get() {
        let mut st = ctx.stats.borrow_mut();
        st.disconnects += 1;
        st.note_failure(|| {
            format!(
                "{} disconnected: {}",
                conn.user,
                why.unwrap_or_else(|| "close frame".into())
            )
        });
    }
    conn.close();
}

/// Handles one frame; false when the server closed the connection.
fn on_frame(
    ctx: &Ctx,
    conn: &Conn,
    frame: ws::Frame<'_>,
    fragments: &mut Option<(u8, Vec<u8>)>,
) -> bool {
    match frame.opcode {
        ws::OP_PING => {
            conn.push_frame(ws::OP_PONG, frame.payload);
            true
        }
        ws::OP_PONG => true,
        ws::OP_CLOSE => false,
        ws::OP_CONTINUE => {
            let Some((op, mut data)) = fragments.take() else {
                ctx.stats.borrow_mut().bad_frames += 1;
                return false;
            };
            data.extend_from_slice(frame.payload);
            if frame.fin {
                on_message(ctx, conn, op, &data);
            } else {
                *fragments = Some((op, data));
            }
            true
        }
        op => {
            if frame.fin {
                on_message(ctx, conn, op, frame.payload);
            } else {
                *fragments = Some((op, frame.payload.to_vec()));
            }
            true
        }
    }
}

fn on_message(ctx: &Ctx, conn: &Conn, opcode: u8, data: &[u8]) {
    if opcode != ws::OP_BINARY {
        ctx.stats.borrow_mut().bad_frames += 1;
        return;
    }
    let Ok(env) = MessageEnvelope::decode(data) else {
        ctx.stats.borrow_mut().bad_frames += 1;
        return;
    };
    match env.r#type.as_str() {
        "RESPONSE" => on_response(ctx, conn, &env),
        "MSG_PUSH" => on_push(ctx, conn, &env),
        "KICKOUT" => {
            let mut st = ctx.stats.borrow_mut();
            st.kicked += 1;
            let reason = pb::KickoutNotice::decode(&*env.data)
                .map(|k| k.reason)
                .unwrap_or_default();
            st.note_failure(|| format!("{} kicked out: {reason}", conn.user));
        }
        _ => {}
    }
}

fn on_response(ctx: &Ctx, conn: &Conn, env: &MessageEnvelope) {
    let now = now_ns();
    let Some(pending) = conn.pending.borrow_mut().remove(&env.req_id) else {
        return;
    };
    let Ok(resp) = pb::Response::decode(&*env.data) else {
        ctx.stats.borrow_mut().bad_frames += 1;
        return;
    };
    match pending {
        Pending::Send { due_ns, stream } => {
            conn.in_flight.set(conn.in_flight.get().saturating_sub(1));
            if let Some(w) = conn.window_waker.take() {
                w.wake();
            }
            let mut st = ctx.stats.borrow_mut();
            if resp.code != 0 {
                *st.send_errors.entry(resp.code).or_insert(0) += 1;
                st.note_failure(|| {
                    format!(
                        "send from {} refused: {} {}",
                        conn.user, resp.code, resp.message
                    )
                });
                return;
            }
            match pb::SendMessageResponse::decode(&*resp.body) {
                Ok(ack) => {
                    st.acks_ok += 1;
                    record_ns(&mut st.ack_us, now.saturating_sub(due_ns));
                    ctx.checker.borrow_mut().acked(stream, ack.seq);
                }
                Err(_) => st.bad_frames += 1,
            }
        }
        Pending::Heartbeat { sent_ns } => {
            let mut st = ctx.stats.borrow_mut();
            st.heartbeat_replies += 1;
            record_ns(&mut st.heartbeat_us, now.saturating_sub(sent_ns));
        }
        Pending::Call(slot) => slot.fill(resp),
    }
}

fn on_push(ctx: &Ctx, conn: &Conn, env: &MessageEnvelope) {
    let now = now_ns();
    let Ok(item) = MsgItem::decode(&*env.data) else {
        ctx.stats.borrow_mut().bad_frames += 1;
        return;
    };
    let system = item.msg_type >= 100;
    if let Some(stream) = conn.stream_of(&item.conv_id) {
        ctx.checker.borrow_mut().pushed(stream, item.seq, system);
    }
    if !system {
        let mut st = ctx.stats.borrow_mut();
        st.pushes += 1;
        if let Some(due) = stamp_of(&item.content, "{\"t\":") {
            record_ns(&mut st.push_us, now.saturating_sub(due));
        }
        if let Some(written) = stamp_of(&item.content, ",\"w\":") {
            record_ns(&mut st.push_write_us, now.saturating_sub(written));
        }
    }
    if ctx.settings.push_ack && env.ack_required {
        conn.ack_later(ctx, item.conv_id, item.seq);
    }
}

/// A timestamp the loadgen put into a message's content after `key` (`{"t":` the
/// time the send was due, `,"w":` the time it was written).
pub fn stamp_of(content: &str, key: &str) -> Option<u64> {
    let at = content.find(key)? + key.len();
    let rest = &content[at..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

impl Conn {
    /// Notes a push to acknowledge; sends the acks once `ack_batch` are due.
    fn ack_later(&self, ctx: &Ctx, conv_id: String, seq: i64) {
        {
            let mut due = self.acks_due.borrow_mut();
            match due.iter_mut().find(|(c, _)| *c == conv_id) {
                Some((_, s)) => *s = (*s).max(seq),
                None => due.push((conv_id, seq)),
            }
        }
        let n = self.unacked.get() + 1;
        self.unacked.set(n);
        if n >= ctx.settings.ack_batch {
            self.flush_acks(ctx);
        }
    }

    /// Sends one cumulative PushAck (req_id 0: no answer) per conversation with
    /// unacknowledged pushes.
    pub fn flush_acks(&self, ctx: &Ctx) {
        if self.unacked.replace(0) == 0 {
            return;
        }
        let due = std::mem::take(&mut *self.acks_due.borrow_mut());
        ctx.stats.borrow_mut().push_acks += due.len() as u64;
        for (conv_id, seq) in due {
            self.send_body(Body::PushAck(pb::PushAck { conv_id, seq }), None);
        }
    }
}

/// The step of [`ack_ticker`]: one tick of monoio's timer wheel.
const ACK_TICK: Duration = Duration::from_millis(1);

/// Sends the acks each connection of this thread owes once per `ack_interval`, until
/// the run ends. Connections are spread over the interval one timer tick (1 ms) apart
/// (connection i flushes in tick i % ticks-per-interval), as independent clients
/// would be. (Flushing every connection at once sent the server 10,000 frames in one
/// instant and overflowed a 1000-packet `netdev_max_backlog`; ten 10 ms slices still
/// made bursts of hundreds. At 50,000 deliveries/s the 1 ms spread measured the same
/// latency as the ten slices: what sets it there is this loop's own load.)
pub async fn ack_ticker(ctx: Rc<Ctx>) {
    if !ctx.settings.push_ack {
        return;
    }
    let slices = (ctx.settings.ack_interval.as_millis() / ACK_TICK.as_millis()).max(1) as u64;
    let tick = ctx.settings.ack_interval / slices as u32;
    let start = monoio::time::Instant::now();
    // Ticks done so far; the timer may fire late, and the ticks it skipped are caught
    // up at once so that every connection still flushes once per interval.
    let mut done = 0u64;
    loop {
        monoio::time::sleep(tick).await;
        if ctx.phase.get() == Phase::Done {
            return;
        }
        let due = (start.elapsed().as_nanos() / tick.as_nanos().max(1)) as u64;
        while done < due {
            done += 1;
            let slice = (done % slices) as usize;
            for c in ctx
                .conns
                .borrow()
                .iter()
                .skip(slice)
                .step_by(slices as usize)
            {
                c.flush_acks(&ctx);
            }
        }
    }
}

/// Writes whatever the connection's tasks queued, one write per batch.
async fn writer(ctx: Rc<Ctx>, conn: Rc<Conn>, mut wr: OwnedWriteHalf<TcpStream>) {
    loop {
        poll_fn(|cx| {
            if !conn.out.borrow().is_empty() || conn.closed.get() {
                return Poll::Ready(());
            }
            conn.out_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        if conn.closed.get() {
            return;
        }
        let data = std::mem::take(&mut *conn.out.borrow_mut());
        let (res, mut data) = wr.write_all(data).await;
        if let Err(e) = res {
            return ended(&ctx, &conn, Some(format!("write: {e}")));
        }
        data.clear();
        let mut out = conn.out.borrow_mut();
        if out.is_empty() && out.capacity() == 0 && data.capacity() <= 64 * 1024 {
            *out = data;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_roundtrip() {
        let c = "{\"t\":123456,\"w\":123999,\"p\":\"xx\"}";
        assert_eq!(stamp_of(c, "{\"t\":"), Some(123456));
        assert_eq!(stamp_of(c, ",\"w\":"), Some(123999));
        assert_eq!(stamp_of("{\"x\":1}", "{\"t\":"), None);
        assert_eq!(stamp_of("{\"t\":12", "{\"t\":"), None);
    }
}
