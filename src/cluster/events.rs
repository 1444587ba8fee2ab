//! The cluster's Redis channels every node subscribes to (PROTOCOL.md "Cluster
//! events"), and their payloads decoded into typed, checked events.
//!
//! - [`KICK_CHANNEL`] `connect:events:kick`: a protobuf `KickEvent`; each node kicks
//!   the matching connections it holds (`device_id` `ALL` = every device).
//! - [`BROADCAST_CHANNEL`] `connect:events:broadcast`: a protobuf `BroadcastEvent`;
//!   each node delivers its envelope to the listed users it holds (empty list: every
//!   connection it holds).
//! - [`NODES_CHANGED_CHANNEL`]: membership changed; read the live set
//!   ([`super::membership::Membership::refresh_now`]).
//!
//! Delivery is Redis pub/sub's: at most once, to the nodes subscribed at the moment
//! of the `PUBLISH` ([`crate::store::redis::pubsub`]). A kick or broadcast published
//! while a node is reconnecting is lost for that node; a kicked client that stays
//! connected there can be kicked again. What to do with an event (which shard holds
//! the user, the KICKOUT reason sent) is the chat layer's.
//!
//! A payload that does not decode, or names an invalid id, is an [`EventError`] that
//! says which channel and why: logged and dropped by the caller, never a crash.

use bytes::Bytes;
use prost::Message;

use super::membership::NODES_CHANGED_CHANNEL;
use crate::ids::is_valid_id;
use crate::proto::pb;
use crate::store::redis::{publish, PubSubConn, RedisConn, RedisError};

/// Kick events (protobuf `KickEvent`).
pub const KICK_CHANNEL: &str = "connect:events:kick";
/// Broadcast events (protobuf `BroadcastEvent`).
pub const BROADCAST_CHANNEL: &str = "connect:events:broadcast";

/// `device_id` of a kick that means every device of the user.
pub const ALL_DEVICES: &str = "ALL";

/// A message of one of the cluster channels, decoded and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterEvent {
    /// Kick `user_uuid`'s `device_id` (or every device for [`ALL_DEVICES`]).
    Kick(pb::KickEvent),
    /// Deliver `message` to `user_uuids` (every connection when empty).
    Broadcast(pb::BroadcastEvent),
    /// The live set changed; the payload is the node id that changed, or `expired`.
    NodesChanged(Bytes),
}

/// Why a message of a cluster channel was not turned into an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    /// Not one of the cluster channels (a subscription of another layer).
    UnknownChannel(String),
    /// The payload is not the channel's protobuf message.
    Undecodable {
        channel: &'static str,
        error: String,
    },
    /// It decoded but breaks PROTOCOL.md (a bad id, a broadcast without a type).
    Invalid { channel: &'static str, what: String },
}

impl std::fmt::Display for EventError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventError::UnknownChannel(c) => write!(f, "not a cluster channel: {c:?}"),
            EventError::Undecodable { channel, error } => {
                write!(f, "{channel}: payload does not decode: {error}")
            }
            EventError::Invalid { channel, what } => write!(f, "{channel}: {what}"),
        }
    }
}

impl std::error::Error for EventError {}

/// Holds the three cluster channels on `sub` (one write with the turn's other
/// changes).
pub fn subscribe_cluster_channels(sub: &PubSubConn) {
    sub.subscribe(Bytes::from_static(KICK_CHANNEL.as_bytes()));
    sub.subscribe(Bytes::from_static(BROADCAST_CHANNEL.as_bytes()));
    sub.subscribe(Bytes::from_static(NODES_CHANGED_CHANNEL.as_bytes()));
}

/// Decodes and checks a message received on `channel`.
pub fn decode_event(channel: &[u8], payload: Bytes) -> Result<ClusterEvent, EventError> {
    match channel {
        c if c == KICK_CHANNEL.as_bytes() => {
            let ev = pb::KickEvent::decode(payload).map_err(|e| EventError::Undecodable {
                channel: KICK_CHANNEL,
                error: e.to_string(),
            })?;
            let invalid = |what: String| EventError::Invalid {
                channel: KICK_CHANNEL,
                what,
            };
            if !is_valid_id(&ev.user_uuid) {
                return Err(invalid(format!("bad user_uuid {:?}", ev.user_uuid)));
            }
            if ev.device_id != ALL_DEVICES && !is_valid_id(&ev.device_id) {
                return Err(invalid(format!("bad device_id {:?}", ev.device_id)));
            }
            Ok(ClusterEvent::Kick(ev))
        }
        c if c == BROADCAST_CHANNEL.as_bytes() => {
            let ev = pb::BroadcastEvent::decode(payload).map_err(|e| EventError::Undecodable {
                channel: BROADCAST_CHANNEL,
                error: e.to_string(),
            })?;
            let invalid = |what: String| EventError::Invalid {
                channel: BROADCAST_CHANNEL,
                what,
            };
            if let Some(bad) = ev.user_uuids.iter().find(|u| !is_valid_id(u)) {
                return Err(invalid(format!("bad user_uuid {bad:?}")));
            }
            match &ev.message {
                Some(m) if !m.r#type.is_empty() => Ok(ClusterEvent::Broadcast(ev)),
                _ => Err(invalid("message with an empty type".to_string())),
            }
        }
        c if c == NODES_CHANGED_CHANNEL.as_bytes() => Ok(ClusterEvent::NodesChanged(payload)),
        other => Err(EventError::UnknownChannel(
            String::from_utf8_lossy(other).into_owned(),
        )),
    }
}

