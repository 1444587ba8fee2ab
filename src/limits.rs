//! Fixed limits of the protocol (docs/PROTOCOL.md). Configurable limits live in `config`.

/// Identifiers (user, device, group): 1 to this many characters of `[A-Za-z0-9_.@]`.
pub const MAX_ID_LEN: usize = 64;
/// Pull: default and maximum `limit`.
pub const PULL_DEFAULT_LIMIT: i32 = 50;
pub const PULL_MAX_LIMIT: i32 = 200;
/// GetMessagesByIds: 1 to this many ids.
pub const BY_IDS_MAX: usize = 50;
/// GetConversations: default and maximum page size.
pub const CONV_PAGE_DEFAULT: i32 = 50;
pub const CONV_PAGE_MAX: i32 = 200;
/// GetUnread: default and maximum messages per conversation.
pub const UNREAD_PER_CONV_DEFAULT: i32 = 50;
pub const UNREAD_PER_CONV_MAX: i32 = 200;
/// Pull, GetMessagesByIds and GetUnread stop adding messages once a reply holds this
/// many bytes of stored messages (always at least one message), and say so
/// (`has_more`). Well under the default `outbound_queue_bytes` (4 MiB), so a reply
/// never gets its own client cut as a slow reader: 200 messages of 64 KiB would be
/// 12.8 MB. See [`reply_budget`] for the effective value.
pub const REPLY_MESSAGE_BYTES: usize = 1 << 20;

/// The byte budget of one reply: [`REPLY_MESSAGE_BYTES`], or a quarter of the
/// configured `outbound_queue_bytes` if that is smaller.
pub fn reply_budget(outbound_queue_bytes: usize) -> usize {
    REPLY_MESSAGE_BYTES.min(outbound_queue_bytes / 4)
}

/// The dedupe window for (sender, client_msg_id).
pub const DEDUPE_WINDOW_MS: i64 = 24 * 3600 * 1000;
/// client_msg_id: at most this many bytes.
pub const MAX_CLIENT_MSG_ID_LEN: usize = 128;
/// at_users: at most this many entries.
pub const MAX_AT_USERS: usize = 100;
/// msg_type: user messages are 0..=99; 100+ are system messages the server writes.
pub const MAX_USER_MSG_TYPE: i32 = 99;
/// An HTTP request head (request line and headers) may be at most this long.
pub const MAX_HTTP_HEAD: usize = 16 * 1024;
/// At most this many headers in an HTTP request.
pub const MAX_HTTP_HEADERS: usize = 32;
/// Control frames carry at most 125 bytes (RFC 6455).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// An admin kick's reason (sent in KICKOUT and the close frame): at most this many bytes.
pub const MAX_KICK_REASON_BYTES: usize = 64;
/// A group has at most this many members.
pub const MAX_GROUP_MEMBERS: usize = 100_000;
/// A group name: at most this many characters.
pub const MAX_GROUP_NAME_CHARS: usize = 128;
/// System messages about membership list at most this many user ids per list (the
/// counts are always exact; a client wanting the rest asks for the member list).
pub const SYSTEM_MSG_MAX_IDS: usize = 100;
