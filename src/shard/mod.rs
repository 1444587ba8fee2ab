//! The per-core runtime: one [`Shard`] per thread, pinned to a core, with its own
//! monoio io_uring loop. Shards share nothing mutable; they talk through the typed
//! messages of [`msg::ShardMsg`] over the SPSC rings of [`ring`].
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

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::task::{Poll, Waker};

pub use crate::rt::yield_now;
use std::time::Duration;

use local_sync::oneshot;

use crate::auth::Verifier;
use crate::chat::filter::Filter;
use crate::chat::{self, ConvState, UserState};
use crate::codes::ApiError;
use crate::config::Config;
use crate::store::ShardStore;
use msg::{Reply, ReplyTo, ShardMsg};
use ring::Endpoint;

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
/// Bytes staged in the store but not yet durable above which readers pause.
pub const STORE_UNSYNCED_HIGH: usize = 64 << 20;
/// Fan-out jobs queued behind conversations above which readers pause.
pub const FANOUT_QUEUED_HIGH: usize = 4096;

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

/// The reply to a [`Shard::call`], once it arrives.
pub struct Call(oneshot::Receiver<Reply>);

impl Future for Call {
    type Output = Reply;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Reply> {
        match std::pin::Pin::new(&mut self.0).poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(_)) => {
                Poll::Ready(Err(ApiError::Internal("the call was dropped".into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Counters of one shard, read by /metrics.
#[derive(Default)]
pub struct Counters {
    pub connections: Cell<u64>,
    pub connections_total: Cell<u64>,
    pub handovers: Cell<u64>,
    pub messages_stored: Cell<u64>,
    pub pushes: Cell<u64>,
    pub slow_reader_cuts: Cell<u64>,
    pub heartbeat_timeouts: Cell<u64>,
    pub cache_evictions: Cell<u64>,
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

/// One shard's state. Only its own thread touches it; every field says what it owns.
pub struct Shard {
    pub id: usize,
    /// Number of shards.
    pub n: usize,
    pub cfg: Arc<Config>,
    /// The content filter, compiled once at start-up and shared by every shard.
    pub filter: Arc<Filter>,
    pub verifier: Verifier,
    /// This shard's store (conversations and user rows it owns).
    pub store: Rc<ShardStore>,
    /// This shard's ends of the rings.
    pub ring: Rc<Endpoint>,
    /// Users this shard owns that are online or were touched: devices, rows, rate.
    pub users: RefCell<HashMap<String, UserState>>,
    /// Conversations this shard owns that were touched: seq counter, in-flight dedupe.
    pub convs: RefCell<HashMap<String, ConvState>>,
    /// Bumped whenever conversations are dropped from `convs`: a load that started
    /// before may have read what is no longer true, and starts over.
    pub conv_epoch: Cell<u64>,
    /// Bytes charged for loaded rows and conversations (see `chat::cache`), and the
    /// eviction queue over them.
    pub cache_bytes: Cell<usize>,
    pub cache_queue: RefCell<std::collections::VecDeque<chat::cache::CacheKey>>,
    /// An eviction pass is scheduled for the end of this loop turn.
    pub cache_pass_due: Cell<bool>,
    /// Users whose rows a delivery needs, waiting for the batched loader, and whether
    /// it runs (`chat::user`).
    pub rows_to_load: RefCell<std::collections::VecDeque<String>>,
    pub rows_loader_running: Cell<bool>,
    /// What all shards share (connection count, shutdown flag).
    pub global: Arc<Global>,
    /// Calls this shard made that wait for a reply, by token, with the wheel second
    /// after which they are answered with an error ([`CALL_TIMEOUT`]).
    calls: RefCell<HashMap<u64, (oneshot::Sender<Reply>, u32)>>,
    next_token: Cell<u64>,
    /// Heartbeat deadlines of this shard's connections.
    pub timers: RefCell<timer::Wheel>,
    pub next_conn_id: Cell<u64>,
    /// Read buffers lent to connections while they read (none held while idle).
    pub read_bufs: RefCell<Vec<Vec<u8>>>,
    /// Bytes of unfinished incoming messages held by this shard's connections
    /// (capped by `frame_memory_bytes`).
    pub frame_memory: Cell<usize>,
    /// Fan-out jobs queued behind conversations of this shard.
    pub fanout_queued: Cell<usize>,
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
}

impl Shard {
    pub fn new(
        id: usize,
        cfg: Arc<Config>,
        filter: Arc<Filter>,
        secret: &[u8],
        store: Rc<ShardStore>,
        ring: Endpoint,
        global: Arc<Global>,
    ) -> Rc<Shard> {
        let timeout_ticks = cfg.heartbeat_timeout.as_secs().max(1) as u32;
        Rc::new(Shard {
            id,
            n: cfg.shards,
            filter,
            verifier: Verifier::new(secret),
            store,
            ring: Rc::new(ring),
            users: RefCell::new(HashMap::new()),
            convs: RefCell::new(HashMap::new()),
            conv_epoch: Cell::new(0),
            cache_bytes: Cell::new(0),
            cache_queue: RefCell::new(std::collections::VecDeque::new()),
            cache_pass_due: Cell::new(false),
            rows_to_load: RefCell::new(std::collections::VecDeque::new()),
            rows_loader_running: Cell::new(false),
            global,
            calls: RefCell::new(HashMap::new()),
            next_token: Cell::new(1),
            timers: RefCell::new(timer::Wheel::new(timeout_ticks)),
            next_conn_id: Cell::new(1),
            read_bufs: RefCell::new(Vec::new()),
            frame_memory: Cell::new(0),
            fanout_queued: Cell::new(0),
            requests_in_flight: Cell::new(0),
            paused_readers: RefCell::new(HashMap::new()),
            push_acks: RefCell::new(acks::AckTable::default()),
            pressure: Pressure::default(),
            draining: Cell::new(false),
            drain_wakers: RefCell::new(Vec::new()),
            counters: Counters::default(),
            cfg,
        })
    }

    pub fn user_shard(&self, user: &str) -> usize {
        shard_of_user(user, self.n)
    }

    pub fn conv_shard(&self, conv_id: &str) -> usize {
        shard_of_conv(conv_id, self.n)
    }

    /// Sends a one-way message; to this shard it is handled right away.
    pub fn post(self: &Rc<Self>, target: usize, msg: ShardMsg) {
        if target == self.id {
            self.handle(msg);
        } else {
            self.ring.send(target, msg);
        }
    }

    /// Sends a command and waits for its reply.
    pub fn call(self: &Rc<Self>, target: usize, make: impl FnOnce(ReplyTo) -> ShardMsg) -> Call {
        let (tx, rx) = oneshot::channel();
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        let deadline = self.timers.borrow().now() + CALL_TIMEOUT.as_secs() as u32;
        self.calls.borrow_mut().insert(token, (tx, deadline));
        self.post(
            target,
            make(ReplyTo {
                shard: self.id,
                token,
            }),
        );
        Call(rx)
    }

    /// Answers a call, locally or through the ring.
    pub fn reply(self: &Rc<Self>, to: ReplyTo, reply: Reply) {
        if to.shard == self.id {
            self.answer_call(to.token, reply);
        } else {
            self.ring.send(
                to.shard,
                ShardMsg::Reply {
                    token: to.token,
                    reply,
                },
            );
        }
    }

    /// Handles one message addressed to this shard. Never blocks: work that waits
    /// (durable writes) runs in a task of its own.
    pub fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::HandOver(h) => conn::adopt(self, *h),
            ShardMsg::Execute {
                reply,
                caller,
                body,
            } => {
                let shard = self.clone();
                monoio::spawn(async move {
                    let r = chat::execute(&shard, &caller, *body).await;
                    shard.reply(reply, r);
                });
            }
            ShardMsg::Send { reply, send } => chat::conv::handle_send(self, reply, *send),
            ShardMsg::Pull { reply, pull } => {
                let shard = self.clone();
                monoio::spawn(async move {
                    let r = chat::conv::handle_pull(&shard, &pull).await;
                    shard.reply(reply, r);
                });
            }
            ShardMsg::ByIds { reply, cmd } => {
                let shard = self.clone();
                monoio::spawn(async move {
                    let r = chat::conv::handle_by_ids(&shard, *cmd).await;
                    shard.reply(reply, r);
                });
            }
            ShardMsg::Recall { reply, cmd } => {
                let shard = self.clone();
                monoio::spawn(async move { chat::conv::handle_recall(&shard, reply, *cmd).await });
            }
            ShardMsg::CreateGroup { reply, cmd } => {
                let shard = self.clone();
                monoio::spawn(async move { chat::group::handle_create(&shard, reply, *cmd).await });
            }
            ShardMsg::UpdateMembers { reply, cmd } => {
                let shard = self.clone();
                monoio::spawn(async move { chat::group::handle_update(&shard, reply, *cmd).await });
            }
            ShardMsg::ConvInfo { reply, convs } => {
                let shard = self.clone();
                monoio::spawn(async move {
                    let r = chat::conv::handle_info(&shard, &convs).await;
                    shard.reply(reply, r);
                });
            }
            ShardMsg::Deliver(d) => chat::user::deliver(self, &d),
            ShardMsg::Notify(n) => chat::user::notify(self, &n.frame, &n.users),
            ShardMsg::Kick {
                reply,
                user,
                device,
                reason,
            } => {
                let n = chat::admin::kick_local(self, &user, &device, &reason);
                self.reply(reply, Ok(bytes::Bytes::copy_from_slice(&n.to_be_bytes())));
            }
            ShardMsg::Broadcast {
                reply,
                frame,
                users,
            } => {
                let n = chat::admin::broadcast_local(self, &frame, users.as_deref());
                self.reply(reply, Ok(bytes::Bytes::copy_from_slice(&n.to_be_bytes())));
            }
            ShardMsg::Presence { reply, users } => {
                let r = chat::admin::presence_local(self, &users);
                self.reply(reply, r);
            }
            ShardMsg::Ping { reply } => self.reply(reply, Ok(bytes::Bytes::new())),
            ShardMsg::Metrics { reply } => {
                self.reply(reply, Ok(crate::metrics::snapshot(self).encode()));
            }
            ShardMsg::Reply { token, reply } => self.answer_call(token, reply),
        }
    }

    fn answer_call(&self, token: u64, reply: Reply) {
        let pending = self.calls.borrow_mut().remove(&token);
        if let Some((tx, _)) = pending {
            let _ = tx.send(reply);
        }
    }

    /// Answers, with an error, every call whose deadline passed (run once a second by
    /// the ticker; the map holds only calls in flight).
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
            let err = ApiError::Internal(format!(
                "no answer from the owning shard within {}s",
                CALL_TIMEOUT.as_secs()
            ));
            tracing::warn!(shard = self.id, token, "a call to another shard timed out");
            self.answer_call(token, Err(err));
        }
    }

    /// Whether this shard is behind (ring outboxes, unsynced store bytes or queued
    /// fan-out past their marks): readers stop taking new requests until it is not.
    /// `low` uses half the marks, so readers resume with room to spare.
    fn behind(&self, low: bool) -> bool {
        let d = if low { 2 } else { 1 };
        self.ring.backlog() > RING_BACKLOG_HIGH / d
            || self.store.unsynced_bytes() > STORE_UNSYNCED_HIGH / d
            || self.fanout_queued.get() > FANOUT_QUEUED_HIGH / d
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

    /// After a failed store batch: forget every cached conversation (their seq
    /// counters may have advanced past what is stored) and let the store accept writes.
    pub fn reset_after_store_failure(self: &Rc<Self>) {
        if self.store.has_failed() {
            let convs = std::mem::take(&mut *self.convs.borrow_mut());
            self.conv_epoch.set(self.conv_epoch.get() + 1);
            self.store.reset_after_failure();
            for (_, conv) in convs {
                chat::cache::release(self, conv.charged());
                let queued = conv.queued_fanout();
                self.fanout_queued
                    .set(self.fanout_queued.get().saturating_sub(queued));
                for waiter in conv.into_waiters() {
                    let err = ApiError::StoreUnavailable("an earlier write failed".into());
                    self.reply(waiter, Err(err));
                }
            }
        }
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
async fn watch_pressure(shard: Rc<Shard>) {
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

    /// 10,000 readers paused while the shard is behind cost one poll each to pause and
    /// one to resume: no timer per reader, no polling while they wait.
    #[test]
    fn paused_readers_wait_in_a_list_and_all_resume() {
        const READERS: usize = 10_000;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("io_uring runtime");
        rt.block_on(async move {
            let parts = ring::mesh(1).expect("mesh").pop().expect("parts");
            let store = ShardStore::open(dir.path(), 0, parts.bell()).expect("store");
            let cfg = Arc::new(Config {
                data_dir: dir.path().to_path_buf(),
                shards: 1,
                ..Config::default()
            });
            let shard = Shard::new(
                0,
                cfg,
                Arc::default(),
                b"secret-secret-secret",
                store,
                parts.into_endpoint(),
                Arc::default(),
            );
            shard.fanout_queued.set(FANOUT_QUEUED_HIGH + 1);
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
            shard.fanout_queued.set(0);
            monoio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(resumed.get(), READERS, "every reader resumes");
            assert_eq!(polls.get(), 2 * READERS, "one more poll each to resume");
        });
    }
}
