//! A subscribed Redis connection of its own, driven from the shard's io_uring loop
//! like [`RedisConn`]: the receiving side of the cluster channels
//! (`connect:events:kick`, `connect:events:broadcast`, `imshard:nodes:changed`, and
//! later the per-user / per-group delivery channels of DESIGN.md).
//!
//! A subscribed connection can carry no ordinary calls, so publishing is not here:
//! `PUBLISH` goes over the shard's normal [`RedisConn`] (see
//! [`publish`]), batched with its other commands of the loop turn.
//!
//! # What [`PubSubConn`] guarantees
//! - **The set is the owner's**: [`PubSubConn::subscribe`] / [`PubSubConn::unsubscribe`]
//!   change the set of channels held, at once and idempotently; the connection follows
//!   it. Changes of one loop turn go out in one write (one `SUBSCRIBE` and one
//!   `UNSUBSCRIBE` command with every channel of the turn; a channel subscribed and
//!   unsubscribed in the same turn sends nothing).
//! - **Only held channels are delivered**: a message is handed to the callback only
//!   if its channel is in the set at the moment it is read, so nothing arrives for a
//!   channel after `unsubscribe` returned, even if Redis sent it before it processed
//!   the `UNSUBSCRIBE`.
//! - **Order**: messages are delivered in the order Redis sent them on the connection
//!   (for one publisher and one channel, publish order).
//! - **At most once**: Redis pub/sub keeps nothing for a disconnected subscriber.
//!   When the connection breaks the callback gets [`PubSubEvent::Disconnected`];
//!   messages published from then until [`PubSubEvent::Resubscribed`] are lost. The
//!   layer above answers `Resubscribed` by telling its clients to resync by seq
//!   (DESIGN.md "Pub/sub is at-most-once"). A message is never delivered twice by this
//!   connection.
//! - **Reconnect**: the driver reconnects with the backoff of [`RedisConfig`], sends
//!   `AUTH`/`SELECT`, then one `SUBSCRIBE` with every channel held, and reports
//!   `Resubscribed` once Redis confirmed all of them (so delivery has resumed when it
//!   is reported). [`PubSubConn::is_confirmed`] tells whether Redis confirmed one
//!   channel on the live connection.
//! - **Dead connections are noticed**: a `PING` goes out every [`RedisConfig::timeout`];
//!   when the previous one is still unanswered at the next, the connection is dropped
//!   and made again (a silent peer is found within two timeouts).
//!
//! Not done: pattern subscriptions (`PSUBSCRIBE`), sharded pub/sub (`SSUBSCRIBE`,
//! needed on Redis Cluster), RESP3 push. The callback runs on the reader task: it
//! must not block; it may call `subscribe`/`unsubscribe`. Memory: the set of channels
//! held, twice (held and confirmed); a message is handed over as [`Bytes`] without a
//! copy of the payload.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::Poll;

use ::redis::Value;
use bytes::Bytes;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;

use super::conn::{connect_target, jitter, parse_all, Signal, Target, READ_CHUNK};
use super::{RedisConfig, RedisConn, RedisError};

/// What the connection reports to its owner's callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PubSubEvent {
    /// A message on a channel held now.
    Message { channel: Bytes, payload: Bytes },
    /// The live connection broke: what is published from now until the next
    /// `Resubscribed` is lost.
    Disconnected { reason: String },
    /// A connection after the first is up and Redis confirmed the subscription of
    /// every channel held when it connected (`channels` of them): delivery resumed,
    /// and anything published since `Disconnected` was lost.
    Resubscribed { channels: usize },
}

/// Counters for `/metrics` and tests. Monotonic except `connected` and `channels`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PubSubStats {
    /// A connection is up now.
    pub connected: bool,
    /// Channels held now.
    pub channels: usize,
    /// Connections made after the first one.
    pub reconnects: u64,
    /// Connection attempts that failed.
    pub connect_failures: u64,
    /// Messages handed to the callback.
    pub messages: u64,
    /// Messages read for a channel no longer held (unsubscribed meanwhile), dropped.
    pub dropped: u64,
    /// Socket writes of subscription changes and pings.
    pub writes: u64,
}

