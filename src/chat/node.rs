//! Cluster mode of the chat service: which node owns a conversation or a user, and the
//! commands one node asks of another.
//!
//! # Ownership
//! A conversation is owned by the live node that owns its slot
//! (`cluster::slots::slot_of(conv_id)`, rendezvous hashing over the live set, see
//! [`crate::cluster::slots`]), and inside that node by `shard_of_conv`. A user's rows
//! (conversation list, read marks, settings, request budget) are owned the same way by
//! `slot_of(user)`. Connections are not: a device connects to any node and stays there.
//!
//! # Forwarding (one hop each way)
//! - A client operation runs on the user's owner node ([`super::execute`]): the node
//!   holding the connection forwards it ([`ExecuteCmd`]) when it is not that node.
//! - There, what concerns a conversation goes to the conversation's owner node (a
//!   [`SendCmd`], [`PullCmd`], ...): the same commands the shards of one node hand each
//!   other, encoded with `node.proto` on the node link ([`crate::cluster::link`]).
//! - A node serves what it is asked whatever its own view of the slot map (views
//!   differ for a moment while the live set changes): forwarded work is never
//!   forwarded again, so nothing loops, and the store's fencing (the stored max seq is
//!   checked on every batch) keeps seqs +1 without gaps or duplicates even when two
//!   nodes both believe they own a conversation.
//!
//! A node that holds no lease (not yet registered, or stepped down) owns nothing:
//! operations that need an owner answer 50301 until it is back.
//!
//! # Deliveries
//! A stored message's row updates go to each recipient's owner node ([`RowsCmd`],
//! one per node and message); its push goes out on the pub/sub channels of
//! [`super::routes`], received only by nodes holding a device of a recipient.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;

use super::{conv, group, Caller, Response, Shard};
use crate::cluster::link::{Links, Responder};
use crate::cluster::slots::{slot_of, SlotMap};
use crate::cluster::NodeId;
use crate::codes::ApiError;
use crate::proto::node_pb::{
    node_reply::Reply, node_request::Op, ByIdsCmd, ConvInfoCmd, CreateGroupCmd, Done, ExecuteCmd,
    Failure, NodeReply, NodeRequest, PullCmd, RecallCmd, RowsCmd, SendCmd, UpdateMembersCmd,
};
use crate::proto::pb::{
    ClientFrame, CreateGroupResponse, GetMessagesByIdsResponse, PullMessagesResponse,
    RecallMessageResponse, SendMessageResponse, UpdateGroupMembersResponse,
};
use crate::proto::store_pb::{ConvSummaries, ConvSummary};

/// This shard's view of the cluster (absent on a single node).
pub struct NodeCtx {
    pub me: NodeId,
    /// The slot map of the live set this shard last heard of (shard 0 reads the live
    /// set and posts every change to each shard).
    pub map: RefCell<Arc<SlotMap>>,
    /// Whether this node holds its lease: without it, it owns nothing.
    pub active: Cell<bool>,
    /// This shard's connections to the other nodes.
    pub links: Links,
    /// Requests sent to and served for other nodes, for /metrics.
    pub forwarded: Cell<u64>,
    pub served: Cell<u64>,
    /// This shard's push channels (set once the shard runs).
    pub routes: std::cell::OnceCell<super::routes::Routes>,
    /// This shard's end of the node link (other nodes' requests arrive here).
    pub link_server: std::cell::OnceCell<crate::cluster::link::LinkServer>,
    /// Shard 0: the node's lease and the live set.
    pub membership: std::cell::OnceCell<crate::cluster::membership::Membership>,
    /// Shard 0: the control channels (live set changes, kick, broadcast).
    pub control: std::cell::OnceCell<crate::store::channels::Channels>,
    /// Shard 0: broadcasts this node published after doing them itself (hash of the
    /// payload, when), so its own copy from the channel is not written twice.
    pub own_broadcasts: RefCell<Vec<(u64, std::time::Instant)>>,
}

/// Where a conversation or user lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node (then `shard_of_conv` / `shard_of_user` inside it).
    Here,
    Node(NodeId),
}

