//! Cluster mode: pushes travel on Redis pub/sub channels and reach only the nodes that
//! hold a device of a recipient, once per node, encoded once.
//!
//! # Channels
//! - `imshard:u:{user}`: what concerns one user: p2p messages, notices (recall, read
//!   marks of the user's other devices), and the user's group membership changes.
//! - `imshard:g:{conv_id}`: a group's messages and recall notices.
//!
//! Each node holds one subscribed connection, on shard 0
//! ([`crate::store::channels`]): Redis delivers a message once per node, shard 0
//! decodes it once and hands it to the shards that asked for its channel. A shard asks
//! for `u:{user}` while a device of the user is connected to it, and for `g:{conv}`
//! while one of those users is a member of group `conv` (a user's groups are read from
//! the store on connect, `im:{user}:gs`, and kept current by the `joined` / `left`
//! events the group's owner publishes on `u:{member}`). The payload is a
//! [`ChannelPush`]: the frame and whom not to write it to.
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

/// One shard's routes: what its connected users need, and on shard 0 the node's one
/// subscription.
pub struct Routes {
    /// Shard 0 only: the node's subscription, and which shards want each channel.
    node: Option<NodeSubscription>,
    /// Group conv_id -> the users connected to this shard who are members.
    groups: RefCell<HashMap<String, HashSet<UserId>>>,
    /// User -> the groups it was filed under in `groups` (to undo on disconnect).
    user_groups: RefCell<HashMap<UserId, HashSet<String>>>,
    pub published: Rc<PublishStats>,
    /// Channel messages this shard got (from shard 0, or read by shard 0 itself).
    pub received: Cell<u64>,
    pub resyncs: Cell<u64>,
}

/// The node's subscription (on shard 0): Redis delivers each message once per node;
/// shard 0 decodes it once and hands it to the shards that asked for the channel.
struct NodeSubscription {
    channels: Channels,
    /// Channel -> the shards that hold a user (or group member) it is for.
    wanted: RefCell<HashMap<Vec<u8>, Vec<usize>>>,
    /// Messages read from Redis (once per node).
    read: Cell<u64>,
}

impl Routes {
    /// This shard's routes; shard 0 also opens the node's subscription (on the store's
    /// Redis).
    pub fn start(shard: &Rc<Shard>) -> Result<Routes, crate::store::StoreError> {
        let node = if shard.id == 0 {
            let weak: Weak<Shard> = Rc::downgrade(shard);
            let channels =
                shard
                    .store
                    .channels(&shard.cfg.redis_url, shard.cfg.redis_timeout, move |ev| {
                        if let Some(shard) = weak.upgrade() {
                            on_event(&shard, ev);
                        }
                    })?;
            Some(NodeSubscription {
                channels,
                wanted: RefCell::new(HashMap::new()),
                read: Cell::new(0),
            })
        } else {
            None
        };
        Ok(Routes {
            node,
            groups: RefCell::new(HashMap::new()),
            user_groups: RefCell::new(HashMap::new()),
            published: Rc::default(),
            received: Cell::new(0),
            resyncs: Cell::new(0),
        })
    }

    /// Channels the node subscribes to (shard 0; 0 on the other shards).
    pub fn held(&self) -> usize {
        self.node.as_ref().map_or(0, |n| n.channels.held())
    }

    /// Messages the node read from its subscription (shard 0; 0 on the others).
    pub fn read(&self) -> u64 {
        self.node.as_ref().map_or(0, |n| n.read.get())
    }
}

/// This shard wants (or no longer wants) `channel`: tells shard 0, which subscribes
/// while any shard wants it.
fn want(shard: &Rc<Shard>, channel: Vec<u8>, on: bool) {
    let from = shard.id;
    shard.post(0, move |s| {
        let Some(n) = routes(s).and_then(|r| r.node.as_ref()) else {
            return;
        };
        let mut wanted = n.wanted.borrow_mut();
        if on {
            let shards = wanted.entry(channel.clone()).or_default();
            if shards.is_empty() {
                n.channels.subscribe(channel);
            }
            if !shards.contains(&from) {
                shards.push(from);
            }
        } else if let Some(shards) = wanted.get_mut(&channel) {
            shards.retain(|t| *t != from);
            if shards.is_empty() {
                wanted.remove(&channel);
                n.channels.unsubscribe(&channel);
            }
        }
    });
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
    want(shard, user_channel(user), true);
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
    want(shard, user_channel(user), false);
    for conv_id in groups {
        leave_group(shard, r, user, &conv_id);
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
        want(shard, group_channel(conv_id), true);
    }
    members.insert(user.clone());
}

fn leave_group(shard: &Rc<Shard>, r: &Routes, user: &str, conv_id: &str) {
    let mut groups = r.groups.borrow_mut();
    if let Some(members) = groups.get_mut(conv_id) {
        members.remove(user);
        if members.is_empty() {
            groups.remove(conv_id);
            want(shard, group_channel(conv_id), false);
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

/// The node's subscription reported something (on shard 0): a message goes, decoded
/// once, to every shard that wants its channel; a restored subscription makes every
/// shard tell its connections to resync.
fn on_event(shard: &Rc<Shard>, ev: ChannelEvent) {
    let Some(n) = routes(shard).and_then(|r| r.node.as_ref()) else {
        return;
    };
    match ev {
        ChannelEvent::Message { channel, payload } => {
            n.read.set(n.read.get() + 1);
            let Ok(push) = ChannelPush::decode(payload) else {
                tracing::warn!("a channel message that is not a ChannelPush");
                return;
            };
            let Ok(channel) = String::from_utf8(channel.to_vec()) else {
                return;
            };
            let shards = n
                .wanted
                .borrow()
                .get(channel.as_bytes())
                .cloned()
                .unwrap_or_default();
            for t in shards {
                let (channel, push) = (channel.clone(), push.clone());
                shard.post(t, move |s| on_push(s, &channel, push));
            }
        }
        ChannelEvent::Lost => {}
        ChannelEvent::Resumed => {
            for t in 0..shard.n {
                shard.post(t, resync);
            }
        }
    }
}

/// Every connection of this shard may have missed pushes: RESYNC.
fn resync(shard: &Rc<Shard>) {
    let Some(r) = routes(shard) else { return };
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

/// A channel message for this shard's users.
fn on_push(shard: &Rc<Shard>, channel: &str, push: ChannelPush) {
    let Some(r) = routes(shard) else { return };
    r.received.set(r.received.get() + 1);
    if let Some(user) = channel.strip_prefix("imshard:u:") {
        on_user_push(shard, r, user, push);
    } else if let Some(conv) = channel.strip_prefix("imshard:g:") {
        on_group_push(shard, r, conv, push);
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
        leave_group(shard, r, user, &push.conv_id);
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
            leave_group(shard, r, u, conv_id);
        }
    }
}
