//! What the conversation's shard sends to the recipients' shards: a delivery (a stored
//! message, its frame encoded once) or a notice, with the recipients of that shard as a
//! shared range of a member list.

use std::ops::Deref;
use std::sync::Arc;

use bytes::Bytes;

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
    /// Write the frame to the recipients' devices here. False in cluster mode, where
    /// pushes travel on the pub/sub channels (`chat::routes`) and a delivery only
    /// updates rows.
    pub push: bool,
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
