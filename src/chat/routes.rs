//! Cluster mode: pushes travel on Redis pub/sub channels and reach only the nodes that
//! hold a device of a recipient, once per subscribed shard, encoded once.
//!
//! # Channels
//! - `imshard:u:{user}`: what concerns one user: p2p messages, notices (recall, read
//!   marks of the user's other devices), and the user's group membership changes.
//! - `imshard:g:{conv_id}`: a group's messages and recall notices.
//!
//! Each shard holds one subscribed connection ([`crate::store::channels`]). It holds
//! `u:{user}` while a device of the user is connected to it, and `g:{conv}` while one
//! of those users is a member of group `conv` (the groups are read from the store
//! on connect and kept current by the `joined` / `left` events the group's owner
//! publishes on `u:{member}`). The payload is a [`ChannelPush`]: the frame and whom not
//! to write it to.
//!
//! # What is not guaranteed
//! Pub/sub is at most once. A push published while the shard was not yet subscribed
//! (the first moments of a connection, a membership change being learnt) or while its
//! subscription was down is lost; everything pushed was stored first, so clients pull
//! by seq: after connecting, as always, and after a `RESYNC` notice, which every
//! connection of a shard gets when its subscription is back after a break.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::{Rc, Weak};

use bytes::Bytes;
use prost::Message as _;

use super::fanout::UserId;
use super::Shard;
use crate::ids::ConvRef;
use crate::proto::envelope::{kind, notice_frame};
use crate::proto::node_pb::ChannelPush;
use crate::proto::pb::ResyncNotice;
use crate::store::channels::{ChannelEvent, Channels, PublishStats};

/// The channel of a user's own pushes.
pub fn user_channel(user: &str) -> Vec<u8> {
    format!("imshard:u:{user}").into_bytes()
}

/// The channel of a group's pushes.
pub fn group_channel(conv_id: &str) -> Vec<u8> {
    format!("imshard:g:{conv_id}").into_bytes()
}

/// One shard's subscriptions and what they are for.
pub struct Routes {
    channels: Channels,
    /// Group conv_id -> the users connected to this shard who are members.
    groups: RefCell<HashMap<String, HashSet<UserId>>>,
    /// User -> the groups it was filed under in `groups` (to undo on disconnect).
    user_groups: RefCell<HashMap<UserId, HashSet<String>>>,
    pub published: Rc<PublishStats>,
    pub received: Cell<u64>,
    pub resyncs: Cell<u64>,
}

impl Routes {
    /// Opens this shard's subscription (on the store's Redis).
    pub fn start(shard: &Rc<Shard>) -> Result<Routes, crate::store::StoreError> {
        let weak: Weak<Shard> = Rc::downgrade(shard);
        let channels =
            shard
                .store
                .channels(&shard.cfg.redis_url, shard.cfg.redis_timeout, move |ev| {
                    if let Some(shard) = weak.upgrade() {
                        on_event(&shard, ev);
                    }
                })?;
        Ok(Routes {
            channels,
            groups: RefCell::new(HashMap::new()),
            user_groups: RefCell::new(HashMap::new()),
            published: Rc::default(),
            received: Cell::new(0),
            resyncs: Cell::new(0),
        })
    }

    /// Channels held now.
    pub fn held(&self) -> usize {
        self.channels.held()
    }
}

fn routes(shard: &Shard) -> Option<&Routes> {
    shard.node.get().and_then(|n| n.routes.get())
}

/// A user's first device connected to this shard: subscribe to the user's channel and
/// to the groups the user is a member of (read from the user's rows in the store).
pub fn user_connected(shard: &Rc<Shard>, user: &str) {
    let Some(r) = routes(shard) else { return };
    let id = UserId::from(user);
    if r.user_groups.borrow().contains_key(&id) {
        return;
    }
    r.user_groups
        .borrow_mut()
        .insert(id.clone(), HashSet::new());
    r.channels.subscribe(user_channel(user));
    let shard = shard.clone();
    monoio::spawn(async move {
        // Written with the group's member records, so a group that exists is there.
        let groups = match shard.store.groups_of(&id).await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(user = %id, error = %e, "cannot read a user's groups; group pushes wait for a pull");
                return;
            }
        };
        for conv_id in groups {
            join(&shard, &id, &conv_id);
        }
    });
}

/// A user's last device on this shard left: drop its subscriptions.
pub fn user_disconnected(shard: &Rc<Shard>, user: &str) {
    let Some(r) = routes(shard) else { return };
    let Some(groups) = r.user_groups.borrow_mut().remove(user) else {
        return;
    };
    r.channels.unsubscribe(&user_channel(user));
    for conv_id in groups {
        leave_group(r, user, &conv_id);
    }
}

/// Files a connected user under group `conv_id` (subscribing when first).
fn join(shard: &Rc<Shard>, user: &UserId, conv_id: &str) {
    let Some(r) = routes(shard) else { return };
    let mut ug = r.user_groups.borrow_mut();
    let Some(mine) = ug.get_mut(user) else {
        // Disconnected meanwhile.
        return;
    };
    mine.insert(conv_id.to_string());
    let mut groups = r.groups.borrow_mut();
    let members = groups.entry(conv_id.to_string()).or_default();
    if members.is_empty() {
        r.channels.subscribe(group_channel(conv_id));
    }
    members.insert(user.clone());
}

fn leave_group(r: &Routes, user: &str, conv_id: &str) {
    let mut groups = r.groups.borrow_mut();
    if let Some(members) = groups.get_mut(conv_id) {
        members.remove(user);
        if members.is_empty() {
            groups.remove(conv_id);
            r.channels.unsubscribe(&group_channel(conv_id));
        }
    }
}

