//! The event-log outbox on Redis: one stream per shard, written in the same
//! `MULTI`/`EXEC` round as the data it reports, drained by
//! [`crate::eventlog::OutboxPump`].
//!
//! # Key and entries
//! `im:{outbox:<node>:<shard>}:x`, a stream; each entry has the fields `t` (topic:
//! `e` events, `o` offline), `k` (record key) and `v` (the encoded
//! [`crate::proto::events_pb::Event`]). Ids are Redis's (`*`), so entries are in the
//! order their rounds ran. No `MAXLEN`: entries leave only by `XTRIM MINID` once Kafka
//! has them. While Kafka is down the stream grows by the events written (watch
//! `outbox_len`).
//!
//! # What the store does (the only store-side change)
//! For each event, add [`xadd`]`(&outbox_key(node, shard), topic, key, value)` to the
//! round's atomic pipeline, next to the commands of the data it reports; after the
//! round is durable, call `OutboxPump::notify`. In Redis Cluster the stream and the
//! data are in different slots: like the rest of a round, that needs the cluster
//! client the store does not have yet (the round is one `MULTI` over many keys today).

use ::redis::{Cmd, Value};

use super::RedisConn;
use crate::eventlog::{Outbox, OutboxEntry, OutboxError, OutboxId, Topic};

/// The outbox stream of `shard` on `node`.
pub fn outbox_key(node: &str, shard: usize) -> Vec<u8> {
    format!("im:{{outbox:{node}:{shard}}}:x").into_bytes()
}

/// The command that adds one event to the outbox: put it in the same atomic round as
/// the data the event reports.
pub fn xadd(stream: &[u8], topic: Topic, key: &[u8], value: &[u8]) -> Cmd {
    ::redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("t")
        .arg(topic.code())
        .arg("k")
        .arg(key)
        .arg("v")
        .arg(value)
        .clone()
}

/// A shard's outbox stream on its Redis connection.
#[derive(Clone)]
pub struct RedisOutbox {
    conn: RedisConn,
    key: Vec<u8>,
}

impl RedisOutbox {
    pub fn new(conn: RedisConn, key: Vec<u8>) -> RedisOutbox {
        RedisOutbox { conn, key }
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }

    async fn one(&self, cmd: Cmd) -> Result<Value, OutboxError> {
        match self.conn.cmd(&cmd).await {
            Ok(Value::ServerError(e)) => Err(OutboxError::Unavailable(format!("{e:?}"))),
            Ok(v) => Ok(v),
            Err(e) => Err(OutboxError::Unavailable(e.to_string())),
        }
    }
}

impl Outbox for RedisOutbox {
    async fn read(
        &self,
        after: Option<OutboxId>,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, OutboxError> {
        let start = match after {
            // `(` makes the start exclusive (Redis 6.2+).
            Some(id) => format!("({id}"),
            None => "-".to_string(),
        };
        let v = self
            .one(
                ::redis::cmd("XRANGE")
                    .arg(&self.key)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit)
                    .clone(),
            )
            .await?;
        parse_range(&v)
    }

    async fn trim(&self, upto: OutboxId) -> Result<(), OutboxError> {
        let v = self
            .one(
                ::redis::cmd("XTRIM")
                    .arg(&self.key)
                    .arg("MINID")
                    .arg(upto.next().to_string())
                    .clone(),
            )
            .await?;
        match v {
            Value::Int(_) => Ok(()),
            other => Err(OutboxError::Corrupt(format!("XTRIM answered {other:?}"))),
        }
    }

    async fn stored(&self) -> Result<u64, OutboxError> {
        match self
            .one(::redis::cmd("XLEN").arg(&self.key).clone())
            .await?
        {
            Value::Int(n) => Ok(n.max(0) as u64),
            other => Err(OutboxError::Corrupt(format!("XLEN answered {other:?}"))),
        }
    }
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// XRANGE's `[[id, [field, value, ...]], ...]`.
fn parse_range(v: &Value) -> Result<Vec<OutboxEntry>, OutboxError> {
    let bad = |what: &str| OutboxError::Corrupt(format!("XRANGE: {what}"));
    let Value::Array(items) = v else {
        return Err(bad("not an array"));
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(pair) = item else {
            return Err(bad("entry not an array"));
        };
        let [id, fields] = &pair[..] else {
            return Err(bad("entry not [id, fields]"));
        };
        let id = bulk(id)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(OutboxId::parse)
            .ok_or_else(|| bad("entry id"))?;
        let Value::Array(fields) = fields else {
            return Err(bad("fields not an array"));
        };
        let (mut topic, mut key, mut value) = (None, None, None);
        for kv in fields.chunks_exact(2) {
            match bulk(&kv[0]) {
                Some(b"t") => topic = bulk(&kv[1]).and_then(Topic::from_code),
                Some(b"k") => key = bulk(&kv[1]).map(bytes::Bytes::copy_from_slice),
                Some(b"v") => value = bulk(&kv[1]).map(bytes::Bytes::copy_from_slice),
                _ => {}
            }
        }
        match (topic, key, value) {
            (Some(topic), Some(key), Some(value)) => out.push(OutboxEntry {
                id,
                topic,
                key,
                value,
            }),
            _ => {
                return Err(OutboxError::Corrupt(format!(
                    "outbox entry {id} lacks t/k/v"
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_ids_order() {
        let entry = |id: &str, t: &str| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"t".to_vec()),
                    Value::BulkString(t.as_bytes().to_vec()),
                    Value::BulkString(b"k".to_vec()),
                    Value::BulkString(b"c1".to_vec()),
                    Value::BulkString(b"v".to_vec()),
                    Value::BulkString(vec![1, 2, 3]),
                ]),
            ])
        };
        let v = Value::Array(vec![entry("5-0", "e"), entry("5-1", "o")]);
        let got = parse_range(&v).expect("parses");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].topic, Topic::Events);
        assert_eq!(got[1].topic, Topic::Offline);
        assert_eq!(&got[1].value[..], &[1, 2, 3]);
        assert!(got[0].id < got[1].id);
        assert_eq!(got[1].id.next().to_string(), "5-2");
        assert!(parse_range(&Value::Array(vec![entry("x", "e")])).is_err());
        assert!(parse_range(&Value::Array(vec![entry("1-1", "z")])).is_err());
    }
}
