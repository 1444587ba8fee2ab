//! Groups, on the group conversation's shard: members and roles (loaded from the store
//! on first use, one key per member), create and membership changes. Every change is
//! also a system message (msg_type 100+) in the group, stored in the same atomic batch
//! and pushed like any message, so devices learn it by the same push/pull path.
//!
//! Rules: the creator is the owner; owner and admins add and remove members; only the
//! owner names admins or removes an admin; a member may remove itself, except the owner
//! (there is no ownership transfer yet). Members may pull the whole history, including
//! messages from before they joined; a removed member may no longer pull or send.

use std::collections::HashMap;
use std::rc::Rc;

use super::cache;
use super::conv::{fan_out, on_conv, split_by_shard, ByShard};
use super::fanout::UserId;
use super::Shard;
use crate::codes::ApiError;
use crate::proto::envelope::now_ms;
use crate::proto::pb::{CreateGroupResponse, MsgItem, UpdateGroupMembersResponse};
use crate::proto::store_pb::{GroupMeta, MemberRecord};
use crate::shard::msg::ReplyTo;
use crate::store::WriteSet;

pub const ROLE_MEMBER: i32 = 0;
pub const ROLE_ADMIN: i32 = 1;
pub const ROLE_OWNER: i32 = 2;

/// System message types.
pub const MSG_GROUP_CREATED: i32 = 100;
pub const MSG_MEMBERS_CHANGED: i32 = 101;

/// Members and roles of one group. Each member id is one shared allocation, named by
/// the role map and by the per-shard lists (about 80 bytes a member in all).
pub struct GroupState {
    pub name: String,
    pub owner: String,
    roles: HashMap<UserId, i32>,
    /// The members by owner shard, handed to every message's fan-out by reference
    /// (rebuilt on change).
    pub by_shard: ByShard,
}

impl GroupState {
    /// Every member id, sorted (for the UpdateGroupMembers answer).
    pub fn sorted_members(&self) -> Vec<String> {
        let mut list: Vec<String> = self.roles.keys().map(|u| u.to_string()).collect();
        list.sort_unstable();
        list
    }

    pub fn member_count(&self) -> usize {
        self.roles.len()
    }

    pub fn is_member(&self, user: &str) -> bool {
        self.roles.contains_key(user)
    }

    pub fn is_admin(&self, user: &str) -> bool {
        self.roles.get(user).is_some_and(|r| *r >= ROLE_ADMIN)
    }

    fn role(&self, user: &str) -> Option<i32> {
        self.roles.get(user).copied()
    }

    /// Rebuilds the shared per-shard lists after a change, for `n` shards.
    fn rebuild_list(&mut self, n: usize) {
        let mut list: Vec<UserId> = self.roles.keys().cloned().collect();
        list.sort_unstable();
        self.by_shard = Rc::new(split_by_shard(n, list));
        self.roles.shrink_to_fit();
    }
}

/// Loads a group from the store (None when it does not exist).
pub async fn load(shard: &Shard, conv_id: &str) -> Result<Option<Box<GroupState>>, ApiError> {
    let Some((meta, members)) = shard.store.group_with_members(conv_id).await? else {
        return Ok(None);
    };
    let roles: HashMap<UserId, i32> = members
        .into_iter()
        .map(|(u, r)| (UserId::from(u), r.role))
        .collect();
    let mut g = GroupState {
        name: meta.name,
        owner: meta.owner,
        roles,
        by_shard: Rc::default(),
    };
    g.rebuild_list(shard.n);
    Ok(Some(Box::new(g)))
}

/// Checked group commands, for the group conversation's shard (see `node.proto`).
pub use crate::proto::node_pb::{CreateGroupCmd, UpdateMembersCmd};

/// The first ids of a list, for a system message.
fn capped(list: &[String]) -> &[String] {
    &list[..list.len().min(crate::limits::SYSTEM_MSG_MAX_IDS)]
}

fn system_message(
    conv_id: &str,
    seq: i64,
    operator: &str,
    msg_type: i32,
    content: serde_json::Value,
) -> MsgItem {
    MsgItem {
        msg_id: ulid::Ulid::new().to_string(),
        client_msg_id: String::new(),
        conv_id: conv_id.to_string(),
        seq,
        from_uuid: operator.to_string(),
        msg_type,
        content: content.to_string(),
        status: 0,
        send_time: now_ms(),
        reply_to_msg_id: String::new(),
        at_users: Vec::new(),
    }
}

