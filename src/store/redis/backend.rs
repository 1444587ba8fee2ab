//! The Redis backend of the store (`--store redis`): the same reads and atomic batches
//! as the embedded backend, on one [`RedisConn`] per shard.
//!
//! # Keys (hash tags put every key of a conversation, and of a user, in one slot)
//! | key | type | content |
//! |---|---|---|
//! | `im:{conv}:m` | hash | seq (decimal) -> MsgItem; seqs are 1..=max without gaps, so `HLEN` is the max seq |
//! | `im:{conv}:i` | hash | msg_id -> seq (8 bytes, big-endian) |
//! | `im:{conv}:d:<day>` | hash, expires at the end of day + 1 | sender `\0` client_msg_id -> DedupeRecord, in the bucket of the day (UTC, `send_time / 86,400,000`) it was sent: a record lives 24-48 h; reads look in today's and yesterday's bucket and the message code keeps only records of the last 24 h |
//! | `im:{user}:r` | hash | conv_id -> ConvRow |
//! | `im:{conv}:g` | string | GroupMeta |
//! | `im:{conv}:gm` | hash | user -> MemberRecord |
//! | `im:{user}:gs` | hash | conv_id -> "1" for each group the user is a member of (written with `:gm`; cluster mode reads it when the user connects) |
//!
//! # Writes: rounds, fenced, pipelined
//! The batches staged by the shard are sent by one writer task
//! ([`RedisBackend::run_writer`]), in order. Everything queued when the writer looks
//! is one **round**: one `EVALSHA` of the round script (loaded with `SCRIPT LOAD`
//! ahead of the first round on each connection), so a round is atomic, and with
//! `appendfsync always` it is on Redis's disk when the script answered (plus `WAIT`
//! for `--redis-wait-replicas`, in the same write, right after it).
//!
//! - **Fencing** (DESIGN.md, cluster mode): for every conversation that gets new
//!   messages in the round (a new message is one whose id is indexed in the round: a
//!   recall rewrites a stored message and indexes nothing), the script first checks
//!   that the stored max seq (`HLEN` of `im:{conv}:m`) is the writer's expectation, the
//!   round's first new seq of it minus 1. On any mismatch it writes **nothing** of the
//!   round and answers `FENCED <key> ...` ([`RoundError::Fenced`]; the batches fail
//!   with a [`StoreError::Write`] that [`is_fence_failure`] recognises). A round whose
//!   own new seqs of a conversation are not contiguous is refused the same way before
//!   it is sent. So two writers that both believe they own a conversation (a stale
//!   cache, a moving slot) can never store a seq twice or leave a gap: one is
//!   refused, drops its cached state and reloads the max seq. Updates of stored
//!   messages, rows, groups, members and dedupe records are not fenced.
//! - **Pipelining**: the writer does not wait for a round's answer before sending the
//!   next; up to [`MAX_ROUNDS_IN_FLIGHT`] rounds are in flight on the shard's
//!   connection. Rounds are reported in order. **Failure rule**: when a round fails,
//!   every later round in flight is reported failed with it, and every batch queued
//!   after it fails unsent, until the shard has dropped its cached state and reset
//!   (as with the embedded store). A later round may still have been applied by Redis
//!   (it ran after the failed one): its outcome is unknown, as after a lost
//!   connection, and the client's retry with the same client_msg_id is answered from
//!   the dedupe record. It can never fill in behind the failed round: a conversation
//!   whose new messages were in the failed round fails the fence in every later one
//!   (its stored max seq is short of what they expect). The shard's reads after a
//!   failure go over the same connection, behind the rounds in flight, so they see
//!   whatever those rounds stored.
//! - **Encoding**: a round's writes are grouped by key (one `HSET` with many fields per
//!   hash, the last write of a string key) and encoded straight into the connection's
//!   buffer. A runtime error inside the script (`WRONGTYPE` on a foreign key) stops it
//!   where it is, like an error inside `MULTI`/`EXEC`: the round fails, and what the
//!   script wrote before the error stays.
//! - The round script touches keys of many hash slots: Redis Cluster would need one
//!   script per slot (not done; this backend speaks to one Redis).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use prost::Message;
use redis::{Cmd, Value};

use super::{LuaScript, Pending, RedisConn, RedisError};
use crate::proto::pb::MsgItem;
use crate::proto::store_pb::{ConvRow, DedupeRecord, GroupMeta, MemberRecord};
use crate::store::{keys, Ks, Put, StoreError};

/// A batch staged by the shard: its id and its writes.
type Batch = (u64, Vec<Put>);

/// A dedupe bucket holds the records of one day (UTC), and expires when the next day
/// ends: every record lives at least the dedupe window.
const DAY_MS: i64 = 86_400_000;
const _: () = assert!(crate::limits::DEDUPE_WINDOW_MS <= DAY_MS);

/// The dedupe bucket of a record sent at `send_time_ms`.
fn dedupe_day(send_time_ms: i64) -> i64 {
    send_time_ms.div_euclid(DAY_MS)
}

