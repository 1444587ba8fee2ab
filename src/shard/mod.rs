//! The per-core runtime: one [`Shard`] per thread, pinned to a core, with its own
//! monoio io_uring loop. Shards share nothing mutable; they talk through the typed
//! messages of [`msg::ShardMsg`] over the SPSC rings of [`ring`].
//!
//! The runtime knows connections, rings, timers and backpressure, not what the
//! messages mean: a [`Service`] sits on top (the chat service, `crate::chat::Chat`),
//! one value of it per shard, reached as the shard's own state (`Shard<S>` derefs to
//! `S`, like seastar's `sharded<T>::local()`). Work for another shard is a closure run
//! there with that shard's state ([`Shard::post`], [`Shard::call`],
//! [`Shard::invoke_on`]); its answer comes back as the typed value the caller waits for.
//!
//! Routing is one function per kind of key, used everywhere: [`shard_of_user`] and
//! [`shard_of_conv`]. A call to the current shard takes the local path (no ring).

pub mod accept;
pub mod acks;
pub mod conn;
pub mod msg;
pub mod ring;
pub mod shutdown;
pub mod timer;

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::ops::Deref;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::task::{Poll, Waker};

pub use crate::rt::yield_now;
use std::time::Duration;

use bytes::Bytes;
use local_sync::oneshot;

use crate::auth::Verifier;
use crate::codes::ApiError;
use crate::config::Config;
use crate::proto::http::Head;
use crate::proto::pb::client_frame::Body;
use conn::Conn;
use msg::{ReplyTo, ShardMsg};
use ring::Endpoint;

/// What runs on top of the runtime, one value per shard. The runtime calls these
/// hooks; everything else the service does through jobs it posts to shards.
pub trait Service: Sized + 'static {
    /// A WebSocket connection of a user this shard owns is open: file it with the
    /// user's devices. Returns the connection of the same (user, device) it replaces
    /// (the runtime closes that one with KICKOUT `replaced`).
    fn conn_opened(shard: &Rc<Shard<Self>>, conn: &Rc<Conn>) -> Option<Rc<Conn>>;
    /// A complete message or control frame arrived on `conn`: it is alive.
    fn conn_seen(shard: &Rc<Shard<Self>>, conn: &Rc<Conn>);
    /// `conn` ended.
    fn conn_closed(shard: &Rc<Shard<Self>>, conn: &Rc<Conn>);
    /// Every open connection of this shard (graceful shutdown closes them).
    fn conns(&self) -> Vec<Rc<Conn>>;
    /// Serves one client request of `conn`: the encoded XxxResponse for the RESPONSE
    /// envelope, or the error to put there.
    fn request(
        shard: Rc<Shard<Self>>,
        conn: Rc<Conn>,
        body: Body,
    ) -> impl Future<Output = Result<Bytes, ApiError>>;
    /// Serves one HTTP request (any path but `/ws`): the whole HTTP response.
    fn http(shard: &Rc<Shard<Self>>, head: &Head, body: &[u8]) -> impl Future<Output = Vec<u8>>;
    /// Whether `path` belongs on the admin listener when there is one.
    fn is_admin_path(path: &str) -> bool;
    /// Whether the service's own queues are past their marks (half the marks with
    /// `low`): readers stop taking new requests until they are not.
    fn behind(&self, low: bool) -> bool;
    /// Bytes the service accepted but has not made durable yet (shutdown waits for 0).
    fn unflushed(&self) -> usize;
    /// This shard's bell rang (another thread has news): wake what of the service
    /// waits on other threads (e.g. the store's completions).
    fn on_bell(&self);
}

/// The shard that owns a user's connections and conversation rows.
pub fn shard_of_user(user: &str, shards: usize) -> usize {
    (xxhash_rust::xxh3::xxh3_64(user.as_bytes()) % shards as u64) as usize
}

/// The shard that owns a conversation's seq counter, messages and dedupe window.
pub fn shard_of_conv(conv_id: &str, shards: usize) -> usize {
    (xxhash_rust::xxh3::xxh3_64(conv_id.as_bytes()) % shards as u64) as usize
}

