//! The Redis backend of the store (`--store redis`): the same reads and atomic batches
//! as the embedded backend, on one [`RedisConn`] per shard.
//!
//! # Keys (hash tags put every key of a conversation, and of a user, in one slot)
//! | key | type | content |
//! |---|---|---|
//! | `im:{conv}:m` | hash | seq (decimal) -> MsgItem; seqs are 1..=max without gaps, so `HLEN` is the max seq |
//! | `im:{conv}:i` | hash | msg_id -> seq (8 bytes, big-endian) |
//! | `im:{conv}:d:sender\0client_msg_id` | string, 24 h TTL | DedupeRecord |
//! | `im:{user}:r` | hash | conv_id -> ConvRow |
//! | `im:{conv}:g` | string | GroupMeta |
//! | `im:{conv}:gm` | hash | user -> MemberRecord |
//!
//! # Writes
//! The batches staged by the shard are sent by one writer task, in order, each round as
//! one `MULTI`/`EXEC` (all of it or none of it applies); a batch is reported durable
//! when `EXEC` answered, which with `appendfsync always` means it is on Redis's disk. A
//! round that fails (Redis down, timeout) fails its batches and every later one until
//! the shard resets, exactly as with the embedded store; the outcome of a round whose
//! connection broke mid-way is unknown, and the shard then reloads its state from Redis.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use prost::Message;
use redis::{Cmd, Pipeline, Value};

use super::{RedisConn, RedisError};
use crate::proto::pb::MsgItem;
use crate::proto::store_pb::{ConvRow, DedupeRecord, GroupMeta, MemberRecord};
use crate::store::{keys, Ks, Put, StoreError};

/// The dedupe window, as a key TTL.
const DEDUPE_TTL_SECS: u64 = (crate::limits::DEDUPE_WINDOW_MS / 1000) as u64;