/// The owner node of `key` (a conv_id or a user id).
pub fn owner(shard: &Shard, key: &str) -> Result<Owner, ApiError> {
    let Some(ctx) = shard.node.get() else {
        return Ok(Owner::Here);
    };
    let map = ctx.map.borrow();
    match map.owner(slot_of(key)) {
        Some(n) if *n == ctx.me => {
            if ctx.active.get() {
                Ok(Owner::Here)
            } else {
                Err(no_owner())
            }
        }
        Some(n) => Ok(Owner::Node(n.clone())),
        None => Err(no_owner()),
    }
}

fn no_owner() -> ApiError {
    ApiError::Unavailable("no live node owns this now (the cluster is changing); retry")
}

/// Whether this shard runs in a cluster.
pub fn clustered(shard: &Shard) -> bool {
    shard.node.get().is_some()
}

/// A reply of the kind a command expects.
pub trait FromReply: Sized {
    fn from_reply(r: Reply) -> Option<Self>;
}

macro_rules! from_reply {
    ($($t:ty => $v:ident),* $(,)?) => {
        $(impl FromReply for $t {
            fn from_reply(r: Reply) -> Option<Self> {
                match r {
                    Reply::$v(x) => Some(x),
                    _ => None,
                }
            }
        })*
    };
}

from_reply! {
    SendMessageResponse => Send,
    PullMessagesResponse => Pull,
    GetMessagesByIdsResponse => ByIds,
    RecallMessageResponse => Recall,
    CreateGroupResponse => CreateGroup,
    UpdateGroupMembersResponse => UpdateMembers,
    ConvSummaries => Summaries,
    Done => Done,
}

impl FromReply for Response {
    fn from_reply(r: Reply) -> Option<Response> {
        Some(match r {
            Reply::Failure(_) | Reply::Summaries(_) => return None,
            Reply::Done(_) => Response::Empty,
            Reply::Heartbeat(x) => Response::Heartbeat(x),
            Reply::Send(x) => Response::Send(x),
            Reply::Pull(x) => Response::Pull(x),
            Reply::ByIds(x) => Response::ByIds(x),
            Reply::Recall(x) => Response::Recall(x),
            Reply::Conversations(x) => Response::Conversations(x),
            Reply::MarkRead(x) => Response::MarkRead(x),
            Reply::Delete(x) => Response::Delete(x),
            Reply::Settings(x) => Response::Settings(x),
            Reply::Unread(x) => Response::Unread(x),
            Reply::CreateGroup(x) => Response::CreateGroup(x),
            Reply::UpdateMembers(x) => Response::UpdateMembers(x),
        })
    }
}

impl From<Response> for Reply {
    fn from(r: Response) -> Reply {
        match r {
            Response::Empty => Reply::Done(Done {}),
            Response::Heartbeat(x) => Reply::Heartbeat(x),
            Response::Send(x) => Reply::Send(x),
            Response::Pull(x) => Reply::Pull(x),
            Response::ByIds(x) => Reply::ByIds(x),
            Response::Recall(x) => Reply::Recall(x),
            Response::Conversations(x) => Reply::Conversations(x),
            Response::MarkRead(x) => Reply::MarkRead(x),
            Response::Delete(x) => Reply::Delete(x),
            Response::Settings(x) => Reply::Settings(x),
            Response::Unread(x) => Reply::Unread(x),
            Response::CreateGroup(x) => Reply::CreateGroup(x),
            Response::UpdateMembers(x) => Reply::UpdateMembers(x),
        }
    }
}

