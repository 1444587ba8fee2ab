//! A WebSocket connection owned by its user's shard.
//!
//! Memory while idle is the [`Conn`] struct, the reader task waiting on a readiness
//! poll (an io_uring PollAdd, no buffer), one wheel entry and the user's entry in the
//! shard map. Bytes are read synchronously, after readiness, into the shard's one read
//! buffer; a partial frame is the only thing a connection keeps between reads.
//!
//! Writes are coalesced: frames queue in `out` and one writer task per busy connection
//! drains the queue with a single write per batch. A connection whose queue passes
//! `outbound_queue_bytes` is cut (slow reader): it resyncs by seq on reconnect, and
//! nothing is lost because everything pushed was already stored.
//!
//! What a client cannot do to the shard:
//! - keep a connection alive with bytes alone: only a complete message or a control
//!   frame counts as activity for the heartbeat, and a started message must complete
//!   within `frame_timeout` (close 1008);
//! - hold unbounded memory with unfinished messages: the shard's total is capped by
//!   `frame_memory_bytes` (the connection that would pass it is closed with 1013);
//! - queue unbounded work: at most `max_requests_in_flight` requests per connection
//!   are served at once (the rest wait unread in the socket), and no connection reads
//!   while the shard is behind ([`Shard::input_allowed`]);
//! - keep a socket after a close: a closing connection lingers at most
//!   [`CLOSE_LINGER_SECS`] for the client's close, then is aborted.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use prost::Message as _;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use super::msg::HandOver;
use super::{Service, Shard};
use crate::codes::{close, kick, ApiError};
use crate::proto::envelope::{self, decode_client_frame, FrameError};
use crate::proto::pb::{client_frame::Body, ClientFrame, HeartbeatResponse};
use crate::proto::{http, json, ws};

/// Bytes read per `recv` (the shard's read buffer size).
const READ_CHUNK: usize = 64 * 1024;
/// A closing connection waits at most this long (seconds) for its close frame to be
/// written and the client's close, then is aborted.
pub const CLOSE_LINGER_SECS: u32 = 2;
/// `Conn::partial_since` when the connection holds no unfinished message.
const NO_PARTIAL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// A close frame is queued. Once it is written the server sends FIN and keeps
    /// reading (and dropping) until the client closes too, so the kernel never
    /// answers unread bytes with a reset that could swallow the close frame. The
    /// heartbeat wheel aborts a client that never finishes.
    Closing,
    Closed,
}

/// One connection. Shared (`Rc`) by the reader task, the writer task while it runs,
/// the user's device list and (weakly) the timer wheel.
pub struct Conn {
    pub id: u64,
    pub user: Box<str>,
    pub device: Box<str>,
    pub device_type: Box<str>,
    fd: RawFd,
    phase: Cell<Phase>,
    /// Frames waiting to be written, and their total size.
    out: RefCell<VecDeque<Bytes>>,
    out_bytes: Cell<usize>,
    /// The write half; taken by the writer task while it writes.
    writer: RefCell<Option<OwnedWriteHalf<TcpStream>>>,
    writing: Cell<bool>,
    /// Wheel second of the last complete message or control frame received.
    pub last_active: Cell<u32>,
    /// Wheel second at which the unfinished message now held started (`NO_PARTIAL`).
    partial_since: Cell<u32>,
    /// The wheel second this connection is filed under (see `timer`).
    filed_at: Cell<u32>,
    /// Requests of this connection being served.
    in_flight: Cell<u16>,
    /// Speaks the `imshard.v1.json` subprotocol: text frames with JSON. Frames are
    /// still built as protobuf (shared by all recipients) and converted in [`Conn::send`].
    json: bool,
}

impl Conn {
    pub fn is_open(&self) -> bool {
        self.phase.get() == Phase::Open
    }

    /// Whether requests of this connection are being served.
    pub fn has_requests_in_flight(&self) -> bool {
        self.in_flight.get() > 0
    }

    /// Queues a frame; starts the writer if it is not running. Cuts a slow reader.
    pub fn send<S: Service>(self: &Rc<Self>, shard: &Rc<Shard<S>>, frame: Bytes) {
        self.send_reply(shard, frame, None);
    }

