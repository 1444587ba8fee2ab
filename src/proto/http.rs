//! HTTP/1.1 for the upgrade and the JSON API: request heads parsed by httparse, bodies
//! by Content-Length only, replies in the docs/PROTOCOL.md envelope.

use crate::codes::ApiError;
use crate::limits::{MAX_HTTP_HEAD, MAX_HTTP_HEADERS};

/// A parsed request head. Header names are lower-cased.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub content_length: usize,
    pub keep_alive: bool,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A query parameter, percent-decoded.
    pub fn query_param(&self, key: &str) -> Option<String> {
        query_param(&self.query, key)
    }

    /// Whether the header's comma-separated tokens include `token` (case-insensitive).
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    /// The bearer token from `Authorization`, else from `?token=`.
    pub fn token(&self) -> Option<String> {
        if let Some(v) = self.header("authorization") {
            if let Some(t) = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
            {
                return Some(t.trim().to_string());
            }
        }
        self.query_param("token")
    }
}

/// Why a request head was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum HttpError {
    /// Not HTTP/1.x, or a broken head (400).
    Malformed,
    /// Head over MAX_HTTP_HEAD or too many headers (431).
    HeadTooLarge,
    /// Body over the limit (413).
    BodyTooLarge,
    /// Transfer-Encoding bodies are not accepted (411: send Content-Length).
    LengthRequired,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::LengthRequired => 411,
        }
    }

    pub fn api_error(&self) -> ApiError {
        match self {
            HttpError::BodyTooLarge => ApiError::ContentTooLarge { size: 0, max: 0 },
            HttpError::Malformed => ApiError::invalid("malformed HTTP request"),
            HttpError::HeadTooLarge => ApiError::invalid("HTTP request head too large"),
            HttpError::LengthRequired => ApiError::invalid("send the body with Content-Length"),
        }
    }
}

/// Parses a request head from the front of `buf`: `Ok(None)` wants more bytes,
/// `Ok(Some((head, n)))` used `n` bytes.
pub fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<(Head, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HTTP_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_HTTP_HEAD {
                Err(HttpError::HeadTooLarge)
            } else {
                Ok(None)
            }
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(_) => return Err(HttpError::Malformed),
    };
    if n > MAX_HTTP_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut head = Head {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers: Vec::with_capacity(req.headers.len()),
        content_length: 0,
        keep_alive: req.version == Some(1),
    };
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| HttpError::Malformed)?;
        head.headers
            .push((h.name.to_ascii_lowercase(), value.trim().to_string()));
    }
    if head.header("transfer-encoding").is_some() {
        return Err(HttpError::LengthRequired);
    }
    if let Some(cl) = head.header("content-length") {
        head.content_length = cl.parse().map_err(|_| HttpError::Malformed)?;
        if head.content_length > max_body {
            return Err(HttpError::BodyTooLarge);
        }
    }
    if let Some(c) = head.header("connection") {
        if c.eq_ignore_ascii_case("close") {
            head.keep_alive = false;
        } else if c.eq_ignore_ascii_case("keep-alive") {
            head.keep_alive = true;
        }
    }
    Ok(Some((head, n)))
}

/// Looks up `key` in an `a=1&b=2` query and percent-decodes it.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode(v))
    })
}

/// Decodes `%XY` escapes and `+` (a space); anything else is kept as it is.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            // Two hex digits only: a sign (`%+1`) is not one.
            b'%' if i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit() =>
            {
                let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                out.push((digit(b[i + 1]) << 4) | digit(b[i + 2]));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A full HTTP/1.1 response.
pub fn response(status: u16, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
            reason(status),
            body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// The docs/PROTOCOL.md JSON envelope for a success.
pub fn json_ok(data: serde_json::Value, keep_alive: bool) -> Vec<u8> {
    let body = serde_json::json!({
        "code": 0, "message": "", "data": data, "timestamp": crate::proto::envelope::now_ms()
    });
    response(
        200,
        "application/json",
        body.to_string().as_bytes(),
        keep_alive,
    )
}

/// The docs/PROTOCOL.md JSON envelope for an error; the status is the code's first 3 digits.
pub fn json_err(err: &ApiError, keep_alive: bool) -> Vec<u8> {
    let body = serde_json::json!({
        "code": err.code(), "message": err.to_string(), "data": null,
        "timestamp": crate::proto::envelope::now_ms()
    });
    response(
        err.http_status(),
        "application/json",
        body.to_string().as_bytes(),
        keep_alive,
    )
}

/// The 101 answer to a valid upgrade, echoing the chosen subprotocol if any.
pub fn upgrade_response(accept: &str, subprotocol: Option<&str>) -> Vec<u8> {
    let protocol = match subprotocol {
        Some(p) => format!("Sec-WebSocket-Protocol: {p}\r\n"),
        None => String::new(),
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let req = b"GET /ws?token=a%2Eb&x=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\nrest";
        let (h, n) = parse_head(req, 10).unwrap().unwrap();
        assert_eq!(&req[n..], b"rest");
        assert_eq!(h.path, "/ws");
        assert_eq!(h.token().as_deref(), Some("a.b"));
        assert!(h.header_has_token("connection", "upgrade"));
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost", 10), Ok(None));
        assert_eq!(
            parse_head(b"\x00\x01garbage\r\n\r\n", 10).unwrap_err(),
            HttpError::Malformed
        );
        let big = b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(parse_head(big, 10).unwrap_err(), HttpError::BodyTooLarge);
        let te = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(te, 10).unwrap_err(), HttpError::LengthRequired);
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HTTP_HEAD));
        assert_eq!(parse_head(&huge, 10).unwrap_err(), HttpError::HeadTooLarge);
    }

    #[test]
    fn percent() {
        assert_eq!(query_param("a=%41%zz+b%", "a").as_deref(), Some("A%zz b%"));
        // Caught by the reference model in tests/fuzz.rs: a sign is not a hex digit.
        assert_eq!(query_param("a=%+1%-1%4", "a").as_deref(), Some("% 1%-1%4"));
        assert_eq!(query_param("a=1&b=2", "b").as_deref(), Some("2"));
        assert_eq!(query_param("a=1", "c"), None);
    }
}