/// A shard's Redis store: its connection and the batches waiting for the writer.
pub struct RedisBackend {
    pub conn: RedisConn,
    /// Batches handed over by the shard's flush, oldest first.
    queue: RefCell<VecDeque<Batch>>,
    /// Whether the writer task runs.
    writing: Cell<bool>,
    /// Wakes the writer, waiting for a round's answer, when a batch is queued.
    writer_waker: Cell<Option<Waker>>,
    /// The round script, and the connection it was last loaded on.
    script: LuaScript,
    script_epoch: Cell<Option<u64>>,
    /// Replicas that must acknowledge a round (`WAIT`) before it counts as durable,
    /// and how long to wait for them.
    wait_replicas: u32,
    wait_timeout_ms: u64,
}

fn key(tag: &str, suffix: &str) -> Vec<u8> {
    format!("im:{{{tag}}}:{suffix}").into_bytes()
}

fn store_err(e: RedisError) -> StoreError {
    if e.is_retryable() {
        StoreError::Read(format!("redis: {e}"))
    } else {
        StoreError::Corrupt(format!("redis: {e}"))
    }
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        _ => None,
    }
}

fn decode<T: Message + Default>(v: &Value, what: &str) -> Result<Option<T>, StoreError> {
    match v {
        Value::Nil => Ok(None),
        Value::BulkString(b) => T::decode(&b[..])
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("{what}: {e}"))),
        Value::ServerError(e) => Err(StoreError::Read(format!("redis: {e:?}"))),
        other => Err(StoreError::Corrupt(format!("{what}: unexpected {other:?}"))),
    }
}

impl RedisBackend {
    /// A backend on `conn`; with `wait_replicas > 0` every round also waits (up to
    /// `wait_timeout_ms`) for that many replicas.
    pub fn new(conn: RedisConn, wait_replicas: u32, wait_timeout_ms: u64) -> Rc<RedisBackend> {
        Rc::new(RedisBackend {
            conn,
            queue: RefCell::new(VecDeque::new()),
            writing: Cell::new(false),
            writer_waker: Cell::new(None),
            script: LuaScript::new(ROUND_SCRIPT),
            script_epoch: Cell::new(None),
            wait_replicas,
            wait_timeout_ms,
        })
    }

    async fn one(&self, cmd: Cmd) -> Result<Value, StoreError> {
        match self.conn.cmd(&cmd).await.map_err(store_err)? {
            Value::ServerError(e) => Err(StoreError::Read(format!("redis: {e:?}"))),
            v => Ok(v),
        }
    }

    // ---- reads ----

    pub async fn max_seq(&self, conv: &str) -> Result<i64, StoreError> {
        match self
            .one(redis::cmd("HLEN").arg(key(conv, "m")).clone())
            .await?
        {
            Value::Int(n) => Ok(n),
            other => Err(StoreError::Corrupt(format!("HLEN: {other:?}"))),
        }
    }

