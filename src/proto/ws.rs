//! WebSocket (RFC 6455) server side, sans-I/O: the caller owns the buffers and the socket.
//!
//! Frame headers are parsed and written by tungstenite's `FrameHeader`; this module adds
//! the checks a server must make on client frames (masking, reserved bits, control frame
//! rules, size limit), unmasking, and reassembly of fragmented messages.

use std::io::Cursor;

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::codes::close;
use crate::limits::MAX_CONTROL_PAYLOAD;

/// Why the connection must be closed, with the close code to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsError {
    /// A frame or message larger than the configured maximum (1009).
    TooBig,
    /// A violation of RFC 6455 (1002).
    Protocol(&'static str),
}

impl WsError {
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::TooBig => close::MESSAGE_TOO_BIG,
            WsError::Protocol(_) => close::PROTOCOL_ERROR,
        }
    }
}

/// One unmasked frame from a client.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: Vec<u8>,
}

/// Parses one client frame from the front of `buf`. `Ok(None)` means more bytes are
/// needed; otherwise returns the frame and how many bytes it used. A frame announcing
/// more than `max_payload` bytes is refused before its payload arrives.
pub fn parse_client_frame(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(Frame, usize)>, WsError> {
    let Some(h) = client_frame_header(buf, max_payload)? else {
        return Ok(None);
    };
    let mut payload = buf[h.payload.clone()].to_vec();
    unmask(&mut payload, h.mask);
    Ok(Some((
        Frame {
            fin: h.fin,
            opcode: h.opcode,
            payload,
        },
        h.payload.end,
    )))
}

/// One client frame unmasked where it lies in the caller's buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameInPlace {
    pub fin: bool,
    pub opcode: OpCode,
    /// Where the (now unmasked) payload is in the buffer given.
    pub payload: std::ops::Range<usize>,
}

impl FrameInPlace {
    /// The frame, payload copied out of `buf` (for the [`Assembler`]).
    pub fn to_frame(&self, buf: &[u8]) -> Frame {
        Frame {
            fin: self.fin,
            opcode: self.opcode,
            payload: buf[self.payload.clone()].to_vec(),
        }
    }
}

/// [`parse_client_frame`] without a copy: the payload is unmasked in `buf` itself
/// (so those bytes must not be parsed again) and returned as a range of it. What a
/// client mostly sends, small whole messages such as PushAcks, is then read with no
/// allocation.
pub fn unmask_client_frame(
    buf: &mut [u8],
    max_payload: usize,
) -> Result<Option<(FrameInPlace, usize)>, WsError> {
    let Some(h) = client_frame_header(buf, max_payload)? else {
        return Ok(None);
    };
    unmask(&mut buf[h.payload.clone()], h.mask);
    let used = h.payload.end;
    Ok(Some((
        FrameInPlace {
            fin: h.fin,
            opcode: h.opcode,
            payload: h.payload,
        },
        used,
    )))
}

/// A checked client frame header and where its payload lies.
struct ClientHeader {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    payload: std::ops::Range<usize>,
}

/// Parses and checks the header of the frame at the front of `buf`; `Ok(None)` until
/// the whole frame is there.
fn client_frame_header(buf: &[u8], max_payload: usize) -> Result<Option<ClientHeader>, WsError> {
    let mut cursor = Cursor::new(buf);
    let (header, len) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(_) => return Err(WsError::Protocol("bad frame header")),
    };
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(WsError::Protocol("reserved bits set"));
    }
    let Some(mask) = header.mask else {
        return Err(WsError::Protocol("client frames must be masked"));
    };
    match header.opcode {
        OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
            return Err(WsError::Protocol("reserved opcode"))
        }
        OpCode::Control(_) if !header.is_final || len > MAX_CONTROL_PAYLOAD as u64 => {
            return Err(WsError::Protocol(
                "control frames must be final and at most 125 bytes",
            ))
        }
        _ => {}
    }
    if len > max_payload as u64 {
        return Err(WsError::TooBig);
    }
    let start = cursor.position() as usize;
    let end = start + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some(ClientHeader {
        fin: header.is_final,
        opcode: header.opcode,
        mask,
        payload: start..end,
    }))
}

/// XORs `data` with the 4-byte mask, eight bytes at a time.
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let m = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let (chunks, rest) = data.as_chunks_mut::<8>();
    for c in chunks {
        *c = (u64::from_ne_bytes(*c) ^ m).to_ne_bytes();
    }
    for (i, b) in rest.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A complete message from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Binary(Vec<u8>),
    Text(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    /// The close code the client sent, if any.
    Close(Option<u16>),
}