/// A handle to one subscribed connection of this shard. Cheap to clone; not `Send`.
/// When the last handle is dropped the connection is closed, the driver ends and the
/// callback is not called again.
#[derive(Clone)]
pub struct PubSubConn {
    shared: Rc<Shared>,
    _owner: Rc<Owner>,
}

/// Closes the connection when the last [`PubSubConn`] goes.
struct Owner(Rc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.closed.set(true);
        self.0
            .fail_current("connection closed by its owner".to_string());
        self.0.driver_wake.wake();
    }
}

struct Shared {
    target: Target,
    config: RedisConfig,
    state: RefCell<State>,
    /// The owner's callback; never called while `state` is borrowed.
    on_event: RefCell<Box<dyn FnMut(PubSubEvent)>>,
    /// Set by the last handle's drop: no more events, the driver stops.
    closed: Cell<bool>,
    /// Wakes the writer when there is something to send or the connection broke.
    writer_wake: Signal,
    /// Wakes the driver out of its backoff wait when the handle is dropped.
    driver_wake: Signal,
    stats: Cell<PubSubStats>,
}

struct State {
    /// The live connection's socket, taken out (and shut down) by whoever breaks it.
    socket: Option<RawFd>,
    /// Increases with every connection; tasks of an older one see it and stop.
    epoch: u64,
    /// Why the last connection or attempt failed.
    last_error: RedisError,
    /// The channels the owner holds: subscribed on every connection.
    held: HashSet<Bytes>,
    /// Channels Redis confirmed on the live connection.
    confirmed: HashSet<Bytes>,
    /// Held channels not yet sent on the live connection (empty while disconnected:
    /// the driver's first write on a new connection subscribes to all of `held`).
    to_subscribe: HashSet<Bytes>,
    /// Channels dropped from `held` whose `UNSUBSCRIBE` is not yet sent.
    to_unsubscribe: HashSet<Bytes>,
    /// The health task asks the writer for a `PING`.
    ping_due: bool,
    /// A `PING` was sent and its `pong` has not come back.
    ping_unanswered: bool,
    /// Confirmations of the re-subscription still to come on this connection; the
    /// `Resubscribed` event goes out when it reaches zero.
    resubscribe_pending: usize,
    /// Channels in the re-subscription of this connection (reported).
    resubscribe_total: usize,
    /// This connection is a reconnect (so `Resubscribed` is reported).
    reconnected: bool,
}

impl PubSubConn {
    /// Parses the URL and starts the driver on the current monoio runtime (timer
    /// enabled). Returns at once; `on_event` is called for every message and
    /// connection event from the shard's thread.
    pub fn start(
        config: RedisConfig,
        on_event: impl FnMut(PubSubEvent) + 'static,
    ) -> Result<PubSubConn, RedisError> {
        let target = Target::parse(&config.url)?;
        let shared = Rc::new(Shared {
            target,
            config,
            state: RefCell::new(State {
                socket: None,
                epoch: 0,
                last_error: RedisError::Unavailable("not connected yet".to_string()),
                held: HashSet::new(),
                confirmed: HashSet::new(),
                to_subscribe: HashSet::new(),
                to_unsubscribe: HashSet::new(),
                ping_due: false,
                ping_unanswered: false,
                resubscribe_pending: 0,
                resubscribe_total: 0,
                reconnected: false,
            }),
            on_event: RefCell::new(Box::new(on_event)),
            closed: Cell::new(false),
            writer_wake: Signal::default(),
            driver_wake: Signal::default(),
            stats: Cell::new(PubSubStats::default()),
        });
        monoio::spawn(drive(shared.clone()));
        Ok(PubSubConn {
            _owner: Rc::new(Owner(shared.clone())),
            shared,
        })
    }

    /// Holds `channel` (no-op if held). Sent with the other changes of this turn.
    pub fn subscribe(&self, channel: impl Into<Bytes>) {
        let channel = channel.into();
        let mut st = self.shared.state.borrow_mut();
        if !st.held.insert(channel.clone()) {
            return;
        }
        if !st.to_unsubscribe.remove(&channel) && st.socket.is_some() {
            st.to_subscribe.insert(channel);
        }
        drop(st);
        self.shared.writer_wake.wake();
    }

