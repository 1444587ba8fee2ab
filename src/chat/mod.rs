//! Message logic. A client operation runs on the caller's user shard ([`execute`]),
//! which owns the caller's devices and conversation rows; it asks the conversation's
//! shard ([`conv`]) for anything about messages. Deliveries go to each recipient's
//! user shard ([`user`]).

pub mod admin;
pub mod cache;
pub mod conv;
pub mod convlist;
pub mod filter;
pub mod group;
pub mod user;

use std::rc::Rc;

use bytes::Bytes;
use prost::Message as _;

use crate::codes::ApiError;
use crate::ids::{self, ConvRef};
use crate::limits;
use crate::proto::pb::{
    client_frame::Body, ConvType, CreateGroupRequest, GetMessagesByIdsRequest, PullDirection,
    PullMessagesRequest, RecallMessageRequest, SendMessageRequest, UpdateGroupMembersRequest,
};
use crate::shard::msg::ShardMsg;
use crate::shard::Shard;

pub use conv::ConvState;
pub use user::UserState;

/// Who is asking: from the connection or the HTTP token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: String,
    pub device: String,
    pub admin: bool,
}

/// A checked send, for the conversation's shard.
#[derive(Debug)]
pub struct SendCmd {
    pub conv_id: String,
    pub conv_type: ConvType,
    pub sender: String,
    pub sender_device: String,
    /// Everyone who gets the message (and a conversation row): both parties for p2p.
    pub members: Vec<String>,
    pub client_msg_id: String,
    pub msg_type: i32,
    pub content: String,
    pub reply_to_msg_id: String,
    pub at_users: Vec<String>,
}

/// A checked pull, for the conversation's shard.
#[derive(Debug)]
pub struct PullCmd {
    pub conv_id: String,
    pub user: String,
    pub anchor_seq: i64,
    pub limit: usize,
    pub backward: bool,
    /// The caller's clear_seq: nothing at or below it is returned.
    pub clear_seq: i64,
    /// Stop adding messages once they hold this many bytes (at least one is returned):
    /// the reply must fit the caller's outbound queue ([`limits::reply_budget`]).
    pub max_bytes: usize,
}

/// Messages by id, for the conversation's shard.
#[derive(Debug)]
pub struct ByIdsCmd {
    pub conv_id: String,
    pub user: String,
    pub msg_ids: Vec<String>,
    pub clear_seq: i64,
    /// Stop before the message that would pass this many bytes (at least one is
    /// returned); see [`limits::reply_budget`].
    pub max_bytes: usize,
}

/// A recall, for the conversation's shard.
#[derive(Debug)]
pub struct RecallCmd {
    pub conv_id: String,
    pub msg_id: String,
    pub operator: String,
}

/// Runs one client operation on the caller's user shard. Returns the encoded
/// XxxResponse for the RESPONSE envelope (or the HTTP JSON reply). Its latency and any
/// refusal are recorded there, for /metrics.
pub async fn execute(shard: &Rc<Shard>, caller: &Caller, body: Body) -> Result<Bytes, ApiError> {
    let owner = shard.user_shard(&caller.user);
    if owner != shard.id {
        let caller = caller.clone();
        return shard
            .call(owner, move |reply| ShardMsg::Execute {
                reply,
                caller,
                body: Box::new(body),
            })
            .await;
    }
    let op = crate::metrics::Op::of(&body);
    let started = std::time::Instant::now();
    let result = run(shard, caller, body).await;
    let micros = started.elapsed().as_micros() as u64;
    shard.counters.recorded.request(op, micros, &result);
    result
}

/// Runs one operation on the caller's user shard (this shard).
async fn run(shard: &Rc<Shard>, caller: &Caller, body: Body) -> Result<Bytes, ApiError> {
    user::take_tokens(shard, &caller.user, cost(&body))?;
    match body {
        Body::Send(req) => send(shard, caller, req).await,
        Body::Pull(req) => pull(shard, caller, req).await,
        Body::GetByIds(req) => by_ids(shard, caller, req).await,
        Body::Recall(req) => recall(shard, caller, req).await,
        Body::GetConversations(req) => convlist::get_conversations(shard, caller, req).await,
        Body::MarkRead(req) => convlist::mark_read(shard, caller, req).await,
        Body::DeleteConversation(req) => convlist::delete(shard, caller, req).await,
        Body::UpdateSettings(req) => convlist::update_settings(shard, caller, req).await,
        Body::GetUnread(req) => convlist::get_unread(shard, caller, req).await,
        Body::Heartbeat(_) => Ok(crate::proto::pb::HeartbeatResponse {
            server_ts: crate::proto::envelope::now_ms(),
        }
        .encode_to_vec()
        .into()),
        Body::PushAck(_) => Ok(Bytes::new()),
        Body::CreateGroup(req) => create_group(shard, caller, req).await,
        Body::UpdateMembers(req) => update_members(shard, caller, req).await,
    }
}

