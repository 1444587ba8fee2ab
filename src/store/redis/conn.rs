//! One Redis connection driven from the shard's io_uring loop: callers queue encoded
//! commands, a writer task sends everything queued in a loop turn in one write, the
//! reader parses replies and hands them to callers in order, and a driver task
//! reconnects with backoff. The guarantees are listed in the [module doc](super).
//!
//! Tasks per connection (all on the shard's thread, sharing one `Rc<Shared>`):
//! - the **driver** (one for the life of the [`RedisConn`]): connects, hands the
//!   socket's write half to a new writer, then reads replies until the connection
//!   breaks, fails what was in flight, waits out the backoff and connects again;
//! - the **writer** (one per connection): waits for queued commands and writes them.
//!
//! Breaking a connection (timeout, error, drop of the last handle) shuts the socket
//! down with `shutdown(2)`, which ends the pending io_uring read and write at once.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use ::redis::{Cmd, IntoConnectionInfo, Parser, Pipeline, Value};
use local_sync::oneshot;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;

use super::RedisError;

/// Bytes asked of each socket read. A reply bigger than this is parsed across reads.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// A write buffer that grew past this (one huge pipeline) is not kept for reuse.
const KEEP_WRITE_BUFFER: usize = 1024 * 1024;

/// Where to connect and how long to wait.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// A call with no complete answer after this fails with [`RedisError::Timeout`]
    /// and the connection is dropped.
    pub timeout: Duration,
    /// Limit for one connection attempt, TCP connect plus `AUTH`/`SELECT`.
    pub connect_timeout: Duration,
    /// The first wait before reconnecting; it doubles after each failed attempt.
    pub backoff_min: Duration,
    /// The longest wait between two attempts.
    pub backoff_max: Duration,
}

impl RedisConfig {
    /// The defaults: 2 s per call, 1 s per connection attempt, backoff 50 ms to 2 s.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

/// The URL with any password replaced by `***`.
fn redact(url: &str) -> String {
    match ::redis::parse_redis_url(url) {
        Some(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        None => "<not a redis url>".to_string(),
    }
}

/// What the URL names.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    db: i64,
    username: Option<String>,
    password: Option<String>,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Target, RedisError> {
        let info = url
            .into_connection_info()
            .map_err(|e| RedisError::BadUrl(format!("{}: {e}", redact(url))))?;
        let (host, port) = match info.addr() {
            ::redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
            other => {
                return Err(RedisError::BadUrl(format!(
                    "{}: only plain TCP is supported, not {other}",
                    redact(url)
                )))
            }
        };
        let settings = info.redis_settings();
        Ok(Target {
            host,
            port,
            db: settings.db(),
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
        })
    }

    /// `AUTH` and `SELECT`, as needed, to send first on every new connection.
    fn handshake(&self) -> Vec<Cmd> {
        let mut cmds = Vec::new();
        if let Some(password) = &self.password {
            let mut auth = ::redis::cmd("AUTH");
            if let Some(user) = &self.username {
                auth.arg(user);
            }
            auth.arg(password);
            cmds.push(auth);
        }
        if self.db != 0 {
            cmds.push(::redis::cmd("SELECT").arg(self.db).clone());
        }
        cmds
    }
}

/// Counters for `/metrics` and tests. Monotonic except `connected`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisStats {
    /// A connection is up now.
    pub connected: bool,
    /// Connections made after the first one.
    pub reconnects: u64,
    /// Connection attempts that failed (refused, timed out, handshake refused).
    pub connect_failures: u64,
    /// Calls that failed with `Unavailable`, `Disconnected` or `Timeout`.
    pub failed_calls: u64,
    /// Calls that failed with `Timeout`.
    pub timeouts: u64,
    /// Socket writes of queued commands (one per loop turn with calls in it).
    pub writes: u64,
    /// Commands queued by calls.
    pub commands: u64,
    /// Socket reads that returned reply bytes.
    pub reads: u64,
}

/// A handle to one Redis connection of this shard. Cheap to clone; not `Send` (it
/// lives on the shard that made it). When the last handle is dropped, the connection
/// is closed and its driver task ends.
#[derive(Clone)]
pub struct RedisConn {
    shared: Rc<Shared>,
    _owner: Rc<Owner>,
}

