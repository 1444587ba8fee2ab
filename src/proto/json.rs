//! The JSON subprotocol (`imshard.v1.json`): the same `ClientFrame` / `MessageEnvelope`
//! messages as the binary one, one per WebSocket text frame, in protobuf's canonical
//! JSON mapping as implemented by `prost-reflect` from the descriptors `build.rs` gets
//! from `imshard.proto` (nothing here knows a field by hand).
//!
//! Mapping choices (README "JSON over WebSocket"):
//! - field names as in the .proto (`req_id`, `conv_id`): the HTTP API's names; input
//!   may use those or lowerCamelCase (`reqId`), as the mapping says;
//! - enums as names (`"CONV_TYPE_P2P"`), numbers accepted on input; 64-bit integers as
//!   strings (`"seq": "12"`), numbers accepted on input; fields at their default value
//!   are left out; unknown fields are refused (40001);
//! - an envelope's `data` (bytes) is replaced by `payload`, the message it holds as
//!   JSON, chosen by `type` (RESPONSE: Response, MSG_PUSH: MsgItem, MSG_RECALL:
//!   RecallNotice, MSG_MARK_READ: MarkReadNotice, KICKOUT: KickoutNotice). A
//!   Response's `body` (bytes) is likewise the XxxResponse of the request as JSON. A
//!   type the server does not know (an admin broadcast of its own kind) keeps `data`
//!   as base64, the canonical form of bytes.
//!
//! Server frames are encoded once as protobuf (a group push is shared by every
//! recipient); a JSON connection converts each frame as it queues it
//! ([`text_frame`]), so binary connections pay nothing for this module.

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions,
};
use serde_json::Value;

use super::envelope::{kind, FrameError};
use super::pb::{client_frame::Body, ClientFrame};
use super::ws;

/// Subprotocol names a client offers in `Sec-WebSocket-Protocol`.
pub const SUBPROTOCOL_JSON: &str = "imshard.v1.json";
pub const SUBPROTOCOL_PROTO: &str = "imshard.v1.proto";

/// The encoded descriptors of `imshard.proto` (written by `build.rs`).
static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/imshard.fds"));
const PACKAGE: &str = "imshard.v1";

/// Why a frame could not be converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// The built-in descriptors lack a message (a build problem, not the client's).
    Schema(&'static str),
    /// The protobuf bytes the server produced did not decode (a bug).
    Decode(String),
    /// The frame is not one of the server's binary frames.
    NotAFrame,
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JsonError::Schema(m) => write!(f, "no descriptor for {m}"),
            JsonError::Decode(e) => write!(f, "cannot decode a server frame: {e}"),
            JsonError::NotAFrame => write!(f, "not a server binary frame"),
        }
    }
}

impl std::error::Error for JsonError {}

/// What the client asked for in `Sec-WebSocket-Protocol`, as the server answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The subprotocol to echo in the 101 (none when the client offered none we speak).
    pub echo: Option<&'static str>,
    /// Text frames with JSON instead of binary frames with protobuf.
    pub json: bool,
}

/// Picks the first subprotocol in the client's list that the server speaks. No header,
/// or only unknown names, means binary protobuf and no `Sec-WebSocket-Protocol` in the
/// answer (a browser that insisted on a name then fails the connection itself).
pub fn negotiate(offered: Option<&str>) -> Negotiated {
    for name in offered.unwrap_or("").split(',').map(str::trim) {
        if name.eq_ignore_ascii_case(SUBPROTOCOL_JSON) {
            return Negotiated {
                echo: Some(SUBPROTOCOL_JSON),
                json: true,
            };
        }
        if name.eq_ignore_ascii_case(SUBPROTOCOL_PROTO) {
            return Negotiated {
                echo: Some(SUBPROTOCOL_PROTO),
                json: false,
            };
        }
    }
    Negotiated {
        echo: None,
        json: false,
    }
}

fn pool() -> Option<&'static DescriptorPool> {
    static POOL: OnceLock<Option<DescriptorPool>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTORS).ok())
        .as_ref()
}

fn descriptor(name: &'static str) -> Result<MessageDescriptor, JsonError> {
    pool()
        .and_then(|p| p.get_message_by_name(&format!("{PACKAGE}.{name}")))
        .ok_or(JsonError::Schema(name))
}

const SERIALIZE: SerializeOptions = SerializeOptions::new().use_proto_field_name(true);

