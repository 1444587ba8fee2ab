//! Message logic. A client operation runs on the caller's user shard ([`execute`]),
//! which owns the caller's devices and conversation rows; it asks the conversation's
//! shard ([`conv`]) for anything about messages. Deliveries go to each recipient's
//! user shard ([`user`]).

pub mod admin;
pub mod cache;
pub mod conv;
pub mod convlist;
pub mod events;
pub mod fanout;
pub mod filter;
pub mod group;
pub mod node;
pub mod routes;
pub mod user;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;

use crate::codes::ApiError;
use crate::ids::{self, ConvRef};
use crate::limits;
use crate::proto::http::Head;
use crate::proto::pb::{
    client_frame::Body, ConvType, CreateGroupRequest, CreateGroupResponse,
    DeleteConversationResponse, GetConversationsResponse, GetMessagesByIdsRequest,
    GetMessagesByIdsResponse, GetUnreadResponse, HeartbeatResponse, MarkReadResponse,
    PullDirection, PullMessagesRequest, PullMessagesResponse, RecallMessageRequest,
    RecallMessageResponse, SendMessageRequest, SendMessageResponse, UpdateConvSettingsResponse,
    UpdateGroupMembersRequest, UpdateGroupMembersResponse,
};
use crate::shard::conn::Conn;
use crate::store::ShardStore;
use filter::Filter;

pub use conv::ConvState;
pub use user::UserState;

/// A shard running the chat service: the runtime's shard with [`Chat`] as its state.
pub type Shard = crate::shard::Shard<Chat>;

/// Bytes staged in the store but not yet durable above which readers pause.
pub const STORE_UNSYNCED_HIGH: usize = 64 << 20;
/// Fan-out jobs queued behind conversations above which readers pause.
pub const FANOUT_QUEUED_HIGH: usize = 4096;

/// The chat service's state on one shard: the users and conversations this shard
/// owns (their caches) and its store. Reached as `shard.<field>` (the shard derefs to
/// it); only this shard's thread touches it.
pub struct Chat {
    /// The content filter, compiled once at start-up and shared by every shard.
    pub filter: Arc<Filter>,
    /// This shard's store (conversations and user rows it owns).
    pub store: Rc<ShardStore>,
    /// Users this shard owns that are online or were touched: devices, rows, rate.
    pub users: RefCell<HashMap<String, UserState>>,
    /// Conversations this shard owns that were touched: seq counter, in-flight dedupe.
    pub convs: RefCell<HashMap<String, ConvState>>,
    /// Bumped whenever conversations are dropped from `convs`: a load that started
    /// before may have read what is no longer true, and starts over.
    pub conv_epoch: Cell<u64>,
    /// Bytes charged for loaded rows and conversations (see [`cache`]), and the
    /// eviction queue over them.
    pub cache_bytes: Cell<usize>,
    pub cache_queue: RefCell<VecDeque<cache::CacheKey>>,
    /// An eviction pass is scheduled for the end of this loop turn.
    pub cache_pass_due: Cell<bool>,
    /// Users whose rows a delivery needs, waiting for the batched loader, and whether
    /// it runs ([`user`]).
    pub rows_to_load: RefCell<VecDeque<String>>,
    pub rows_loader_running: Cell<bool>,
    /// Fan-out jobs queued behind conversations of this shard.
    pub fanout_queued: Cell<usize>,
    /// Counters of the chat service, read by /metrics.
    pub stats: Stats,
    /// Cluster mode: this node's view of the cluster (unset on a single node).
    pub node: std::cell::OnceCell<node::NodeCtx>,
    /// The Kafka event log (`--kafka-brokers`; unset without it).
    pub events: std::cell::OnceCell<events::Events>,
}

/// Counters of one shard's chat service, read by /metrics.
#[derive(Default)]
pub struct Stats {
    pub messages_stored: Cell<u64>,
    pub pushes: Cell<u64>,
    pub cache_evictions: Cell<u64>,
}

impl Chat {
    pub fn new(store: Rc<ShardStore>, filter: Arc<Filter>) -> Chat {
        Chat {
            filter,
            store,
            users: RefCell::new(HashMap::new()),
            convs: RefCell::new(HashMap::new()),
            conv_epoch: Cell::new(0),
            cache_bytes: Cell::new(0),
            cache_queue: RefCell::new(VecDeque::new()),
            cache_pass_due: Cell::new(false),
            rows_to_load: RefCell::new(VecDeque::new()),
            rows_loader_running: Cell::new(false),
            fanout_queued: Cell::new(0),
            stats: Stats::default(),
            node: std::cell::OnceCell::new(),
            events: std::cell::OnceCell::new(),
        }
    }
}

