//! Membership: each node holds a lease in Redis; every node reads the set of nodes
//! whose lease is current (the live set) and reports joins and leaves with the
//! membership epoch.
//!
//! # In Redis
//! - `imshard:{nodes}`: ZSET, member = node id, score = lease expiry in Redis' clock
//!   (ms).
//! - `imshard:{nodes}:info`: HASH, node id -> `"<instance> <addr>"`: a random instance
//!   number drawn at process start and the node-to-node address it advertises.
//! - `imshard:{nodes}:epoch`: the membership epoch, `INCR`ed by the scripts on every
//!   change of the live set (a join, a rejoin after a lapse or a restart, a graceful
//!   leave, an expired lease removed).
//! - channel [`NODES_CHANGED_CHANNEL`]: published on every such change, so nodes that
//!   subscribe (with [`crate::store::redis::PubSubConn`]) read the new set at once
//!   ([`Membership::refresh_now`]) instead of at their next periodic read.
//!
//! All expiry arithmetic runs in Lua on Redis' clock (`TIME`), so node clocks need not
//! agree; only their *rates* matter (see the timing argument). The keys share the hash
//! tag `{nodes}`, so the scripts also run on Redis Cluster.
//!
//! # What it guarantees
//! - **One live instance per node id**: registering an id whose lease is current
//!   under another instance is refused ([`MembershipError::NodeIdInUse`], retried
//!   every renew period), so a restarted node joins only after its previous life's
//!   lease expired and that life's slots were given up.
//! - **Same epoch, same set**: the epoch and the live set are read by one script, and
//!   every change of the set bumps the epoch in the same script, so two nodes that
//!   report the same epoch hold the same live set.
//! - **A node stops owning before others take over** (the timing argument):
//!   - `L` = lease ([`MembershipConfig::lease`], default 6 s, at most 10 s). A renew
//!     goes out every `L/3`; the node's lease is valid, in its own monotonic clock,
//!     until `sent + L - m`, with `sent` the moment it *sent* the last renew that
//!     succeeded and margin `m = L/6`. [`Membership::is_active`] reads the clock on
//!     every call, so a loop that stalled past that instant sees itself inactive
//!     before it acts; a watchdog also reports [`MembershipEvent::SteppedDown`].
//!   - That renew ran in Redis after it was sent and set the expiry to
//!     `T_redis + L`; other nodes drop the node only when Redis' clock passes it (the
//!     read script compares with `TIME`). So in real time others can take its slots
//!     no sooner than `L` after `sent`, while the node stopped at `L - m` after
//!     `sent`: `m` (1 s at the default) of safety, as long as the node's clock and
//!     Redis' clock run at rates within `m / L` (17%) of each other over one lease
//!     and Redis' wall clock is not stepped forward by more than `m`.
//!   - Two renews in a row may fail (at `L/3` and `2L/3`); one sent by `L - m` and
//!     succeeding keeps the node active without a gap. A renew not answered within
//!     `L/6` ([`MembershipConfig::renew_timeout`]) counts as failed.
//!   - What the margin cannot cover: a write the node sent while active that reaches
//!     Redis after its lease expired. The store's fencing script (stored max seq
//!     checked on every batch) refuses such a write when a new owner wrote first.
//! - **A node acts on a current live set**: every renew returns the current epoch;
//!   when it is newer than the live set the node holds, the node reads the set at
//!   once and [`Membership::is_active`] is false until it has. So within
//!   `L/3 + L/6` of any change, every node has either seen the new epoch (and acts
//!   as an owner again only once it read the new set) or had a renew fail, and then
//!   it steps down at most `L - m` after the change (its last successful renew was
//!   sent before it).
//! - **Handover on a join** (the previous owner is still live): the node that gains
//!   a slot serves it only [`MembershipConfig::handover_delay`] (`L - m`) after it
//!   read the change; by then the previous owner has read it too (and forwards) or
//!   has stepped down. Slots of a node that *left* or expired can be served at once:
//!   their previous owner stepped down first (above). The delay is the chat layer's
//!   to apply; fencing covers a write that was in flight across it.
//! - **Failure detection**: a node that dies is removed by the first read after its
//!   expiry (by any node); that read bumps the epoch and publishes the change, so
//!   every subscribed node learns it within about `L + L/3` of the last renew.
//! - **Graceful leave** ([`Membership::leave`]): the node stops counting itself
//!   active first, then removes its entry (only its own instance's), bumps the epoch
//!   and publishes, so the others move its slots at once instead of after `L`.
//!
//! Not guaranteed: anything, if Redis loses acknowledged writes (a restart without
//! persistence, a failover to a replica that had not received the renew): a node
//! may then be dropped from the live set while it counts itself active, for up to
//! one renew period (its next renew rejoins it); fencing still keeps seqs exact.
//! That all nodes switch to a new epoch at the same instant (each
//! reads when told or every `L/3`); a node that cannot reach Redis keeps its last live
//! set (it is then inactive itself, so it owns nothing, and forwards by a possibly
//! stale map). Redis is the single source of truth: if Redis is down, no node is
//! active after `L - m`.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ::redis::Value;

