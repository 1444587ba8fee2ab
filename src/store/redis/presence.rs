//! Presence in Redis: one ZSET per user, `user:online:{uuid}`, member = device id,
//! score = a time in ms. The server writes what docs/PROTOCOL.md ("Cluster events")
//! fixes: the score is the device's last heartbeat, and a device counts as online while
//! its score is newer than now - heartbeat_timeout. The code also supports scores that
//! are expiry times (a window of 0), which the tests use.
//!
//! Updates are collected in a [`PresenceBatch`] (latest change per device wins) and
//! sent as one pipeline; [`PresenceWriter`] does that for a shard: changes staged from
//! anywhere in a loop turn go out together at the end of the turn. Each touched key
//! also drops its expired devices (`ZREMRANGEBYSCORE`) and gets `PEXPIREAT` of its
//! newest expiry, so a node that dies without cleaning up leaves nothing behind for
//! longer than one heartbeat timeout.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use ::redis::{Cmd, Value};

use super::{RedisConn, RedisError};

/// The ZSET of a user's online devices (the hash tag keeps it on one cluster slot
/// with the user's other keys).
pub fn online_key(user: &str) -> String {
    format!("user:online:{{{user}}}")
}

/// Presence changes to send together: per user, per device, the latest change.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PresenceBatch {
    /// user -> device -> `Some(expires_at_ms)` (online until then) or `None` (gone).
    users: BTreeMap<String, BTreeMap<String, Option<i64>>>,
}

impl PresenceBatch {
    pub fn new() -> PresenceBatch {
        PresenceBatch::default()
    }

    /// Marks `device` of `user` online until `expires_at_ms` (a connect or a heartbeat).
    pub fn set_online(&mut self, user: &str, device: &str, expires_at_ms: i64) {
        self.set(user, device, Some(expires_at_ms));
    }

    /// Marks `device` of `user` offline (its connection closed).
    pub fn set_offline(&mut self, user: &str, device: &str) {
        self.set(user, device, None);
    }

    fn set(&mut self, user: &str, device: &str, state: Option<i64>) {
        self.users
            .entry(user.to_string())
            .or_default()
            .insert(device.to_string(), state);
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Devices changed.
    pub fn len(&self) -> usize {
        self.users.values().map(BTreeMap::len).sum()
    }

    /// The commands of the batch: per user `ZADD` (online devices), `ZREM` (gone
    /// devices), `ZREMRANGEBYSCORE -inf now_ms` (expired devices) and, when a device
    /// came online, `PEXPIREAT` of the newest expiry.
    pub fn to_cmds(&self, now_ms: i64) -> Vec<Cmd> {
        self.to_cmds_in(now_ms, 0)
    }

    /// As [`PresenceBatch::to_cmds`] with scores that are last-seen times counting for
    /// `window_ms`: devices older than `now_ms - window_ms` are dropped, and the key
    /// expires `window_ms` after its newest score.
    pub fn to_cmds_in(&self, now_ms: i64, window_ms: i64) -> Vec<Cmd> {
        let mut cmds = Vec::with_capacity(self.users.len() * 4);
        for (user, devices) in &self.users {
            let key = online_key(user);
            let mut zadd = ::redis::cmd("ZADD");
            zadd.arg(&key);
            let mut zrem = ::redis::cmd("ZREM");
            zrem.arg(&key);
            let (mut added, mut removed, mut newest) = (false, false, None::<i64>);
            for (device, state) in devices {
                match state {
                    Some(expires) => {
                        zadd.arg(*expires).arg(device);
                        added = true;
                        newest = Some(newest.map_or(*expires, |n| n.max(*expires)));
                    }
                    None => {
                        zrem.arg(device);
                        removed = true;
                    }
                }
            }
            if added {
                cmds.push(zadd);
            }
            if removed {
                cmds.push(zrem);
            }
            cmds.push(
                ::redis::cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now_ms - window_ms)
                    .clone(),
            );
            if let Some(newest) = newest {
                cmds.push(
                    ::redis::cmd("PEXPIREAT")
                        .arg(&key)
                        .arg(newest + window_ms)
                        .clone(),
                );
            }
        }
        cmds
    }

    /// Sends the batch as one pipeline.
    pub async fn send(&self, conn: &RedisConn, now_ms: i64) -> Result<(), RedisError> {
        self.send_in(conn, now_ms, 0).await
    }

    /// Sends the batch as one pipeline, scores counting for `window_ms`.
    pub async fn send_in(
        &self,
        conn: &RedisConn,
        now_ms: i64,
        window_ms: i64,
    ) -> Result<(), RedisError> {
        let replies = conn.cmds(&self.to_cmds_in(now_ms, window_ms)).await?;
        match replies.into_iter().find_map(|v| match v {
            Value::ServerError(e) => Some(e),
            _ => None,
        }) {
            Some(e) => Err(RedisError::from_server(&e)),
            None => Ok(()),
        }
    }
}