/// A call to another shard that has no answer after this long is answered 50001 by
/// the caller's shard (the target is stuck or gone); the late answer is dropped.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages waiting in a shard's ring outboxes above which its readers pause.
pub const RING_BACKLOG_HIGH: usize = ring::BACKLOG_HIGH;

/// What every shard of the process shares: atomics only, never locked.
#[derive(Default)]
pub struct Global {
    /// Open WebSocket connections on all shards (enforces `max_connections`).
    pub connections: AtomicUsize,
    /// Set once by the main thread on SIGTERM/SIGINT, before it rings every bell.
    pub shutting_down: AtomicBool,
}

/// Tasks paused until this shard has caught up, and whether the one task that
/// watches for it runs. A paused connection costs one `Waker` here, not a timer.
#[derive(Default)]
struct Pressure {
    /// Readers (WebSocket and HTTP) waiting for every queue to drain.
    input: RefCell<Vec<Waker>>,
    /// Fan-out tasks waiting for the ring outboxes to drain.
    ring: RefCell<Vec<Waker>>,
    watching: Cell<bool>,
}

/// The answer to a [`Shard::call`], once it arrives: the callee's `R`, or an error
/// when the call got no answer (the target dropped it, or [`CALL_TIMEOUT`] passed).
pub struct Call<R>(oneshot::Receiver<R>);