/// Stages `write` (with the system message `msg`), then answers `body` and pushes the
/// message to `fanout` once durable.
/// One durable membership change and whom to tell.
struct Change {
    write: WriteSet,
    msg: MsgItem,
    fanout: ByShard,
    removed: Vec<String>,
    /// Users this change makes members (cluster mode subscribes their nodes).
    joined: Vec<String>,
}

fn commit<T: Send + 'static>(
    shard: &Rc<Shard>,
    reply: ReplyTo<Result<T, ApiError>>,
    change: Change,
    device: String,
    body: T,
) {
    let Change {
        mut write,
        msg,
        fanout,
        removed,
        joined,
    } = change;
    write.message(&msg);
    super::events::stage(shard, &mut write, |o| {
        crate::eventlog::record::message_stored(o, &msg)
    });
    super::events::stage(shard, &mut write, |o| {
        crate::eventlog::record::membership_changed(
            o,
            msg.seq,
            crate::proto::events_pb::MembershipChanged {
                conv_id: msg.conv_id.clone(),
                added: joined.clone(),
                removed: removed.clone(),
                operator: msg.from_uuid.clone(),
                ..Default::default()
            },
        )
    });
    // In staging order with the group's other messages (see `conv::handle_send`).
    let shard2 = shard.clone();
    shard.store.stage_then(write, move |result| {
        let shard = shard2;
        match result {
            Ok(()) => {
                if let Some(c) = shard.convs.borrow_mut().get_mut(&msg.conv_id) {
                    c.durable_seq = c.durable_seq.max(msg.seq);
                }
                super::events::notify(&shard);
                shard.reply(reply, Ok(body));
                fan_out(&shard, &msg, fanout, removed, &joined, &device);
            }
            Err(e) => {
                shard.reply(reply, Err(e.into()));
                super::reset_after_store_failure(&shard);
            }
        }
    });
}

pub async fn handle_create(
    shard: &Rc<Shard>,
    reply: ReplyTo<Result<CreateGroupResponse, ApiError>>,
    cmd: CreateGroupCmd,
) {
    super::reset_after_store_failure(shard);
    let prepared = on_conv(shard, &cmd.conv_id, |c| {
        if c.group.is_some() || c.next_seq > 1 {
            return Err(ApiError::invalid("group_id is already taken"));
        }
        let mut g = GroupState {
            name: cmd.name.clone(),
            owner: cmd.owner.clone(),
            roles: cmd
                .members
                .iter()
                .map(|m| (UserId::from(m.as_str()), ROLE_MEMBER))
                .collect(),
            by_shard: Rc::default(),
        };
        g.roles.insert(UserId::from(cmd.owner.as_str()), ROLE_OWNER);
        g.rebuild_list(shard.n);
        let by_shard = g.by_shard.clone();
        let grown = g.member_count() * cache::MEMBER_BYTES;
        c.group = Some(Box::new(g));
        c.charged += grown;
        cache::grow(shard, grown);
        let seq = c.next_seq;
        c.next_seq += 1;
        Ok((seq, by_shard))
    })
    .await;
    let (seq, by_shard) = match prepared.and_then(|r| r) {
        Ok(v) => v,
        Err(e) => return shard.reply(reply, Err(e)),
    };
    let now = now_ms();
    let mut write = WriteSet::new();
    write.group(
        &cmd.conv_id,
        &GroupMeta {
            name: cmd.name.clone(),
            owner: cmd.owner.clone(),
            created_at: now,
        },
    );
    for m in &cmd.members {
        let role = if *m == cmd.owner {
            ROLE_OWNER
        } else {
            ROLE_MEMBER
        };
        write.member(
            &cmd.conv_id,
            m,
            &MemberRecord {
                role,
                joined_at: now,
            },
        );
    }
    let msg = system_message(
        &cmd.conv_id,
        seq,
        &cmd.owner,
        MSG_GROUP_CREATED,
        serde_json::json!({"event": "group_created", "operator": cmd.owner, "name": cmd.name,
            "member_count": cmd.members.len(), "members": capped(&cmd.members)}),
    );
    let body = CreateGroupResponse {
        group_id: cmd.group_id,
        conv_id: cmd.conv_id,
    };
    let change = Change {
        write,
        msg,
        fanout: by_shard,
        removed: Vec::new(),
        joined: cmd.members.clone(),
    };
    commit(shard, reply, change, cmd.device, body);
}