/// Reassembles fragmented messages. Holds memory only while a fragmented message is
/// in flight.
#[derive(Debug, Default)]
pub struct Assembler {
    partial: Option<(bool, Vec<u8>)>,
}

impl Assembler {
    /// No fragmented message is being assembled: a whole data frame now is a whole
    /// message.
    pub fn idle(&self) -> bool {
        self.partial.is_none()
    }

    /// Bytes held for an unfinished fragmented message (its buffer's capacity).
    pub fn buffered(&self) -> usize {
        self.partial.as_ref().map_or(0, |(_, b)| b.capacity())
    }

    /// Feeds one frame; returns a message when one is complete.
    pub fn push(&mut self, frame: Frame, max_message: usize) -> Result<Option<Message>, WsError> {
        match frame.opcode {
            OpCode::Control(Control::Ping) => Ok(Some(Message::Ping(frame.payload))),
            OpCode::Control(Control::Pong) => Ok(Some(Message::Pong)),
            OpCode::Control(Control::Reserved(_)) => Err(WsError::Protocol("reserved opcode")),
            OpCode::Control(Control::Close) => match frame.payload.len() {
                0 => Ok(Some(Message::Close(None))),
                1 => Err(WsError::Protocol("close payload of one byte")),
                _ => Ok(Some(Message::Close(Some(u16::from_be_bytes([
                    frame.payload[0],
                    frame.payload[1],
                ]))))),
            },
            OpCode::Data(Data::Continue) => {
                let Some((is_text, mut buf)) = self.partial.take() else {
                    return Err(WsError::Protocol("continuation without a message"));
                };
                if buf.len() + frame.payload.len() > max_message {
                    return Err(WsError::TooBig);
                }
                buf.extend_from_slice(&frame.payload);
                if frame.fin {
                    Ok(Some(if is_text {
                        Message::Text(buf)
                    } else {
                        Message::Binary(buf)
                    }))
                } else {
                    self.partial = Some((is_text, buf));
                    Ok(None)
                }
            }
            OpCode::Data(d) => {
                if self.partial.is_some() {
                    return Err(WsError::Protocol("new message before the last one ended"));
                }
                let is_text = d == Data::Text;
                if frame.fin {
                    Ok(Some(if is_text {
                        Message::Text(frame.payload)
                    } else {
                        Message::Binary(frame.payload)
                    }))
                } else {
                    self.partial = Some((is_text, frame.payload));
                    Ok(None)
                }
            }
        }
    }
}

/// Writes a server (unmasked, final) frame header for `len` payload bytes.
pub fn put_header(out: &mut BytesMut, opcode: OpCode, len: usize) {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
    };
    // Writing into a BytesMut cannot fail.
    let _ = header.format(len as u64, &mut out.writer());
}

/// Header length of a server frame carrying `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// A complete server frame.
pub fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut out, opcode, payload.len());
    out.extend_from_slice(payload);
    out.freeze()
}

pub const BINARY: OpCode = OpCode::Data(Data::Binary);
pub const TEXT: OpCode = OpCode::Data(Data::Text);
pub const PONG: OpCode = OpCode::Control(Control::Pong);
pub const CLOSE: OpCode = OpCode::Control(Control::Close);

/// The opcode and payload of one complete server frame (as [`frame`] and
/// [`put_header`] write them); `None` when `frame` is not exactly one such frame.
pub fn server_frame_payload(frame: &[u8]) -> Option<(OpCode, &[u8])> {
    let mut cursor = Cursor::new(frame);
    let (header, len) = FrameHeader::parse(&mut cursor).ok()??;
    let start = cursor.position() as usize;
    let payload = frame.get(start..)?;
    (header.mask.is_none() && payload.len() as u64 == len).then_some((header.opcode, payload))
}

/// A close frame with a status code and a short reason.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let reason = &reason.as_bytes()[..reason.len().min(MAX_CONTROL_PAYLOAD - 2)];
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason);
    frame(CLOSE, &payload)
}