    /// The messages of `seqs` (ascending), skipping missing ones.
    async fn by_seqs(&self, conv: &str, seqs: &[i64]) -> Result<Vec<(usize, MsgItem)>, StoreError> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key(conv, "m"));
        for s in seqs {
            cmd.arg(s.to_string());
        }
        let Value::Array(values) = self.one(cmd).await? else {
            return Err(StoreError::Corrupt("HMGET: not an array".into()));
        };
        let mut out = Vec::with_capacity(values.len());
        for v in &values {
            let len = bytes_of(v).map_or(0, <[u8]>::len);
            if let Some(m) = decode::<MsgItem>(v, "message")? {
                out.push((len, m));
            }
        }
        Ok(out)
    }

    pub async fn messages(
        &self,
        conv: &str,
        lo: i64,
        hi: i64,
        limit: usize,
        newest: bool,
        max_bytes: usize,
    ) -> Result<Vec<MsgItem>, StoreError> {
        if lo > hi || limit == 0 {
            return Ok(Vec::new());
        }
        let n = (limit as i64).min(hi - lo + 1);
        let first = if newest { hi - n + 1 } else { lo };
        let seqs: Vec<i64> = (first..first + n).collect();
        let mut found = self.by_seqs(conv, &seqs).await?;
        if newest {
            // The budget is spent from the newest end.
            found.reverse();
            let mut out = within_budget(found, max_bytes);
            out.reverse();
            return Ok(out);
        }
        Ok(within_budget(found, max_bytes))
    }

    pub async fn message(&self, conv: &str, seq: i64) -> Result<Option<MsgItem>, StoreError> {
        let v = self
            .one(
                redis::cmd("HGET")
                    .arg(key(conv, "m"))
                    .arg(seq.to_string())
                    .clone(),
            )
            .await?;
        decode(&v, "message")
    }

    pub async fn messages_by_ids(
        &self,
        conv: &str,
        msg_ids: Vec<String>,
        floor: i64,
        ceiling: i64,
        max_bytes: usize,
    ) -> Result<Vec<MsgItem>, StoreError> {
        if msg_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key(conv, "i"));
        for id in &msg_ids {
            cmd.arg(id);
        }
        let Value::Array(values) = self.one(cmd).await? else {
            return Err(StoreError::Corrupt("HMGET: not an array".into()));
        };
        let seqs: Vec<i64> = values
            .iter()
            .filter_map(|v| bytes_of(v).and_then(keys::seq_of))
            .filter(|s| (floor..=ceiling).contains(s))
            .collect();
        // by_seqs keeps the order asked (request order here).
        Ok(within_budget(self.by_seqs(conv, &seqs).await?, max_bytes))
    }

    pub async fn seq_of_msg_id(&self, conv: &str, msg_id: &str) -> Result<Option<i64>, StoreError> {
        let v = self
            .one(redis::cmd("HGET").arg(key(conv, "i")).arg(msg_id).clone())
            .await?;
        Ok(bytes_of(&v).and_then(keys::seq_of))
    }

    pub async fn dedupe_many(
        &self,
        conv: &str,
        keys_asked: Vec<(String, String)>,
    ) -> Result<Vec<Option<DedupeRecord>>, StoreError> {
        if keys_asked.is_empty() {
            return Ok(Vec::new());
        }
        // A record of the last 24 h is in today's bucket or yesterday's.
        let today = dedupe_day(super::presence::now_ms());
        let cmds: Vec<Cmd> = [today, today - 1]
            .iter()
            .map(|day| {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(key(conv, &format!("d:{day}")));
                for (sender, id) in &keys_asked {
                    cmd.arg(keys::pair(sender, id));
                }
                cmd
            })
            .collect();
        let replies = self.conn.cmds(&cmds).await.map_err(store_err)?;
        let (Some(Value::Array(now)), Some(Value::Array(before))) =
            (replies.first(), replies.get(1))
        else {
            return Err(StoreError::Corrupt(format!("dedupe HMGET: {replies:?}")));
        };
        now.iter()
            .zip(before)
            .map(|(a, b)| match decode::<DedupeRecord>(a, "dedupe")? {
                Some(r) => Ok(Some(r)),
                None => decode(b, "dedupe"),
            })
            .collect()
    }

    pub async fn rows(&self, user: &str) -> Result<Vec<(String, ConvRow)>, StoreError> {
        let v = self
            .one(redis::cmd("HGETALL").arg(key(user, "r")).clone())
            .await?;
        pairs(&v, "row")
    }

    pub async fn rows_many(
        &self,
        users: &[String],
    ) -> Result<Vec<Vec<(String, ConvRow)>>, StoreError> {
        let cmds: Vec<Cmd> = users
            .iter()
            .map(|u| redis::cmd("HGETALL").arg(key(u, "r")).clone())
            .collect();
        let replies = self.conn.cmds(&cmds).await.map_err(store_err)?;
        replies.iter().map(|v| pairs(v, "row")).collect()
    }

    pub async fn group_with_members(
        &self,
        conv: &str,
    ) -> Result<Option<(GroupMeta, Vec<(String, MemberRecord)>)>, StoreError> {
        let v = self
            .one(redis::cmd("GET").arg(key(conv, "g")).clone())
            .await?;
        let Some(meta) = decode::<GroupMeta>(&v, "group")? else {
            return Ok(None);
        };
        let v = self
            .one(redis::cmd("HGETALL").arg(key(conv, "gm")).clone())
            .await?;
        Ok(Some((meta, pairs(&v, "member")?)))
    }

    // ---- writes ----

    /// Queues a batch for the writer; true when the writer must be started
    /// ([`RedisBackend::run_writer`]).
    pub fn enqueue(&self, id: u64, puts: Vec<Put>) -> bool {
        self.queue.borrow_mut().push_back((id, puts));
        if let Some(w) = self.writer_waker.take() {
            w.wake();
        }
        !self.writing.replace(true)
    }

    /// Drops the queued batches (after a failure); the highest id dropped.
    pub fn drop_queued(&self) -> Option<u64> {
        let mut q = self.queue.borrow_mut();
        let last = q.back().map(|(id, _)| *id);
        q.clear();
        last
    }

    /// The queued batches of the next round, oldest first, up to
    /// [`MAX_ROUND_BYTES`] (at least one batch): the highest id and the batches.
    fn take_batches(&self) -> Option<(u64, Vec<Batch>)> {
        let mut q = self.queue.borrow_mut();
        let mut bytes = 0;
        let n = q
            .iter()
            .take_while(|(_, puts)| {
                let fits = bytes < MAX_ROUND_BYTES;
                bytes += puts
                    .iter()
                    .map(|p| p.key.len() + p.value.as_ref().map_or(0, Vec::len))
                    .sum::<usize>();
                fits
            })
            .count();
        let batches: Vec<Batch> = q.drain(..n).collect();
        Some((batches.last()?.0, batches))
    }

    /// The shard's writer: sends the queued batches as rounds (each round one script
    /// call, see the module doc), keeps up to [`MAX_ROUNDS_IN_FLIGHT`] of them in
    /// flight, and reports them to `sink` in order. A round that fails fails every
    /// later round in flight with it (reported as one failure up to the last of
    /// them), and batches taken while `sink` still has a failure waiting for its
    /// reset are failed without being sent. Returns when nothing is queued or in
    /// flight; [`RedisBackend::enqueue`] says when to start it again.
    pub async fn run_writer(self: Rc<Self>, sink: impl RoundSink) {
        // Let the rest of the turn stage first: one round carries the whole turn.
        crate::rt::yield_now().await;
        let this: &RedisBackend = &self;
        let mut in_flight: VecDeque<InFlight<'_>> = VecDeque::new();
        loop {
            this.fill(&sink, &mut in_flight);
            let room = in_flight.len() < MAX_ROUNDS_IN_FLIGHT;
            let Some(front) = in_flight.front_mut() else {
                this.writing.set(false);
                return;
            };
            // The oldest round's outcome, or (with room for another round) new batches.
            let outcome = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = front.result.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if room {
                    if !this.queue.borrow().is_empty() {
                        return Poll::Ready(None);
                    }
                    this.writer_waker.set(Some(cx.waker().clone()));
                }
                Poll::Pending
            })
            .await;
            let Some(result) = outcome else {
                continue;
            };
            let Some(done) = in_flight.pop_front() else {
                continue;
            };
            let took = done.started.elapsed();
            match result {
                Ok(()) => {
                    // What was staged meanwhile goes out before this round's callbacks
                    // run (replies, pushes): Redis works on it while the shard does.
                    this.fill(&sink, &mut in_flight);
                    sink.report(done.upto, took, Ok(()));
                }
                Err(e) => {
                    // Later rounds were built on what this one should have stored.
                    let upto = in_flight.back().map_or(done.upto, |r| r.upto);
                    in_flight.clear();
                    sink.report(upto, took, Err(e));
                }
            }
        }
    }

    /// Sends the queued batches as rounds while there is room in flight.
    fn fill<'a>(&'a self, sink: &impl RoundSink, in_flight: &mut VecDeque<InFlight<'a>>) {
        while in_flight.len() < MAX_ROUNDS_IN_FLIGHT {
            let Some((upto, batches)) = self.take_batches() else {
                return;
            };
            if sink.failed() {
                sink.report(upto, Duration::ZERO, Err(RoundError::AfterFailure));
                continue;
            }
            in_flight.push_back(self.send_round(upto, &batches));
        }
    }

    /// Writes `puts` as one round and waits for it (tests and tools; the shard's
    /// batches go through [`RedisBackend::run_writer`]).
    pub async fn write_once(&self, puts: Vec<Put>) -> Result<(), RoundError> {
        let batches = vec![(0, puts)];
        self.send_round(0, &batches).result.await
    }

    /// Queues one round on the connection now (in call order) and returns its outcome
    /// to await.
    fn send_round(&self, upto: u64, batches: &[Batch]) -> InFlight<'_> {
        let started = Instant::now();
        let round = Round::build(batches);
        if let Some(broken) = round.broken_fence() {
            return InFlight {
                upto,
                started,
                result: Box::pin(std::future::ready(Err(RoundError::Fenced(broken)))),
            };
        }
        // The script is loaded once per connection, ahead of the first round on it.
        let load = match self.conn.epoch() {
            Some(epoch) if self.script_epoch.get() != Some(epoch) => {
                self.script_epoch.set(Some(epoch));
                true
            }
            _ => false,
        };
        let wait = self.wait_replicas > 0;
        let expected = 1 + usize::from(load) + usize::from(wait);
        let pending = self.conn.queue(expected, |out| {
            if load {
                resp::array(out, 3);
                resp::bulk(out, b"SCRIPT");
                resp::bulk(out, b"LOAD");
                resp::bulk(out, self.script.code().as_bytes());
            }
            round.encode(out, self.script.sha1().as_bytes());
            if wait {
                resp::array(out, 3);
                resp::bulk(out, b"WAIT");
                resp::int(out, i64::from(self.wait_replicas));
                resp::int(out, self.wait_timeout_ms as i64);
            }
        });
        InFlight {
            upto,
            started,
            result: Box::pin(self.finish_round(pending, load)),
        }
    }

    /// The outcome of a round from its replies: `[SCRIPT LOAD,] EVALSHA[, WAIT]`.
    async fn finish_round(&self, pending: Pending, loaded: bool) -> Result<(), RoundError> {
        let replies = pending
            .replies()
            .await
            .map_err(|e| RoundError::Redis(e.to_string()))?;
        let mut replies = replies.into_iter();
        if loaded {
            if let Some(Value::ServerError(e)) = replies.next() {
                self.script_epoch.set(None);
                return Err(RoundError::Redis(format!(
                    "SCRIPT LOAD refused: {} {}",
                    e.code(),
                    e.details().unwrap_or("")
                )));
            }
        }
        match replies.next() {
            Some(Value::ServerError(e)) if e.code() == "FENCED" => {
                return Err(RoundError::Fenced(e.details().unwrap_or("").to_string()))
            }
            Some(Value::ServerError(e)) => {
                if e.code() == "NOSCRIPT" {
                    // Flushed or failed over without a reconnect: load it again.
                    self.script_epoch.set(None);
                }
                return Err(RoundError::Redis(format!(
                    "the round script failed: {} {}",
                    e.code(),
                    e.details().unwrap_or("")
                )));
            }
            Some(_) => {}
            None => return Err(RoundError::Redis("no reply to the round".into())),
        }
        if self.wait_replicas == 0 {
            return Ok(());
        }
        match replies.next() {
            Some(Value::Int(n)) if n >= i64::from(self.wait_replicas) => Ok(()),
            Some(Value::Int(n)) => Err(RoundError::Redis(format!(
                "only {n} of {} replicas acknowledged the batch within {} ms",
                self.wait_replicas, self.wait_timeout_ms
            ))),
            other => Err(RoundError::Redis(format!("WAIT answered {other:?}"))),
        }
    }
}