    /// [`Conn::send`] for a RESPONSE whose body is a `body_type` (the XxxResponse
    /// name, see [`json::response_type`]), which a JSON connection needs to decode it.
    fn send_reply<S: Service>(
        self: &Rc<Self>,
        shard: &Rc<Shard<S>>,
        frame: Bytes,
        body_type: Option<&'static str>,
    ) {
        if self.phase.get() != Phase::Open {
            return;
        }
        let frame = if self.json {
            match json::text_frame(&frame, body_type) {
                Ok(text) => text,
                Err(e) => {
                    tracing::warn!(user = %self.user, device = %self.device, error = %e,
                        "dropping a frame a JSON connection cannot get");
                    return;
                }
            }
        } else {
            frame
        };
        let size = self.out_bytes.get() + frame.len();
        if size > shard.cfg.outbound_queue_bytes {
            super::Counters::bump(&shard.counters.slow_reader_cuts);
            tracing::info!(user = %self.user, device = %self.device, queued = size,
                reason = kick::SLOW_READER, "cutting a connection");
            self.out.borrow_mut().clear();
            self.out_bytes.set(0);
            self.close(shard, close::KICKED, Some(kick::SLOW_READER));
            return;
        }
        self.out_bytes.set(size);
        self.out.borrow_mut().push_back(frame);
        self.start_writer(shard);
    }

    /// Queues an optional KICKOUT and a close frame, then shuts the socket down.
    pub fn close<S: Service>(
        self: &Rc<Self>,
        shard: &Rc<Shard<S>>,
        code: u16,
        kick_reason: Option<&str>,
    ) {
        if self.phase.get() != Phase::Open {
            return;
        }
        let why = crate::metrics::Cut::of(code, kick_reason, shard.draining.get());
        shard.counters.cut(why);
        if let Some(reason) = kick_reason {
            self.send(shard, envelope::kickout_frame(reason));
        }
        self.push_raw(ws::close_frame(code, kick_reason.unwrap_or("")));
        self.phase.set(Phase::Closing);
        self.start_writer(shard);
        let now = shard.timers.borrow().now();
        self.file_by(shard, now + CLOSE_LINGER_SECS);
    }

    /// Files the connection in the wheel at `at` unless it is filed earlier already
    /// (or at all: an entry whose second is `now` is being handled by the ticker).
    fn file_by<S: Service>(self: &Rc<Self>, shard: &Shard<S>, at: u32) {
        let mut timers = shard.timers.borrow_mut();
        let filed = self.filed_at.get();
        if at < filed || filed <= timers.now() {
            self.filed_at.set(timers.insert(Rc::downgrade(self), at));
        }
    }