/// The online devices of each of `users` (same order), read in one pipeline.
pub async fn online_devices(
    conn: &RedisConn,
    users: &[&str],
    now_ms: i64,
) -> Result<Vec<Vec<String>>, RedisError> {
    let cmds: Vec<Cmd> = users
        .iter()
        .map(|u| {
            ::redis::cmd("ZRANGEBYSCORE")
                .arg(online_key(u))
                .arg(format!("({now_ms}"))
                .arg("+inf")
                .clone()
        })
        .collect();
    conn.cmds(&cmds)
        .await?
        .into_iter()
        .map(|reply| match reply {
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::BulkString(b) => String::from_utf8(b).map_err(|_| {
                        RedisError::UnexpectedReply("a device id that is not UTF-8".to_string())
                    }),
                    other => Err(RedisError::UnexpectedReply(format!(
                        "device id as {other:?}"
                    ))),
                })
                .collect(),
            Value::ServerError(e) => Err(RedisError::from_server(&e)),
            other => Err(RedisError::UnexpectedReply(format!(
                "ZRANGEBYSCORE answered {other:?}"
            ))),
        })
        .collect()
}

/// Stages presence changes from synchronous code of a shard (connect, heartbeat,
/// close) and sends each loop turn's changes as one batch at the end of the turn.
/// Fire and forget: a failed batch is counted and logged, not retried (the next
/// heartbeat refreshes the device anyway, and an expired score counts as offline).
pub struct PresenceWriter {
    conn: RedisConn,
    staged: RefCell<PresenceBatch>,
    /// A flush task is queued for the end of this turn.
    flush_queued: Cell<bool>,
    /// Batches that failed.
    failed_batches: Cell<u64>,
    /// How long a score counts (0: scores are expiry times).
    window_ms: i64,
}

impl PresenceWriter {
    pub fn new(conn: RedisConn) -> Rc<PresenceWriter> {
        PresenceWriter::with_window(conn, 0)
    }

    /// A writer whose scores are last-seen times that count for `window_ms` (the
    /// server's heartbeat timeout: docs/PROTOCOL.md's meaning).
    pub fn with_window(conn: RedisConn, window_ms: i64) -> Rc<PresenceWriter> {
        Rc::new(PresenceWriter {
            conn,
            staged: RefCell::new(PresenceBatch::new()),
            flush_queued: Cell::new(false),
            failed_batches: Cell::new(0),
            window_ms,
        })
    }

    pub fn set_online(self: &Rc<Self>, user: &str, device: &str, expires_at_ms: i64) {
        self.staged
            .borrow_mut()
            .set_online(user, device, expires_at_ms);
        self.queue_flush();
    }

    pub fn set_offline(self: &Rc<Self>, user: &str, device: &str) {
        self.staged.borrow_mut().set_offline(user, device);
        self.queue_flush();
    }

    /// Batches that failed so far.
    pub fn failed_batches(&self) -> u64 {
        self.failed_batches.get()
    }

    /// A task spawned now runs after every task already queued in this turn, so the
    /// changes those tasks stage are in its batch.
    fn queue_flush(self: &Rc<Self>) {
        if self.flush_queued.replace(true) {
            return;
        }
        let me = self.clone();
        monoio::spawn(async move {
            me.flush_queued.set(false);
            let batch = std::mem::take(&mut *me.staged.borrow_mut());
            if let Err(e) = batch.send_in(&me.conn, now_ms(), me.window_ms).await {
                me.failed_batches.set(me.failed_batches.get() + 1);
                tracing::warn!(error = %e, devices = batch.len(), "presence update failed");
            }
        });
    }
}

/// Unix time in ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_change_per_device_wins_and_cmds_are_grouped_per_user() {
        let mut b = PresenceBatch::new();
        b.set_online("u1", "phone", 1_000);
        b.set_online("u1", "pc", 2_000);
        b.set_offline("u1", "phone");
        b.set_offline("u2", "pad");
        assert_eq!(b.len(), 3);
        let packed: Vec<String> = b
            .to_cmds(500)
            .iter()
            .map(|c| String::from_utf8_lossy(&c.get_packed_command()).replace("\r\n", " "))
            .collect();
        assert_eq!(packed.len(), 6, "{packed:?}");
        assert!(
            packed[0].contains("ZADD $16 user:online:{u1} $4 2000 $2 pc"),
            "{packed:?}"
        );
        assert!(packed[1].contains("ZREM $16 user:online:{u1} $5 phone"));
        assert!(packed[2].contains("ZREMRANGEBYSCORE"));
        assert!(packed[3].contains("PEXPIREAT $16 user:online:{u1} $4 2000"));
        assert!(packed[4].contains("ZREM $16 user:online:{u2} $3 pad"));
        assert!(packed[5].contains("ZREMRANGEBYSCORE $16 user:online:{u2}"));
    }
}