impl crate::shard::Service for Chat {
    fn conn_opened(shard: &Rc<Shard>, conn: &Rc<Conn>) -> Option<Rc<Conn>> {
        let replaced = user::register(shard, conn);
        routes::user_connected(shard, &conn.user);
        replaced
    }

    fn conn_seen(shard: &Rc<Shard>, conn: &Rc<Conn>) {
        user::seen(shard, conn);
    }

    fn conn_closed(shard: &Rc<Shard>, conn: &Rc<Conn>) {
        user::unregister(shard, conn);
        if user::devices(shard, &conn.user).is_empty() {
            routes::user_disconnected(shard, &conn.user);
        }
    }

    fn conns(&self) -> Vec<Rc<Conn>> {
        self.users
            .borrow()
            .values()
            .flat_map(|u| u.conns.iter().cloned())
            .collect()
    }

    async fn request(shard: Rc<Shard>, conn: Rc<Conn>, body: Body) -> Result<Bytes, ApiError> {
        let caller = Caller {
            user: conn.user.to_string(),
            device: conn.device.to_string(),
            admin: false,
        };
        execute(&shard, &caller, body).await.map(|r| r.encode())
    }

    async fn http(shard: &Rc<Shard>, head: &Head, body: &[u8]) -> Vec<u8> {
        crate::api::handle(shard, head, body).await
    }

    fn is_admin_path(path: &str) -> bool {
        crate::api::is_admin_path(path)
    }

    fn behind(&self, low: bool) -> bool {
        let d = if low { 2 } else { 1 };
        self.store.unsynced_bytes() > STORE_UNSYNCED_HIGH / d
            || self.fanout_queued.get() > FANOUT_QUEUED_HIGH / d
    }

    fn unflushed(&self) -> usize {
        self.store.unsynced_bytes()
    }

    fn on_bell(&self) {
        self.store.wake_local();
        if let Some(e) = self.events.get() {
            e.log.wake_local();
        }
    }
}

/// After a failed store batch: forget every cached conversation (their seq counters
/// may have advanced past what is stored), fail the sends that waited on them, and
/// let the store accept writes.
pub fn reset_after_store_failure(shard: &Rc<Shard>) {
    if shard.store.has_failed() {
        let convs = std::mem::take(&mut *shard.convs.borrow_mut());
        shard.conv_epoch.set(shard.conv_epoch.get() + 1);
        shard.store.reset_after_failure();
        for (_, conv) in convs {
            cache::release(shard, conv.charged());
            let queued = conv.queued_fanout();
            shard
                .fanout_queued
                .set(shard.fanout_queued.get().saturating_sub(queued));
            for waiter in conv.into_waiters() {
                let err = ApiError::StoreUnavailable("an earlier write failed".into());
                shard.reply(waiter, Err(err));
            }
        }
    }
}

/// The answer of a client operation, typed until it is written: encoded once for the
/// RESPONSE envelope ([`Response::encode`]) or turned into JSON by the HTTP API.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// Operations that answer nothing (a PushAck asked to answer).
    Empty,
    Heartbeat(HeartbeatResponse),
    Send(SendMessageResponse),
    Pull(PullMessagesResponse),
    ByIds(GetMessagesByIdsResponse),
    Recall(RecallMessageResponse),
    Conversations(GetConversationsResponse),
    MarkRead(MarkReadResponse),
    Delete(DeleteConversationResponse),
    Settings(UpdateConvSettingsResponse),
    Unread(GetUnreadResponse),
    CreateGroup(CreateGroupResponse),
    UpdateMembers(UpdateGroupMembersResponse),
}

impl Response {
    /// The XxxResponse's protobuf bytes (the `body` of a RESPONSE envelope).
    pub fn encode(&self) -> Bytes {
        let v = match self {
            Response::Empty => return Bytes::new(),
            Response::Heartbeat(r) => r.encode_to_vec(),
            Response::Send(r) => r.encode_to_vec(),
            Response::Pull(r) => r.encode_to_vec(),
            Response::ByIds(r) => r.encode_to_vec(),
            Response::Recall(r) => r.encode_to_vec(),
            Response::Conversations(r) => r.encode_to_vec(),
            Response::MarkRead(r) => r.encode_to_vec(),
            Response::Delete(r) => r.encode_to_vec(),
            Response::Settings(r) => r.encode_to_vec(),
            Response::Unread(r) => r.encode_to_vec(),
            Response::CreateGroup(r) => r.encode_to_vec(),
            Response::UpdateMembers(r) => r.encode_to_vec(),
        };
        v.into()
    }
}