/// Asks node `node` to run `op`; its typed answer, or the error to give the client.
/// A node that cannot be reached, or does not answer in time, is 50301 (for a send:
/// the client retries with its client_msg_id, and dedupe answers if it was stored).
pub async fn ask<R: FromReply>(shard: &Rc<Shard>, node: &NodeId, op: Op) -> Result<R, ApiError> {
    let ctx = shard
        .node
        .get()
        .ok_or_else(|| ApiError::Internal("a node request on a single node".into()))?;
    ctx.forwarded.set(ctx.forwarded.get() + 1);
    let req = NodeRequest {
        shard: 0,
        op: Some(op),
    }
    .encode_to_vec();
    let bytes = ctx
        .links
        .request(node, &req)
        .await
        .map_err(|e| ApiError::FromNode {
            code: 50301,
            message: format!("unavailable: node {node} did not answer: {e}"),
        })?;
    let reply = NodeReply::decode(bytes)
        .map_err(|e| ApiError::Internal(format!("node {node} answered garbage: {e}")))?
        .reply
        .ok_or_else(|| ApiError::Internal(format!("node {node} answered nothing")))?;
    match reply {
        Reply::Failure(f) => Err(ApiError::FromNode {
            code: f.code,
            message: f.message,
        }),
        r => R::from_reply(r)
            .ok_or_else(|| ApiError::Internal(format!("node {node} answered another kind"))),
    }
}

/// Serves one request of another node (the link server's handler, on the shard that
/// accepted the link): runs it on the owning shard of this node and answers.
pub fn serve(shard: &Rc<Shard>, payload: Bytes, responder: Responder) {
    let shard = shard.clone();
    monoio::spawn(async move {
        if let Some(ctx) = shard.node.get() {
            ctx.served.set(ctx.served.get() + 1);
        }
        let result = match NodeRequest::decode(payload) {
            Ok(NodeRequest { op: Some(op), .. }) => run(&shard, op).await,
            Ok(_) => Err(ApiError::invalid("a node request without an operation")),
            Err(e) => Err(ApiError::invalid(format!("not a node request: {e}"))),
        };
        let reply = result.unwrap_or_else(|e| {
            Reply::Failure(Failure {
                code: e.code(),
                message: e.to_string(),
            })
        });
        responder.reply(&NodeReply { reply: Some(reply) }.encode_to_vec());
    });
}

/// Runs a forwarded operation here (never forwarded again).
async fn run(shard: &Rc<Shard>, op: Op) -> Result<Reply, ApiError> {
    Ok(match op {
        Op::Execute(c) => {
            let body = c
                .frame
                .and_then(|f| f.body)
                .ok_or_else(|| ApiError::invalid("ClientFrame has no body"))?;
            let caller = Caller {
                user: c.user,
                device: c.device,
                admin: false,
            };
            super::execute_on_node(shard, &caller, body).await?.into()
        }
        Op::Send(c) => Reply::Send(send_here(shard, c).await?),
        Op::Pull(c) => Reply::Pull(pull_here(shard, c).await?),
        Op::ByIds(c) => Reply::ByIds(by_ids_here(shard, c).await?),
        Op::Recall(c) => Reply::Recall(recall_here(shard, c).await?),
        Op::CreateGroup(c) => Reply::CreateGroup(create_group_here(shard, c).await?),
        Op::UpdateMembers(c) => Reply::UpdateMembers(update_members_here(shard, c).await?),
        Op::ConvInfo(c) => Reply::Summaries(ConvSummaries {
            items: conv_info_here(shard, c.conv_ids).await?,
        }),
        Op::Rows(c) => {
            rows_here(shard, c);
            Reply::Done(Done {})
        }
    })
}

/// Forwards a client operation to the user's owner node.
pub async fn execute_at(
    shard: &Rc<Shard>,
    node: &NodeId,
    caller: &Caller,
    body: crate::proto::pb::client_frame::Body,
) -> Result<Response, ApiError> {
    let cmd = ExecuteCmd {
        user: caller.user.clone(),
        device: caller.device.clone(),
        frame: Some(ClientFrame {
            req_id: 0,
            body: Some(body),
        }),
    };
    ask(shard, node, Op::Execute(cmd)).await
}