    /// Ends the connection now, without writing anything more.
    pub fn abort(&self) {
        if self.phase.replace(Phase::Closed) != Phase::Closed {
            // SAFETY: plain syscall on a descriptor this connection owns; shutting
            // down wakes the reader (EOF) and fails a pending write.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        }
    }

    /// Sends FIN after the close frame; reading goes on until the client's EOF.
    fn half_close(&self) {
        if self.phase.get() == Phase::Closing {
            // SAFETY: plain syscall on a descriptor this connection owns.
            unsafe { libc::shutdown(self.fd, libc::SHUT_WR) };
        }
    }

    fn push_raw(&self, frame: Bytes) {
        self.out_bytes.set(self.out_bytes.get() + frame.len());
        self.out.borrow_mut().push_back(frame);
    }

    fn start_writer<S: Service>(self: &Rc<Self>, shard: &Rc<Shard<S>>) {
        if !self.writing.replace(true) {
            monoio::spawn(write_loop(self.clone(), shard.clone()));
        }
    }
}

/// Drains the queue: one write per batch of frames.
async fn write_loop<S: Service>(conn: Rc<Conn>, shard: Rc<Shard<S>>) {
    let Some(mut w) = conn.writer.borrow_mut().take() else {
        conn.writing.set(false);
        return;
    };
    // When the frames of the next write began to wait: now (the first was just
    // queued), then the end of each write.
    let mut waiting_since = std::time::Instant::now();
    loop {
        let batch = {
            let mut q = conn.out.borrow_mut();
            match q.len() {
                0 => None,
                1 => q.pop_front(),
                _ => {
                    let mut buf = BytesMut::with_capacity(conn.out_bytes.get());
                    for f in q.drain(..) {
                        buf.extend_from_slice(&f);
                    }
                    Some(buf.freeze())
                }
            }
        };
        let Some(batch) = batch else { break };
        conn.out_bytes
            .set(conn.out_bytes.get().saturating_sub(batch.len()));
        let (res, _) = w.write_all(batch).await;
        if res.is_err() {
            conn.abort();
            break;
        }
        let done = std::time::Instant::now();
        shard
            .counters
            .recorded
            .write_wait
            .observe(done.duration_since(waiting_since).as_micros() as u64);
        waiting_since = done;
    }
    *conn.writer.borrow_mut() = Some(w);
    conn.writing.set(false);
    conn.half_close();
}

/// Called on the owning shard for a connection another shard accepted.
pub fn adopt<S: Service>(shard: &Rc<Shard<S>>, h: HandOver) {
    shard
        .counters
        .handovers
        .set(shard.counters.handovers.get() + 1);
    // SAFETY: the fd came out of a TcpStream on the accepting shard (into_raw_fd) and
    // nothing else owns it.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
    match TcpStream::from_std(std_stream) {
        Ok(stream) => {
            monoio::spawn(upgrade(
                shard.clone(),
                stream,
                Upgrade {
                    user: h.user,
                    device: h.device,
                    device_type: h.device_type,
                    ws_key: h.ws_key,
                    subprotocol: h.subprotocol,
                    leftover: h.leftover,
                },
            ));
        }
        Err(e) => tracing::warn!(error = %e, "handed-over socket unusable"),
    }
}

/// An authenticated upgrade request, ready for the 101.
pub struct Upgrade {
    pub user: String,
    pub device: String,
    pub device_type: String,
    pub ws_key: String,
    pub subprotocol: json::Negotiated,
    pub leftover: Vec<u8>,
}

/// Answers 101, registers the connection (replacing one of the same device) and runs
/// its reader until it closes.
pub async fn upgrade<S: Service>(shard: Rc<Shard<S>>, mut stream: TcpStream, up: Upgrade) {
    let Upgrade {
        user,
        device,
        device_type,
        ws_key,
        subprotocol,
        leftover,
    } = up;
    let resp = http::upgrade_response(&ws::accept_key(ws_key.as_bytes()), subprotocol.echo);
    drop(ws_key);
    // A fresh socket's send buffer always takes the 101 at once; the async write (in a
    // box, so its state does not stay in the connection's task) is the fallback.
    let sent = match send_now(stream.as_raw_fd(), &resp) {
        Ok(n) => n,
        Err(_) => return,
    };
    if sent < resp.len()
        && Box::pin(stream.write_all(resp[sent..].to_vec()))
            .await
            .0
            .is_err()
    {
        return;
    }
    drop(resp);
    let fd = stream.as_raw_fd();
    let (rd, wr) = stream.into_split();
    let now = shard.timers.borrow().now();
    let id = shard.next_conn_id.get();
    shard.next_conn_id.set(id + 1);
    let conn = Rc::new(Conn {
        id,
        user: user.into_boxed_str(),
        device: device.into_boxed_str(),
        device_type: device_type.into_boxed_str(),
        fd,
        phase: Cell::new(Phase::Open),
        out: RefCell::new(VecDeque::new()),
        out_bytes: Cell::new(0),
        writer: RefCell::new(Some(wr)),
        writing: Cell::new(false),
        last_active: Cell::new(now),
        partial_since: Cell::new(NO_PARTIAL),
        filed_at: Cell::new(0),
        in_flight: Cell::new(0),
        json: subprotocol.json,
    });
    {
        let mut timers = shard.timers.borrow_mut();
        let at = now + timers.timeout();
        conn.filed_at.set(timers.insert(Rc::downgrade(&conn), at));
    }
    if let Some(old) = S::conn_opened(&shard, &conn) {
        old.close(&shard, close::KICKED, Some(kick::REPLACED));
    }
    S::conn_seen(&shard, &conn);
    if shard.draining.get() {
        // Handed over just as shutdown began.
        conn.close(&shard, close::GOING_AWAY, None);
    }
    super::Counters::bump(&shard.counters.connections);
    super::Counters::bump(&shard.counters.connections_total);
    shard
        .global
        .connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The connection's long-lived task holds only the reader's state; this task (the
    // handshake's strings and buffers) ends here.
    monoio::spawn(run(shard, conn, rd, leftover));
}

/// Reads until the connection ends, then unregisters it.
async fn run<S: Service>(
    shard: Rc<Shard<S>>,
    conn: Rc<Conn>,
    rd: OwnedReadHalf<TcpStream>,
    leftover: Vec<u8>,
) {
    read_loop(&shard, &conn, rd, leftover).await;
    conn.abort();
    S::conn_closed(&shard, &conn);
    shard.push_acks.borrow_mut().forget(conn.id);
    shard
        .counters
        .connections
        .set(shard.counters.connections.get() - 1);
    shard
        .global
        .connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

/// Waits until fewer than `max_requests_in_flight` requests of `conn` are served.
/// The waker sits in the shard's map only while the reader waits.
async fn requests_below_limit<S: Service>(shard: &Rc<Shard<S>>, conn: &Conn) {
    let max = shard.cfg.max_requests_in_flight;
    std::future::poll_fn(|cx| {
        if conn.in_flight.get() < max || conn.phase.get() != Phase::Open {
            shard.paused_readers.borrow_mut().remove(&conn.id);
            std::task::Poll::Ready(())
        } else {
            shard
                .paused_readers
                .borrow_mut()
                .insert(conn.id, cx.waker().clone());
            std::task::Poll::Pending
        }
    })
    .await
}

/// Sends what fits right away (`send` with MSG_DONTWAIT); the number of bytes sent.
fn send_now(fd: RawFd, data: &[u8]) -> std::io::Result<usize> {
    // SAFETY: the pointer and length describe `data`.
    let n = unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n >= 0 {
        return Ok(n as usize);
    }
    match std::io::Error::last_os_error() {
        e if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        e => Err(e),
    }
}

/// What one non-blocking read gave.
enum Read {
    /// This many bytes, now at the front of the buffer.
    Data(usize),
    /// Nothing to read right now: wait for readiness.
    WouldBlock,
    /// The peer closed or the socket failed.
    End,
}

/// Reads what the socket has into `buf` without waiting (`recv` with MSG_DONTWAIT).
fn recv_now(fd: RawFd, buf: &mut Vec<u8>) -> Read {
    buf.clear();
    // SAFETY: the pointer and length describe `buf`'s spare capacity, which recv fills
    // with at most that many bytes; set_len only covers what recv reported written.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.capacity(),
            libc::MSG_DONTWAIT,
        )
    };
    match n {
        n if n > 0 => {
            // SAFETY: recv wrote n <= capacity bytes.
            unsafe { buf.set_len(n as usize) };
            Read::Data(n as usize)
        }
        0 => Read::End,
        _ => match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Read::WouldBlock,
            _ => Read::End,
        },
    }
}