impl<R> Future for Call<R> {
    type Output = Result<R, ApiError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<R, ApiError>> {
        match std::pin::Pin::new(&mut self.0).poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(Ok(r)),
            Poll::Ready(Err(_)) => Poll::Ready(Err(ApiError::Internal(format!(
                "no answer from the other shard (dropped, or none within {}s)",
                CALL_TIMEOUT.as_secs()
            )))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A call waiting for its answer: hands the boxed answer to the caller's `Call<R>`.
type Pending = Box<dyn FnOnce(Box<dyn Any + Send>)>;

/// Counters of one shard, read by /metrics.
#[derive(Default)]
pub struct Counters {
    pub connections: Cell<u64>,
    pub connections_total: Cell<u64>,
    pub handovers: Cell<u64>,
    pub slow_reader_cuts: Cell<u64>,
    pub heartbeat_timeouts: Cell<u64>,
    /// Latency histograms, refusals by code, cuts by reason.
    pub recorded: crate::metrics::Recorded,
}

impl Counters {
    pub fn bump(c: &Cell<u64>) {
        c.set(c.get() + 1);
    }

    /// Counts a connection the server closes (one call per close frame it sends).
    pub fn cut(&self, why: crate::metrics::Cut) {
        self.recorded.cut(why);
    }
}

/// One shard's runtime state and its service `S`. Only its own thread touches it;
/// every field says what it owns.
pub struct Shard<S> {
    pub id: usize,
    /// Number of shards.
    pub n: usize,
    pub cfg: Arc<Config>,
    pub verifier: Verifier,
    /// This shard's ends of the rings.
    pub ring: Rc<Endpoint<ShardMsg<S>>>,
    /// What all shards share (connection count, shutdown flag).
    pub global: Arc<Global>,
    /// Calls this shard made that wait for an answer, by token, with the wheel second
    /// after which they are dropped ([`CALL_TIMEOUT`]).
    calls: RefCell<HashMap<u64, (Pending, u32)>>,
    next_token: Cell<u64>,
    /// Heartbeat deadlines of this shard's connections.
    pub timers: RefCell<timer::Wheel>,
    pub next_conn_id: Cell<u64>,
    /// Read buffers lent to connections while they read (none held while idle).
    pub read_bufs: RefCell<Vec<Vec<u8>>>,
    /// Bytes of unfinished incoming messages held by this shard's connections
    /// (capped by `frame_memory_bytes`).
    pub frame_memory: Cell<usize>,
    /// Requests being served for this shard's connections and HTTP clients.
    pub requests_in_flight: Cell<usize>,
    /// Readers waiting for one of their connection's requests to finish, by conn id.
    pub paused_readers: RefCell<HashMap<u64, Waker>>,
    /// The highest seq each connection acknowledged per conversation (PushAck), for
    /// connections that acked; kept in memory only.
    pub push_acks: RefCell<acks::AckTable>,
    pressure: Pressure,
    /// Set when shutdown begins: no new connections or requests.
    pub draining: Cell<bool>,
    /// Tasks to wake when draining begins (the accept loop).
    drain_wakers: RefCell<Vec<Waker>>,
    pub counters: Counters,
    /// The service on top: this shard's part of it.
    svc: S,
}

impl<S> Deref for Shard<S> {
    type Target = S;

    /// The service's state of this shard.
    fn deref(&self) -> &S {
        &self.svc
    }
}

impl<S: Service> Shard<S> {
    pub fn new(
        id: usize,
        cfg: Arc<Config>,
        secret: &[u8],
        ring: Endpoint<ShardMsg<S>>,
        global: Arc<Global>,
        svc: S,
    ) -> Rc<Shard<S>> {
        let timeout_ticks = cfg.heartbeat_timeout.as_secs().max(1) as u32;
        Rc::new(Shard {
            id,
            n: cfg.shards,
            verifier: Verifier::new(secret),
            ring: Rc::new(ring),
            global,
            calls: RefCell::new(HashMap::new()),
            next_token: Cell::new(1),
            timers: RefCell::new(timer::Wheel::new(timeout_ticks)),
            next_conn_id: Cell::new(1),
            read_bufs: RefCell::new(Vec::new()),
            frame_memory: Cell::new(0),
            requests_in_flight: Cell::new(0),
            paused_readers: RefCell::new(HashMap::new()),
            push_acks: RefCell::new(acks::AckTable::default()),
            pressure: Pressure::default(),
            draining: Cell::new(false),
            drain_wakers: RefCell::new(Vec::new()),
            counters: Counters::default(),
            cfg,
            svc,
        })
    }

    pub fn user_shard(&self, user: &str) -> usize {
        shard_of_user(user, self.n)
    }

    pub fn conv_shard(&self, conv_id: &str) -> usize {
        shard_of_conv(conv_id, self.n)
    }

    /// Runs `job` on shard `target` with its state, one way; on this shard it runs
    /// right away.
    pub fn post(self: &Rc<Self>, target: usize, job: impl FnOnce(&Rc<Shard<S>>) + Send + 'static) {
        if target == self.id {
            job(self);
        } else {
            self.ring.send(target, ShardMsg::Run(Box::new(job)));
        }
    }

    /// Runs `job` on shard `target` with where to send its answer; `job` (or whoever
    /// it hands the [`ReplyTo`] to) answers with [`Shard::reply`], now or later.
    pub fn call<R: Send + 'static>(
        self: &Rc<Self>,
        target: usize,
        job: impl FnOnce(&Rc<Shard<S>>, ReplyTo<R>) + Send + 'static,
    ) -> Call<R> {
        let (tx, rx) = oneshot::channel::<R>();
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        let deadline = self.timers.borrow().now() + CALL_TIMEOUT.as_secs() as u32;
        let pending: Pending = Box::new(move |value: Box<dyn Any + Send>| {
            if let Ok(value) = value.downcast::<R>() {
                let _ = tx.send(*value);
            }
        });
        self.calls.borrow_mut().insert(token, (pending, deadline));
        let reply = ReplyTo::new(self.id, token);
        self.post(target, move |shard| job(shard, reply));
        Call(rx)
    }

    /// Runs the future `f` makes on shard `target` and answers with its output
    /// (seastar's `invoke_on`).
    pub fn invoke_on<R, F, Fut>(self: &Rc<Self>, target: usize, f: F) -> Call<R>
    where
        R: Send + 'static,
        F: FnOnce(Rc<Shard<S>>) -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
    {
        self.call(target, move |shard, reply| {
            let shard = shard.clone();
            monoio::spawn(async move {
                let r = f(shard.clone()).await;
                shard.reply(reply, r);
            });
        })
    }

    /// Answers a call, locally or through the ring.
    pub fn reply<R: Send + 'static>(self: &Rc<Self>, to: ReplyTo<R>, value: R) {
        if to.shard == self.id {
            self.answer_call(to.token, Box::new(value));
        } else {
            self.ring.send(
                to.shard,
                ShardMsg::Reply {
                    token: to.token,
                    value: Box::new(value),
                },
            );
        }
    }

    /// Handles one message addressed to this shard. Never blocks: work that waits
    /// runs in a task of its own.
    pub fn handle(self: &Rc<Self>, msg: ShardMsg<S>) {
        match msg {
            ShardMsg::HandOver(h) => conn::adopt(self, *h),
            ShardMsg::Run(job) => job(self),
            ShardMsg::Reply { token, value } => self.answer_call(token, value),
        }
    }

    fn answer_call(&self, token: u64, value: Box<dyn Any + Send>) {
        let pending = self.calls.borrow_mut().remove(&token);
        if let Some((answer, _)) = pending {
            answer(value);
        }
    }

    /// Drops every call whose deadline passed (run once a second by the ticker; the
    /// map holds only calls in flight): their callers get an error.
    pub fn expire_calls(&self) {
        let now = self.timers.borrow().now();
        let expired: Vec<u64> = self
            .calls
            .borrow()
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            tracing::warn!(shard = self.id, token, "a call to another shard timed out");
            self.calls.borrow_mut().remove(&token);
        }
    }

