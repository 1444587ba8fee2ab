//! Building the records of `events.proto`: one function per event kind, each returning
//! the topic, the record key and the encoded [`Event`], ready for
//! [`super::EventLog::append`] or the store's outbox.

use bytes::Bytes;
use prost::Message;

use super::Topic;
use crate::proto::events_pb::{
    event::Body, Event, MembershipChanged, MessageRecalled, MessageStored, OfflinePush, ReadMark,
};
use crate::proto::pb::MsgItem;

/// Where an event was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The node id.
    pub node: String,
    /// The shard index.
    pub shard: u32,
}

/// An encoded record: its topic, key and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: Topic,
    pub key: Bytes,
    pub value: Bytes,
}

/// Longest preview in an offline push, in characters.
pub const PREVIEW_CHARS: usize = 100;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn event(origin: &Origin, conv_id: &str, seq: i64, body: Body) -> Event {
    Event {
        conv_id: conv_id.to_string(),
        seq,
        time: now_ms(),
        node: origin.node.clone(),
        shard: origin.shard,
        body: Some(body),
    }
}

fn on_events(ev: Event) -> Record {
    Record {
        topic: Topic::Events,
        key: Bytes::copy_from_slice(ev.conv_id.as_bytes()),
        value: Bytes::from(ev.encode_to_vec()),
    }
}

/// A stored message (after its batch is durable).
pub fn message_stored(origin: &Origin, msg: &MsgItem) -> Record {
    on_events(event(
        origin,
        &msg.conv_id,
        msg.seq,
        Body::Stored(MessageStored {
            msg: Some(msg.clone()),
        }),
    ))
}

/// A recall of the message `msg_id` at `seq`.
pub fn message_recalled(
    origin: &Origin,
    conv_id: &str,
    seq: i64,
    msg_id: &str,
    operator: &str,
    recall_time: i64,
) -> Record {
    on_events(event(
        origin,
        conv_id,
        seq,
        Body::Recalled(MessageRecalled {
            msg_id: msg_id.to_string(),
            operator: operator.to_string(),
            recall_time,
        }),
    ))
}

/// A read mark moved to `read_seq`.
pub fn read_mark(
    origin: &Origin,
    user: &str,
    device: &str,
    conv_id: &str,
    read_seq: i64,
) -> Record {
    on_events(event(
        origin,
        conv_id,
        0,
        Body::ReadMark(ReadMark {
            user: user.to_string(),
            device: device.to_string(),
            conv_id: conv_id.to_string(),
            read_seq,
        }),
    ))
}

/// A membership change recorded by the system message at `seq`.
pub fn membership_changed(origin: &Origin, seq: i64, change: MembershipChanged) -> Record {
    let conv_id = change.conv_id.clone();
    on_events(event(origin, &conv_id, seq, Body::Membership(change)))
}

/// An offline push of `msg` to `user` (offline topic, keyed by the user).
pub fn offline_push(origin: &Origin, user: &str, msg: &MsgItem) -> Record {
    let ev = event(
        origin,
        &msg.conv_id,
        msg.seq,
        Body::OfflinePush(OfflinePush {
            user: user.to_string(),
            conv_id: msg.conv_id.clone(),
            seq: msg.seq,
            sender: msg.from_uuid.clone(),
            preview: preview(&msg.content),
            msg_id: msg.msg_id.clone(),
            msg_type: msg.msg_type,
            mentioned: msg.at_users.iter().any(|u| u == user),
        }),
    );
    Record {
        topic: Topic::Offline,
        key: Bytes::copy_from_slice(user.as_bytes()),
        value: Bytes::from(ev.encode_to_vec()),
    }
}

/// The notification text: the content's `text` field when the content is a JSON
/// object with one, else the content itself; at most [`PREVIEW_CHARS`] characters.
pub fn preview(content: &str) -> String {
    let text = serde_json::from_str::<serde_json::Value>(content)
        .ok()
        .and_then(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| content.to_string());
    text.chars().take(PREVIEW_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_back_with_key_and_topic() {
        let o = Origin {
            node: "n1".into(),
            shard: 3,
        };
        let msg = MsgItem {
            msg_id: "m1".into(),
            conv_id: "p2p:a:b".into(),
            seq: 7,
            from_uuid: "a".into(),
            content: r#"{"text":"héllo"}"#.into(),
            at_users: vec!["b".into()],
            ..Default::default()
        };
        let r = message_stored(&o, &msg);
        assert_eq!(r.topic, Topic::Events);
        assert_eq!(&r.key[..], b"p2p:a:b");
        let ev = Event::decode(&r.value[..]).expect("decodes");
        assert_eq!((ev.seq, ev.shard, ev.node.as_str()), (7, 3, "n1"));
        assert_eq!(
            ev.body,
            Some(Body::Stored(MessageStored {
                msg: Some(msg.clone())
            }))
        );

        let p = offline_push(&o, "b", &msg);
        assert_eq!((p.topic, &p.key[..]), (Topic::Offline, &b"b"[..]));
        let Some(Body::OfflinePush(push)) = Event::decode(&p.value[..]).expect("decodes").body
        else {
            panic!("not a push");
        };
        assert_eq!(push.preview, "héllo");
        assert!(push.mentioned);
        assert_eq!(preview(&"é".repeat(300)).chars().count(), PREVIEW_CHARS);
        assert_eq!(preview("plain"), "plain");
    }
}
