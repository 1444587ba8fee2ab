//! Every code a client can see, in one place: API error codes (docs/PROTOCOL.md "Error
//! codes"), WebSocket close codes and kick reasons, with what each means for a client.

use std::fmt;

/// An operation failed; [`ApiError::code`] is the docs/PROTOCOL.md code the client sees.
///
/// The HTTP status is the first three digits of the code. `retryable` tells a client
/// whether sending the same request again (same client_msg_id) can succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 40001: a bad id, field, frame or count. The text names the field.
    InvalidArgument(String),
    /// 40101: missing, malformed, wrongly signed or expired token.
    Unauthenticated(&'static str),
    /// 40301: the caller is not a member or may not do this.
    Forbidden(&'static str),
    /// 40401: no such conversation, message or group.
    NotFound(&'static str),
    /// 41301: content over `max_content_bytes`.
    ContentTooLarge { size: usize, max: usize },
    /// 42201: recall window expired.
    RecallExpired,
    /// 42202: content has a blocked word and the filter is in `reject` mode.
    ContentRejected,
    /// 42901: the caller is over its request budget (`rate_limit`).
    RateLimited,
    /// 42901: the caller used up a quota (e.g. `members_added_per_hour`); the text
    /// names it. Retry after the quota's window.
    QuotaExceeded(String),
    /// 50001: a bug or an unexpected state; the text is for logs.
    Internal(String),
    /// 50301: the store did not accept the write; nothing was stored.
    StoreUnavailable(String),
    /// 50301: the server cannot take this now (at `max_connections`, shutting down);
    /// nothing was done. Retry later, elsewhere if there is another node.
    Unavailable(&'static str),
    /// The error another node of the cluster answered a forwarded request with: its
    /// code and text, passed on unchanged.
    FromNode { code: i32, message: String },
}

pub const OK: i32 = 0;

impl ApiError {
    pub fn invalid(what: impl Into<String>) -> Self {
        ApiError::InvalidArgument(what.into())
    }

    /// The docs/PROTOCOL.md error code.
    pub fn code(&self) -> i32 {
        match self {
            ApiError::InvalidArgument(_) => 40001,
            ApiError::Unauthenticated(_) => 40101,
            ApiError::Forbidden(_) => 40301,
            ApiError::NotFound(_) => 40401,
            ApiError::ContentTooLarge { .. } => 41301,
            ApiError::RecallExpired => 42201,
            ApiError::ContentRejected => 42202,
            ApiError::RateLimited | ApiError::QuotaExceeded(_) => 42901,
            ApiError::Internal(_) => 50001,
            ApiError::StoreUnavailable(_) | ApiError::Unavailable(_) => 50301,
            ApiError::FromNode { code, .. } => *code,
        }
    }

    /// HTTP status: the first three digits of the code.
    pub fn http_status(&self) -> u16 {
        (self.code() / 100) as u16
    }

    /// Whether the same request may succeed if sent again unchanged.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ApiError::RateLimited | ApiError::StoreUnavailable(_) | ApiError::Unavailable(_)
        ) || matches!(self, ApiError::FromNode { code, .. } if *code == 42901 || *code == 50301)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::InvalidArgument(w) => write!(f, "invalid argument: {w}"),
            ApiError::Unauthenticated(w) => write!(f, "unauthenticated: {w}"),
            ApiError::Forbidden(w) => write!(f, "forbidden: {w}"),
            ApiError::NotFound(w) => write!(f, "not found: {w}"),
            ApiError::ContentTooLarge { size, max } => {
                write!(f, "content is {size} bytes, over the limit of {max}")
            }
            ApiError::RecallExpired => f.write_str("recall window expired"),
            ApiError::ContentRejected => f.write_str("content rejected by the filter"),
            ApiError::RateLimited => f.write_str("rate limited"),
            ApiError::QuotaExceeded(w) => write!(f, "quota exceeded: {w}"),
            ApiError::Internal(w) => write!(f, "internal error: {w}"),
            ApiError::StoreUnavailable(w) => write!(f, "store unavailable: {w}"),
            ApiError::Unavailable(w) => write!(f, "unavailable: {w}"),
            ApiError::FromNode { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for ApiError {}

/// WebSocket close codes the server sends (RFC 6455 section 7.4.1).
pub mod close {
    /// Normal closure: the client asked, or the server is shutting down.
    pub const NORMAL: u16 = 1000;
    /// Going away: heartbeat timeout or server shutdown. Reconnect and resync by seq.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error: unmasked client frame, bad opcode, reserved bits. Fix the client.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Unsupported data: a frame of the other encoding than the one negotiated (a text
    /// frame on a binary protobuf connection, a binary frame on an `imshard.v1.json` one).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Invalid payload: a binary frame that is not a ClientFrame and has no readable req_id.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation: a started message did not complete within `frame_timeout`.
    /// Send each message promptly once its first byte is out.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// Message too big: over `max_frame_bytes`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Try again later: the shard holds too many unfinished incoming messages
    /// (`frame_memory_bytes`). Reconnect after a short back-off.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Kicked (replaced, admin kick) or cut as a slow reader. Reconnect only if the
    /// KICKOUT reason allows (not after `replaced` on the same device).
    pub const KICKED: u16 = 4000;
}

/// KICKOUT reasons.
pub mod kick {
    /// Another connection with the same (user, device) took over.
    pub const REPLACED: &str = "replaced";
    /// An admin kicked this device or every device of the user.
    pub const ADMIN: &str = "admin";
    /// The client read too slowly: its outbound queue overflowed. Resync by seq.
    pub const SLOW_READER: &str = "slow_reader";
}
