//! Every way shards talk to each other: one enum, moved through the SPSC rings.
//! Reading it tells a newcomer every cross-shard interaction.

use std::ops::Deref;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::Bytes;

use crate::chat::group::{CreateGroupCmd, UpdateMembersCmd};
use crate::chat::{ByIdsCmd, Caller, PullCmd, RecallCmd, SendCmd};
use crate::codes::ApiError;
use crate::proto::json::Negotiated;
use crate::proto::pb::client_frame::Body;

/// Where an answer goes: the asking shard and its call token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub shard: usize,
    pub token: u64,
}

/// The answer to a call: an encoded XxxResponse, or the error for the client.
pub type Reply = Result<Bytes, ApiError>;

/// A command or reply between shards.
pub enum ShardMsg {
    /// A WebSocket upgrade that another shard accepted and authenticated, for a user
    /// this shard owns: this shard answers 101 and owns the connection from then on.
    HandOver(Box<HandOver>),
    /// Run a client operation for a user this shard owns (the HTTP API, served on the
    /// accepting shard, sends this); answers the encoded response.
    Execute {
        reply: ReplyTo,
        caller: Caller,
        body: Box<Body>,
    },
    /// Store a message in a conversation this shard owns (dedupe, seq, durable write);
    /// answers SendMessageResponse after the write is durable.
    Send { reply: ReplyTo, send: Box<SendCmd> },
    /// Read messages of a conversation this shard owns; answers PullMessagesResponse.
    Pull { reply: ReplyTo, pull: Box<PullCmd> },
    /// Messages of a conversation this shard owns by msg_id; answers
    /// GetMessagesByIdsResponse.
    ByIds { reply: ReplyTo, cmd: Box<ByIdsCmd> },
    /// Recall a message of a conversation this shard owns; answers after the change is
    /// durable, then sends MSG_RECALL to every member's shard.
    Recall { reply: ReplyTo, cmd: Box<RecallCmd> },
    /// Create a group whose conversation this shard owns; answers CreateGroupResponse
    /// after the group, its members and the "created" system message are durable.
    CreateGroup {
        reply: ReplyTo,
        cmd: Box<CreateGroupCmd>,
    },
    /// Change the members or admins of a group this shard owns; answers
    /// UpdateGroupMembersResponse after the change and its system message are durable.
    UpdateMembers {
        reply: ReplyTo,
        cmd: Box<UpdateMembersCmd>,
    },
    /// Durable max seq and last message of conversations this shard owns; answers
    /// ConvSummaries (store.proto).
    ConvInfo { reply: ReplyTo, convs: Vec<String> },
    /// Write a frame, encoded once on the conversation's shard, to the online devices of
    /// these users (owned by this shard) and update their conversation rows.
    Deliver(Box<Delivery>),
    /// Write a frame to the online devices of these users (owned by this shard), rows
    /// untouched: MSG_RECALL and other notices.
    Notify(Box<Notice>),
    /// Kick one device (or "ALL") of a user this shard owns with a checked KICKOUT
    /// reason; answers the number closed as 8 bytes, big-endian.
    Kick {
        reply: ReplyTo,
        user: String,
        device: String,
        reason: String,
    },
    /// Write a frame to these users' devices (None = every connection of this shard);
    /// answers the number of connections written to, 8 bytes big-endian.
    Broadcast {
        reply: ReplyTo,
        frame: Bytes,
        users: Option<Vec<String>>,
    },
    /// Online devices of users this shard owns; answers JSON `{"user": ["device", ..]}`.
    Presence { reply: ReplyTo, users: Vec<String> },
    /// This shard's metrics for /metrics: a `metrics::ShardMetrics`, encoded (replies
    /// are `Bytes` for every call; see `ShardMetrics::encode`).
    Metrics { reply: ReplyTo },
    /// Liveness probe for /healthz; answers an empty body.
    Ping { reply: ReplyTo },
    /// The answer to a call this shard made.
    Reply { token: u64, reply: Reply },
}

/// An upgrade handed from the accepting shard to the owner.
pub struct HandOver {
    pub fd: OwnedFd,
    pub user: String,
    pub device: String,
    pub device_type: String,
    pub ws_key: String,
    /// The subprotocol chosen from the client's `Sec-WebSocket-Protocol`.
    pub subprotocol: Negotiated,
    /// Bytes the client sent after the request head (normally none).
    pub leftover: Vec<u8>,
}

/// A stored message to push to users of one shard.
pub struct Delivery {
    /// The MSG_PUSH frame, shared by every recipient.
    pub frame: Bytes,
    pub conv_id: String,
    pub seq: i64,
    pub send_time: i64,
    /// Recipients owned by the target shard.
    pub users: Recipients,
    /// The device that sent the message gets no push.
    pub except_user: String,
    pub except_device: String,
    /// Users this message removes from a group: their rows stop at this seq.
    pub left: Vec<String>,
}

/// A notice for users of one shard.
pub struct Notice {
    pub frame: Bytes,
    pub users: Recipients,
}

/// A user id shared by every list that names the user (a group's member map and its
/// per-shard lists hold one allocation per member, not one per list).
pub type UserId = Arc<str>;

/// Recipients of one delivery: a range of a member list shared by reference (a group's
/// per-shard list is built once per membership change, not once per message).
#[derive(Debug, Clone)]
pub struct Recipients {
    list: Arc<[UserId]>,
    start: usize,
    end: usize,
}

impl Recipients {
    /// All of `list`.
    pub fn all(list: Arc<[UserId]>) -> Recipients {
        let end = list.len();
        Recipients {
            list,
            start: 0,
            end,
        }
    }

    /// `list[start..end]` (clamped to the list).
    pub fn range(list: Arc<[UserId]>, start: usize, end: usize) -> Recipients {
        let end = end.min(list.len());
        Recipients {
            start: start.min(end),
            list,
            end,
        }
    }
}

impl From<Vec<UserId>> for Recipients {
    fn from(v: Vec<UserId>) -> Recipients {
        Recipients::all(v.into())
    }
}

impl Deref for Recipients {
    type Target = [UserId];
    fn deref(&self) -> &[UserId] {
        &self.list[self.start..self.end]
    }
}