/// A protobuf message as canonical JSON.
fn to_value(msg: &DynamicMessage) -> Result<Value, JsonError> {
    msg.serialize_with_options(serde_json::value::Serializer, &SERIALIZE)
        .map_err(|e| JsonError::Decode(e.to_string()))
}

fn decode(name: &'static str, bytes: &[u8]) -> Result<DynamicMessage, JsonError> {
    DynamicMessage::decode(descriptor(name)?, bytes).map_err(|e| JsonError::Decode(e.to_string()))
}

/// The message an envelope of this `type` carries in `data`.
fn payload_type(kind: &str) -> Option<&'static str> {
    Some(match kind {
        kind::RESPONSE => "Response",
        kind::MSG_PUSH => "MsgItem",
        kind::MSG_RECALL => "RecallNotice",
        kind::MSG_MARK_READ => "MarkReadNotice",
        kind::KICKOUT => "KickoutNotice",
        _ => return None,
    })
}

/// The message a successful RESPONSE to this request carries in `body` (none for
/// PushAck, whose answer is empty).
pub fn response_type(body: &Body) -> Option<&'static str> {
    Some(match body {
        Body::Heartbeat(_) => "HeartbeatResponse",
        Body::Send(_) => "SendMessageResponse",
        Body::Pull(_) => "PullMessagesResponse",
        Body::GetByIds(_) => "GetMessagesByIdsResponse",
        Body::Recall(_) => "RecallMessageResponse",
        Body::GetConversations(_) => "GetConversationsResponse",
        Body::MarkRead(_) => "MarkReadResponse",
        Body::DeleteConversation(_) => "DeleteConversationResponse",
        Body::UpdateSettings(_) => "UpdateConvSettingsResponse",
        Body::PushAck(_) => return None,
        Body::GetUnread(_) => "GetUnreadResponse",
        Body::CreateGroup(_) => "CreateGroupResponse",
        Body::UpdateMembers(_) => "UpdateGroupMembersResponse",
    })
}

/// A `MessageEnvelope` (protobuf bytes) as the JSON a JSON client gets. `body_type`
/// names the XxxResponse inside a RESPONSE (see [`response_type`]).
pub fn envelope_json(envelope: &[u8], body_type: Option<&'static str>) -> Result<Value, JsonError> {
    let mut env = decode("MessageEnvelope", envelope)?;
    let kind = env
        .get_field_by_name("type")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let data = env
        .get_field_by_name("data")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    let payload = match payload_type(&kind) {
        Some(name) => match decode(name, &data) {
            Ok(msg) if name == "Response" => Some(response_json(msg, body_type)?),
            Ok(msg) => Some(to_value(&msg)?),
            // An admin broadcast may use a known type with data of its own.
            Err(_) => None,
        },
        None => None,
    };
    if payload.is_some() {
        env.clear_field_by_name("data");
    }
    let mut out = to_value(&env)?;
    if let (Some(p), Value::Object(map)) = (payload, &mut out) {
        map.insert("payload".into(), p);
    }
    Ok(out)
}

/// A Response with its `body` decoded as `body_type` when the call succeeded.
fn response_json(
    mut resp: DynamicMessage,
    body_type: Option<&'static str>,
) -> Result<Value, JsonError> {
    let code = resp
        .get_field_by_name("code")
        .and_then(|v| v.as_i32())
        .unwrap_or(0);
    let body = match (code, body_type) {
        (0, Some(name)) => {
            let bytes = resp
                .get_field_by_name("body")
                .and_then(|v| v.as_bytes().cloned())
                .unwrap_or_default();
            resp.clear_field_by_name("body");
            Some(to_value(&decode(name, &bytes)?)?)
        }
        _ => None,
    };
    let mut out = to_value(&resp)?;
    if let (Some(b), Value::Object(map)) = (body, &mut out) {
        map.insert("body".into(), b);
    }
    Ok(out)
}

thread_local! {
    /// The last push or notice converted on this thread (a shard): (protobuf frame,
    /// JSON frame). A group push is one shared `Bytes` for every recipient, so its
    /// JSON connections on this shard share one conversion. Holding the protobuf
    /// frame keeps its allocation alive, so its address identifies it.
    static LAST: std::cell::RefCell<Option<(Bytes, Bytes)>> = const { std::cell::RefCell::new(None) };
}