/// Reads frames until the peer goes away. After the server starts closing, input is
/// read and dropped until the client's EOF.
///
/// Reads are readiness-based: the connection waits on an io_uring PollAdd (no buffer),
/// then reads synchronously with `recv(MSG_DONTWAIT)` into the shard's one read buffer
/// and handles every complete frame at once. No read is ever in flight with a buffer of
/// its own, so 100,000 connections waking together (a heartbeat wave, a close storm)
/// still use one buffer per shard; only a partial frame is kept per connection.
async fn read_loop<S: Service>(
    shard: &Rc<Shard<S>>,
    conn: &Rc<Conn>,
    rd: OwnedReadHalf<TcpStream>,
    mut pending: Vec<u8>,
) {
    let mut input = Input {
        asm: ws::Assembler::default(),
        held: 0,
    };
    if pending.is_empty() {
        // The handshake's read buffer comes along empty but with its capacity (a few
        // hundred bytes): an idle connection must not keep it.
        pending = Vec::new();
    }
    let mut wait = false;
    loop {
        if !pending.is_empty() && conn.is_open() {
            let progressed = process(shard, conn, &mut pending, &mut input.asm);
            input.account(shard, conn, &mut pending, progressed);
        }
        if !conn.is_open() && !pending.is_empty() {
            pending = Vec::new();
            input.account(shard, conn, &mut pending, false);
        }
        if conn.phase.get() == Phase::Closed {
            break;
        }
        if conn.is_open() {
            // Boxed: these futures would otherwise sit in every idle connection's task.
            if conn.in_flight.get() >= shard.cfg.max_requests_in_flight {
                Box::pin(requests_below_limit(shard, conn)).await;
                continue;
            }
            Box::pin(shard.input_allowed()).await;
        }
        if wait {
            // SAFETY: monoio's split halves share the stream through an UnsafeCell the
            // same way its own read and write futures do; `readable` only clones the
            // fd into a PollAdd op and never touches the stream's other state.
            let stream = unsafe { &*rd.0.get() };
            if stream.readable(false).await.is_err() {
                break;
            }
        }
        // Borrowed and returned with no await in between: one buffer per shard.
        let mut buf = shard.take_read_buf(READ_CHUNK);
        let n = match recv_now(conn.fd, &mut buf) {
            Read::Data(n) => n,
            Read::WouldBlock => {
                shard.give_read_buf(buf);
                wait = true;
                continue;
            }
            Read::End => {
                shard.give_read_buf(buf);
                break;
            }
        };
        // A short read drained the socket: wait for readiness next time.
        wait = n < buf.capacity();
        if !conn.is_open() {
            shard.give_read_buf(buf);
            continue;
        }
        let progressed = if pending.is_empty() {
            let progressed = process(shard, conn, &mut buf, &mut input.asm);
            // Keep only a partial frame; the buffer goes back to the pool.
            if conn.is_open() && !buf.is_empty() {
                pending = buf.clone();
            }
            progressed
        } else {
            pending.extend_from_slice(&buf);
            process(shard, conn, &mut pending, &mut input.asm)
        };
        shard.give_read_buf(buf);
        input.account(shard, conn, &mut pending, progressed);
    }
    input.asm = ws::Assembler::default();
    pending = Vec::new();
    input.account(shard, conn, &mut pending, false);
}

