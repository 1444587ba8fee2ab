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
    /// Extension (cluster mode): pushes may have been missed; pull by seq.
    pub const RESYNC: &str = "RESYNC";
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

/// A `PushAck` frame read in place: the conv_id borrows the frame's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushAckView<'a> {
    pub req_id: u64,
    pub conv_id: &'a str,
    pub seq: i64,
}

/// `ClientFrame` field numbers of the `body` oneof (2..=14 in imshard.proto).
const BODY_TAGS: std::ops::RangeInclusive<u32> = 2..=14;
/// `ClientFrame.push_ack`.
const PUSH_ACK_TAG: u32 = 11;

/// Reads a binary frame as a PushAck without allocating, for the hot path: a client
/// acknowledges pushes all the time and the ack needs no `String`.
///
/// `Some` only when the frame is a valid `ClientFrame` whose body is a `PushAck` and
/// which [`decode_client_frame`] would decode to the same values; anything else
/// (another body, a broken or unusual encoding such as a repeated body field or a
/// group) is `None`, and the caller falls back to the full decode, which keeps every
/// error answer as it was.
pub fn peek_push_ack(payload: &[u8]) -> Option<PushAckView<'_>> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut buf = payload;
    let mut req_id = 0;
    let mut ack = None;
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).ok()?;
        match (tag, wire) {
            (1, WireType::Varint) => req_id = decode_varint(&mut buf).ok()?,
            (PUSH_ACK_TAG, WireType::LengthDelimited) if ack.is_none() => {
                ack = Some(push_ack_fields(take_len(&mut buf)?)?);
            }
            (1, _) => return None,
            (t, _) if BODY_TAGS.contains(&t) => return None,
            (_, wire) => skip_field(&mut buf, wire)?,
        }
    }
    let (conv_id, seq) = ack?;
    Some(PushAckView {
        req_id,
        conv_id,
        seq,
    })
}

/// The fields of an encoded `PushAck` message (last value wins, as in prost).
fn push_ack_fields(mut buf: &[u8]) -> Option<(&str, i64)> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut conv_id = "";
    let mut seq = 0;
    while !buf.is_empty() {
        match decode_key(&mut buf).ok()? {
            (1, WireType::LengthDelimited) => {
                conv_id = std::str::from_utf8(take_len(&mut buf)?).ok()?
            }
            (2, WireType::Varint) => seq = decode_varint(&mut buf).ok()? as i64,
            (1 | 2, _) => return None,
            (_, wire) => skip_field(&mut buf, wire)?,
        }
    }
    Some((conv_id, seq))
}

/// Takes a length-prefixed slice off the front of `buf`.
fn take_len<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(prost::encoding::decode_varint(buf).ok()?).ok()?;
    if len > buf.len() {
        return None;
    }
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Some(field)
}

/// Skips an unknown field; `None` for groups (left to the full decoder).
fn skip_field(buf: &mut &[u8], wire: prost::encoding::WireType) -> Option<()> {
    use prost::encoding::WireType;
    let n = match wire {
        WireType::Varint => {
            prost::encoding::decode_varint(buf).ok()?;
            0
        }
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => {
            take_len(buf)?;
            0
        }
        WireType::StartGroup | WireType::EndGroup => return None,
    };
    *buf = buf.get(n..)?;
    Some(())
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

    /// What the full decoder makes of a frame, as a PushAckView if it is one.
    fn full(payload: &[u8]) -> Option<(u64, String, i64)> {
        match decode_client_frame(payload) {
            Ok(ClientFrame {
                req_id,
                body: Some(Body::PushAck(a)),
            }) => Some((req_id, a.conv_id, a.seq)),
            _ => None,
        }
    }

    #[test]
    fn push_ack_peek_matches_the_full_decode() {
        use crate::proto::pb::PushAck;
        let f = ClientFrame {
            req_id: 0,
            body: Some(Body::PushAck(PushAck {
                conv_id: "grp-g1".into(),
                seq: 42,
            })),
        };
        let bytes = f.encode_to_vec();
        assert_eq!(
            peek_push_ack(&bytes),
            Some(PushAckView {
                req_id: 0,
                conv_id: "grp-g1",
                seq: 42
            })
        );
        let hb = ClientFrame {
            req_id: 3,
            body: Some(Body::Heartbeat(Heartbeat { client_ts: 1 })),
        };
        assert_eq!(peek_push_ack(&hb.encode_to_vec()), None);
        // A PushAck followed by another body: the last one wins, so it is no ack.
        let mut two = bytes.clone();
        two.extend_from_slice(&hb.encode_to_vec());
        assert_eq!(full(&two), None);
        assert_eq!(peek_push_ack(&two), None);
        // Mutated and random frames: whenever the peek says "ack", the full decode
        // says the same ack.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: Vec<Vec<u8>> = vec![
            bytes.clone(),
            ClientFrame {
                req_id: 77,
                body: Some(Body::PushAck(PushAck {
                    conv_id: "p2p-a-b".into(),
                    seq: -1,
                })),
            }
            .encode_to_vec(),
            two,
        ];
        let mut agree = 0;
        for i in 0..200_000 {
            let mut b = seeds[i % seeds.len()].clone();
            for _ in 0..(next() % 4) {
                let r = next() as usize;
                match r % 4 {
                    0 if !b.is_empty() => {
                        let at = r / 4 % b.len();
                        b[at] = next() as u8;
                    }
                    1 if !b.is_empty() => {
                        b.truncate(r / 4 % b.len());
                    }
                    2 => b.insert(r / 4 % (b.len() + 1), next() as u8),
                    _ => b.extend_from_slice(&seeds[r % seeds.len()]),
                }
            }
            let peek = peek_push_ack(&b).map(|v| (v.req_id, v.conv_id.to_string(), v.seq));
            if let Some(p) = peek {
                assert_eq!(Some(p), full(&b), "{b:02x?}");
                agree += 1;
            }
        }
        assert!(agree > 1000, "only {agree} mutated frames were acks");
    }
}