/// Publishes a kick to every node (over an ordinary connection). Returns how many
/// subscribers Redis handed it to.
pub async fn publish_kick(conn: &RedisConn, ev: &pb::KickEvent) -> Result<u64, RedisError> {
    publish(conn, KICK_CHANNEL.as_bytes(), &ev.encode_to_vec()).await
}

/// Publishes a broadcast to every node. Returns how many subscribers got it.
pub async fn publish_broadcast(
    conn: &RedisConn,
    ev: &pb::BroadcastEvent,
) -> Result<u64, RedisError> {
    publish(conn, BROADCAST_CHANNEL.as_bytes(), &ev.encode_to_vec()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kick(user: &str, device: &str) -> Bytes {
        pb::KickEvent {
            user_uuid: user.into(),
            device_id: device.into(),
            reason: "admin".into(),
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn kicks() {
        let ev = decode_event(KICK_CHANNEL.as_bytes(), kick("alice", "ALL")).unwrap();
        assert!(
            matches!(ev, ClusterEvent::Kick(k) if k.user_uuid == "alice" && k.device_id == "ALL")
        );
        assert!(decode_event(KICK_CHANNEL.as_bytes(), kick("alice", "phone")).is_ok());
        assert!(matches!(
            decode_event(KICK_CHANNEL.as_bytes(), kick("al-ice", "phone")),
            Err(EventError::Invalid { .. })
        ));
        assert!(matches!(
            decode_event(KICK_CHANNEL.as_bytes(), kick("alice", "")),
            Err(EventError::Invalid { .. })
        ));
        assert!(matches!(
            decode_event(KICK_CHANNEL.as_bytes(), Bytes::from_static(b"\xff\xff\xff")),
            Err(EventError::Undecodable { .. })
        ));
    }

    #[test]
    fn broadcasts() {
        let ev = |users: &[&str], ty: &str| -> Bytes {
            pb::BroadcastEvent {
                user_uuids: users.iter().map(|u| u.to_string()).collect(),
                message: Some(pb::MessageEnvelope {
                    r#type: ty.into(),
                    data: Bytes::from_static(b"hi"),
                    ..Default::default()
                }),
            }
            .encode_to_vec()
            .into()
        };
        let ch = BROADCAST_CHANNEL.as_bytes();
        assert!(
            matches!(decode_event(ch, ev(&[], "NOTICE")), Ok(ClusterEvent::Broadcast(b)) if b.user_uuids.is_empty())
        );
        assert!(decode_event(ch, ev(&["a", "b"], "NOTICE")).is_ok());
        assert!(decode_event(ch, ev(&["a b"], "NOTICE")).is_err());
        assert!(decode_event(ch, ev(&["a"], "")).is_err());
        let no_message = pb::BroadcastEvent::default().encode_to_vec();
        assert!(decode_event(ch, no_message.into()).is_err());
    }

    #[test]
    fn random_payloads_are_errors_not_panics() {
        use rand::{Rng, RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let mut payload = vec![0u8; rng.random_range(0..48)];
            rng.fill_bytes(&mut payload);
            for ch in [KICK_CHANNEL, BROADCAST_CHANNEL] {
                if let Ok(ClusterEvent::Kick(k)) =
                    decode_event(ch.as_bytes(), payload.clone().into())
                {
                    assert!(is_valid_id(&k.user_uuid));
                }
            }
        }
    }

    #[test]
    fn other_channels() {
        assert_eq!(
            decode_event(NODES_CHANGED_CHANNEL.as_bytes(), Bytes::from_static(b"n1")),
            Ok(ClusterEvent::NodesChanged(Bytes::from_static(b"n1")))
        );
        assert!(matches!(
            decode_event(b"user:alice", Bytes::new()),
            Err(EventError::UnknownChannel(_))
        ));
    }
}