/// Rounds a shard's writer keeps in flight on its connection: the next round is at
/// Redis while the last one is being written and fsynced. Not more: with
/// `appendfsync always` Redis fsyncs once per event-loop pass that wrote anything
/// (~2 ms on our virtual disk), and more rounds in flight means smaller rounds spread
/// over more passes. Measured (p2p, 10 s, same box, one run each): 1 in flight 36,700
/// sends/s with 76 fsyncs/s; 2: 35,500/s, 134 fsyncs/s; 4: 29,500/s, 215 fsyncs/s.
pub const MAX_ROUNDS_IN_FLIGHT: usize = 2;

/// A round takes queued batches until their keys and values pass this. One script
/// runs alone on Redis (every other client waits), so a round must stay short even
/// when Redis fell behind and much is queued; the rest goes in the next rounds.
pub const MAX_ROUND_BYTES: usize = 1 << 20;

/// Where the writer reports: the shard's store.
pub trait RoundSink {
    /// Whether a failure is waiting for the shard's reset: batches taken now were
    /// built on the state the shard is about to drop, and are failed unsent.
    fn failed(&self) -> bool;
    /// Every batch up to `upto` is durable (`Ok`) or failed; rounds are reported in
    /// order. `took` is the round's time from sending to its answer.
    fn report(&self, upto: u64, took: Duration, result: Result<(), RoundError>);
}