/// Closes the connection when the last [`RedisConn`] goes (the driver task holds
/// `Shared`, not `Owner`, so it does not keep the connection alive).
struct Owner(Rc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.closed.set(true);
        self.0
            .fail_current("connection closed by its owner".to_string());
        self.0.driver_wake.wake();
    }
}

/// State of one connection, touched only by the shard's thread.
struct Shared {
    target: Target,
    config: RedisConfig,
    state: RefCell<State>,
    /// Set by the last handle's drop; the driver stops at its next step.
    closed: Cell<bool>,
    /// Wakes the writer when commands are queued or the connection breaks.
    writer_wake: Signal,
    /// Wakes the driver out of its backoff wait when the handle is dropped.
    driver_wake: Signal,
    stats: Cell<RedisStats>,
}

struct State {
    /// The socket of the live connection, or `None` while disconnected. Taken out
    /// (and shut down) by whoever breaks the connection, so it is shut down once and
    /// never after its descriptor could have been reused.
    socket: Option<RawFd>,
    /// Increases with every connection; tasks and calls of an older connection see a
    /// different value and stop.
    epoch: u64,
    /// Why the last connection or connection attempt failed (for `Unavailable`).
    last_error: RedisError,
    /// Encoded commands of `queued`, not yet handed to the writer.
    out: Vec<u8>,
    /// Calls whose commands are in `out`, in order.
    queued: VecDeque<Waiter>,
    /// Calls whose commands were handed to the writer, in order; the next reply
    /// belongs to the front one.
    in_flight: VecDeque<Waiter>,
}

/// A call waiting for its replies.
struct Waiter {
    expected: usize,
    replies: Vec<Value>,
    done: oneshot::Sender<Result<Vec<Value>, RedisError>>,
}

impl RedisConn {
    /// Parses the URL and starts the driver task on the current monoio runtime (which
    /// must have its timer enabled). Returns at once: calls fail with
    /// [`RedisError::Unavailable`] until the first connection is up.
    pub fn start(config: RedisConfig) -> Result<RedisConn, RedisError> {
        let target = Target::parse(&config.url)?;
        let shared = Rc::new(Shared {
            target,
            config,
            state: RefCell::new(State {
                socket: None,
                epoch: 0,
                last_error: RedisError::Unavailable("not connected yet".to_string()),
                out: Vec::new(),
                queued: VecDeque::new(),
                in_flight: VecDeque::new(),
            }),
            closed: Cell::new(false),
            writer_wake: Signal::default(),
            driver_wake: Signal::default(),
            stats: Cell::new(RedisStats::default()),
        });
        monoio::spawn(drive(shared.clone()));
        Ok(RedisConn {
            _owner: Rc::new(Owner(shared.clone())),
            shared,
        })
    }

    /// [`RedisConn::start`], then waits up to `wait` for the first connection. On
    /// failure returns the error of the last attempt (the driver is stopped).
    pub async fn connect(config: RedisConfig, wait: Duration) -> Result<RedisConn, RedisError> {
        let conn = RedisConn::start(config)?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            if conn.is_connected() {
                return Ok(conn);
            }
            if std::time::Instant::now() >= deadline {
                return Err(conn.shared.state.borrow().last_error.clone());
            }
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.shared.state.borrow().socket.is_some()
    }

    /// The counters so far.
    pub fn stats(&self) -> RedisStats {
        let mut s = self.shared.stats.get();
        s.connected = self.is_connected();
        s
    }

    /// Sends `cmds` (in the same write as every other call of this loop turn) and
    /// returns one reply per command, in order. An error reply is a
    /// [`Value::ServerError`] in its place; `Err` means the connection failed.
    pub async fn cmds(&self, cmds: &[Cmd]) -> Result<Vec<Value>, RedisError> {
        self.call(cmds.len(), |out| {
            for c in cmds {
                c.write_packed_command(out);
            }
        })
        .await
    }

    /// One command, one reply.
    pub async fn cmd(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        let mut replies = self.cmds(std::slice::from_ref(cmd)).await?;
        replies
            .pop()
            .ok_or_else(|| RedisError::UnexpectedReply("no reply".to_string()))
    }