pub async fn handle_update(
    shard: &Rc<Shard>,
    reply: ReplyTo<Result<UpdateGroupMembersResponse, ApiError>>,
    cmd: UpdateMembersCmd,
) {
    super::reset_after_store_failure(shard);
    let now = now_ms();
    let prepared = on_conv(shard, &cmd.conv_id, |c| -> Result<_, ApiError> {
        let Some(g) = c.group.as_mut() else {
            return Err(ApiError::NotFound("no such group"));
        };
        let op_role = g
            .role(&cmd.operator)
            .ok_or(ApiError::Forbidden("not a member of this group"))?;
        if !cmd.add.is_empty() && op_role < ROLE_ADMIN {
            return Err(ApiError::Forbidden(
                "only the owner or an admin may add members",
            ));
        }
        if !cmd.add_admins.is_empty() && op_role < ROLE_OWNER {
            return Err(ApiError::Forbidden("only the owner may name admins"));
        }
        for r in &cmd.remove {
            match g.role(r) {
                None => {}
                Some(ROLE_OWNER) if *r == cmd.operator => {
                    return Err(ApiError::invalid("the owner cannot leave the group"))
                }
                Some(ROLE_OWNER) => return Err(ApiError::Forbidden("the owner cannot be removed")),
                Some(_) if *r == cmd.operator => {}
                Some(role) if role >= ROLE_ADMIN && op_role < ROLE_OWNER => {
                    return Err(ApiError::Forbidden("only the owner may remove an admin"))
                }
                Some(_) if op_role < ROLE_ADMIN => {
                    return Err(ApiError::Forbidden(
                        "only the owner or an admin may remove members",
                    ))
                }
                Some(_) => {}
            }
        }
        for a in &cmd.add_admins {
            if !g.is_member(a) && !cmd.add.contains(a) {
                return Err(ApiError::invalid("add_admins must name members"));
            }
        }
        // Everyone who should hear of the change: members before it and those added.
        let before: Vec<UserId> = g.roles.keys().cloned().collect();
        let mut write = WriteSet::new();
        let (mut added, mut removed, mut admins) = (Vec::new(), Vec::new(), Vec::new());
        for a in &cmd.add {
            if !g.is_member(a) {
                g.roles.insert(UserId::from(a.as_str()), ROLE_MEMBER);
                write.member(
                    &cmd.conv_id,
                    a,
                    &MemberRecord {
                        role: ROLE_MEMBER,
                        joined_at: now,
                    },
                );
                added.push(a.clone());
            }
        }
        for r in &cmd.remove {
            if g.roles.remove(r.as_str()).is_some() {
                write.remove_member(&cmd.conv_id, r);
                removed.push(r.clone());
            }
        }
        for a in &cmd.add_admins {
            if g.role(a) == Some(ROLE_MEMBER) {
                g.roles.insert(UserId::from(a.as_str()), ROLE_ADMIN);
                write.member(
                    &cmd.conv_id,
                    a,
                    &MemberRecord {
                        role: ROLE_ADMIN,
                        joined_at: now,
                    },
                );
                admins.push(a.clone());
            }
        }
        g.rebuild_list(shard.n);
        let after = g.sorted_members();
        let grown = added.len() * cache::MEMBER_BYTES;
        c.charged += grown;
        cache::grow(shard, grown);
        if added.is_empty() && removed.is_empty() && admins.is_empty() {
            return Ok((None, after));
        }
        let fanout = split_by_shard(
            shard.n,
            before
                .into_iter()
                .chain(added.iter().map(|a| UserId::from(a.as_str()))),
        );
        let seq = c.next_seq;
        c.next_seq += 1;
        let msg = system_message(
            &cmd.conv_id,
            seq,
            &cmd.operator,
            MSG_MEMBERS_CHANGED,
            serde_json::json!({"event": "members_changed", "operator": cmd.operator,
                "added_count": added.len(), "added": capped(&added),
                "removed_count": removed.len(), "removed": capped(&removed),
                "admins": capped(&admins), "member_count": after.len()}),
        );
        let change = Change {
            write,
            msg,
            fanout: Rc::new(fanout),
            removed,
            joined: added.clone(),
        };
        Ok((Some(change), after))
    })
    .await;
    let (change, after) = match prepared.and_then(|r| r) {
        Ok(v) => v,
        Err(e) => return shard.reply(reply, Err(e)),
    };
    let body = UpdateGroupMembersResponse { members: after };
    match change {
        None => shard.reply(reply, Ok(body)),
        Some(change) => commit(shard, reply, change, cmd.device, body),
    }
}