    /// Stops holding `channel` (no-op if not held): no message of it is delivered
    /// from now on. Sent with the other changes of this turn.
    pub fn unsubscribe(&self, channel: &[u8]) {
        let mut st = self.shared.state.borrow_mut();
        let Some(channel) = st.held.take(channel) else {
            return;
        };
        if !st.to_subscribe.remove(&channel) && st.socket.is_some() {
            st.to_unsubscribe.insert(channel);
        }
        drop(st);
        self.shared.writer_wake.wake();
    }

    /// Whether `channel` is held.
    pub fn is_held(&self, channel: &[u8]) -> bool {
        self.shared.state.borrow().held.contains(channel)
    }

    /// Whether Redis confirmed the subscription of `channel` on the live connection
    /// (from then on, what is published on it is delivered until a disconnect).
    pub fn is_confirmed(&self, channel: &[u8]) -> bool {
        let st = self.shared.state.borrow();
        st.socket.is_some() && st.held.contains(channel) && st.confirmed.contains(channel)
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.shared.state.borrow().socket.is_some()
    }

    /// Why the last connection or connection attempt failed.
    pub fn last_error(&self) -> RedisError {
        self.shared.state.borrow().last_error.clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> PubSubStats {
        let mut s = self.shared.stats.get();
        let st = self.shared.state.borrow();
        s.connected = st.socket.is_some();
        s.channels = st.held.len();
        s
    }
}

/// `PUBLISH channel payload` over an ordinary connection (batched with the other
/// calls of the turn); returns how many subscribers Redis handed it to, over the
/// whole server. Zero is not an error: nobody held the channel.
pub async fn publish(conn: &RedisConn, channel: &[u8], payload: &[u8]) -> Result<u64, RedisError> {
    match conn
        .cmd(::redis::cmd("PUBLISH").arg(channel).arg(payload))
        .await?
    {
        Value::Int(n) => Ok(n.max(0) as u64),
        Value::ServerError(e) => Err(RedisError::from_server(&e)),
        other => Err(RedisError::UnexpectedReply(format!(
            "PUBLISH answered {other:?}"
        ))),
    }
}

impl Shared {
    fn count(&self, f: impl FnOnce(&mut PubSubStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Hands `event` to the owner, unless the connection was closed by its owner.
    fn emit(&self, event: PubSubEvent) {
        if self.closed.get() {
            return;
        }
        if let Ok(mut f) = self.on_event.try_borrow_mut() {
            f(event);
        }
    }

    /// Breaks connection `epoch` if it is still live; reports `Disconnected`.
    fn fail(&self, epoch: u64, reason: String) {
        {
            let mut st = self.state.borrow_mut();
            if st.epoch != epoch {
                return;
            }
            let Some(fd) = st.socket.take() else {
                return;
            };
            // SAFETY: `fd` is the live connection's stream, whose halves are dropped
            // only after their tasks see `socket` gone; shutdown does not close it.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            st.last_error = RedisError::Disconnected(reason.clone());
            st.confirmed.clear();
            st.to_subscribe.clear();
            st.to_unsubscribe.clear();
            st.ping_due = false;
            st.ping_unanswered = false;
            st.resubscribe_pending = 0;
        }
        self.writer_wake.wake();
        self.emit(PubSubEvent::Disconnected { reason });
    }

    fn fail_current(&self, reason: String) {
        let epoch = self.state.borrow().epoch;
        self.fail(epoch, reason);
    }

    /// Handles one value read on connection `epoch`.
    fn on_value(&self, epoch: u64, value: Value) -> Result<(), String> {
        let parts = match value {
            Value::Array(parts) | Value::Push { data: parts, .. } => parts,
            // A connection that holds no channel is not in subscribed mode: Redis
            // answers its PING with a plain `+PONG`.
            Value::SimpleString(s) if s.eq_ignore_ascii_case("pong") => {
                self.state.borrow_mut().ping_unanswered = false;
                return Ok(());
            }
            Value::ServerError(e) => {
                return Err(format!(
                    "server error: {} {}",
                    e.code(),
                    e.details().unwrap_or("")
                ))
            }
            other => {
                return Err(format!(
                    "unexpected value on a subscribed connection: {other:?}"
                ))
            }
        };
        let mut parts = parts.into_iter().map(|v| match v {
            Value::BulkString(b) => Some(Bytes::from(b)),
            Value::SimpleString(s) => Some(Bytes::from(s)),
            _ => None,
        });
        let kind = parts.next().flatten().unwrap_or_default();
        let channel = parts.next().flatten().unwrap_or_default();
        match &kind[..] {
            b"message" => {
                let payload = parts
                    .next()
                    .flatten()
                    .ok_or_else(|| "a message without a payload".to_string())?;
                let held = {
                    let st = self.state.borrow();
                    st.epoch == epoch && st.held.contains(&channel)
                };
                if held {
                    self.count(|s| s.messages += 1);
                    self.emit(PubSubEvent::Message { channel, payload });
                } else {
                    self.count(|s| s.dropped += 1);
                }
            }
            b"subscribe" => {
                let resubscribed = {
                    let mut st = self.state.borrow_mut();
                    if st.epoch != epoch {
                        return Ok(());
                    }
                    st.confirmed.insert(channel);
                    if st.resubscribe_pending > 0 {
                        st.resubscribe_pending -= 1;
                        (st.resubscribe_pending == 0 && st.reconnected)
                            .then_some(st.resubscribe_total)
                    } else {
                        None
                    }
                };
                if let Some(channels) = resubscribed {
                    self.emit(PubSubEvent::Resubscribed { channels });
                }
            }
            b"unsubscribe" => {
                let mut st = self.state.borrow_mut();
                if st.epoch == epoch {
                    st.confirmed.remove(&channel);
                }
            }
            b"pong" => self.state.borrow_mut().ping_unanswered = false,
            other => {
                return Err(format!(
                    "unexpected push {:?} on a subscribed connection",
                    String::from_utf8_lossy(other)
                ))
            }
        }
        Ok(())
    }
}

/// The driver: connect, subscribe to everything held, serve, fail, back off, again.
async fn drive(shared: Rc<Shared>) {
    let min = shared.config.backoff_min;
    let max = shared.config.backoff_max.max(min);
    let mut backoff = min;
    let mut connected_before = false;
    while !shared.closed.get() {
        match connect_target(&shared.target, shared.config.connect_timeout).await {
            Ok(mut stream) if !shared.closed.get() => {
                backoff = min;
                // The re-subscription is the connection's first write, from a snapshot
                // of the held set taken together with the count of confirmations to
                // wait for; changes made from here on go through the writer, after it.
                let (epoch, resubscribe) = {
                    let mut st = shared.state.borrow_mut();
                    let st = &mut *st;
                    st.epoch += 1;
                    st.socket = Some(stream.as_raw_fd());
                    st.to_subscribe.clear();
                    st.to_unsubscribe.clear();
                    st.resubscribe_pending = st.held.len();
                    st.resubscribe_total = st.held.len();
                    st.reconnected = connected_before;
                    let mut buf = Vec::new();
                    if !st.held.is_empty() {
                        let mut c = ::redis::cmd("SUBSCRIBE");
                        for ch in &st.held {
                            c.arg(&ch[..]);
                        }
                        c.write_packed_command(&mut buf);
                    }
                    (st.epoch, buf)
                };
                if connected_before {
                    shared.count(|s| s.reconnects += 1);
                    if resubscribe.is_empty() {
                        shared.emit(PubSubEvent::Resubscribed { channels: 0 });
                    }
                }
                connected_before = true;
                let written = if resubscribe.is_empty() {
                    Ok(())
                } else {
                    shared.count(|s| s.writes += 1);
                    stream.write_all(resubscribe).await.0.map(drop)
                };
                match written {
                    Ok(()) => {
                        tracing::info!(host = %shared.target.host, port = shared.target.port, "redis pub/sub connected");
                        let (reader, writer) = stream.into_split();
                        monoio::spawn(write_loop(shared.clone(), writer, epoch));
                        monoio::spawn(health_loop(shared.clone(), epoch));
                        let reason = read_loop(&shared, reader, epoch).await;
                        if !shared.closed.get() {
                            tracing::warn!(%reason, "redis pub/sub connection lost");
                        }
                        shared.fail(epoch, reason);
                    }
                    Err(e) => shared.fail(epoch, format!("write: {e}")),
                }
            }
            Ok(_) => {}
            Err(e) => {
                shared.count(|s| s.connect_failures += 1);
                tracing::debug!(error = %e, "redis pub/sub connect failed");
                shared.state.borrow_mut().last_error = e;
            }
        }
        if shared.closed.get() {
            break;
        }
        let _ = monoio::time::timeout(jitter(backoff), shared.driver_wake.wait()).await;
        backoff = (backoff * 2).min(max);
    }
}

/// Sends the subscription changes and pings gathered since the last write, one write
/// per wake-up, until connection `epoch` ends. It starts after the driver wrote the
/// re-subscription, so those confirmations are the first to come back.
async fn write_loop(
    shared: Rc<Shared>,
    mut writer: monoio::io::OwnedWriteHalf<TcpStream>,
    epoch: u64,
) {
    let mut buf = Vec::new();
    loop {
        let live = std::future::poll_fn(|cx| {
            let st = shared.state.borrow();
            if st.epoch != epoch || st.socket.is_none() {
                Poll::Ready(false)
            } else if !st.to_subscribe.is_empty() || !st.to_unsubscribe.is_empty() || st.ping_due {
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
        buf.clear();
        {
            let mut st = shared.state.borrow_mut();
            if !st.to_subscribe.is_empty() {
                let mut c = ::redis::cmd("SUBSCRIBE");
                for ch in st.to_subscribe.drain() {
                    c.arg(&ch[..]);
                }
                c.write_packed_command(&mut buf);
            }
            if !st.to_unsubscribe.is_empty() {
                let mut c = ::redis::cmd("UNSUBSCRIBE");
                for ch in st.to_unsubscribe.drain() {
                    c.arg(&ch[..]);
                }
                c.write_packed_command(&mut buf);
            }
            if std::mem::take(&mut st.ping_due) {
                ::redis::cmd("PING").write_packed_command(&mut buf);
                st.ping_unanswered = true;
            }
        }
        shared.count(|s| s.writes += 1);
        let (res, b) = writer.write_all(buf).await;
        buf = b;
        if let Err(e) = res {
            shared.fail(epoch, format!("write: {e}"));
            return;
        }
        // Let the tasks woken in the turn the write completed add their changes first.
        crate::rt::yield_now().await;
    }
}

/// Asks for a `PING` every call timeout; drops the connection when the previous one
/// is still unanswered.
async fn health_loop(shared: Rc<Shared>, epoch: u64) {
    let every = shared.config.timeout;
    loop {
        monoio::time::sleep(every).await;
        let silent = {
            let mut st = shared.state.borrow_mut();
            if st.epoch != epoch || st.socket.is_none() {
                return;
            }
            if st.ping_unanswered {
                true
            } else {
                st.ping_due = true;
                false
            }
        };
        if silent {
            shared.fail(epoch, format!("no PONG within {every:?}"));
            return;
        }
        shared.writer_wake.wake();
    }
}

/// Reads and dispatches until connection `epoch` ends; returns why it ended.
async fn read_loop(
    shared: &Shared,
    mut reader: monoio::io::OwnedReadHalf<TcpStream>,
    epoch: u64,
) -> String {
    let mut parser = ::redis::Parser::new();
    let mut buf = Vec::with_capacity(READ_CHUNK);
    loop {
        buf.clear();
        let (res, b) = reader.read(buf).await;
        buf = b;
        match res {
            Ok(0) => return "the server closed the connection".to_string(),
            Ok(_) => {}
            Err(e) => return format!("read: {e}"),
        }
        if let Err(reason) = parse_all(&mut parser, &buf, |v| shared.on_value(epoch, v)) {
            return reason;
        }
        if shared.state.borrow().epoch != epoch {
            return "replaced".to_string();
        }
    }
}