/// Why a round was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundError {
    /// The fence refused the round: a conversation it adds messages to holds another
    /// number of messages than this writer expected (another writer stored some, or
    /// this shard's seq counter is stale). Nothing of the round was written. The
    /// text names the conversation's key and both counts.
    Fenced(String),
    /// An earlier round of the shard failed; this one was not sent.
    AfterFailure,
    /// Redis failed the round: connection lost or no answer in time (the outcome is
    /// unknown), an error reply, or too few replicas acknowledged it.
    Redis(String),
}

impl RoundError {
    /// Whether the fence refused the round.
    pub fn is_fenced(&self) -> bool {
        matches!(self, RoundError::Fenced(_))
    }
}

impl std::fmt::Display for RoundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundError::Fenced(detail) => write!(f, "fenced: {detail}"),
            RoundError::AfterFailure => f.write_str("an earlier batch failed"),
            RoundError::Redis(e) => f.write_str(e),
        }
    }
}

impl From<RoundError> for StoreError {
    fn from(e: RoundError) -> StoreError {
        match e {
            RoundError::Fenced(detail) => StoreError::Fenced(detail),
            other => StoreError::Write(other.to_string()),
        }
    }
}

/// Whether a failed batch was refused by the fence (see [`RoundError::Fenced`]).
pub fn is_fence_failure(e: &StoreError) -> bool {
    matches!(e, StoreError::Fenced(_))
}

/// A round sent and not yet reported.
struct InFlight<'a> {
    upto: u64,
    started: Instant,
    result: Pin<Box<dyn Future<Output = Result<(), RoundError>> + 'a>>,
}

/// The round script. KEYS: every key the round writes. ARGV: the number of fences F,
/// F pairs (index in KEYS of a conversation's `m` hash, the count it must hold), then
/// the writes, each `op, key index, n, n arguments`: `h` HSET field value ..., `d`
/// HDEL field ..., `s` SET value, `k` DEL, `e` EXPIREAT unix-seconds. Every fence is
/// checked before anything is written.
const ROUND_SCRIPT: &str = r#"
local a = 2
for _ = 1, tonumber(ARGV[1]) do
  local k = KEYS[tonumber(ARGV[a])]
  local want = tonumber(ARGV[a + 1])
  local have = redis.call('HLEN', k)
  if have ~= want then
    return redis.error_reply('FENCED ' .. k .. ' holds ' .. have .. ' messages, the writer expected ' .. want)
  end
  a = a + 2