    /// Sends a [`Pipeline`] and returns the server's replies as they came: one per
    /// command, or for an atomic pipeline (`.atomic()`) `OK` for `MULTI`, `QUEUED` per
    /// command and the `EXEC` reply (an array of the commands' replies, or nil).
    pub async fn pipeline(&self, pipe: &Pipeline) -> Result<Vec<Value>, RedisError> {
        let transaction = pipe.is_transaction();
        let expected = pipe.len() + if transaction { 2 } else { 0 };
        self.call(expected, |out| {
            if transaction {
                ::redis::cmd("MULTI").write_packed_command(out);
            }
            for c in pipe.cmd_iter() {
                c.write_packed_command(out);
            }
            if transaction {
                ::redis::cmd("EXEC").write_packed_command(out);
            }
        })
        .await
    }

    /// Queues `expected` encoded commands and waits for as many replies.
    async fn call(
        &self,
        expected: usize,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Vec<Value>, RedisError> {
        self.queue(expected, encode).replies().await
    }

    /// Queues `expected` commands now, before returning: `encode` writes them (RESP,
    /// one array of bulk strings per command) straight into the connection's output
    /// buffer. Unlike the `async` calls, which queue when first polled, commands
    /// queued this way reach Redis in the order of the `queue` calls, so a caller can
    /// keep several calls in flight and await them later ([`Pending::replies`]). The
    /// call timeout counts from now. `expected` must be the number of commands
    /// `encode` writes: the replies are matched to calls by count.
    pub fn queue(&self, expected: usize, encode: impl FnOnce(&mut Vec<u8>)) -> Pending {
        let shared = self.shared.clone();
        if expected == 0 {
            return Pending {
                shared,
                state: PendingState::Ready(Ok(Vec::new())),
            };
        }
        let (done, answer) = oneshot::channel();
        let epoch = {
            let mut st = shared.state.borrow_mut();
            if st.socket.is_none() {
                let e = RedisError::Unavailable(match &st.last_error {
                    RedisError::Unavailable(why) | RedisError::Disconnected(why) => why.clone(),
                    other => other.to_string(),
                });
                drop(st);
                shared.count(|s| s.failed_calls += 1);
                return Pending {
                    shared,
                    state: PendingState::Ready(Err(e)),
                };
            }
            encode(&mut st.out);
            st.queued.push_back(Waiter {
                expected,
                replies: Vec::with_capacity(expected),
                done,
            });
            st.epoch
        };
        shared.count(|s| s.commands += expected as u64);
        shared.writer_wake.wake();
        let deadline = monoio::time::Instant::now() + shared.config.timeout;
        Pending {
            shared,
            state: PendingState::Waiting {
                epoch,
                answer,
                deadline,
            },
        }
    }

    /// The number of the live connection (it changes with every reconnect), or
    /// `None` while there is none. Server-side state that lives per connection (a
    /// script loaded before a restart of Redis is gone after it) can be keyed by it.
    pub fn epoch(&self) -> Option<u64> {
        let st = self.shared.state.borrow();
        st.socket.map(|_| st.epoch)
    }
}

/// A call queued by [`RedisConn::queue`]: its replies, once they come.
pub struct Pending {
    shared: Rc<Shared>,
    state: PendingState,
}

enum PendingState {
    /// Answered at once (nothing to send, or no connection).
    Ready(Result<Vec<Value>, RedisError>),
    Waiting {
        epoch: u64,
        answer: oneshot::Receiver<Result<Vec<Value>, RedisError>>,
        deadline: monoio::time::Instant,
    },
}

impl Pending {
    /// One reply per command, in order (an error reply is a [`Value::ServerError`] in
    /// its place); `Err` when the connection failed or the call timed out, as for
    /// [`RedisConn::cmds`]. Dropping this instead does not withdraw the commands.
    pub async fn replies(self) -> Result<Vec<Value>, RedisError> {
        let shared = self.shared;
        let (epoch, answer, deadline) = match self.state {
            PendingState::Ready(r) => return r,
            PendingState::Waiting {
                epoch,
                answer,
                deadline,
            } => (epoch, answer, deadline),
        };
        let result = match monoio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RedisError::Disconnected(
                "the call was dropped with its connection".to_string(),
            )),
            Err(_) => {
                let t = shared.config.timeout;
                shared.fail(epoch, format!("no reply within {t:?}"));
                shared.count(|s| s.timeouts += 1);
                Err(RedisError::Timeout(t))
            }
        };
        if result.is_err() {
            shared.count(|s| s.failed_calls += 1);
        }
        result
    }
}