/// A connection's input state between reads, and the bytes of it that count against
/// the shard's `frame_memory_bytes`.
struct Input {
    asm: ws::Assembler,
    held: usize,
}

impl Input {
    /// After input was handled: refreshes activity and the unfinished-message clock,
    /// and keeps the shard's frame memory within its cap (closing this connection with
    /// 1013 when it would pass it).
    fn account<S: Service>(
        &mut self,
        shard: &Rc<Shard<S>>,
        conn: &Rc<Conn>,
        pending: &mut Vec<u8>,
        progressed: bool,
    ) {
        if pending.is_empty() && pending.capacity() > 0 {
            // Free the partial-frame buffer: idle connections hold none.
            *pending = Vec::new();
        }
        let mut now_held = pending.capacity() + self.asm.buffered();
        let others = shard.frame_memory.get() - self.held;
        if now_held > self.held && others + now_held > shard.cfg.frame_memory_bytes {
            tracing::info!(user = %conn.user, device = %conn.device, held = now_held,
                "closing a connection: the shard's memory for unfinished messages is full");
            conn.close(shard, close::TRY_AGAIN_LATER, None);
            *pending = Vec::new();
            self.asm = ws::Assembler::default();
            now_held = 0;
        }
        shard.frame_memory.set(others + now_held);
        self.held = now_held;
        let now = shard.timers.borrow().now();
        if progressed {
            conn.last_active.set(now);
        }
        if now_held == 0 {
            conn.partial_since.set(NO_PARTIAL);
        } else if progressed || conn.partial_since.get() == NO_PARTIAL {
            conn.partial_since.set(now);
            let timeout = shard.cfg.frame_timeout.as_secs() as u32;
            conn.file_by(shard, now + timeout);
        }
    }
}

