//! The store's pub/sub channels (Redis backend, cluster mode): publishing through the
//! shard's store connection, subscribing on a connection of its own
//! ([`crate::store::redis::PubSubConn`]), and who is online on any node (the presence
//! ZSETs). The chat layer sees only these types, never Redis'.
//!
//! Pub/sub is at most once: while a subscription is down, what is published is lost;
//! [`ChannelEvent::Resumed`] says so once delivery is back (the layer above tells its
//! clients to resync by seq).

use std::cell::Cell;
use std::rc::Rc;

use bytes::Bytes;

use super::redis::{pubsub, PubSubConn, PubSubEvent, RedisConfig};
use super::{ShardStore, StoreError};

/// What a subscription reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelEvent {
    /// A message on a channel held.
    Message { channel: Bytes, payload: Bytes },
    /// The subscription broke: what is published from now on is lost until `Resumed`.
    Lost,
    /// Delivery resumed (every channel held is subscribed again).
    Resumed,
}

/// A set of subscribed channels on a connection of its own.
pub struct Channels {
    conn: PubSubConn,
}

impl Channels {
    /// Holds `channel` (no-op if held); changes of one loop turn go out together.
    pub fn subscribe(&self, channel: impl Into<Bytes>) {
        self.conn.subscribe(channel);
    }

    /// Stops holding `channel`: nothing more is delivered for it.
    pub fn unsubscribe(&self, channel: &[u8]) {
        self.conn.unsubscribe(channel);
    }

    pub fn is_held(&self, channel: &[u8]) -> bool {
        self.conn.is_held(channel)
    }

    /// Channels held now.
    pub fn held(&self) -> usize {
        self.conn.stats().channels
    }
}

/// Publishes counted by the caller's store.
#[derive(Default)]
pub struct PublishStats {
    pub sent: Cell<u64>,
    pub failed: Cell<u64>,
}

impl ShardStore {
    /// The store's Redis connection, for the cluster's own keys (the node lease of
    /// `crate::cluster::membership`); `None` on the embedded store. Only start-up
    /// wiring uses it: the chat service goes through the methods below.
    pub fn redis_handle(&self) -> Option<super::redis::RedisConn> {
        self.redis_conn().cloned()
    }

    /// Subscribes on a new connection to the store's Redis (`url`, as the store was
    /// opened with); `on_event` runs on this shard's thread for every message.
    pub fn channels(
        &self,
        url: &str,
        timeout: std::time::Duration,
        on_event: impl FnMut(ChannelEvent) + 'static,
    ) -> Result<Channels, StoreError> {
        if self.redis_conn().is_none() {
            return Err(StoreError::Open(
                "channels need the Redis store (--store redis)".into(),
            ));
        }
        let mut on_event = on_event;
        let mut config = RedisConfig::new(url.to_string());
        config.timeout = timeout;
        let conn = PubSubConn::start(config, move |ev| match ev {
            PubSubEvent::Message { channel, payload } => {
                on_event(ChannelEvent::Message { channel, payload })
            }
            PubSubEvent::Disconnected { .. } => on_event(ChannelEvent::Lost),
            PubSubEvent::Resubscribed { .. } => on_event(ChannelEvent::Resumed),
        })
        .map_err(|e| StoreError::Open(format!("redis subscription: {e}")))?;
        Ok(Channels { conn })
    }

    /// Publishes `payload` on `channel`, fire and forget (batched with the shard's
    /// other Redis commands of the loop turn); a failure is counted in `stats`.
    pub fn publish(&self, channel: Vec<u8>, payload: Bytes, stats: &Rc<PublishStats>) {
        let Some(conn) = self.redis_conn().cloned() else {
            return;
        };
        let stats = stats.clone();
        stats.sent.set(stats.sent.get() + 1);
        monoio::spawn(async move {
            if let Err(e) = pubsub::publish(&conn, &channel, &payload).await {
                stats.failed.set(stats.failed.get() + 1);
                tracing::debug!(error = %e, "a publish failed");
            }
        });
    }

    /// Publishes and returns how many subscribers got it.
    pub async fn publish_counted(&self, channel: &[u8], payload: &[u8]) -> Result<u64, StoreError> {
        let conn = self
            .redis_conn()
            .ok_or_else(|| StoreError::Open("publishing needs the Redis store".into()))?;
        pubsub::publish(conn, channel, payload)
            .await
            .map_err(|e| StoreError::Read(format!("redis: {e}")))
    }

    /// The group conversations `user` is a member of (the Redis backend keeps the set
    /// `im:{user}:gs`, a hash of conv_id -> 1, in the same atomic round as the group's
    /// member records); empty
    /// on the embedded store, which needs it for nothing.
    pub async fn groups_of(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let Some(conn) = self.redis_conn() else {
            return Ok(Vec::new());
        };
        let key = format!("im:{{{user}}}:gs");
        match conn
            .cmd(::redis::cmd("HKEYS").arg(key))
            .await
            .map_err(|e| StoreError::Read(format!("redis: {e}")))?
        {
            ::redis::Value::Array(items) | ::redis::Value::Set(items) => Ok(items
                .into_iter()
                .filter_map(|v| match v {
                    ::redis::Value::BulkString(b) => String::from_utf8(b).ok(),
                    _ => None,
                })
                .collect()),
            other => Err(StoreError::Corrupt(format!("HKEYS answered {other:?}"))),
        }
    }

    /// The devices of each user seen within `window_ms` on any node (the presence
    /// ZSETs); `None` without presence (the embedded store).
    pub async fn online_devices(
        &self,
        users: &[String],
        window_ms: i64,
    ) -> Result<Option<Vec<Vec<String>>>, StoreError> {
        let Some(conn) = self.redis_conn() else {
            return Ok(None);
        };
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let since = crate::proto::envelope::now_ms() - window_ms;
        super::redis::online_devices(conn, &users, since)
            .await
            .map(Some)
            .map_err(|e| StoreError::Read(format!("redis: {e}")))
    }
}

/// A shard's Kafka outbox on the store's Redis (`store::redis::outbox`), drained into
/// the shard's [`crate::eventlog::EventLog`] by a pump task.
pub struct OutboxHandle {
    pump: Rc<crate::eventlog::OutboxPump<super::redis::outbox::RedisOutbox>>,
    /// The tag of the outbox stream (what [`super::WriteSet::event`] takes).
    pub tag: String,
}

impl OutboxHandle {
    /// The outbox has new entries (after a durable batch that added some).
    pub fn notify(&self) {
        self.pump.notify();
    }

    pub fn stats(&self) -> crate::eventlog::PumpStats {
        self.pump.stats()
    }

    pub fn stop(&self) {
        self.pump.stop();
    }
}

impl ShardStore {
    /// Starts the outbox pump of shard `shard` of node `node`: whatever an earlier run
    /// left in the outbox is produced first.
    pub fn start_outbox(
        &self,
        node: &str,
        shard: usize,
        log: crate::eventlog::EventLog,
    ) -> Result<OutboxHandle, StoreError> {
        let conn = self
            .redis_conn()
            .cloned()
            .ok_or_else(|| StoreError::Open("the Kafka event log needs --store redis".into()))?;
        let key = super::redis::outbox::outbox_key(node, shard);
        let tag = format!("outbox:{node}:{shard}");
        let outbox = super::redis::outbox::RedisOutbox::new(conn, key);
        let pump =
            crate::eventlog::OutboxPump::start(outbox, log, crate::eventlog::PumpConfig::default());
        Ok(OutboxHandle { pump, tag })
    }
}