/// The Sec-WebSocket-Accept value for a client key.
pub fn accept_key(key: &[u8]) -> String {
    tungstenite::handshake::derive_accept_key(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            v.push(0x80 | len as u8);
        } else if len < 65536 {
            v.push(0x80 | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(0x80 | 127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        unmask(&mut p, mask);
        v.extend_from_slice(&p);
        v
    }

    #[test]
    fn roundtrip_sizes() {
        for len in [0usize, 1, 7, 8, 9, 125, 126, 65535, 65536, 100_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let bytes = client_frame(true, 2, &payload, [1, 2, 3, 4]);
            for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
                if cut < bytes.len() {
                    assert_eq!(
                        parse_client_frame(&bytes[..cut], 1 << 20),
                        Ok(None),
                        "len {len} cut {cut}"
                    );
                }
            }
            let (f, used) = parse_client_frame(&bytes, 1 << 20).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(f.payload, payload);
            assert!(f.fin);
        }
    }

    #[test]
    fn in_place_unmasking_reads_what_the_copying_parser_reads() {
        for (fin, opcode, len) in [
            (true, 2u8, 0usize),
            (true, 2, 20),
            (false, 1, 130),
            (true, 9, 5),
        ] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut bytes = client_frame(fin, opcode, &payload, [9, 8, 7, 6]);
            bytes.extend_from_slice(b"next frame");
            let (copied, used) = parse_client_frame(&bytes, 1 << 20).unwrap().unwrap();
            let (f, n) = unmask_client_frame(&mut bytes, 1 << 20).unwrap().unwrap();
            assert_eq!(n, used);
            assert_eq!(&bytes[f.payload.clone()], &payload[..]);
            assert_eq!(f.to_frame(&bytes), copied);
            assert_eq!(
                &bytes[n..],
                b"next frame",
                "bytes after the frame untouched"
            );
        }
        let big = client_frame(true, 2, &[0u8; 200], [0; 4]);
        assert_eq!(
            unmask_client_frame(&mut big[..8].to_vec(), 100),
            Err(WsError::TooBig)
        );
        let mut unmasked = vec![0x82, 0x00];
        assert!(unmask_client_frame(&mut unmasked, 100).is_err());
    }

    #[test]
    fn refuses_bad_frames() {
        // unmasked
        assert_eq!(
            parse_client_frame(&[0x82, 0x00], 100),
            Err(WsError::Protocol("client frames must be masked"))
        );
        // reserved bit
        assert!(matches!(
            parse_client_frame(&[0xC2, 0x80, 0, 0, 0, 0], 100),
            Err(WsError::Protocol(_))
        ));
        // too big, refused from the header alone
        let big = client_frame(true, 2, &[0u8; 200], [0; 4]);
        assert_eq!(parse_client_frame(&big[..8], 100), Err(WsError::TooBig));
        // fragmented ping
        let ping = client_frame(false, 9, b"x", [0; 4]);
        assert!(matches!(
            parse_client_frame(&ping, 100),
            Err(WsError::Protocol(_))
        ));
        // reserved opcode
        let r = client_frame(true, 3, b"x", [0; 4]);
        assert!(matches!(
            parse_client_frame(&r, 100),
            Err(WsError::Protocol(_))
        ));
    }

    #[test]
    fn fragments() {
        let mut a = Assembler::default();
        let f = |fin, op: u8, p: &[u8]| {
            let b = client_frame(fin, op, p, [9, 8, 7, 6]);
            parse_client_frame(&b, 100).unwrap().unwrap().0
        };
        assert_eq!(a.push(f(false, 2, b"ab"), 10), Ok(None));
        assert_eq!(
            a.push(f(true, 9, b"p"), 10),
            Ok(Some(Message::Ping(b"p".to_vec())))
        );
        assert_eq!(a.push(f(false, 0, b"cd"), 10), Ok(None));
        assert_eq!(
            a.push(f(true, 0, b"e"), 10),
            Ok(Some(Message::Binary(b"abcde".to_vec())))
        );
        assert!(a.push(f(true, 0, b"e"), 10).is_err());
        assert_eq!(a.push(f(false, 2, b"123456"), 10), Ok(None));
        assert_eq!(a.push(f(true, 0, b"7890a"), 10), Err(WsError::TooBig));
    }

    #[test]
    fn server_frames() {
        let b = frame(BINARY, &[7u8; 300]);
        assert_eq!(&b[..4], &[0x82, 126, 1, 44]);
        assert_eq!(b.len(), 304);
        let c = close_frame(1009, "too big");
        assert_eq!(&c[..4], &[0x88, 9, 0x03, 0xF1]);
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