use super::NodeId;
use crate::store::redis::conn::Signal;
use crate::store::redis::{run_script, LuaScript, RedisConn, RedisError};

/// The ZSET of leases.
pub const NODES_KEY: &str = "imshard:{nodes}";
/// The HASH of node info.
pub const NODES_INFO_KEY: &str = "imshard:{nodes}:info";
/// The membership epoch counter.
pub const NODES_EPOCH_KEY: &str = "imshard:{nodes}:epoch";
/// Published (payload: the node id, or `expired`) on every change of the live set.
pub const NODES_CHANGED_CHANNEL: &str = "imshard:nodes:changed";

/// The default lease.
pub const LEASE_DEFAULT: Duration = Duration::from_secs(6);
/// The longest lease allowed: a dead node's slots move within about 4/3 of it.
pub const LEASE_MAX: Duration = Duration::from_secs(10);
/// The shortest lease allowed: renews every 100 ms.
pub const LEASE_MIN: Duration = Duration::from_millis(300);

/// Registers or renews a lease. KEYS: zset, info, epoch. ARGV: id, "instance addr",
/// lease ms, channel. Returns {redis now ms, epoch}; refuses with NODEIDINUSE when
/// the id's lease is current under another instance.
const REGISTER: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
local alive = expiry and tonumber(expiry) > now
local info = redis.call('HGET', KEYS[2], ARGV[1])
if alive and info ~= ARGV[2] then
  return redis.error_reply('NODEIDINUSE node id ' .. ARGV[1] .. ' is held by ' .. tostring(info))
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
local epoch
if alive then
  epoch = tonumber(redis.call('GET', KEYS[3]) or '0')
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  epoch = redis.call('INCR', KEYS[3])
  redis.call('PUBLISH', ARGV[4], ARGV[1])
end
return {now, epoch}
"#;

/// Removes expired leases, then returns {epoch, id1, info1, id2, info2, ...} of the
/// live ones. KEYS: zset, info, epoch. ARGV: channel.
const READ: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #dead > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  for _, id in ipairs(dead) do redis.call('HDEL', KEYS[2], id) end
  redis.call('INCR', KEYS[3])
  redis.call('PUBLISH', ARGV[1], 'expired')
end
local out = {tonumber(redis.call('GET', KEYS[3]) or '0')}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
end
return out
"#;

/// Removes this instance's lease. KEYS: zset, info, epoch. ARGV: id, "instance addr",
/// channel. Returns the new epoch, or 0 when the entry was not this instance's.
const LEAVE: &str = r#"
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local epoch = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return epoch
"#;

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipError {
    /// The configuration cannot work (lease out of range). Not retryable.
    BadConfig(String),
    /// Another live instance holds this node id. Retryable after its lease expires.
    NodeIdInUse(String),
    /// Redis failed; see [`RedisError::is_retryable`].
    Redis(RedisError),
    /// Redis answered something the scripts never return (a foreign key type?).
    UnexpectedReply(String),
}

impl std::fmt::Display for MembershipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MembershipError::BadConfig(e) => write!(f, "bad cluster configuration: {e}"),
            MembershipError::NodeIdInUse(e) => write!(f, "node id in use: {e}"),
            MembershipError::Redis(e) => write!(f, "membership: {e}"),
            MembershipError::UnexpectedReply(e) => {
                write!(f, "membership: unexpected redis reply: {e}")
            }
        }
    }
}

impl std::error::Error for MembershipError {}

impl From<RedisError> for MembershipError {
    fn from(e: RedisError) -> Self {
        match e {
            RedisError::Server { code, detail } if code == "NODEIDINUSE" => {
                MembershipError::NodeIdInUse(detail)
            }
            other => MembershipError::Redis(other),
        }
    }
}