end
local n = #ARGV
while a <= n do
  local op, k, c = ARGV[a], KEYS[tonumber(ARGV[a + 1])], tonumber(ARGV[a + 2])
  a = a + 3
  if op == 'h' then
    redis.call('HSET', k, unpack(ARGV, a, a + c - 1))
  elseif op == 'd' then
    redis.call('HDEL', k, unpack(ARGV, a, a + c - 1))
  elseif op == 'e' then
    redis.call('EXPIREAT', k, ARGV[a])
  elseif op == 's' then
    redis.call('SET', k, ARGV[a])
  elseif op == 'k' then
    redis.call('DEL', k)
  elseif op == 'x' then
    redis.call('XADD', k, '*', unpack(ARGV, a, a + c - 1))
  else
    return redis.error_reply('ERR imshard round script: unknown op ' .. op)
  end
  a = a + c
end
return n
"#;

/// Field/value pairs per `HSET` (fields per `HDEL`) of the round script: Lua's
/// `unpack` is bounded by its C stack (8,000 values).
const MAX_HASH_ARGS: usize = 1000;

/// One argument of the round script.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
enum Arg<'a> {
    Bytes(&'a [u8]),
    Int(i64),
}

/// A key of a round, `im:{tag}:suffix extra`, borrowed from the staged keys.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct KeyName<'a> {
    tag: &'a [u8],
    suffix: &'static [u8],
    /// A number after the suffix (the day of a dedupe bucket).
    day: Option<i64>,
}

/// What the fence checks of one conversation in a round.
struct Fence {
    /// The index of its `im:{conv}:m` key.
    key: usize,
    first: i64,
    last: i64,
    count: i64,
}