/// What an operation takes from the caller's request budget (`rate_limit` tokens per
/// second): one for a message operation, more for what reads or writes much.
pub fn cost(body: &Body) -> u32 {
    /// Member ids one token pays for in group changes.
    const IDS_PER_TOKEN: usize = 100;
    match body {
        Body::Heartbeat(_) | Body::PushAck(_) => 0,
        Body::Send(_)
        | Body::Pull(_)
        | Body::GetByIds(_)
        | Body::Recall(_)
        | Body::GetConversations(_)
        | Body::MarkRead(_)
        | Body::DeleteConversation(_)
        | Body::UpdateSettings(_) => 1,
        Body::GetUnread(_) => 5,
        Body::CreateGroup(r) => 5 + (r.members.len() / IDS_PER_TOKEN) as u32,
        Body::UpdateMembers(r) => {
            let ids = r.add.len() + r.remove.len() + r.add_admins.len();
            5 + (ids / IDS_PER_TOKEN) as u32
        }
    }
}

async fn send(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: SendMessageRequest,
) -> Result<Bytes, ApiError> {
    let conv_type =
        ConvType::try_from(req.conv_type).map_err(|_| ApiError::invalid("conv_type"))?;
    ids::check_id("target", &req.target)?;
    if req.client_msg_id.len() > limits::MAX_CLIENT_MSG_ID_LEN || req.client_msg_id.contains('\0') {
        return Err(ApiError::invalid(format!(
            "client_msg_id must be at most {} bytes without NUL",
            limits::MAX_CLIENT_MSG_ID_LEN
        )));
    }
    if !(0..=limits::MAX_USER_MSG_TYPE).contains(&req.msg_type) {
        return Err(ApiError::invalid(
            "msg_type must be 0-99 (100+ are system messages)",
        ));
    }
    if req.at_users.len() > limits::MAX_AT_USERS {
        return Err(ApiError::invalid("too many at_users"));
    }
    for u in &req.at_users {
        ids::check_id("at_users", u)?;
    }
    if !req.reply_to_msg_id.is_empty() && ulid::Ulid::from_string(&req.reply_to_msg_id).is_err() {
        return Err(ApiError::invalid("reply_to_msg_id must be a msg_id"));
    }
    if req.content.is_empty() {
        return Err(ApiError::invalid("content must not be empty"));
    }
    let max = shard.cfg.max_content_bytes;
    if req.content.len() > max {
        return Err(ApiError::ContentTooLarge {
            size: req.content.len(),
            max,
        });
    }
    let content = shard.filter.apply(req.content)?;
    let (conv_id, members) = match conv_type {
        ConvType::P2p => {
            if req.target == caller.user {
                return Err(ApiError::invalid("target must be another user"));
            }
            (
                ids::p2p_conv_id(&caller.user, &req.target),
                vec![caller.user.clone(), req.target.clone()],
            )
        }
        // Members come from the group's state on its conversation shard.
        ConvType::Group => (ids::group_conv_id(&req.target), Vec::new()),
        ConvType::Unspecified => return Err(ApiError::invalid("conv_type must be P2P or GROUP")),
    };
    let cmd = SendCmd {
        conv_id,
        conv_type,
        sender: caller.user.clone(),
        sender_device: caller.device.clone(),
        members,
        client_msg_id: req.client_msg_id,
        msg_type: req.msg_type,
        content,
        reply_to_msg_id: req.reply_to_msg_id,
        at_users: req.at_users,
    };
    let target = shard.conv_shard(&cmd.conv_id);
    shard
        .call(target, |reply| ShardMsg::Send {
            reply,
            send: Box::new(cmd),
        })
        .await
}

async fn pull(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: PullMessagesRequest,
) -> Result<Bytes, ApiError> {
    check_party(&req.conv_id, &caller.user)?;
    let direction =
        PullDirection::try_from(req.direction).map_err(|_| ApiError::invalid("direction"))?;
    if req.anchor_seq < 0 {
        return Err(ApiError::invalid("anchor_seq must be >= 0"));
    }
    let limit = match req.limit {
        l if l < 0 => return Err(ApiError::invalid("limit must be >= 0")),
        0 => limits::PULL_DEFAULT_LIMIT,
        l => l.min(limits::PULL_MAX_LIMIT),
    } as usize;
    let clear_seq = user::row_of(shard, &caller.user, &req.conv_id)
        .await?
        .map_or(0, |r| r.clear_seq);
    let cmd = PullCmd {
        conv_id: req.conv_id,
        user: caller.user.clone(),
        anchor_seq: req.anchor_seq,
        limit,
        backward: direction == PullDirection::Backward,
        clear_seq,
        max_bytes: limits::reply_budget(shard.cfg.outbound_queue_bytes),
    };
    let target = shard.conv_shard(&cmd.conv_id);
    shard
        .call(target, |reply| ShardMsg::Pull {
            reply,
            pull: Box::new(cmd),
        })
        .await
}

/// Parses a conv_id and, for p2p, checks that `user` is a party (group membership is
/// checked on the conversation's shard).
pub fn check_party(conv_id: &str, user: &str) -> Result<(), ApiError> {
    let conv = ConvRef::parse(conv_id)?;
    match conv {
        ConvRef::P2p { .. } if !conv.p2p_has(user) => {
            Err(ApiError::Forbidden("not a member of this conversation"))
        }
        _ => Ok(()),
    }
}