/// This node's membership settings.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// `--node-id`.
    pub node_id: NodeId,
    /// The node-to-node address others reach this node's [`super::link`] at.
    pub addr: SocketAddr,
    /// `--cluster-lease`: how long a renew keeps the node in the live set.
    pub lease: Duration,
}

impl MembershipConfig {
    /// Settings with the default lease.
    pub fn new(node_id: NodeId, addr: SocketAddr) -> MembershipConfig {
        MembershipConfig {
            node_id,
            addr,
            lease: LEASE_DEFAULT,
        }
    }

    fn check(&self) -> Result<(), MembershipError> {
        if self.lease < LEASE_MIN || self.lease > LEASE_MAX {
            return Err(MembershipError::BadConfig(format!(
                "lease {:?} is outside {LEASE_MIN:?}..={LEASE_MAX:?}",
                self.lease
            )));
        }
        Ok(())
    }

    /// How often the lease is renewed and the live set read: `L/3`.
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// How long after sending its last successful renew the node counts itself
    /// active: `L - L/6`.
    pub fn active_for(&self) -> Duration {
        self.lease - self.lease / 6
    }

    /// A renew with no answer after this (`L/6`) counts as failed.
    pub fn renew_timeout(&self) -> Duration {
        self.lease / 6
    }

    /// How long a node waits, after reading a live set in which it gains a slot
    /// from a node that is still live (a join), before serving that slot, so that
    /// the previous owner has read the change or stepped down: `L - L/6` (see the
    /// module doc).
    pub fn handover_delay(&self) -> Duration {
        self.active_for()
    }
}

/// A live node as the live set lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Its node-to-node address.
    pub addr: SocketAddr,
    /// Drawn at process start: a restarted node is a new instance (it left and
    /// joined again, even under the same id and address).
    pub instance: u64,
}

/// The nodes whose lease was current when it was read, sorted by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveSet {
    /// The membership epoch it was read at.
    pub epoch: u64,
    pub nodes: Vec<NodeInfo>,
}

impl LiveSet {
    pub fn get(&self, id: &NodeId) -> Option<&NodeInfo> {
        self.nodes
            .binary_search_by(|n| n.id.cmp(id))
            .ok()
            .map(|i| &self.nodes[i])
    }

    pub fn ids(&self) -> impl Iterator<Item = &NodeId> {
        self.nodes.iter().map(|n| &n.id)
    }
}

/// What the owner of a [`Membership`] is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// This node holds its lease (first registration, or a renew after a lapse): it may
    /// own slots from now on.
    Active,
    /// The lease could not be renewed in time (or the node is leaving): own nothing
    /// from now on.
    SteppedDown { reason: String },
    /// The live set changed. `left` holds instances no longer live, `joined` new ones
    /// (a restarted node is in both).
    Changed {
        epoch: u64,
        joined: Vec<NodeInfo>,
        left: Vec<NodeInfo>,
    },
}

/// Counters for `/metrics` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MembershipStats {
    pub renews: u64,
    pub renew_failures: u64,
    pub reads: u64,
    pub read_failures: u64,
    pub step_downs: u64,
}

/// This node's membership, run by one shard of the node (its tasks live on that
/// shard's loop). Dropping the last handle stops renewing without leaving: the
/// lease then expires by itself.
#[derive(Clone)]
pub struct Membership {
    shared: Rc<Shared>,
    _owner: Rc<Owner>,
}

struct Owner(Rc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.closed.set(true);
        self.0.wake_all();
    }
}

struct Shared {
    conn: RedisConn,
    config: MembershipConfig,
    /// `"<instance> <addr>"`, this process' value in the info hash.
    info: String,
    instance: u64,
    register: LuaScript,
    read: LuaScript,
    leave: LuaScript,
    /// Until when this node may own slots (monotonic); `None` = not active.
    active_until: Cell<Option<Instant>>,
    /// The membership epoch the last successful renew returned: a live set older
    /// than this is stale (a change happened that this node has not read yet).
    renew_epoch: Cell<u64>,
    /// Whether `Active` was the last of `Active`/`SteppedDown` reported.
    reported_active: Cell<bool>,
    live: RefCell<Rc<LiveSet>>,
    last_error: RefCell<Option<MembershipError>>,
    /// Set by `leave` or the drop of the last handle: tasks stop.
    closed: Cell<bool>,
    /// Leaving: renews stop and `is_active` is false.
    leaving: Cell<bool>,
    on_event: RefCell<Box<dyn FnMut(MembershipEvent)>>,
    renew_wake: Signal,
    read_wake: Signal,
    watchdog_wake: Signal,
    stats: Cell<MembershipStats>,
}

