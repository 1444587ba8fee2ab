//! Server-to-client envelopes, encoded straight into a WebSocket frame once, so the
//! same `Bytes` can be written to every recipient.

use bytes::{Bytes, BytesMut};
use prost::Message as _;

use super::pb::{ClientFrame, KickoutNotice, MessageEnvelope, MsgItem, Response};
use super::ws;
use crate::codes::ApiError;

/// Envelope `type` values (docs/PROTOCOL.md).
pub mod kind {
    pub const RESPONSE: &str = "RESPONSE";
    pub const MSG_PUSH: &str = "MSG_PUSH";
    pub const MSG_RECALL: &str = "MSG_RECALL";
    pub const MSG_MARK_READ: &str = "MSG_MARK_READ";
    pub const KICKOUT: &str = "KICKOUT";
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Encodes an envelope as one binary WebSocket frame (header and payload in one buffer).
pub fn envelope_frame(env: &MessageEnvelope) -> Bytes {
    let len = env.encoded_len();
    let mut out = BytesMut::with_capacity(ws::header_len(len) + len);
    ws::put_header(&mut out, ws::BINARY, len);
    // The buffer has room for `len` bytes, so encoding cannot fail.
    let _ = env.encode(&mut out);
    out.freeze()
}

/// A RESPONSE frame: `body` is the encoded XxxResponse on success.
pub fn response_frame(req_id: u64, result: Result<Bytes, ApiError>) -> Bytes {
    let resp = match result {
        Ok(body) => Response {
            code: 0,
            message: String::new(),
            body,
        },
        Err(e) => Response {
            code: e.code(),
            message: e.to_string(),
            body: Bytes::new(),
        },
    };
    envelope_frame(&MessageEnvelope {
        r#type: kind::RESPONSE.to_string(),
        data: resp.encode_to_vec().into(),
        seq: 0,
        server_ts: now_ms(),
        trace_id: String::new(),
        ack_required: false,
        req_id,
    })
}

/// A MSG_PUSH frame for a stored message.
pub fn push_frame(msg: &MsgItem) -> Bytes {
    envelope_frame(&MessageEnvelope {
        r#type: kind::MSG_PUSH.to_string(),
        data: msg.encode_to_vec().into(),
        seq: msg.seq,
        server_ts: now_ms(),
        trace_id: String::new(),
        ack_required: true,
        req_id: 0,
    })
}

/// A notice frame (MSG_RECALL, MSG_MARK_READ, KICKOUT) carrying `data`.
pub fn notice_frame(kind: &str, data: &impl prost::Message) -> Bytes {
    envelope_frame(&MessageEnvelope {
        r#type: kind.to_string(),
        data: data.encode_to_vec().into(),
        seq: 0,
        server_ts: now_ms(),
        trace_id: String::new(),
        ack_required: false,
        req_id: 0,
    })
}

pub fn kickout_frame(reason: &str) -> Bytes {
    notice_frame(
        kind::KICKOUT,
        &KickoutNotice {
            reason: reason.to_string(),
        },
    )
}

/// Only field 1 of ClientFrame, to answer an undecodable frame by its req_id.
#[derive(Clone, PartialEq, prost::Message)]
struct ReqIdOnly {
    #[prost(uint64, tag = "1")]
    req_id: u64,
}

/// Why a binary frame is not a usable ClientFrame.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Not decodable, but its req_id could be read: answer 40001 to it.
    Invalid { req_id: u64 },
    /// Nothing could be read: close with 1007.
    Undecodable,
}

/// Decodes a ClientFrame, telling apart "answerable" and "hopeless" garbage.
pub fn decode_client_frame(payload: &[u8]) -> Result<ClientFrame, FrameError> {
    match ClientFrame::decode(payload) {
        Ok(f) => Ok(f),
        Err(_) => match ReqIdOnly::decode(payload) {
            Ok(r) if r.req_id != 0 => Err(FrameError::Invalid { req_id: r.req_id }),
            _ => Err(FrameError::Undecodable),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::pb::{client_frame::Body, Heartbeat};

    #[test]
    fn decode_kinds() {
        let f = ClientFrame {
            req_id: 7,
            body: Some(Body::Heartbeat(Heartbeat { client_ts: 1 })),
        };
        assert_eq!(decode_client_frame(&f.encode_to_vec()), Ok(f));
        // field 1 = 9, then field 3 (send) with a broken nested message
        let bad = [0x08, 9, 0x1a, 2, 0x0a, 5];
        assert_eq!(
            decode_client_frame(&bad),
            Err(FrameError::Invalid { req_id: 9 })
        );
        assert_eq!(
            decode_client_frame(b"\xff\xff\xff"),
            Err(FrameError::Undecodable)
        );
    }
}