/// Converts one of the server's binary frames (a `MessageEnvelope`, see
/// [`super::envelope`]) to a text frame with its JSON. Other frames (pong, close) are
/// returned as they are. A push or notice sent to several JSON connections in a row
/// is converted once.
pub fn text_frame(frame: &Bytes, body_type: Option<&'static str>) -> Result<Bytes, JsonError> {
    if body_type.is_some() {
        // A RESPONSE: one recipient.
        return convert(frame, body_type);
    }
    let same = |(pb, _): &(Bytes, Bytes)| pb.as_ptr() == frame.as_ptr() && pb.len() == frame.len();
    if let Some(text) =
        LAST.with_borrow(|last| last.as_ref().filter(|l| same(l)).map(|l| l.1.clone()))
    {
        return Ok(text);
    }
    let text = convert(frame, None)?;
    LAST.set(Some((frame.clone(), text.clone())));
    Ok(text)
}

/// [`text_frame`] without the cache.
pub fn convert(frame: &Bytes, body_type: Option<&'static str>) -> Result<Bytes, JsonError> {
    let Some((opcode, payload)) = ws::server_frame_payload(frame) else {
        return Err(JsonError::NotAFrame);
    };
    if opcode != ws::BINARY {
        return Ok(frame.clone());
    }
    let text = envelope_json(payload, body_type)?.to_string();
    let mut out = BytesMut::with_capacity(ws::header_len(text.len()) + text.len());
    ws::put_header(&mut out, ws::TEXT, text.len());
    out.extend_from_slice(text.as_bytes());
    Ok(out.freeze())
}

/// Decodes a `ClientFrame` sent as JSON. Like the binary decoder it tells apart JSON
/// whose `req_id` can be read (answered with 40001) from hopeless input (close 1007).
pub fn decode_client_frame(text: &[u8]) -> Result<ClientFrame, FrameError> {
    parse_client_frame(text).map_err(|_| match readable_req_id(text) {
        Some(req_id) => FrameError::Invalid { req_id },
        None => FrameError::Undecodable,
    })
}

fn parse_client_frame(text: &[u8]) -> Result<ClientFrame, JsonError> {
    let desc = descriptor("ClientFrame")?;
    let mut de = serde_json::Deserializer::from_slice(text);
    let msg = DynamicMessage::deserialize_with_options(desc, &mut de, &DeserializeOptions::new())
        .map_err(|e| JsonError::Decode(e.to_string()))?;
    de.end().map_err(|e| JsonError::Decode(e.to_string()))?;
    msg.transcode_to::<ClientFrame>()
        .map_err(|e| JsonError::Decode(e.to_string()))
}