/// Publishes a stored message's push (the owner of its conversation calls this once
/// per message): on the group's channel, or on each party's channel for p2p. `joined`
/// members of a group hear of it on their own channel (with the news that they are
/// members now); `left` ones get it on the group channel, then are dropped from it.
pub fn publish_push(
    shard: &Rc<Shard>,
    conv_id: &str,
    frame: &Bytes,
    sender: &str,
    sender_device: &str,
    joined: &[String],
    left: &[String],
) {
    let Some(ctx) = shard.node.get() else { return };
    let Some(r) = ctx.routes.get() else { return };
    let push = |left: Vec<String>, joined: bool| ChannelPush {
        frame: frame.clone(),
        conv_id: conv_id.to_string(),
        except_user: sender.to_string(),
        except_device: sender_device.to_string(),
        left,
        joined,
        left_user: false,
    };
    match ConvRef::parse(conv_id) {
        Ok(ConvRef::Group { .. }) => {
            let payload = Bytes::from(push(left.to_vec(), false).encode_to_vec());
            shard
                .store
                .publish(group_channel(conv_id), payload, &r.published);
            if !joined.is_empty() {
                let payload = Bytes::from(push(Vec::new(), true).encode_to_vec());
                for u in joined {
                    shard
                        .store
                        .publish(user_channel(u), payload.clone(), &r.published);
                }
            }
        }
        Ok(ConvRef::P2p { a, b }) => {
            let payload = Bytes::from(push(Vec::new(), false).encode_to_vec());
            for u in [a, b] {
                shard
                    .store
                    .publish(user_channel(u), payload.clone(), &r.published);
            }
        }
        Err(_) => {}
    }
}

/// Publishes a notice frame for these users' devices (on their own channels), or for
/// a group's members (on the group channel); `except` (user, device) gets none.
pub fn publish_notice(
    shard: &Rc<Shard>,
    frame: &Bytes,
    conv_id: Option<&str>,
    users: &[UserId],
    except: Option<(&str, &str)>,
) {
    let Some(ctx) = shard.node.get() else { return };
    let Some(r) = ctx.routes.get() else { return };
    let payload = |conv: &str| {
        Bytes::from(
            ChannelPush {
                frame: frame.clone(),
                conv_id: conv.to_string(),
                except_user: except.map_or(String::new(), |e| e.0.to_string()),
                except_device: except.map_or(String::new(), |e| e.1.to_string()),
                ..ChannelPush::default()
            }
            .encode_to_vec(),
        )
    };
    match conv_id {
        Some(c) if matches!(ConvRef::parse(c), Ok(ConvRef::Group { .. })) => {
            shard
                .store
                .publish(group_channel(c), payload(c), &r.published);
        }
        _ => {
            let p = payload(conv_id.unwrap_or(""));
            for u in users {
                shard
                    .store
                    .publish(user_channel(u), p.clone(), &r.published);
            }
        }
    }
}

fn on_event(shard: &Rc<Shard>, ev: ChannelEvent) {
    let Some(r) = routes(shard) else { return };
    match ev {
        ChannelEvent::Message { channel, payload } => {
            r.received.set(r.received.get() + 1);
            let Ok(push) = ChannelPush::decode(payload) else {
                tracing::warn!("a channel message that is not a ChannelPush");
                return;
            };
            let channel = String::from_utf8_lossy(&channel);
            if let Some(user) = channel.strip_prefix("imshard:u:") {
                on_user_push(shard, r, user, push);
            } else if let Some(conv) = channel.strip_prefix("imshard:g:") {
                on_group_push(shard, r, conv, push);
            }
        }
        ChannelEvent::Lost => {}
        ChannelEvent::Resumed => {
            r.resyncs.set(r.resyncs.get() + 1);
            let frame = notice_frame(
                kind::RESYNC,
                &ResyncNotice {
                    reason: "subscription_restored".into(),
                },
            );
            for c in crate::shard::Service::conns(&***shard) {
                c.send(shard, frame.clone());
            }
        }
    }
}

fn write_to(shard: &Rc<Shard>, user: &str, push: &ChannelPush) {
    if push.frame.is_empty() {
        return;
    }
    for c in super::user::devices(shard, user) {
        if *c.user == *push.except_user && *c.device == *push.except_device {
            continue;
        }
        shard.stats.pushes.set(shard.stats.pushes.get() + 1);
        c.send(shard, push.frame.clone());
    }
}

fn on_user_push(shard: &Rc<Shard>, r: &Routes, user: &str, push: ChannelPush) {
    write_to(shard, user, &push);
    if push.joined {
        join(shard, &UserId::from(user), &push.conv_id);
    } else if push.left_user {
        if let Some(g) = r.user_groups.borrow_mut().get_mut(user) {
            g.remove(&push.conv_id);
        }
        leave_group(r, user, &push.conv_id);
    }
}

fn on_group_push(shard: &Rc<Shard>, r: &Routes, conv_id: &str, push: ChannelPush) {
    let members: Vec<UserId> = r
        .groups
        .borrow()
        .get(conv_id)
        .map(|m| m.iter().cloned().collect())
        .unwrap_or_default();
    for u in &members {
        write_to(shard, u, &push);
    }
    for u in &push.left {
        if members.iter().any(|m| **m == **u) {
            if let Some(g) = r.user_groups.borrow_mut().get_mut(u.as_str()) {
                g.remove(conv_id);
            }
            leave_group(r, u, conv_id);
        }
    }
}