impl Membership {
    /// Starts renewing and reading on the current monoio runtime (timer enabled),
    /// over `conn`. Returns at once: the node is not active until the first renew
    /// succeeds ([`MembershipEvent::Active`]); the live set is empty until the first
    /// read.
    pub fn start(
        conn: RedisConn,
        config: MembershipConfig,
        on_event: impl FnMut(MembershipEvent) + 'static,
    ) -> Result<Membership, MembershipError> {
        config.check()?;
        let instance = rand::random::<u64>();
        let shared = Rc::new(Shared {
            conn,
            info: format!("{instance:016x} {}", config.addr),
            instance,
            config,
            register: LuaScript::new(REGISTER),
            read: LuaScript::new(READ),
            leave: LuaScript::new(LEAVE),
            active_until: Cell::new(None),
            renew_epoch: Cell::new(0),
            reported_active: Cell::new(false),
            live: RefCell::new(Rc::new(LiveSet::default())),
            last_error: RefCell::new(None),
            closed: Cell::new(false),
            leaving: Cell::new(false),
            on_event: RefCell::new(Box::new(on_event)),
            renew_wake: Signal::default(),
            read_wake: Signal::default(),
            watchdog_wake: Signal::default(),
            stats: Cell::new(MembershipStats::default()),
        });
        monoio::spawn(renew_loop(shared.clone()));
        monoio::spawn(read_loop(shared.clone()));
        monoio::spawn(watchdog(shared.clone()));
        Ok(Membership {
            _owner: Rc::new(Owner(shared.clone())),
            shared,
        })
    }

    /// Whether this node may own slots now: it holds its lease (reads the clock) and
    /// its live set is not older than the epoch its last renew saw.
    pub fn is_active(&self) -> bool {
        self.shared.is_active()
    }

    /// The live set last read.
    pub fn live(&self) -> Rc<LiveSet> {
        self.shared.live.borrow().clone()
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.shared.config.node_id
    }

    /// This process' instance number (as in [`NodeInfo::instance`]).
    pub fn instance(&self) -> u64 {
        self.shared.instance
    }

    /// Reads the live set now (call it on a message of [`NODES_CHANGED_CHANNEL`]).
    pub fn refresh_now(&self) {
        self.shared.read_wake.wake();
    }

    /// The error of the last failed renew or read, cleared by the next success.
    pub fn last_error(&self) -> Option<MembershipError> {
        self.shared.last_error.borrow().clone()
    }

    pub fn stats(&self) -> MembershipStats {
        self.shared.stats.get()
    }

    /// Leaves the cluster: stops counting itself active (reported as
    /// `SteppedDown`), stops renewing and reading, and removes its lease so the others
    /// take its slots at once. Returns the new epoch (0 if the entry was already gone
    /// or held by another instance). On error the lease expires by itself within `L`.
    pub async fn leave(&self) -> Result<u64, MembershipError> {
        let shared = &self.shared;
        shared.leaving.set(true);
        shared.active_until.set(None);
        shared.report_step_down("leaving the cluster".to_string());
        shared.closed.set(true);
        shared.wake_all();
        let keys = keys();
        let reply = run_script(
            &shared.conn,
            &shared.leave,
            &keys,
            &[
                shared.config.node_id.as_str().as_bytes(),
                shared.info.as_bytes(),
                NODES_CHANGED_CHANNEL.as_bytes(),
            ],
        )
        .await?;
        match reply {
            Value::Int(epoch) => Ok(epoch.max(0) as u64),
            other => Err(MembershipError::UnexpectedReply(format!("{other:?}"))),
        }
    }
}

fn keys() -> [&'static [u8]; 3] {
    [
        NODES_KEY.as_bytes(),
        NODES_INFO_KEY.as_bytes(),
        NODES_EPOCH_KEY.as_bytes(),
    ]
}