macro_rules! response_from {
    ($($t:ty => $v:ident),* $(,)?) => {
        $(impl From<$t> for Response {
            fn from(r: $t) -> Response {
                Response::$v(r)
            }
        })*
    };
}

response_from! {
    HeartbeatResponse => Heartbeat,
    SendMessageResponse => Send,
    PullMessagesResponse => Pull,
    GetMessagesByIdsResponse => ByIds,
    RecallMessageResponse => Recall,
    GetConversationsResponse => Conversations,
    MarkReadResponse => MarkRead,
    DeleteConversationResponse => Delete,
    UpdateConvSettingsResponse => Settings,
    GetUnreadResponse => Unread,
    CreateGroupResponse => CreateGroup,
    UpdateGroupMembersResponse => UpdateMembers,
}

/// Who is asking: from the connection or the HTTP token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: String,
    pub device: String,
    pub admin: bool,
}

/// The checked commands the user's shard hands to a conversation's shard: the same
/// values between shards of a node and, encoded (`node.proto`), between nodes.
pub use crate::proto::node_pb::{ByIdsCmd, PullCmd, RecallCmd, SendCmd};

/// Runs one client operation on the caller's user shard. Returns the typed
/// XxxResponse for the RESPONSE envelope (or the HTTP JSON reply). Its latency and any
/// refusal are recorded there, for /metrics.
pub async fn execute(shard: &Rc<Shard>, caller: &Caller, body: Body) -> Result<Response, ApiError> {
    match node::owner(shard, &caller.user)? {
        node::Owner::Here => execute_on_node(shard, caller, body).await,
        node::Owner::Node(n) => node::execute_at(shard, &n, caller, body).await,
    }
}

/// [`execute`] on this node, whatever the cluster's view (a forwarded operation runs
/// here): on the caller's user shard.
pub async fn execute_on_node(
    shard: &Rc<Shard>,
    caller: &Caller,
    body: Body,
) -> Result<Response, ApiError> {
    let owner = shard.user_shard(&caller.user);
    if owner != shard.id {
        let caller = caller.clone();
        return shard
            .invoke_on(owner, move |shard| async move {
                execute_on_node(&shard, &caller, body).await
            })
            .await?;
    }
    let op = crate::metrics::Op::of(&body);
    let started = std::time::Instant::now();
    let result = run(shard, caller, body).await;
    let micros = started.elapsed().as_micros() as u64;
    shard.counters.recorded.request(op, micros, &result);
    result
}

/// Runs one operation on the caller's user shard (this shard).
async fn run(shard: &Rc<Shard>, caller: &Caller, body: Body) -> Result<Response, ApiError> {
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
        Body::Heartbeat(_) => Ok(Response::Heartbeat(HeartbeatResponse {
            server_ts: crate::proto::envelope::now_ms(),
        })),
        Body::PushAck(_) => Ok(Response::Empty),
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
) -> Result<Response, ApiError> {
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
        conv_type: conv_type.into(),
        sender: caller.user.clone(),
        sender_device: caller.device.clone(),
        members,
        client_msg_id: req.client_msg_id,
        msg_type: req.msg_type,
        content,
        reply_to_msg_id: req.reply_to_msg_id,
        at_users: req.at_users,
    };
    Ok(node::send(shard, cmd).await?.into())
}

async fn pull(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: PullMessagesRequest,
) -> Result<Response, ApiError> {
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
        limit: limit as u32,
        backward: direction == PullDirection::Backward,
        clear_seq,
        max_bytes: limits::reply_budget(shard.cfg.outbound_queue_bytes) as u64,
    };
    Ok(node::pull(shard, cmd).await?.into())
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
) -> Result<Response, ApiError> {
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
        max_bytes: limits::reply_budget(shard.cfg.outbound_queue_bytes) as u64,
    };
    Ok(node::by_ids(shard, cmd).await?.into())
}

async fn recall(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: RecallMessageRequest,
) -> Result<Response, ApiError> {
    check_party(&req.conv_id, &caller.user)?;
    if ulid::Ulid::from_string(&req.msg_id).is_err() {
        return Err(ApiError::invalid("msg_id must be a msg_id (ULID)"));
    }
    let cmd = RecallCmd {
        conv_id: req.conv_id,
        msg_id: req.msg_id,
        operator: caller.user.clone(),
    };
    Ok(node::recall(shard, cmd).await?.into())
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
) -> Result<Response, ApiError> {
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
    Ok(node::create_group(shard, cmd).await?.into())
}

async fn update_members(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: UpdateGroupMembersRequest,
) -> Result<Response, ApiError> {
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
    Ok(node::update_members(shard, cmd).await?.into())
}