impl Shared {
    fn count(&self, f: impl FnOnce(&mut RedisStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Breaks connection `epoch` if it is still the live one: shuts the socket down
    /// and fails every queued and in-flight call with `Disconnected(reason)`.
    fn fail(&self, epoch: u64, reason: String) {
        let waiters = {
            let mut st = self.state.borrow_mut();
            if st.epoch != epoch {
                return;
            }
            let Some(fd) = st.socket.take() else {
                return;
            };
            // SAFETY: `fd` belongs to the live connection's stream, whose halves are
            // dropped only after this (their tasks stop on seeing `socket` gone);
            // shutdown does not close the descriptor.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            st.last_error = RedisError::Disconnected(reason.clone());
            st.out.clear();
            let mut waiters: Vec<Waiter> = st.in_flight.drain(..).collect();
            waiters.extend(st.queued.drain(..));
            waiters
        };
        self.writer_wake.wake();
        for w in waiters {
            let _ = w.done.send(Err(RedisError::Disconnected(reason.clone())));
        }
    }

    /// Breaks the live connection, if any.
    fn fail_current(&self, reason: String) {
        let epoch = self.state.borrow().epoch;
        self.fail(epoch, reason);
    }

    /// Hands one reply of connection `epoch` to the call it belongs to.
    fn deliver(&self, epoch: u64, reply: Value) -> Result<(), String> {
        let finished = {
            let mut st = self.state.borrow_mut();
            if st.epoch != epoch || st.socket.is_none() {
                return Err("connection already closed".to_string());
            }
            let Some(front) = st.in_flight.front_mut() else {
                return Err("a reply arrived that no call was waiting for".to_string());
            };
            front.replies.push(reply);
            if front.replies.len() < front.expected {
                return Ok(());
            }
            st.in_flight.pop_front()
        };
        if let Some(w) = finished {
            let _ = w.done.send(Ok(w.replies));
        }
        Ok(())
    }
}

/// The driver: connect, serve, fail, back off, again, until the handle is dropped.
async fn drive(shared: Rc<Shared>) {
    let min = shared.config.backoff_min;
    let max = shared.config.backoff_max.max(min);
    let mut backoff = min;
    let mut connected_before = false;
    while !shared.closed.get() {
        match connect_once(&shared).await {
            Ok(stream) if !shared.closed.get() => {
                backoff = min;
                let epoch = {
                    let mut st = shared.state.borrow_mut();
                    st.epoch += 1;
                    st.socket = Some(stream.as_raw_fd());
                    st.epoch
                };
                if connected_before {
                    shared.count(|s| s.reconnects += 1);
                }
                connected_before = true;
                tracing::info!(host = %shared.target.host, port = shared.target.port, "redis connected");
                let (reader, writer) = stream.into_split();
                monoio::spawn(write_loop(shared.clone(), writer, epoch));
                let reason = read_loop(&shared, reader, epoch).await;
                if !shared.closed.get() {
                    tracing::warn!(%reason, "redis connection lost");
                }
                shared.fail(epoch, reason);
            }
            Ok(_) => {}
            Err(e) => {
                shared.count(|s| s.connect_failures += 1);
                tracing::debug!(error = %e, "redis connect failed");
                shared.state.borrow_mut().last_error = e;
            }
        }
        if shared.closed.get() {
            break;
        }
        let wait = jitter(backoff);
        let _ = monoio::time::timeout(wait, shared.driver_wake.wait()).await;
        backoff = (backoff * 2).min(max);
    }
}

/// A wait between 50% and 100% of `d`, so the shards of a node (and the nodes of a
/// cluster) do not all reconnect in the same instant.
pub(crate) fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.5..=1.0))
}

/// One connection attempt of `shared`'s connection.
async fn connect_once(shared: &Shared) -> Result<TcpStream, RedisError> {
    connect_target(&shared.target, shared.config.connect_timeout).await
}

