//! The per-core runtime: one [`Shard`] per thread, pinned to a core, with its own
//! monoio io_uring loop. Shards share nothing mutable; they talk through the typed
//! messages of [`msg::ShardMsg`] over the SPSC rings of [`ring`].
//!
//! Routing is one function per kind of key, used everywhere: [`shard_of_user`] and
//! [`shard_of_conv`]. A call to the current shard takes the local path (no ring).

pub mod accept;
pub mod conn;
pub mod doorbell;
pub mod msg;
pub mod ring;
pub mod timer;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

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

/// Lets every other ready task run once before continuing.
///
/// monoio puts a task that wakes itself during its own poll at the *front* of the run
/// queue (its "yield" runs the task again at once), so `wake_by_ref` + `Pending` would
/// starve every other task of the shard: a busy ring consumer or a large fan-out
/// would never let connections run, and a test producer spinning on it never let its
/// outbox flusher run. Instead the wake comes from a tiny task spawned behind
/// everything already queued; woken from outside its poll, this task goes to the back.
pub fn yield_now() -> impl Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            let waker = cx.waker().clone();
            monoio::spawn(async move { waker.wake() });
            Poll::Pending
        }
    })
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
    /// Calls this shard made that wait for a reply, by token.
    calls: RefCell<HashMap<u64, oneshot::Sender<Reply>>>,
    next_token: Cell<u64>,
    /// Heartbeat deadlines of this shard's connections.
    pub timers: RefCell<timer::Wheel>,
    pub next_conn_id: Cell<u64>,
    /// Read buffers lent to connections while they read (none held while idle).
    pub read_bufs: RefCell<Vec<Vec<u8>>>,
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
            calls: RefCell::new(HashMap::new()),
            next_token: Cell::new(1),
            timers: RefCell::new(timer::Wheel::new(timeout_ticks)),
            next_conn_id: Cell::new(1),
            read_bufs: RefCell::new(Vec::new()),
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
        self.calls.borrow_mut().insert(token, tx);
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
            if let Some(tx) = self.calls.borrow_mut().remove(&to.token) {
                let _ = tx.send(reply);
            }
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
                let r = chat::conv::handle_pull(self, &pull);
                self.reply(reply, r);
            }
            ShardMsg::ByIds { reply, cmd } => {
                let r = chat::conv::handle_by_ids(self, &cmd);
                self.reply(reply, r);
            }
            ShardMsg::Recall { reply, cmd } => chat::conv::handle_recall(self, reply, *cmd),
            ShardMsg::CreateGroup { reply, cmd } => chat::group::handle_create(self, reply, *cmd),
            ShardMsg::UpdateMembers { reply, cmd } => chat::group::handle_update(self, reply, *cmd),
            ShardMsg::ConvInfo { reply, convs } => {
                let r = chat::conv::handle_info(self, &convs);
                self.reply(reply, r);
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
                let body: Vec<u8> = crate::api::metric_values(self)
                    .iter()
                    .flat_map(|v| v.to_be_bytes())
                    .collect();
                self.reply(reply, Ok(body.into()));
            }
            ShardMsg::Reply { token, reply } => {
                if let Some(tx) = self.calls.borrow_mut().remove(&token) {
                    let _ = tx.send(reply);
                }
            }
        }
    }

    /// After a failed store batch: forget every cached conversation (their seq
    /// counters may have advanced past what is stored) and let the store accept writes.
    pub fn reset_after_store_failure(self: &Rc<Self>) {
        if self.store.has_failed() {
            let convs = std::mem::take(&mut *self.convs.borrow_mut());
            self.store.reset_after_failure();
            for (_, conv) in convs {
                for waiter in conv.into_waiters() {
                    let err = ApiError::StoreUnavailable("an earlier write failed".into());
                    self.reply(waiter, Err(err));
                }
            }
        }
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