impl Shared {
    fn count(&self, f: impl FnOnce(&mut MembershipStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    fn wake_all(&self) {
        self.renew_wake.wake();
        self.read_wake.wake();
        self.watchdog_wake.wake();
    }

    fn is_active(&self) -> bool {
        !self.leaving.get()
            && self
                .active_until
                .get()
                .is_some_and(|until| Instant::now() < until)
            && self.live.borrow().epoch >= self.renew_epoch.get()
    }

    fn emit(&self, event: MembershipEvent) {
        if let Ok(mut f) = self.on_event.try_borrow_mut() {
            f(event);
        }
    }

    fn report_step_down(&self, reason: String) {
        if self.reported_active.replace(false) {
            self.count(|s| s.step_downs += 1);
            tracing::warn!(node = %self.config.node_id, %reason, "cluster: stepped down");
            self.emit(MembershipEvent::SteppedDown { reason });
        }
    }

    /// One renew, bounded by `L/6`. On success extends `active_until` from `sent`
    /// and, when the epoch moved past the live set, reads it at once.
    async fn renew(&self) -> Result<(), MembershipError> {
        let sent = Instant::now();
        let lease_ms = self.config.lease.as_millis().to_string();
        let args: [&[u8]; 4] = [
            self.config.node_id.as_str().as_bytes(),
            self.info.as_bytes(),
            lease_ms.as_bytes(),
            NODES_CHANGED_CHANNEL.as_bytes(),
        ];
        let bound = self.config.renew_timeout();
        let reply = monoio::time::timeout(
            bound,
            run_script(&self.conn, &self.register, &keys(), &args),
        )
        .await
        .map_err(|_| MembershipError::Redis(RedisError::Timeout(bound)))??;
        let epoch = match reply {
            Value::Array(v) if v.len() == 2 => match v[1] {
                Value::Int(e) => e.max(0) as u64,
                _ => {
                    return Err(MembershipError::UnexpectedReply(format!(
                        "register epoch {:?}",
                        v[1]
                    )))
                }
            },
            other => {
                return Err(MembershipError::UnexpectedReply(format!(
                    "register answered {other:?}"
                )))
            }
        };
        if self.leaving.get() {
            return Ok(());
        }
        self.renew_epoch.set(self.renew_epoch.get().max(epoch));
        if epoch > self.live.borrow().epoch {
            self.read_wake.wake();
        }
        let until = sent + self.config.active_for();
        self.active_until.set(Some(until));
        self.watchdog_wake.wake();
        if Instant::now() < until && !self.reported_active.replace(true) {
            tracing::info!(node = %self.config.node_id, "cluster: lease held, active");
            self.emit(MembershipEvent::Active);
        }
        Ok(())
    }

    /// One read of the live set; reports the change.
    async fn read(&self) -> Result<(), MembershipError> {
        let reply = run_script(
            &self.conn,
            &self.read,
            &keys(),
            &[NODES_CHANGED_CHANNEL.as_bytes()],
        )
        .await?;
        let next = parse_live_set(reply)?;
        let prev = self.live.borrow().clone();
        if next == *prev {
            return Ok(());
        }
        let joined: Vec<NodeInfo> = next
            .nodes
            .iter()
            .filter(|n| !prev.nodes.contains(n))
            .cloned()
            .collect();
        let left: Vec<NodeInfo> = prev
            .nodes
            .iter()
            .filter(|n| !next.nodes.contains(n))
            .cloned()
            .collect();
        let epoch = next.epoch;
        *self.live.borrow_mut() = Rc::new(next);
        tracing::info!(
            epoch,
            joined = joined.len(),
            left = left.len(),
            "cluster: live set changed"
        );
        self.emit(MembershipEvent::Changed {
            epoch,
            joined,
            left,
        });
        Ok(())
    }

    fn note(&self, r: Result<(), MembershipError>) -> bool {
        match r {
            Ok(()) => {
                self.last_error.borrow_mut().take();
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "cluster membership");
                *self.last_error.borrow_mut() = Some(e);
                false
            }
        }
    }
}

/// `{epoch, id, info, id, info, ...}` -> the live set (entries that do not parse are
/// skipped with a warning: a node of another version must not stop this one).
fn parse_live_set(reply: Value) -> Result<LiveSet, MembershipError> {
    let Value::Array(items) = reply else {
        return Err(MembershipError::UnexpectedReply(format!(
            "read answered {reply:?}"
        )));
    };
    let mut items = items.into_iter();
    let epoch = match items.next() {
        Some(Value::Int(e)) => e.max(0) as u64,
        other => return Err(MembershipError::UnexpectedReply(format!("epoch {other:?}"))),
    };
    let mut nodes = Vec::new();
    while let (Some(id), Some(info)) = (items.next(), items.next()) {
        let text = |v: Value| match v {
            Value::BulkString(b) => String::from_utf8(b).ok(),
            _ => None,
        };
        let (Some(id), Some(info)) = (text(id), text(info)) else {
            continue;
        };
        let parsed = NodeId::new(id.clone()).ok().and_then(|id| {
            let (instance, addr) = info.split_once(' ')?;
            Some(NodeInfo {
                id,
                addr: addr.parse().ok()?,
                instance: u64::from_str_radix(instance, 16).ok()?,
            })
        });
        match parsed {
            Some(n) => nodes.push(n),
            None => {
                tracing::warn!(%id, %info, "cluster: a live node's entry does not parse; skipped")
            }
        }
    }
    nodes.sort();
    Ok(LiveSet { epoch, nodes })
}

/// Renews every `L/3` from the previous send; after a failure tries again in `L/10`.
async fn renew_loop(shared: Rc<Shared>) {
    let every = shared.config.renew_every();
    let retry = shared.config.lease / 10;
    while !shared.closed.get() {
        let started = Instant::now();
        let r = shared.renew().await;
        let ok = r.is_ok();
        if ok {
            shared.count(|s| s.renews += 1);
        } else {
            shared.count(|s| s.renew_failures += 1);
            if let Err(MembershipError::NodeIdInUse(e)) = &r {
                tracing::warn!(error = %e, "cluster: node id held by another live instance; retrying");
            }
        }
        shared.note(r);
        let wait = if ok {
            every.saturating_sub(started.elapsed())
        } else {
            retry
        };
        let _ = monoio::time::timeout(wait, shared.renew_wake.wait()).await;
    }
}

/// Reads the live set every `L/3`, and at once when asked.
async fn read_loop(shared: Rc<Shared>) {
    let every = shared.config.renew_every();
    while !shared.closed.get() {
        let r = shared.read().await;
        if r.is_ok() {
            shared.count(|s| s.reads += 1);
        } else {
            shared.count(|s| s.read_failures += 1);
        }
        shared.note(r);
        if shared.closed.get() {
            break;
        }
        let _ = monoio::time::timeout(every, shared.read_wake.wait()).await;
    }
}

/// Reports `SteppedDown` when the lease runs out without a renew.
async fn watchdog(shared: Rc<Shared>) {
    while !shared.closed.get() {
        let now = Instant::now();
        let wait = match shared.active_until.get() {
            Some(until) if now >= until => {
                shared.report_step_down(format!(
                    "no successful lease renew for {:?}",
                    shared.config.active_for()
                ));
                shared.config.lease
            }
            Some(until) => until - now,
            None => shared.config.lease,
        };
        let _ = monoio::time::timeout(wait, shared.watchdog_wake.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_constants() {
        let c = MembershipConfig::new(
            NodeId::new("n1").unwrap(),
            "127.0.0.1:7000".parse().unwrap(),
        );
        assert_eq!(c.lease, Duration::from_secs(6));
        assert_eq!(c.renew_every(), Duration::from_secs(2));
        assert_eq!(c.active_for(), Duration::from_secs(5));
        // Two missed renews still leave time for a third before stepping down.
        assert!(c.renew_every() * 2 < c.active_for());
        assert!(c.check().is_ok());
        let mut bad = c.clone();
        bad.lease = Duration::from_secs(11);
        assert!(matches!(bad.check(), Err(MembershipError::BadConfig(_))));
        bad.lease = Duration::from_millis(100);
        assert!(bad.check().is_err());
    }

    #[test]
    fn live_set_parses_and_skips_foreign_entries() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![
            Value::Int(7),
            b("n2"),
            b("00000000000000ff 127.0.0.1:7002"),
            b("n1"),
            b("0000000000000001 127.0.0.1:7001"),
            b("bad id!"),
            b("0000000000000001 127.0.0.1:7001"),
            b("n3"),
            b("garbage"),
        ]);
        let live = parse_live_set(reply).unwrap();
        assert_eq!(live.epoch, 7);
        let ids: Vec<&str> = live.ids().map(NodeId::as_str).collect();
        assert_eq!(ids, ["n1", "n2"]);
        let n2 = live.get(&NodeId::new("n2").unwrap()).unwrap();
        assert_eq!(n2.instance, 255);
        assert_eq!(n2.addr, "127.0.0.1:7002".parse().unwrap());
        assert!(parse_live_set(Value::Nil).is_err());
    }
}