/// Defines `$name` (run where the conversation lives) and `$here` (run on this node).
macro_rules! routed {
    ($(#[$doc:meta])* $name:ident, $here:ident, $cmd:ty, $op:ident, $out:ty,
     |$s:ident, $t:ident, $c:ident| $run:block) => {
        $(#[$doc])*
        pub async fn $name(shard: &Rc<Shard>, cmd: $cmd) -> Result<$out, ApiError> {
            match owner(shard, &cmd.conv_id)? {
                Owner::Here => $here(shard, cmd).await,
                Owner::Node(node) => ask(shard, &node, Op::$op(cmd)).await,
            }
        }

        /// The same, on the conversation's shard of this node.
        pub async fn $here($s: &Rc<Shard>, $c: $cmd) -> Result<$out, ApiError> {
            let $t = $s.conv_shard(&$c.conv_id);
            $run
        }
    };
}

routed!(
    /// Stores a message in its conversation: dedupe, seq, durable write, fan-out.
    send, send_here, SendCmd, Send, SendMessageResponse,
    |shard, target, cmd| {
        shard
            .call(target, move |s, reply| conv::handle_send(s, reply, cmd))
            .await?
    }
);

routed!(
    /// Reads messages of a conversation.
    pull, pull_here, PullCmd, Pull, PullMessagesResponse,
    |shard, target, cmd| {
        shard
            .invoke_on(target, move |s| async move { conv::handle_pull(&s, &cmd).await })
            .await?
    }
);

routed!(
    /// Messages of a conversation by msg_id.
    by_ids, by_ids_here, ByIdsCmd, ByIds, GetMessagesByIdsResponse,
    |shard, target, cmd| {
        shard
            .invoke_on(target, move |s| async move { conv::handle_by_ids(&s, cmd).await })
            .await?
    }
);

routed!(
    /// Recalls a message.
    recall, recall_here, RecallCmd, Recall, RecallMessageResponse,
    |shard, target, cmd| {
        shard
            .call(target, move |s, reply| {
                let s = s.clone();
                monoio::spawn(async move { conv::handle_recall(&s, reply, cmd).await });
            })
            .await?
    }
);

routed!(
    /// Creates a group.
    create_group, create_group_here, CreateGroupCmd, CreateGroup, CreateGroupResponse,
    |shard, target, cmd| {
        shard
            .call(target, move |s, reply| {
                let s = s.clone();
                monoio::spawn(async move { group::handle_create(&s, reply, cmd).await });
            })
            .await?
    }
);

routed!(
    /// Changes a group's members or admins.
    update_members, update_members_here, UpdateMembersCmd, UpdateMembers,
    UpdateGroupMembersResponse,
    |shard, target, cmd| {
        shard
            .call(target, move |s, reply| {
                let s = s.clone();
                monoio::spawn(async move { group::handle_update(&s, reply, cmd).await });
            })
            .await?
    }
);

/// Durable max seq and last message of conversations, asked of their owners (one
/// request per owner node and per owner shard).
pub async fn conv_info(
    shard: &Rc<Shard>,
    conv_ids: Vec<String>,
) -> Result<Vec<ConvSummary>, ApiError> {
    let mut here = Vec::new();
    let mut remote: Vec<(NodeId, Vec<String>)> = Vec::new();
    for c in conv_ids {
        match owner(shard, &c)? {
            Owner::Here => here.push(c),
            Owner::Node(n) => match remote.iter_mut().find(|(m, _)| *m == n) {
                Some((_, list)) => list.push(c),
                None => remote.push((n, vec![c])),
            },
        }
    }
    let asks: Vec<_> = remote
        .into_iter()
        .map(|(node, conv_ids)| {
            let shard = shard.clone();
            async move {
                ask::<ConvSummaries>(&shard, &node, Op::ConvInfo(ConvInfoCmd { conv_ids })).await
            }
        })
        .collect();
    let mut out = conv_info_here(shard, here).await?;
    for a in asks {
        out.extend(a.await?.items);
    }
    Ok(out)
}

/// [`conv_info`] for conversations of this node.
pub async fn conv_info_here(
    shard: &Rc<Shard>,
    conv_ids: Vec<String>,
) -> Result<Vec<ConvSummary>, ApiError> {
    let mut by_shard: Vec<Vec<String>> = vec![Vec::new(); shard.n];
    for c in conv_ids {
        by_shard[shard.conv_shard(&c)].push(c);
    }
    let calls: Vec<_> = by_shard
        .into_iter()
        .enumerate()
        .filter(|(_, convs)| !convs.is_empty())
        .map(|(target, convs)| {
            shard.invoke_on(target, move |s| async move {
                conv::handle_info(&s, &convs).await
            })
        })
        .collect();
    let mut out = Vec::new();
    for call in calls {
        out.extend(call.await??);
    }
    Ok(out)
}

/// A delivery's row updates for users this node owns: to their shards.
fn rows_here(shard: &Rc<Shard>, cmd: RowsCmd) {
    let mut by_shard: Vec<Vec<super::fanout::UserId>> = vec![Vec::new(); shard.n];
    for u in &cmd.users {
        by_shard[shard.user_shard(u)].push(super::fanout::UserId::from(u.as_str()));
    }
    for (target, users) in by_shard.into_iter().enumerate() {
        if users.is_empty() {
            continue;
        }
        let d = super::fanout::Delivery {
            frame: Bytes::new(),
            conv_id: cmd.conv_id.clone(),
            seq: cmd.seq,
            send_time: cmd.send_time,
            users: users.into(),
            except_user: cmd.sender.clone(),
            except_device: String::new(),
            left: cmd.left.clone(),
            push: false,
        };
        shard.post(target, move |s| super::user::deliver(s, &d));
    }
}

/// Sends a delivery's row updates to the owner nodes of `users` that are not this
/// node (one request per node); returns the users this node owns.
pub fn rows_elsewhere(
    shard: &Rc<Shard>,
    users: &[super::fanout::UserId],
    conv_id: &str,
    seq: i64,
    send_time: i64,
    sender: &str,
    left: &[String],
) -> Vec<super::fanout::UserId> {
    let mut here = Vec::with_capacity(users.len());
    let mut remote: Vec<(NodeId, Vec<String>)> = Vec::new();
    for u in users {
        match owner(shard, u) {
            Ok(Owner::Node(n)) => match remote.iter_mut().find(|(m, _)| *m == n) {
                Some((_, list)) => list.push(u.to_string()),
                None => remote.push((n, vec![u.to_string()])),
            },
            // Ours, or nobody's for the moment: the row is updated here (rows are
            // read from the store on the next load anyway).
            _ => here.push(u.clone()),
        }
    }
    for (node, users) in remote {
        let cmd = RowsCmd {
            conv_id: conv_id.to_string(),
            seq,
            send_time,
            users,
            sender: sender.to_string(),
            left: left.to_vec(),
        };
        let shard = shard.clone();
        monoio::spawn(async move {
            if let Err(e) = ask::<Done>(&shard, &node, Op::Rows(cmd)).await {
                tracing::warn!(%node, error = %e, "row updates for another node were not delivered");
            }
        });
    }
    here
}

/// A new slot map (the live set changed): use it, point the links at the live nodes,
/// and forget cached conversations and rows another node owns now once they are idle
/// (a busy one finishes; the store's fencing refuses a stale write).
pub fn apply_map(shard: &Rc<Shard>, map: Arc<SlotMap>, peers: Vec<(NodeId, std::net::SocketAddr)>) {
    let Some(ctx) = shard.node.get() else { return };
    ctx.links.set_peers(peers);
    *ctx.map.borrow_mut() = map;
    let moved = |key: &str| !matches!(owner(shard, key), Ok(Owner::Here));
    let convs: Vec<String> = shard
        .convs
        .borrow()
        .keys()
        .filter(|c| moved(c))
        .cloned()
        .collect();
    for c in convs {
        // The first visit clears the "used" mark, the second evicts if idle.
        for _ in 0..2 {
            conv::visit_for_eviction(shard, &c);
        }
    }
    let users: Vec<String> = shard
        .users
        .borrow()
        .keys()
        .filter(|u| moved(u))
        .cloned()
        .collect();
    for u in users {
        for _ in 0..2 {
            super::user::visit_for_eviction(shard, &u);
        }
    }
}

/// Whether this node holds its lease (posted to every shard on each change).
pub fn set_active(shard: &Rc<Shard>, active: bool) {
    if let Some(ctx) = shard.node.get() {
        ctx.active.set(active);
    }
}