/// A non-zero `req_id` (or `reqId`) of a JSON object, as a number or a decimal string.
fn readable_req_id(text: &[u8]) -> Option<u64> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(text) else {
        return None;
    };
    let v = map.get("req_id").or_else(|| map.get("reqId"))?;
    let id = match v {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    (id != 0).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envelope::{kickout_frame, push_frame, response_frame};
    use crate::proto::pb::{MsgItem, SendMessageResponse};
    use prost::Message as _;

    fn json_of(frame: Bytes, body_type: Option<&'static str>) -> Value {
        let text = text_frame(&frame, body_type).unwrap();
        let (op, payload) = ws::server_frame_payload(&text).unwrap();
        assert_eq!(op, ws::TEXT);
        serde_json::from_slice(payload).unwrap()
    }

    #[test]
    fn negotiation() {
        assert_eq!(
            negotiate(None),
            Negotiated {
                echo: None,
                json: false
            }
        );
        let n = negotiate(Some("chat, imshard.v1.json"));
        assert_eq!(n.echo, Some(SUBPROTOCOL_JSON));
        assert!(n.json);
        let n = negotiate(Some("imshard.v1.proto, imshard.v1.json"));
        assert_eq!(n.echo, Some(SUBPROTOCOL_PROTO));
        assert!(!n.json);
        assert_eq!(negotiate(Some("mqtt")).echo, None);
    }

    #[test]
    fn client_frames() {
        let f = decode_client_frame(
            br#"{"req_id":"7","send":{"conv_type":"CONV_TYPE_P2P","target":"bob","content":"{}"}}"#,
        )
        .unwrap();
        assert_eq!(f.req_id, 7);
        let Some(Body::Send(s)) = f.body else {
            panic!("{f:?}")
        };
        assert_eq!((s.conv_type, s.target.as_str()), (1, "bob"));
        // lowerCamelCase, numbers for 64-bit integers and enums
        let f = decode_client_frame(
            br#"{"reqId":8,"pull":{"convId":"p2p-a-b","anchorSeq":3,"direction":2}}"#,
        )
        .unwrap();
        let Some(Body::Pull(p)) = f.body else {
            panic!("{f:?}")
        };
        assert_eq!(
            (p.conv_id.as_str(), p.anchor_seq, p.direction),
            ("p2p-a-b", 3, 2)
        );
        assert_eq!(
            decode_client_frame(br#"{"req_id":9,"send":{"bogus":1}}"#),
            Err(FrameError::Invalid { req_id: 9 })
        );
        assert_eq!(
            decode_client_frame(br#"{"req_id":"9","heartbeat":"x"}"#),
            Err(FrameError::Invalid { req_id: 9 })
        );
        assert_eq!(
            decode_client_frame(br#"{"send":{"bogus":1}}"#),
            Err(FrameError::Undecodable)
        );
        assert_eq!(
            decode_client_frame(b"{not json"),
            Err(FrameError::Undecodable)
        );
        assert_eq!(decode_client_frame(b"[1]"), Err(FrameError::Undecodable));
    }

    #[test]
    fn server_frames() {
        let msg = MsgItem {
            msg_id: "01J".into(),
            conv_id: "p2p-a-b".into(),
            seq: 5,
            from_uuid: "a".into(),
            content: r#"{"text":"hi"}"#.into(),
            ..Default::default()
        };
        let v = json_of(push_frame(&msg), None);
        assert_eq!(v["type"], "MSG_PUSH");
        assert_eq!(v["seq"], "5");
        assert_eq!(v["ack_required"], true);
        assert_eq!(v["payload"]["conv_id"], "p2p-a-b");
        assert_eq!(v["payload"]["content"], r#"{"text":"hi"}"#);
        assert!(v.get("data").is_none());

        let body = SendMessageResponse {
            msg_id: "01J".into(),
            seq: 5,
            ..Default::default()
        }
        .encode_to_vec();
        let v = json_of(
            response_frame(3, Ok(body.into())),
            Some("SendMessageResponse"),
        );
        assert_eq!(v["req_id"], "3");
        assert_eq!(v["payload"]["body"]["seq"], "5");
        assert!(v["payload"].get("code").is_none());

        let err = crate::codes::ApiError::invalid("x");
        let v = json_of(response_frame(4, Err(err)), Some("SendMessageResponse"));
        assert_eq!(v["payload"]["code"], 40001);
        assert!(v["payload"].get("body").is_none());

        let v = json_of(kickout_frame("replaced"), None);
        assert_eq!(v["payload"]["reason"], "replaced");

        // Control frames pass unchanged.
        let pong = ws::frame(ws::PONG, b"p");
        assert_eq!(text_frame(&pong, None).unwrap(), pong);

        // The same frame again (a group push's next recipient) is the same conversion;
        // an equal frame at another address is converted anew.
        let push = push_frame(&msg);
        let first = text_frame(&push, None).unwrap();
        let again = text_frame(&push, None).unwrap();
        assert_eq!(first.as_ptr(), again.as_ptr());
        let copy = Bytes::copy_from_slice(&push);
        assert_ne!(text_frame(&copy, None).unwrap().as_ptr(), first.as_ptr());
    }

    /// Garbage and mutated frames are refused, never a panic (a small stand-in for a
    /// fuzz target: deterministic, so it runs with the unit tests).
    #[test]
    fn mutated_input_never_panics() {
        let valid = br#"{"req_id":"7","send":{"conv_type":"CONV_TYPE_P2P","target":"bob","content":"{}","at_users":["a"]}}"#;
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let mut input = valid.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % input.len();
                match next() % 3 {
                    0 => input[at] = next() as u8,
                    1 => input.truncate(at),
                    _ => input.insert(at, b"{}[]\",:0-e"[(next() % 10) as usize]),
                }
                if input.is_empty() {
                    break;
                }
            }
            let _ = decode_client_frame(&input);
            let _ = text_frame(&Bytes::from(input), None);
        }
    }

    #[test]
    fn unknown_broadcast_type_keeps_base64() {
        let env = crate::proto::pb::MessageEnvelope {
            r#type: "SYSTEM_NOTICE".into(),
            data: Bytes::from_static(b"\x01\x02"),
            ..Default::default()
        };
        let v = json_of(crate::proto::envelope::envelope_frame(&env), None);
        assert_eq!(v["data"], "AQI=");
    }
}