/// One connection attempt: TCP connect, then `AUTH`/`SELECT`, within
/// `connect_timeout`. A refused handshake is [`RedisError::Handshake`], anything else
/// [`RedisError::Unavailable`]. Shared with the pub/sub connection.
pub(crate) async fn connect_target(
    target: &Target,
    connect_timeout: Duration,
) -> Result<TcpStream, RedisError> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        RedisError::Unavailable(format!("{what} {}:{}: {e}", target.host, target.port))
    };
    let attempt = async {
        let mut stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| unavailable("connect", &e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| unavailable("TCP_NODELAY", &e))?;
        let handshake = target.handshake();
        if handshake.is_empty() {
            return Ok(stream);
        }
        let mut out = Vec::new();
        for c in &handshake {
            c.write_packed_command(&mut out);
        }
        let (res, _) = stream.write_all(out).await;
        res.map_err(|e| unavailable("handshake write to", &e))?;
        let mut parser = Parser::new();
        let mut buf = Vec::with_capacity(4096);
        let mut replies = Vec::new();
        while replies.len() < handshake.len() {
            buf.clear();
            let (res, b) = stream.read(buf).await;
            buf = b;
            match res {
                Ok(0) => return Err(unavailable("handshake with", &"connection closed")),
                Ok(_) => {}
                Err(e) => return Err(unavailable("handshake read from", &e)),
            }
            parse_all(&mut parser, &buf, |v| {
                replies.push(v);
                Ok(())
            })
            .map_err(|e| unavailable("handshake with", &e))?;
        }
        for v in replies {
            if let Value::ServerError(e) = v {
                return Err(RedisError::Handshake(format!(
                    "{}:{}: {} {}",
                    target.host,
                    target.port,
                    e.code(),
                    e.details().unwrap_or("")
                )));
            }
        }
        Ok(stream)
    };
    match monoio::time::timeout(connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(unavailable(
            "connect",
            &format!("no answer within {connect_timeout:?}"),
        )),
    }
}

/// Writes queued commands, one write per wake-up, until connection `epoch` ends.
async fn write_loop(
    shared: Rc<Shared>,
    mut writer: monoio::io::OwnedWriteHalf<TcpStream>,
    epoch: u64,
) {
    let mut spare = Vec::new();
    loop {
        let live = std::future::poll_fn(|cx| {
            let st = shared.state.borrow();
            if st.epoch != epoch || st.socket.is_none() {
                Poll::Ready(false)
            } else if !st.out.is_empty() {
                Poll::Ready(true)
            } else {
                shared.writer_wake.register(cx.waker());
                Poll::Pending
            }
        })
        .await;
        if !live {
            return;
        }
        let batch = {
            let mut st = shared.state.borrow_mut();
            let st = &mut *st;
            st.in_flight.extend(st.queued.drain(..));
            std::mem::replace(&mut st.out, spare)
        };
        shared.count(|s| s.writes += 1);
        let (res, mut batch) = writer.write_all(batch).await;
        if let Err(e) = res {
            shared.fail(epoch, format!("write: {e}"));
            return;
        }
        batch.clear();
        if batch.capacity() > KEEP_WRITE_BUFFER {
            batch = Vec::new();
        }
        spare = batch;
        // The write's completion may have come in the same loop turn as replies that
        // woke callers; let them queue their next commands before the next write.
        crate::rt::yield_now().await;
    }
}

/// Reads and dispatches replies until connection `epoch` ends; returns why it ended.
async fn read_loop(
    shared: &Shared,
    mut reader: monoio::io::OwnedReadHalf<TcpStream>,
    epoch: u64,
) -> String {
    let mut parser = Parser::new();
    let mut buf = Vec::with_capacity(READ_CHUNK);
    loop {
        buf.clear();
        let (res, b) = reader.read(buf).await;
        buf = b;
        match res {
            Ok(0) => return "the server closed the connection".to_string(),
            Ok(_) => shared.count(|s| s.reads += 1),
            Err(e) => return format!("read: {e}"),
        }
        if let Err(reason) = parse_all(&mut parser, &buf, |v| shared.deliver(epoch, v)) {
            return reason;
        }
    }
}