async fn by_ids(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: GetMessagesByIdsRequest,
) -> Result<Bytes, ApiError> {
    check_party(&req.conv_id, &caller.user)?;
    if req.msg_ids.is_empty() || req.msg_ids.len() > limits::BY_IDS_MAX {
        return Err(ApiError::invalid(format!(
            "msg_ids must have 1-{} ids",
            limits::BY_IDS_MAX
        )));
    }
    if req
        .msg_ids
        .iter()
        .any(|id| ulid::Ulid::from_string(id).is_err())
    {
        return Err(ApiError::invalid("msg_ids must be msg_ids (ULIDs)"));
    }
    let clear_seq = user::row_of(shard, &caller.user, &req.conv_id)
        .await?
        .map_or(0, |r| r.clear_seq);
    let cmd = ByIdsCmd {
        conv_id: req.conv_id,
        user: caller.user.clone(),
        msg_ids: req.msg_ids,
        clear_seq,
        max_bytes: limits::reply_budget(shard.cfg.outbound_queue_bytes),
    };
    let target = shard.conv_shard(&cmd.conv_id);
    shard
        .call(target, |reply| ShardMsg::ByIds {
            reply,
            cmd: Box::new(cmd),
        })
        .await
}

async fn recall(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: RecallMessageRequest,
) -> Result<Bytes, ApiError> {
    check_party(&req.conv_id, &caller.user)?;
    if ulid::Ulid::from_string(&req.msg_id).is_err() {
        return Err(ApiError::invalid("msg_id must be a msg_id (ULID)"));
    }
    let cmd = RecallCmd {
        conv_id: req.conv_id,
        msg_id: req.msg_id,
        operator: caller.user.clone(),
    };
    let target = shard.conv_shard(&cmd.conv_id);
    shard
        .call(target, |reply| ShardMsg::Recall {
            reply,
            cmd: Box::new(cmd),
        })
        .await
}

/// Checks a list of user ids and removes repeats (first occurrence kept).
fn unique_ids(field: &str, list: Vec<String>) -> Result<Vec<String>, ApiError> {
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    let mut out = Vec::with_capacity(list.len());
    for u in list {
        ids::check_id(field, &u)?;
        if seen.insert(u.clone()) {
            out.push(u);
        }
    }
    Ok(out)
}

async fn create_group(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: CreateGroupRequest,
) -> Result<Bytes, ApiError> {
    let group_id = if req.group_id.is_empty() {
        format!("g{}", ulid::Ulid::new())
    } else {
        ids::check_id("group_id", &req.group_id)?;
        req.group_id
    };
    if req.name.chars().count() > limits::MAX_GROUP_NAME_CHARS {
        return Err(ApiError::invalid(format!(
            "name must be at most {} characters",
            limits::MAX_GROUP_NAME_CHARS
        )));
    }
    if req.members.len() >= limits::MAX_GROUP_MEMBERS {
        return Err(ApiError::invalid(format!(
            "a group has at most {} members",
            limits::MAX_GROUP_MEMBERS
        )));
    }
    let mut members = unique_ids("members", req.members)?;
    if !members.contains(&caller.user) {
        members.push(caller.user.clone());
    }
    user::check_groups_owned(shard, &caller.user).await?;
    let named = members.iter().filter(|m| **m != caller.user).count();
    user::take_member_quota(shard, &caller.user, named)?;
    let cmd = group::CreateGroupCmd {
        conv_id: ids::group_conv_id(&group_id),
        group_id,
        name: req.name,
        owner: caller.user.clone(),
        device: caller.device.clone(),
        members,
    };
    let target = shard.conv_shard(&cmd.conv_id);
    shard
        .call(target, |reply| ShardMsg::CreateGroup {
            reply,
            cmd: Box::new(cmd),
        })
        .await
}

async fn update_members(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: UpdateGroupMembersRequest,
) -> Result<Bytes, ApiError> {
    ids::check_id("group_id", &req.group_id)?;
    let total = req.add.len() + req.remove.len() + req.add_admins.len();
    if total == 0 {
        return Err(ApiError::invalid(
            "add, remove or add_admins must name someone",
        ));
    }
    if total > limits::MAX_GROUP_MEMBERS {
        return Err(ApiError::invalid(format!(
            "at most {} ids per change",
            limits::MAX_GROUP_MEMBERS
        )));
    }
    let cmd = group::UpdateMembersCmd {
        conv_id: ids::group_conv_id(&req.group_id),
        operator: caller.user.clone(),
        device: caller.device.clone(),
        add: unique_ids("add", req.add)?,
        remove: unique_ids("remove", req.remove)?,
        add_admins: unique_ids("add_admins", req.add_admins)?,
    };
    user::take_member_quota(shard, &caller.user, cmd.add.len())?;
    let target = shard.conv_shard(&cmd.conv_id);
    shard
        .call(target, |reply| ShardMsg::UpdateMembers {
            reply,
            cmd: Box::new(cmd),
        })
        .await
}