    /// Whether this shard is behind (ring outboxes or the service's queues past
    /// their marks): readers stop taking new requests until it is not. `low` uses
    /// half the marks, so readers resume with room to spare.
    fn behind(&self, low: bool) -> bool {
        let d = if low { 2 } else { 1 };
        self.ring.backlog() > RING_BACKLOG_HIGH / d || self.svc.behind(low)
    }

    /// Waits until the shard has caught up (see `Shard::behind`); at once if it has.
    pub async fn input_allowed(self: &Rc<Self>) {
        if self.behind(false) {
            self.wait_pressure(true).await;
        }
    }

    /// Waits until the ring outboxes are below their mark (fan-out producers: they must
    /// not wait for the fan-out queues they drain).
    pub async fn ring_room(self: &Rc<Self>) {
        if self.ring.backlog() > RING_BACKLOG_HIGH {
            self.wait_pressure(false).await;
        }
    }

    async fn wait_pressure(self: &Rc<Self>, input: bool) {
        std::future::poll_fn(|cx| {
            let blocked = if input {
                self.behind(true)
            } else {
                self.ring.backlog() > RING_BACKLOG_HIGH / 2
            };
            if !blocked {
                return Poll::Ready(());
            }
            let list = if input {
                &self.pressure.input
            } else {
                &self.pressure.ring
            };
            list.borrow_mut().push(cx.waker().clone());
            if !self.pressure.watching.replace(true) {
                monoio::spawn(watch_pressure(self.clone()));
            }
            Poll::Pending
        })
        .await
    }

    /// Starts shutdown on this shard: wakes the accept loop so it stops.
    pub fn begin_draining(&self) -> bool {
        if self.draining.replace(true) {
            return false;
        }
        for w in self.drain_wakers.borrow_mut().drain(..) {
            w.wake();
        }
        true
    }