/// One write of the round script.
enum Op<'a> {
    HSet(Vec<Arg<'a>>),
    HDel(Vec<Arg<'a>>),
    Set(&'a [u8]),
    Del,
    /// An outbox stream entry: topic, record key, value (fields `t`, `k`, `v`).
    XAdd([&'a [u8]; 3]),
}

/// The writes of a round, grouped by key: consecutive writes of one hash become one
/// `HSET` (or `HDEL`) with many fields, and a string key keeps only its last write.
/// Per key the order of the staged writes is kept; keys are independent.
#[derive(Default)]
struct Round<'a> {
    keys: Vec<KeyName<'a>>,
    index: HashMap<KeyName<'a>, usize>,
    /// Per key, its latest op in `ops`.
    last_op: Vec<usize>,
    ops: Vec<(usize, Op<'a>)>,
    /// Where a field's value sits in an `HSET` op: a field written again in the same
    /// op (a row updated by several messages of the round) keeps only its last value.
    field_at: HashMap<(usize, Arg<'a>), usize>,
    /// Per conversation with new messages: its `m` key, and the lowest, highest and
    /// number of new seqs.
    fences: HashMap<&'a [u8], Fence>,
    /// Keys to expire (dedupe buckets), with the time (Unix seconds); sent after
    /// every other write, so the key exists when its expiry is set.
    expire_at: HashMap<usize, i64>,
}

impl<'a> Round<'a> {
    fn build(batches: &'a [Batch]) -> Round<'a> {
        let mut r = Round::default();
        for (_, puts) in batches {
            for p in puts {
                r.add(p);
            }
        }
        r
    }

    /// A conversation whose new seqs in this round are not `first..=last`, each once:
    /// the writer's own state is wrong, and the round must not be sent (the script
    /// checks only where each conversation's new seqs start).
    fn broken_fence(&self) -> Option<String> {
        self.fences.iter().find_map(|(conv, f)| {
            (f.last - f.first + 1 != f.count).then(|| {
                format!(
                    "the new seqs of {} in one round are not contiguous ({} seqs from {} to {})",
                    String::from_utf8_lossy(conv),
                    f.count,
                    f.first,
                    f.last
                )
            })
        })
    }

    fn key(&mut self, name: KeyName<'a>) -> usize {
        if let Some(i) = self.index.get(&name) {
            return *i;
        }
        let i = self.keys.len();
        self.keys.push(name);
        self.index.insert(name, i);
        self.last_op.push(usize::MAX);
        i
    }

    /// Adds one staged write (one that does not parse, which the store's own key
    /// builders never make, is skipped).
    fn add(&mut self, p: &'a Put) {
        if p.ks == Ks::Outbox {
            // `topic \0 key \0 value` (see `WriteSet::event`), into the stream
            // `im:{<outbox tag>}:x` (see `super::outbox::outbox_key`).
            let Some(v) = p.value.as_deref() else { return };
            let mut parts = v.splitn(3, |b| *b == 0);
            let (Some(t), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next())
            else {
                return;
            };
            let k = self.key(KeyName {
                tag: p.key.as_slice(),
                suffix: b"x",
                day: None,
            });
            self.ops.push((k, Op::XAdd([t, key, value])));
            self.last_op[k] = self.ops.len() - 1;
            return;
        }
        let Some(at) = p.key.iter().position(|b| *b == 0) else {
            if p.ks == Ks::Groups {
                self.string(p.key.as_slice(), b"g", p.value.as_deref());
            }
            return;
        };
        let (tag, rest) = (&p.key[..at], &p.key[at + 1..]);
        match p.ks {
            Ks::Msgs => {
                let Some(seq) = keys::seq_of(&p.key) else {
                    return;
                };
                self.field(tag, b"m", None, Arg::Int(seq), p.value.as_deref());
            }
            Ks::MsgIds => {
                // An id is indexed only when its message is new: these are the seqs
                // the fence checks.
                if let Some(seq) = p.value.as_deref().and_then(keys::seq_of) {
                    let m = self.key(KeyName {
                        tag,
                        suffix: b"m",
                        day: None,
                    });
                    let f = self.fences.entry(tag).or_insert(Fence {
                        key: m,
                        first: seq,
                        last: seq,
                        count: 0,
                    });
                    f.first = f.first.min(seq);
                    f.last = f.last.max(seq);
                    f.count += 1;
                }
                self.field(tag, b"i", None, Arg::Bytes(rest), p.value.as_deref());
            }
            Ks::Dedupe => {
                let sent = p
                    .value
                    .as_deref()
                    .and_then(|v| DedupeRecord::decode(v).ok())
                    .map_or_else(super::presence::now_ms, |r| r.send_time);
                let day = dedupe_day(sent);
                let k = self.field(tag, b"d:", Some(day), Arg::Bytes(rest), p.value.as_deref());
                self.expire_at
                    .entry(k)
                    .or_insert((day + 2) * (DAY_MS / 1000));
            }
            Ks::Rows => {
                self.field(tag, b"r", None, Arg::Bytes(rest), p.value.as_deref());
            }
            Ks::Members => {
                self.field(tag, b"gm", None, Arg::Bytes(rest), p.value.as_deref());
                // The member's own list of groups, in the same round (cluster mode
                // subscribes a connecting user's node to these).
                let member = p.value.as_ref().map(|_| &b"1"[..]);
                self.field(rest, b"gs", None, Arg::Bytes(tag), member);
            }
            Ks::Groups | Ks::Outbox => {}
        }
    }

    /// Sets (or with no value removes) a field of a hash; returns the key's index.
    fn field(
        &mut self,
        tag: &'a [u8],
        suffix: &'static [u8],
        day: Option<i64>,
        field: Arg<'a>,
        value: Option<&'a [u8]>,
    ) -> usize {
        let k = self.key(KeyName { tag, suffix, day });
        let last = self.last_op[k];
        let fits = |args: &Vec<Arg<'a>>| args.len() < MAX_HASH_ARGS;
        match (value, self.ops.get_mut(last)) {
            (Some(v), Some((_, Op::HSet(args)))) if fits(args) => {
                match self.field_at.entry((last, field)) {
                    std::collections::hash_map::Entry::Occupied(at) => {
                        args[*at.get()] = Arg::Bytes(v);
                    }
                    std::collections::hash_map::Entry::Vacant(at) => {
                        at.insert(args.len() + 1);
                        args.extend([field, Arg::Bytes(v)]);
                    }
                }
            }
            (None, Some((_, Op::HDel(args)))) if fits(args) => args.push(field),
            (Some(v), _) => {
                self.last_op[k] = self.ops.len();
                self.field_at.insert((self.ops.len(), field), 1);
                self.ops.push((k, Op::HSet(vec![field, Arg::Bytes(v)])));
            }
            (None, _) => {
                self.last_op[k] = self.ops.len();
                self.ops.push((k, Op::HDel(vec![field])));
            }
        }
        k
    }

    /// Sets (or with no value deletes) a string key.
    fn string(&mut self, tag: &'a [u8], suffix: &'static [u8], value: Option<&'a [u8]>) {
        let k = self.key(KeyName {
            tag,
            suffix,
            day: None,
        });
        let op = match value {
            Some(v) => Op::Set(v),
            None => Op::Del,
        };
        // The last write of a string key is all that counts.
        match self.ops.get_mut(self.last_op[k]) {
            Some(slot) => slot.1 = op,
            None => {
                self.last_op[k] = self.ops.len();
                self.ops.push((k, op));
            }
        }
    }

    /// `EVALSHA sha numkeys KEYS.. ARGV..`, as RESP.
    fn encode(&self, out: &mut Vec<u8>, sha: &[u8]) {
        let op_args: usize = self
            .ops
            .iter()
            .map(|(_, op)| {
                3 + match op {
                    Op::HSet(a) | Op::HDel(a) => a.len(),
                    Op::Set(_) => 1,
                    Op::Del => 0,
                    Op::XAdd(_) => 6,
                }
            })
            .sum::<usize>()
            + 4 * self.expire_at.len();
        resp::array(
            out,
            3 + self.keys.len() + 1 + 2 * self.fences.len() + op_args,
        );
        resp::bulk(out, b"EVALSHA");
        resp::bulk(out, sha);
        resp::int(out, self.keys.len() as i64);
        for k in &self.keys {
            resp::key(out, k);
        }
        resp::int(out, self.fences.len() as i64);
        for f in self.fences.values() {
            resp::int(out, f.key as i64 + 1);
            resp::int(out, f.first - 1);
        }
        for (k, op) in &self.ops {
            let (code, n): (&[u8], usize) = match op {
                Op::HSet(a) => (b"h", a.len()),
                Op::HDel(a) => (b"d", a.len()),
                Op::Set(_) => (b"s", 1),
                Op::Del => (b"k", 0),
                Op::XAdd(_) => (b"x", 6),
            };
            resp::bulk(out, code);
            resp::int(out, *k as i64 + 1);
            resp::int(out, n as i64);
            match op {
                Op::HSet(args) | Op::HDel(args) => {
                    for a in args {
                        match a {
                            Arg::Bytes(b) => resp::bulk(out, b),
                            Arg::Int(i) => resp::int(out, *i),
                        }
                    }
                }
                Op::Set(v) => resp::bulk(out, v),
                Op::Del => {}
                Op::XAdd([t, key, v]) => {
                    for (name, value) in [(b"t", t), (b"k", key), (b"v", v)] {
                        resp::bulk(out, name);
                        resp::bulk(out, value);
                    }
                }
            }
        }
        for (k, at) in &self.expire_at {
            resp::bulk(out, b"e");
            resp::int(out, *k as i64 + 1);
            resp::int(out, 1);
            resp::int(out, *at);
        }
    }
}

/// RESP encoding straight into the connection's buffer.
mod resp {
    use super::KeyName;

    fn decimal(out: &mut Vec<u8>, n: i64) {
        let mut buf = [0u8; 20];
        let mut at = buf.len();
        let mut v = n.unsigned_abs();
        loop {
            at -= 1;
            buf[at] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            out.push(b'-');
        }
        out.extend_from_slice(&buf[at..]);
    }

    fn header(out: &mut Vec<u8>, kind: u8, n: usize) {
        out.push(kind);
        decimal(out, n as i64);
        out.extend_from_slice(b"\r\n");
    }

    pub fn array(out: &mut Vec<u8>, n: usize) {
        header(out, b'*', n);
    }

    pub fn bulk(out: &mut Vec<u8>, b: &[u8]) {
        header(out, b'$', b.len());
        out.extend_from_slice(b);
        out.extend_from_slice(b"\r\n");
    }

    /// An integer as a bulk string (its decimal text).
    pub fn int(out: &mut Vec<u8>, n: i64) {
        let mut buf = Vec::with_capacity(20);
        decimal(&mut buf, n);
        bulk(out, &buf);
    }

    /// `im:{tag}:suffix[day]`.
    pub fn key(out: &mut Vec<u8>, k: &KeyName<'_>) {
        let mut day = Vec::new();
        if let Some(d) = k.day {
            decimal(&mut day, d);
        }
        header(out, b'$', 6 + k.tag.len() + k.suffix.len() + day.len());
        out.extend_from_slice(b"im:{");
        out.extend_from_slice(k.tag);
        out.extend_from_slice(b"}:");
        out.extend_from_slice(k.suffix);
        out.extend_from_slice(&day);
        out.extend_from_slice(b"\r\n");
    }
}

/// The messages (with their stored sizes) that fit `max_bytes`, in order, stopping
/// before the first that would pass it; at least one is always taken.
fn within_budget(found: Vec<(usize, MsgItem)>, max_bytes: usize) -> Vec<MsgItem> {
    let mut out = Vec::with_capacity(found.len());
    let mut bytes = 0usize;
    for (len, m) in found {
        if !out.is_empty() && bytes + len > max_bytes {
            break;
        }
        bytes += len;
        out.push(m);
    }
    out
}

/// HGETALL's field/value pairs, decoded.
fn pairs<T: Message + Default>(v: &Value, what: &str) -> Result<Vec<(String, T)>, StoreError> {
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Map(m) => m.iter().flat_map(|(k, v)| [k, v]).collect(),
        other => return Err(StoreError::Corrupt(format!("{what}s: {other:?}"))),
    };
    let mut out = Vec::with_capacity(items.len() / 2);
    for kv in items.chunks_exact(2) {
        let name = bytes_of(kv[0])
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| StoreError::Corrupt(format!("{what} field")))?;
        if let Some(t) = decode::<T>(kv[1], what)? {
            out.push((name.to_string(), t));
        }
    }
    Ok(out)
}