/// Feeds `bytes` to the parser and calls `each` with every complete reply; a reply
/// cut short stays in the parser for the next call.
pub(crate) fn parse_all(
    parser: &mut Parser,
    bytes: &[u8],
    mut each: impl FnMut(Value) -> Result<(), String>,
) -> Result<(), String> {
    let mut feed = Feed {
        bytes,
        starved: false,
    };
    loop {
        match parser.parse_value(&mut feed) {
            Ok(v) => each(v)?,
            Err(_) if feed.starved => return Ok(()),
            Err(e) => return Err(format!("protocol error: {e}")),
        }
    }
}

/// The bytes of one socket read, as the parser's `Read`. When they run out it says
/// `WouldBlock` and notes it: the parser turns every I/O error into a `RedisError`
/// that no longer tells "need more bytes" from a broken stream, so the flag does.
struct Feed<'a> {
    bytes: &'a [u8],
    starved: bool,
}

impl Read for Feed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.bytes.is_empty() {
            self.starved = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Read::read(&mut self.bytes, buf)
    }
}

/// A wake-up for one waiting task on this thread; a wake with no waiter is kept
/// until the next wait.
#[derive(Default)]
pub(crate) struct Signal {
    waker: Cell<Option<Waker>>,
    raised: Cell<bool>,
}

impl Signal {
    pub(crate) fn register(&self, waker: &Waker) {
        self.waker.set(Some(waker.clone()));
    }

    pub(crate) fn wake(&self) {
        self.raised.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Resolves at the next `wake` (or at once if one came since the last wait).
    pub(crate) async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.raised.replace(false) {
                Poll::Ready(())
            } else {
                self.register(cx.waker());
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts() {
        let t = Target::parse("redis://:pw@127.0.0.1:6390/3").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 6390, 3));
        assert_eq!(t.password.as_deref(), Some("pw"));
        assert_eq!(t.handshake().len(), 2);
        let t = Target::parse("redis://localhost").unwrap();
        assert_eq!((t.port, t.db), (6379, 0));
        assert!(t.handshake().is_empty());
        assert!(matches!(
            Target::parse("http://x"),
            Err(RedisError::BadUrl(_))
        ));
        assert!(matches!(
            Target::parse("redis+unix:///tmp/r.sock"),
            Err(RedisError::BadUrl(_))
        ));
    }

    #[test]
    fn config_debug_hides_the_password() {
        let c = RedisConfig::new("redis://u:secret@h:1/0");
        let s = format!("{c:?}");
        assert!(!s.contains("secret"), "{s}");
    }

    #[test]
    fn replies_split_anywhere_and_many_per_read() {
        let mut wire = Vec::new();
        wire.extend_from_slice(b"+OK\r\n$-1\r\n-ERR bad thing\r\n:42\r\n");
        wire.extend_from_slice(b"*2\r\n$3\r\nabc\r\n*1\r\n$0\r\n\r\n");
        let big = vec![b'x'; 200_000];
        wire.extend_from_slice(format!("${}\r\n", big.len()).as_bytes());
        wire.extend_from_slice(&big);
        wire.extend_from_slice(b"\r\n");
        for cut in [1usize, 2, 3, 7, 100, 65536, wire.len()] {
            let mut parser = Parser::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                parse_all(&mut parser, chunk, |v| {
                    got.push(v);
                    Ok(())
                })
                .unwrap();
            }
            assert_eq!(got.len(), 6, "cut {cut}");
            assert_eq!(got[0], Value::Okay);
            assert_eq!(got[1], Value::Nil);
            assert!(matches!(&got[2], Value::ServerError(e) if e.code() == "ERR"));
            assert_eq!(got[3], Value::Int(42));
            assert_eq!(
                got[4],
                Value::Array(vec![
                    Value::BulkString(b"abc".to_vec()),
                    Value::Array(vec![Value::BulkString(Vec::new())])
                ])
            );
            assert_eq!(got[5], Value::BulkString(big.clone()));
        }
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let mut parser = Parser::new();
        let e = parse_all(&mut parser, b"?what\r\n", |_| Ok(())).unwrap_err();
        assert!(e.starts_with("protocol error"), "{e}");
    }
}