/// A shard's Redis store: its connection and the batches waiting for the writer.
pub struct RedisBackend {
    pub conn: RedisConn,
    /// Batches handed over by the shard's flush, oldest first.
    queue: RefCell<VecDeque<(u64, Vec<Put>)>>,
    /// Whether the writer task runs.
    writing: Cell<bool>,
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

/// Splits a store key at its first `\0`: (first part, the rest).
fn split(key: &[u8]) -> Option<(&str, &[u8])> {
    let at = key.iter().position(|b| *b == 0)?;
    Some((std::str::from_utf8(&key[..at]).ok()?, &key[at + 1..]))
}

impl RedisBackend {
    /// A backend on `conn`; with `wait_replicas > 0` every round also waits (up to
    /// `wait_timeout_ms`) for that many replicas.
    pub fn new(conn: RedisConn, wait_replicas: u32, wait_timeout_ms: u64) -> Rc<RedisBackend> {
        Rc::new(RedisBackend {
            conn,
            queue: RefCell::new(VecDeque::new()),
            writing: Cell::new(false),
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
        let mut cmd = redis::cmd("MGET");
        for (sender, id) in &keys_asked {
            cmd.arg(dedupe_key(conv, sender.as_bytes(), id.as_bytes()));
        }
        let Value::Array(values) = self.one(cmd).await? else {
            return Err(StoreError::Corrupt("MGET: not an array".into()));
        };
        values.iter().map(|v| decode(v, "dedupe")).collect()
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

    /// Queues a batch for the writer; true when the writer must be started.
    pub fn enqueue(&self, id: u64, puts: Vec<Put>) -> bool {
        self.queue.borrow_mut().push_back((id, puts));
        !self.writing.replace(true)
    }

    /// Drops the queued batches (after a failure); the highest id dropped.
    pub fn drop_queued(&self) -> Option<u64> {
        let mut q = self.queue.borrow_mut();
        let last = q.back().map(|(id, _)| *id);
        q.clear();
        last
    }

    /// Takes every queued batch as one round: the highest id and its commands.
    pub fn take_round(&self) -> Option<(u64, Pipeline)> {
        let mut q = self.queue.borrow_mut();
        if q.is_empty() {
            self.writing.set(false);
            return None;
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut upto = 0;
        for (id, puts) in q.drain(..) {
            upto = id;
            for p in puts {
                if let Some(cmd) = command(&p) {
                    pipe.add_command(cmd);
                }
            }
        }
        Some((upto, pipe))
    }

    /// Runs one round; Ok when `EXEC` applied all of it (and, if asked, enough
    /// replicas acknowledged it).
    pub async fn write_round(&self, pipe: &Pipeline) -> Result<(), String> {
        self.exec_round(pipe).await?;
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let wait = redis::cmd("WAIT")
            .arg(self.wait_replicas)
            .arg(self.wait_timeout_ms)
            .clone();
        match self.conn.cmd(&wait).await.map_err(|e| e.to_string())? {
            Value::Int(n) if n >= i64::from(self.wait_replicas) => Ok(()),
            Value::Int(n) => Err(format!(
                "only {n} of {} replicas acknowledged the batch within {} ms",
                self.wait_replicas, self.wait_timeout_ms
            )),
            other => Err(format!("WAIT answered {other:?}")),
        }
    }

    async fn exec_round(&self, pipe: &Pipeline) -> Result<(), String> {
        let replies = self.conn.pipeline(pipe).await.map_err(|e| e.to_string())?;
        match replies.last() {
            Some(Value::Array(results)) => {
                if let Some(err) = results.iter().find_map(|r| match r {
                    Value::ServerError(e) => Some(format!("{e:?}")),
                    _ => None,
                }) {
                    return Err(format!("a command of the batch failed: {err}"));
                }
                Ok(())
            }
            Some(Value::ServerError(e)) => Err(format!("EXEC refused: {e:?}")),
            other => Err(format!("EXEC answered {other:?}")),
        }
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

fn dedupe_key(conv: &str, sender: &[u8], client_msg_id: &[u8]) -> Vec<u8> {
    let mut k = key(conv, "d:");
    k.extend_from_slice(sender);
    k.push(0);
    k.extend_from_slice(client_msg_id);
    k
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

/// The Redis command of one staged write (None: a key that does not parse, which the
/// store's own key builders never make).
fn command(p: &Put) -> Option<Cmd> {
    let set_field = |hash: Vec<u8>, field: &[u8]| -> Cmd {
        match &p.value {
            Some(v) => redis::cmd("HSET").arg(hash).arg(field).arg(&v[..]).clone(),
            None => redis::cmd("HDEL").arg(hash).arg(field).clone(),
        }
    };
    let set_key = |k: Vec<u8>, ttl: Option<u64>| -> Cmd {
        match (&p.value, ttl) {
            (Some(v), Some(t)) => redis::cmd("SET")
                .arg(k)
                .arg(&v[..])
                .arg("EX")
                .arg(t)
                .clone(),
            (Some(v), None) => redis::cmd("SET").arg(k).arg(&v[..]).clone(),
            (None, _) => redis::cmd("DEL").arg(k).clone(),
        }
    };
    match p.ks {
        Ks::Msgs => {
            let (conv, _) = split(&p.key)?;
            let seq = keys::seq_of(&p.key)?;
            Some(set_field(key(conv, "m"), seq.to_string().as_bytes()))
        }
        Ks::MsgIds => {
            let (conv, msg_id) = split(&p.key)?;
            Some(set_field(key(conv, "i"), msg_id))
        }
        Ks::Dedupe => {
            let (conv, rest) = split(&p.key)?;
            let at = rest.iter().position(|b| *b == 0)?;
            let k = dedupe_key(conv, &rest[..at], &rest[at + 1..]);
            Some(set_key(k, Some(DEDUPE_TTL_SECS)))
        }
        Ks::Rows => {
            let (user, conv) = split(&p.key)?;
            Some(set_field(key(user, "r"), conv))
        }
        Ks::Groups => {
            let conv = std::str::from_utf8(&p.key).ok()?;
            Some(set_key(key(conv, "g"), None))
        }
        Ks::Members => {
            let (conv, user) = split(&p.key)?;
            Some(set_field(key(conv, "gm"), user))
        }
    }
}