    /// Resolves once draining has begun. Each waiting task is kept once, however
    /// often it polls (the accept loops poll this once per accepted connection).
    pub async fn until_draining(&self) {
        std::future::poll_fn(|cx| {
            if self.draining.get() {
                return Poll::Ready(());
            }
            let mut wakers = self.drain_wakers.borrow_mut();
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Counts a request in flight for one of this shard's clients.
    pub fn request_started(&self) {
        self.requests_in_flight
            .set(self.requests_in_flight.get() + 1);
    }

    pub fn request_finished(&self) {
        self.requests_in_flight
            .set(self.requests_in_flight.get().saturating_sub(1));
    }

    /// Borrows a read buffer of `size` bytes of capacity from the shard's pool.
    pub fn take_read_buf(&self, size: usize) -> Vec<u8> {
        self.read_bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(size))
    }

    /// Returns a read buffer to the pool (kept small: a few per shard).
    pub fn give_read_buf(&self, mut buf: Vec<u8>) {
        let mut pool = self.read_bufs.borrow_mut();
        if pool.len() < 64 {
            buf.clear();
            pool.push(buf);
        }
    }
}

/// The one task per shard that watches queues while something waits for them to
/// drain: checks every millisecond, wakes the waiters of each condition once it
/// holds, and ends when nobody waits.
async fn watch_pressure<S: Service>(shard: Rc<Shard<S>>) {
    loop {
        monoio::time::sleep(Duration::from_millis(1)).await;
        let p = &shard.pressure;
        if shard.ring.backlog() <= RING_BACKLOG_HIGH / 2 {
            for w in p.ring.borrow_mut().drain(..) {
                w.wake();
            }
        }
        if !shard.behind(true) {
            for w in p.input.borrow_mut().drain(..) {
                w.wake();
            }
        }
        if p.ring.borrow().is_empty() && p.input.borrow().is_empty() {
            p.watching.set(false);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service with nothing but a "behind" switch: the runtime needs no chat.
    #[derive(Default)]
    struct Idle {
        behind: Cell<bool>,
    }

    impl Service for Idle {
        fn conn_opened(_: &Rc<Shard<Self>>, _: &Rc<Conn>) -> Option<Rc<Conn>> {
            None
        }
        fn conn_seen(_: &Rc<Shard<Self>>, _: &Rc<Conn>) {}
        fn conn_closed(_: &Rc<Shard<Self>>, _: &Rc<Conn>) {}
        fn conns(&self) -> Vec<Rc<Conn>> {
            Vec::new()
        }
        async fn request(_: Rc<Shard<Self>>, _: Rc<Conn>, _: Body) -> Result<Bytes, ApiError> {
            Ok(Bytes::new())
        }
        async fn http(_: &Rc<Shard<Self>>, _: &Head, _: &[u8]) -> Vec<u8> {
            Vec::new()
        }
        fn is_admin_path(_: &str) -> bool {
            false
        }
        fn behind(&self, _low: bool) -> bool {
            self.behind.get()
        }
        fn unflushed(&self) -> usize {
            0
        }
        fn on_bell(&self) {}
    }

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>> {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("io_uring runtime")
    }

    fn one_shard() -> Rc<Shard<Idle>> {
        let parts = ring::mesh(1).expect("mesh").pop().expect("parts");
        let cfg = Arc::new(Config {
            shards: 1,
            ..Config::default()
        });
        Shard::new(
            0,
            cfg,
            b"secret-secret-secret",
            parts.into_endpoint(),
            Arc::default(),
            Idle::default(),
        )
    }

    /// 10,000 readers paused while the shard is behind cost one poll each to pause and
    /// one to resume: no timer per reader, no polling while they wait.
    #[test]
    fn paused_readers_wait_in_a_list_and_all_resume() {
        const READERS: usize = 10_000;
        runtime().block_on(async move {
            let shard = one_shard();
            shard.behind.set(true);
            let polls = Rc::new(Cell::new(0usize));
            let resumed = Rc::new(Cell::new(0usize));
            for _ in 0..READERS {
                let (shard, polls, resumed) = (shard.clone(), polls.clone(), resumed.clone());
                monoio::spawn(async move {
                    let mut wait = std::pin::pin!(shard.input_allowed());
                    std::future::poll_fn(|cx| {
                        polls.set(polls.get() + 1);
                        wait.as_mut().poll(cx)
                    })
                    .await;
                    resumed.set(resumed.get() + 1);
                });
            }
            monoio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(resumed.get(), 0, "nobody reads while the shard is behind");
            assert_eq!(polls.get(), READERS, "waiting readers are not polled");
            shard.behind.set(false);
            monoio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(resumed.get(), READERS, "every reader resumes");
            assert_eq!(polls.get(), 2 * READERS, "one more poll each to resume");
        });
    }

    /// A call's answer is the callee's typed value; one that is never answered fails
    /// once its deadline passes.
    #[test]
    fn calls_answer_typed_values_and_expire() {
        runtime().block_on(async move {
            let shard = one_shard();
            let n: Result<Vec<u32>, ApiError> =
                shard.invoke_on(0, |_| async { vec![1u32, 2, 3] }).await;
            assert_eq!(n.ok(), Some(vec![1, 2, 3]));
            let later = shard.call(0, |_, _never_answered: ReplyTo<u8>| {});
            shard.timers.borrow_mut().advance();
            for _ in 0..CALL_TIMEOUT.as_secs() {
                shard.timers.borrow_mut().advance();
            }
            shard.expire_calls();
            assert!(
                later.await.is_err(),
                "an unanswered call fails at its deadline"
            );
        });
    }
}