/// Parses and handles every complete frame at the front of `data`, leaving a partial
/// frame (or, when the connection has its maximum of requests in flight, the frames
/// not yet handled). Stops (and drops the rest) at the first frame that closes the
/// connection. Returns whether a complete message or control frame was handled.
fn process<S: Service>(
    shard: &Rc<Shard<S>>,
    conn: &Rc<Conn>,
    data: &mut Vec<u8>,
    asm: &mut ws::Assembler,
) -> bool {
    let max = shard.cfg.max_frame_bytes;
    let mut used = 0;
    let mut progressed = false;
    let keep_going = loop {
        if conn.in_flight.get() >= shard.cfg.max_requests_in_flight {
            break true;
        }
        match ws::unmask_client_frame(&mut data[used..], max) {
            Ok(None) => break true,
            Ok(Some((frame, n))) => {
                let at = used;
                used += n;
                let whole_data = frame.fin
                    && asm.idle()
                    && matches!(frame.opcode, OpCode::Data(Data::Binary | Data::Text));
                if whole_data {
                    // A whole message (most are): read where it lies, no copy.
                    progressed = true;
                    let payload = &data[at + frame.payload.start..at + frame.payload.end];
                    let text = frame.opcode == OpCode::Data(Data::Text);
                    if !on_data(shard, conn, text, payload) {
                        break false;
                    }
                    continue;
                }
                match asm.push(frame.to_frame(&data[at..]), max) {
                    Ok(None) => {}
                    Ok(Some(msg)) => {
                        progressed = true;
                        if !on_message(shard, conn, msg) {
                            break false;
                        }
                    }
                    Err(e) => {
                        conn.close(shard, e.close_code(), None);
                        break false;
                    }
                }
            }
            Err(e) => {
                conn.close(shard, e.close_code(), None);
                break false;
            }
        }
    };
    if keep_going {
        data.drain(..used);
    } else {
        data.clear();
    }
    progressed
}

fn on_message<S: Service>(shard: &Rc<Shard<S>>, conn: &Rc<Conn>, msg: ws::Message) -> bool {
    match msg {
        ws::Message::Binary(payload) => on_data(shard, conn, false, &payload),
        ws::Message::Text(payload) => on_data(shard, conn, true, &payload),
        ws::Message::Ping(p) => {
            S::conn_seen(shard, conn);
            conn.send(shard, ws::frame(ws::PONG, &p));
            true
        }
        ws::Message::Pong => true,
        ws::Message::Close(_) => {
            conn.close(shard, close::NORMAL, None);
            false
        }
    }
}

/// A whole data message (`text`: a text frame) from the client.
fn on_data<S: Service>(shard: &Rc<Shard<S>>, conn: &Rc<Conn>, text: bool, payload: &[u8]) -> bool {
    match (text, conn.json) {
        (false, false) => {
            // Acks are most of what a client sends: read them in place.
            if let Some(ack) = envelope::peek_push_ack(payload) {
                on_push_ack(shard, conn, ack.req_id, ack.conv_id, ack.seq);
                return true;
            }
            on_client_frame(shard, conn, decode_client_frame(payload))
        }
        (true, true) => on_client_frame(shard, conn, json::decode_client_frame(payload)),
        // The other encoding than the one negotiated: refused as a text frame always was.
        _ => {
            conn.close(shard, close::UNSUPPORTED_DATA, None);
            false
        }
    }
}

