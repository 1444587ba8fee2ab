//! The client side of RFC 6455, as small as the loadgen needs: the upgrade request with
//! the token in the query (docs/PROTOCOL.md), a check of the `101` answer and its
//! `Sec-WebSocket-Accept`, masked client frames, and a parser for the server's unmasked
//! frames. Pure functions over bytes; the caller owns buffers and sockets.

/// Opcodes this client writes or reads.
pub const OP_CONTINUE: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The longest upgrade answer we accept before calling it malformed.
pub const MAX_HANDSHAKE_BYTES: usize = 8 * 1024;

/// Why an upgrade or a frame from the server was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsError {
    /// The server answered the upgrade with this HTTP status (401: bad token).
    Status(u16),
    /// The answer was not HTTP, too long, or lacked the right Sec-WebSocket-Accept.
    BadHandshake(&'static str),
    /// A frame broke RFC 6455 (masked server frame, reserved bits, bad length).
    Protocol(&'static str),
    /// A frame longer than the configured maximum.
    TooBig(u64),
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WsError::Status(s) => write!(f, "upgrade refused with HTTP {s}"),
            WsError::BadHandshake(why) => write!(f, "bad upgrade answer: {why}"),
            WsError::Protocol(why) => write!(f, "WebSocket protocol error: {why}"),
            WsError::TooBig(n) => write!(f, "server frame of {n} bytes is over the limit"),
        }
    }
}

/// Base64 (standard alphabet, padded) of 16 bytes: the Sec-WebSocket-Key.
pub fn key_from_bytes(bytes: [u8; 16]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The upgrade request: `GET {path}?token={token}`.
pub fn upgrade_request(host: &str, path: &str, token: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path}?token={token} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Checks the upgrade answer at the front of `buf`. `Ok(None)`: need more bytes;
/// `Ok(Some(n))`: the head is `n` bytes long and anything after it is frames.
pub fn parse_upgrade_response(buf: &[u8], key: &str) -> Result<Option<usize>, WsError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HANDSHAKE_BYTES {
            return Err(WsError::BadHandshake("no end of headers"));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end])
        .map_err(|_| WsError::BadHandshake("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
        return Err(WsError::BadHandshake("not an HTTP/1.x status line"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(WsError::BadHandshake("no status code"))?;
    if status != 101 {
        return Err(WsError::Status(status));
    }
    let want = imshard::proto::ws::accept_key(key.as_bytes());
    let accepted = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == want
        })
    });
    if !accepted {
        return Err(WsError::BadHandshake(
            "missing or wrong Sec-WebSocket-Accept",
        ));
    }
    Ok(Some(end + 4))
}

/// Appends one final, masked client frame.
pub fn put_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    imshard::proto::ws::unmask(&mut out[start..], mask);
}

/// One frame from the server.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// Parses one server frame at the front of `buf`: `Ok(None)` means more bytes are needed,
/// else the frame and how many bytes it used.
pub fn parse_frame(buf: &[u8], max_payload: u64) -> Result<Option<(Frame<'_>, usize)>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set"));
    }
    if b1 & 0x80 != 0 {
        return Err(WsError::Protocol("server frames must not be masked"));
    }
    let opcode = b0 & 0x0F;
    let (len, header) = match b1 & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            (u64::from_be_bytes(a), 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode >= 0x8 && (len > 125 || b0 & 0x80 == 0) {
        return Err(WsError::Protocol(
            "control frames must be final and at most 125 bytes",
        ));
    }
    if len > max_payload {
        return Err(WsError::TooBig(len));
    }
    let end = header + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((
        Frame {
            fin: b0 & 0x80 != 0,
            opcode,
            payload: &buf[header..end],
        },
        end,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imshard::proto::ws as server;

    #[test]
    fn key_is_base64_of_16_bytes() {
        assert_eq!(key_from_bytes([0; 16]), "AAAAAAAAAAAAAAAAAAAAAA==");
        // RFC 6455 section 4.1's sample nonce.
        assert_eq!(
            key_from_bytes(*b"the sample nonce"),
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
    }

    #[test]
    fn client_frames_parse_on_the_server() {
        for len in [0usize, 5, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            put_frame(&mut out, OP_BINARY, &payload, [3, 1, 4, 1]);
            let (f, used) = server::parse_client_frame(&out, 1 << 20)
                .expect("valid frame")
                .expect("complete frame");
            assert_eq!((used, f.payload), (out.len(), payload));
        }
    }

    #[test]
    fn server_frames_parse_here() {
        for len in [0usize, 125, 126, 300, 65536] {
            let payload = vec![9u8; len];
            let bytes = server::frame(server::BINARY, &payload);
            for cut in [0, 1, bytes.len() - 1] {
                assert_eq!(parse_frame(&bytes[..cut], 1 << 20), Ok(None), "cut {cut}");
            }
            let (f, used) = parse_frame(&bytes, 1 << 20).expect("ok").expect("complete");
            assert_eq!(
                (f.fin, f.opcode, f.payload.len(), used),
                (true, OP_BINARY, len, bytes.len())
            );
        }
        let close = server::close_frame(1000, "bye");
        let (f, _) = parse_frame(&close, 100).expect("ok").expect("complete");
        assert_eq!((f.opcode, &f.payload[..2]), (OP_CLOSE, &[0x03, 0xE8][..]));
        assert_eq!(
            parse_frame(&[0x82, 0x81, 0, 0, 0, 0, 1], 100),
            Err(WsError::Protocol("server frames must not be masked"))
        );
        assert_eq!(
            parse_frame(&server::frame(server::BINARY, &[0; 200]), 100),
            Err(WsError::TooBig(200))
        );
    }

    #[test]
    fn upgrade_answer() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x82\x00";
        assert_eq!(parse_upgrade_response(&ok[..20], key), Ok(None));
        assert_eq!(parse_upgrade_response(ok, key), Ok(Some(ok.len() - 2)));
        let bad = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_upgrade_response(bad, key), Err(WsError::Status(401)));
        let wrong = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert!(matches!(
            parse_upgrade_response(wrong, key),
            Err(WsError::BadHandshake(_))
        ));
        let req = String::from_utf8(upgrade_request("h:1", "/ws", "T", key)).expect("utf8");
        assert!(req.starts_with("GET /ws?token=T HTTP/1.1\r\n") && req.ends_with("\r\n\r\n"));
    }
}