fn on_client_frame<S: Service>(
    shard: &Rc<Shard<S>>,
    conn: &Rc<Conn>,
    decoded: Result<ClientFrame, FrameError>,
) -> bool {
    let frame = match decoded {
        Ok(f) => f,
        Err(FrameError::Invalid { req_id }) => {
            let err = ApiError::invalid("frame is not a valid ClientFrame");
            conn.send(shard, envelope::response_frame(req_id, Err(err)));
            return true;
        }
        Err(FrameError::Undecodable) => {
            conn.close(shard, close::INVALID_PAYLOAD, None);
            return false;
        }
    };
    let req_id = frame.req_id;
    // What a JSON connection decodes a successful RESPONSE's body as.
    let body_type = frame.body.as_ref().and_then(json::response_type);
    match frame.body {
        None => {
            if req_id != 0 {
                let err = ApiError::invalid("ClientFrame has no body");
                conn.send(shard, envelope::response_frame(req_id, Err(err)));
            }
        }
        Some(Body::Heartbeat(_)) => {
            S::conn_seen(shard, conn);
            if req_id != 0 {
                let body = HeartbeatResponse {
                    server_ts: envelope::now_ms(),
                }
                .encode_to_vec();
                let frame = envelope::response_frame(req_id, Ok(body.into()));
                conn.send_reply(shard, frame, body_type);
            }
        }
        Some(Body::PushAck(ack)) => on_push_ack(shard, conn, req_id, &ack.conv_id, ack.seq),
        Some(body) => {
            let shard = shard.clone();
            let conn = conn.clone();
            conn.in_flight.set(conn.in_flight.get() + 1);
            shard.request_started();
            monoio::spawn(async move {
                let r = S::request(shard.clone(), conn.clone(), body).await;
                if req_id != 0 {
                    conn.send_reply(&shard, envelope::response_frame(req_id, r), body_type);
                }
                shard.request_finished();
                let n = conn.in_flight.get() - 1;
                conn.in_flight.set(n);
                if n + 1 == shard.cfg.max_requests_in_flight {
                    let paused = shard.paused_readers.borrow_mut().remove(&conn.id);
                    if let Some(w) = paused {
                        w.wake();
                    }
                }
            });
        }
    }
    true
}

/// A PushAck: every seq <= `seq` of `conv_id` reached this connection. Recorded in the
/// shard's [`AckTable`](super::acks::AckTable) (nothing is stored, nothing allocated
/// after the conversation's first ack); answered only when the frame has a req_id. An
/// ack naming no valid conversation is dropped.
fn on_push_ack<S: Service>(
    shard: &Rc<Shard<S>>,
    conn: &Rc<Conn>,
    req_id: u64,
    conv_id: &str,
    seq: i64,
) {
    if crate::ids::is_valid_conv_id(conv_id) {
        shard.push_acks.borrow_mut().ack(conn.id, conv_id, seq);
    }
    if req_id != 0 {
        conn.send(shard, envelope::response_frame(req_id, Ok(Bytes::new())));
    }
}

/// Once a second on each shard: closes connections that stayed silent past the
/// heartbeat timeout or hold a message unfinished past `frame_timeout`, aborts
/// closing connections whose linger ran out, and fails calls that got no answer.
pub async fn heartbeat_ticker<S: Service>(shard: Rc<Shard<S>>) {
    let mut tick = monoio::time::interval(std::time::Duration::from_secs(1));
    let frame_timeout = shard.cfg.frame_timeout.as_secs() as u32;
    loop {
        tick.tick().await;
        let due = shard.timers.borrow_mut().advance();
        let (now, timeout) = {
            let t = shard.timers.borrow();
            (t.now(), t.timeout())
        };
        for weak in due {
            let Some(conn) = weak.upgrade() else { continue };
            if conn.filed_at.get() != now {
                // Filed again under an earlier second since: this entry is stale.
                continue;
            }
            match conn.phase.get() {
                Phase::Closed => continue,
                // A close that did not finish within its linger: the peer does not read.
                Phase::Closing => {
                    conn.abort();
                    continue;
                }
                Phase::Open => {}
            }
            let deadline = conn.last_active.get() + timeout;
            let partial = conn.partial_since.get();
            if deadline <= now {
                super::Counters::bump(&shard.counters.heartbeat_timeouts);
                tracing::debug!(user = %conn.user, device = %conn.device, "closing a silent connection");
                conn.close(&shard, close::GOING_AWAY, None);
            } else if partial != NO_PARTIAL && partial + frame_timeout <= now {
                tracing::info!(user = %conn.user, device = %conn.device,
                    "closing a connection: a message did not complete within frame_timeout");
                conn.close(&shard, close::POLICY_VIOLATION, None);
            } else {
                let next = if partial == NO_PARTIAL {
                    deadline
                } else {
                    deadline.min(partial + frame_timeout)
                };
                conn.filed_at
                    .set(shard.timers.borrow_mut().insert(weak, next));
            }
        }
        shard.expire_calls();
    }
}
