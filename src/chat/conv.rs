//! The conversation side, on the conversation's shard: the seq counter, the dedupe of
//! (sender, client_msg_id), the durable write of a message, its fan-out, and pulls.
//!
//! Invariants (per conversation, all on this shard's thread):
//! - `next_seq - 1` is the highest seq handed out; seqs go to the store in that order.
//! - `durable_seq` is the highest seq whose write is durable; pulls never see past it.
//! - A send whose (sender, client_msg_id) is in flight waits for the first and gets the
//!   same answer; one that is durable is answered from the store's dedupe record.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use bytes::Bytes;

use super::fanout::{Delivery, Notice, Recipients, UserId};
use super::Shard;
use super::{cache, ByIdsCmd, PullCmd, RecallCmd, SendCmd};
use crate::codes::ApiError;
use crate::ids::ConvRef;
use crate::limits::DEDUPE_WINDOW_MS;
use crate::proto::envelope::{kind, notice_frame, now_ms, push_frame};
use crate::proto::pb::{
    ConvType, GetMessagesByIdsResponse, MsgItem, PullMessagesResponse, RecallMessageResponse,
    RecallNotice, SendMessageResponse,
};
use crate::proto::store_pb::{ConvSummary, DedupeRecord};
use crate::shard::msg::ReplyTo;

/// The answer to a send: what the sender's shard gets back.
pub type Sent = Result<SendMessageResponse, ApiError>;
/// The answer to a recall.
pub type Recalled = Result<RecallMessageResponse, ApiError>;
use crate::store::WriteSet;

/// Fan-out goes to at most this many recipients per step; the shard serves others
/// between steps, so a 100,000-member group never stalls its loop.
pub const FANOUT_CHUNK: usize = 1024;

/// A conversation this shard owns, as far as it was touched since start. It is in
/// the shard's map from the first operation on; its seq counter and members are known
/// once `ready` (loaded from the store on the reader thread).
pub struct ConvState {
    /// Whether the fields below were loaded; until then operations wait in `loading`.
    ready: bool,
    /// The load in progress (0: none), so that only that load fills the state in.
    load_token: u64,
    /// Tasks waiting for the load.
    loading: Vec<Waker>,
    /// The seq the next message gets.
    pub(crate) next_seq: i64,
    /// The highest seq that is durable.
    pub(crate) durable_seq: i64,
    /// Sends in flight by (sender, client_msg_id), with callers waiting for the same.
    in_flight: HashMap<(String, String), Vec<ReplyTo<Sent>>>,
    /// Sends waiting for their seq, in arrival order; one task (`drive_sends`) serves
    /// them, so seqs follow arrival order even though dedupe reads wait for the store.
    sends: VecDeque<(ReplyTo<Sent>, SendCmd)>,
    sending: bool,
    /// Members and roles, for group conversations that exist.
    pub(crate) group: Option<Box<super::group::GroupState>>,
    /// Deliveries waiting for their turn, in seq order; one task drains them.
    fanout: VecDeque<FanoutJob>,
    fanout_running: bool,
    /// Bytes charged to the shard's cache for this state, and whether it was used
    /// since the eviction hand last passed.
    pub(crate) charged: usize,
    pub(crate) used: bool,
}

impl ConvState {
    fn unloaded() -> ConvState {
        ConvState {
            ready: false,
            load_token: 0,
            loading: Vec::new(),
            next_seq: 0,
            durable_seq: 0,
            in_flight: HashMap::new(),
            sends: VecDeque::new(),
            sending: false,
            group: None,
            fanout: VecDeque::new(),
            fanout_running: false,
            charged: 0,
            used: true,
        }
    }

    /// Bytes charged to the cache for this state.
    pub fn charged(&self) -> usize {
        self.charged
    }

    /// Nothing is queued, in flight or waiting, and every assigned seq is durable: a
    /// reload from the store would give the same state.
    fn idle(&self) -> bool {
        self.ready
            && self.sends.is_empty()
            && !self.sending
            && self.in_flight.is_empty()
            && self.fanout.is_empty()
            && !self.fanout_running
            && self.loading.is_empty()
            && self.next_seq - 1 == self.durable_seq
    }

    /// Fan-out jobs queued behind this conversation.
    pub fn queued_fanout(&self) -> usize {
        self.fanout.len()
    }

    /// Callers waiting for sends (answered with an error on a store reset); wakes the
    /// tasks waiting for the load (they load again).
    pub fn into_waiters(self) -> impl Iterator<Item = ReplyTo<Sent>> {
        for w in self.loading {
            w.wake();
        }
        let queued: Vec<ReplyTo<Sent>> = self.sends.into_iter().map(|(r, _)| r).collect();
        self.in_flight.into_values().flatten().chain(queued)
    }
}

/// Recipients by owner shard (index = shard id), each list shared by reference.
pub type ByShard = Rc<Vec<Arc<[UserId]>>>;

/// Groups users by the shard that owns them: done once per membership change for a
/// group, so a message's fan-out costs one ring message per shard, not per member.
pub fn split_by_shard(n: usize, users: impl IntoIterator<Item = UserId>) -> Vec<Arc<[UserId]>> {
    let mut by_shard: Vec<Vec<UserId>> = vec![Vec::new(); n];
    for u in users {
        by_shard[crate::shard::shard_of_user(&u, n)].push(u);
    }
    by_shard.into_iter().map(Arc::from).collect()
}

/// One message to deliver to `targets`, except the sending device.
pub(crate) struct FanoutJob {
    pub frame: Bytes,
    pub conv_id: String,
    pub seq: i64,
    pub send_time: i64,
    pub sender: String,
    pub sender_device: String,
    pub targets: ByShard,
    /// Members this message removes (their rows stop at its seq).
    pub left: Vec<String>,
}

/// Makes sure the conversation's state is loaded: its seq counter continues after the
/// highest stored seq, and a group's members come with it. The reads run on the reader
/// thread; tasks asking meanwhile wait for the same load.
pub(crate) async fn load_conv(shard: &Rc<Shard>, conv_id: &str) -> Result<(), ApiError> {
    loop {
        let must_load = {
            let mut convs = shard.convs.borrow_mut();
            let c = match convs.get_mut(conv_id) {
                Some(c) => c,
                None => convs
                    .entry(conv_id.to_string())
                    .or_insert_with(ConvState::unloaded),
            };
            if c.ready {
                return Ok(());
            }
            // The first asker loads; the others wait for it.
            if c.load_token == 0 {
                c.load_token = next_load_token();
                Some(c.load_token)
            } else {
                None
            }
        };
        let Some(token) = must_load else {
            // Wait for the load another task is doing, then look again.
            std::future::poll_fn(|cx| {
                let mut convs = shard.convs.borrow_mut();
                match convs.get_mut(conv_id) {
                    Some(c) if !c.ready => {
                        c.loading.push(cx.waker().clone());
                        Poll::Pending
                    }
                    _ => Poll::Ready(()),
                }
            })
            .await;
            continue;
        };
        let epoch = shard.conv_epoch.get();
        let loaded = async {
            let max = shard.store.max_seq(conv_id).await?;
            let group = if conv_id.starts_with(crate::ids::GROUP_CONV_PREFIX) {
                super::group::load(shard, conv_id).await?
            } else {
                None
            };
            Ok::<_, ApiError>((max, group))
        }
        .await;
        let mut convs = shard.convs.borrow_mut();
        let Some(c) = convs.get_mut(conv_id).filter(|c| c.load_token == token) else {
            // Our entry was dropped (a store failure) and another task may be loading
            // a new one: look again.
            continue;
        };
        if shard.conv_epoch.get() != epoch {
            // The shard dropped conversations meanwhile (a store failure): what was
            // read may be older than what a new load sees. Load again.
            c.load_token = 0;
            continue;
        }
        for w in c.loading.drain(..) {
            w.wake();
        }
        match loaded {
            Ok((max, group)) => {
                let members = group.as_ref().map_or(0, |g| g.member_count());
                c.ready = true;
                c.next_seq = max + 1;
                c.durable_seq = max;
                c.group = group;
                c.charged = cache::CONV_BYTES + members * cache::MEMBER_BYTES;
                let charged = c.charged;
                drop(convs);
                cache::admit(shard, cache::CacheKey::Conv(conv_id.into()), charged);
                return Ok(());
            }
            Err(e) => {
                // Nothing is known: forget the entry; queued sends get the error.
                if let Some(c) = convs.remove(conv_id) {
                    for (reply, _) in c.sends {
                        shard.reply(reply, Err(e.clone()));
                    }
                }
                return Err(e);
            }
        }
    }
}

fn next_load_token() -> u64 {
    thread_local! {
        static TOKENS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    TOKENS.with(|t| {
        t.set(t.get() + 1);
        t.get()
    })
}

/// Runs `f` on a loaded conversation's state ([`load_conv`] first).
pub(crate) fn with_conv<R>(
    shard: &Shard,
    conv_id: &str,
    f: impl FnOnce(&mut ConvState) -> R,
) -> Result<R, ApiError> {
    match shard.convs.borrow_mut().get_mut(conv_id) {
        Some(c) if c.ready => {
            c.used = true;
            Ok(f(c))
        }
        _ => Err(ApiError::StoreUnavailable(
            "the conversation was dropped after a store failure; retry".into(),
        )),
    }
}

/// Loads the conversation, then runs `f` on its state.
pub(crate) async fn on_conv<R>(
    shard: &Rc<Shard>,
    conv_id: &str,
    f: impl FnOnce(&mut ConvState) -> R,
) -> Result<R, ApiError> {
    load_conv(shard, conv_id).await?;
    with_conv(shard, conv_id, f)
}

/// The eviction hand at a conversation (see [`cache`]).
pub(crate) fn visit_for_eviction(shard: &Shard, conv_id: &str) -> cache::Visit {
    let mut convs = shard.convs.borrow_mut();
    let Some(c) = convs.get_mut(conv_id) else {
        return cache::Visit::Gone;
    };
    if !c.ready {
        // Dropped and asked for again since: its own load queues it again.
        return cache::Visit::Gone;
    }
    if std::mem::replace(&mut c.used, false) || !c.idle() {
        return cache::Visit::Keep;
    }
    let charged = c.charged;
    convs.remove(conv_id);
    cache::release(shard, charged);
    cache::Visit::Evicted
}

fn sent(msg_id: &str, conv_id: &str, seq: i64, send_time: i64) -> SendMessageResponse {
    SendMessageResponse {
        msg_id: msg_id.to_string(),
        conv_id: conv_id.to_string(),
        seq,
        send_time,
    }
}

/// Queues a send behind the conversation's earlier ones; the conversation's send task
/// stores it (dedupe, seq, durable write), answers after it is durable, then pushes it.
pub fn handle_send(shard: &Rc<Shard>, reply: ReplyTo<Sent>, cmd: SendCmd) {
    super::reset_after_store_failure(shard);
    let start = {
        let mut convs = shard.convs.borrow_mut();
        let c = match convs.get_mut(cmd.conv_id.as_str()) {
            Some(c) => c,
            None => convs
                .entry(cmd.conv_id.clone())
                .or_insert_with(ConvState::unloaded),
        };
        let conv_id = cmd.conv_id.clone();
        c.sends.push_back((reply, cmd));
        (!std::mem::replace(&mut c.sending, true)).then_some(conv_id)
    };
    if let Some(conv_id) = start {
        monoio::spawn(drive_sends(shard.clone(), conv_id));
    }
}

/// Serves a conversation's queued sends in arrival order: loads the conversation,
/// reads the dedupe records of every queued send with a client_msg_id in one go,
/// then answers resends and assigns seqs, staging each new message.
async fn drive_sends(shard: Rc<Shard>, conv_id: String) {
    loop {
        if let Err(e) = load_conv(&shard, &conv_id).await {
            tracing::debug!(conv = %conv_id, error = %e, "sends failed: conversation not loaded");
            // load_conv answered the queued sends and dropped the entry.
            return;
        }
        let batch: Vec<(ReplyTo<Sent>, SendCmd)> = {
            let mut convs = shard.convs.borrow_mut();
            let Some(c) = convs.get_mut(&conv_id) else {
                return;
            };
            if c.sends.is_empty() {
                c.sending = false;
                return;
            }
            c.sends.drain(..).collect()
        };
        // Sends whose key is in flight wait for the first; the others are marked.
        let mut lookups: Vec<(String, String)> = Vec::new();
        let mut fresh: Vec<(ReplyTo<Sent>, SendCmd)> = Vec::with_capacity(batch.len());
        let marked = with_conv(&shard, &conv_id, |c| {
            for (reply, cmd) in batch {
                if cmd.client_msg_id.is_empty() {
                    fresh.push((reply, cmd));
                    continue;
                }
                let key = (cmd.sender.clone(), cmd.client_msg_id.clone());
                if let Some(waiters) = c.in_flight.get_mut(&key) {
                    waiters.push(reply);
                } else {
                    c.in_flight.insert(key.clone(), Vec::new());
                    lookups.push(key);
                    fresh.push((reply, cmd));
                }
            }
        });
        if marked.is_err() {
            // Dropped by a store reset meanwhile: its waiters were answered.
            continue;
        }
        let records = if lookups.is_empty() {
            Ok(Vec::new())
        } else {
            shard.store.dedupe_many(&conv_id, lookups).await
        };
        let records = match records {
            Ok(r) => r,
            Err(e) => {
                let err = ApiError::from(e);
                for (reply, cmd) in fresh {
                    answer_key(&shard, &conv_id, &cmd, reply, Err(err.clone()));
                }
                continue;
            }
        };
        let mut records = records.into_iter();
        for (reply, cmd) in fresh {
            if !cmd.client_msg_id.is_empty() {
                let rec = records.next().flatten();
                if let Some(rec) = rec.filter(|r| now_ms() - r.send_time < DEDUPE_WINDOW_MS) {
                    let body = sent(&rec.msg_id, &conv_id, rec.seq, rec.send_time);
                    answer_key(&shard, &conv_id, &cmd, reply, Ok(body));
                    continue;
                }
            }
            store_new(&shard, reply, cmd);
        }
    }
}

/// Answers a send with a client_msg_id, and every send waiting for the same key.
fn answer_key(shard: &Rc<Shard>, conv_id: &str, cmd: &SendCmd, reply: ReplyTo<Sent>, r: Sent) {
    let key = (cmd.sender.clone(), cmd.client_msg_id.clone());
    let waiters = shard
        .convs
        .borrow_mut()
        .get_mut(conv_id)
        .and_then(|c| c.in_flight.remove(&key))
        .unwrap_or_default();
    if let Err(ApiError::StoreUnavailable(_)) = &r {
        super::reset_after_store_failure(shard);
    }
    for w in waiters {
        shard.reply(w, r.clone());
    }
    shard.reply(reply, r);
}

/// Assigns the next seq to a new message and stages it; answers and pushes once it
/// is durable.
fn store_new(shard: &Rc<Shard>, reply: ReplyTo<Sent>, cmd: SendCmd) {
    let has_key = !cmd.client_msg_id.is_empty();
    let dedupe_key = (cmd.sender.clone(), cmd.client_msg_id.clone());
    let assigned = with_conv(shard, &cmd.conv_id, |c| {
        let members = match (&c.group, cmd.conv_type()) {
            (_, ConvType::P2p) => Rc::new(split_by_shard(
                shard.n,
                cmd.members.iter().map(|m| UserId::from(m.as_str())),
            )),
            (Some(g), _) if g.is_member(&cmd.sender) => g.by_shard.clone(),
            (Some(_), _) => return Err(ApiError::Forbidden("not a member of this group")),
            (None, _) => return Err(ApiError::NotFound("no such group")),
        };
        let seq = c.next_seq;
        c.next_seq += 1;
        Ok((seq, members))
    });
    let (seq, members) = match assigned.and_then(|r| r) {
        Ok(v) => v,
        Err(e) if has_key => return answer_key(shard, &cmd.conv_id, &cmd, reply, Err(e)),
        Err(e) => return shard.reply(reply, Err(e)),
    };
    let send_time = now_ms();
    let msg = MsgItem {
        msg_id: ulid::Ulid::new().to_string(),
        client_msg_id: cmd.client_msg_id.clone(),
        conv_id: cmd.conv_id.clone(),
        seq,
        from_uuid: cmd.sender.clone(),
        msg_type: cmd.msg_type,
        content: cmd.content,
        status: 0,
        send_time,
        reply_to_msg_id: cmd.reply_to_msg_id,
        at_users: cmd.at_users,
    };
    let mut write = WriteSet::new();
    write.message(&msg);
    super::events::stage(shard, &mut write, |o| {
        crate::eventlog::record::message_stored(o, &msg)
    });
    if has_key {
        write.dedupe(
            &cmd.conv_id,
            &cmd.sender,
            &cmd.client_msg_id,
            &DedupeRecord {
                msg_id: msg.msg_id.clone(),
                seq,
                send_time,
            },
        );
    }
    // Reply and push run as the store reports the batch, in staging (= seq) order: a
    // task per send would run in whatever order the scheduler picks, and a recipient
    // could see seq 9 before seq 6.
    let shard2 = shard.clone();
    shard.store.stage_then(write, move |result| {
        let shard = shard2;
        let waiters = shard
            .convs
            .borrow_mut()
            .get_mut(&msg.conv_id)
            .and_then(|c| {
                if has_key {
                    c.in_flight.remove(&dedupe_key)
                } else {
                    None
                }
            })
            .unwrap_or_default();
        match result {
            Ok(()) => {
                if let Some(c) = shard.convs.borrow_mut().get_mut(&msg.conv_id) {
                    c.durable_seq = c.durable_seq.max(seq);
                }
                shard
                    .stats
                    .messages_stored
                    .set(shard.stats.messages_stored.get() + 1);
                super::events::notify(&shard);
                if super::events::origin(&shard).is_some() {
                    let recipients: Vec<String> = members
                        .iter()
                        .flat_map(|l| l.iter().map(|u| u.to_string()))
                        .collect();
                    super::events::offline_pushes(&shard, &msg, recipients);
                }
                // The deliveries go before the reply on the same rings, so the sender's
                // own row shows the message by the time the reply reaches them (a
                // GetConversations right after a send lists it). That holds for a
                // fan-out that goes out at once (small, nothing queued: every 1:1
                // message); a big group's queued chunks, or a row on another node,
                // may be updated after the reply.
                fan_out(&shard, &msg, members, Vec::new(), &[], &cmd.sender_device);
                let body = sent(&msg.msg_id, &msg.conv_id, seq, send_time);
                shard.reply(reply, Ok(body.clone()));
                for w in waiters {
                    shard.reply(w, Ok(body.clone()));
                }
            }
            Err(e) => {
                let err = ApiError::from(e);
                shard.reply(reply, Err(err.clone()));
                for w in waiters {
                    shard.reply(w, Err(err.clone()));
                }
                super::reset_after_store_failure(&shard);
            }
        }
    });
}

/// Encodes the push once and hands it to the conversation's ordered fan-out.
pub(crate) fn fan_out(
    shard: &Rc<Shard>,
    msg: &MsgItem,
    targets: ByShard,
    left: Vec<String>,
    joined: &[String],
    sender_device: &str,
) {
    let frame = push_frame(msg);
    // Cluster mode: the push goes out once on the channels, to the nodes holding a
    // recipient's device; the deliveries below update rows only.
    super::routes::publish_push(
        shard,
        &msg.conv_id,
        &frame,
        &msg.from_uuid,
        sender_device,
        joined,
        &left,
    );
    let job = FanoutJob {
        frame,
        conv_id: msg.conv_id.clone(),
        seq: msg.seq,
        send_time: msg.send_time,
        sender: msg.from_uuid.clone(),
        sender_device: sender_device.to_string(),
        targets,
        left,
    };
    // Small fan-outs with nothing queued go out at once; others queue behind the
    // conversation's earlier messages so every member sees seq order.
    let start = {
        let mut convs = shard.convs.borrow_mut();
        match convs.get_mut(&job.conv_id) {
            Some(c) if c.fanout_running || recipients(&job.targets) > FANOUT_CHUNK => {
                c.fanout.push_back(job);
                shard.fanout_queued.set(shard.fanout_queued.get() + 1);
                !std::mem::replace(&mut c.fanout_running, true)
            }
            _ => {
                drop(convs);
                for (target, list) in job.targets.iter().enumerate() {
                    if !list.is_empty() {
                        deliver(shard, &job, target, Recipients::all(list.clone()));
                    }
                }
                return;
            }
        }
    };
    if start {
        monoio::spawn(drain_fanout(shard.clone(), msg.conv_id.clone()));
    }
}

fn recipients(targets: &ByShard) -> usize {
    targets.iter().map(|l| l.len()).sum()
}

/// Posts one Deliver of `job` to `target` for `users`.
fn deliver(shard: &Rc<Shard>, job: &FanoutJob, target: usize, users: Recipients) {
    let clustered = super::node::clustered(shard);
    let users = if clustered {
        // Rows of users other nodes own go there; ours stay.
        let here = super::node::rows_elsewhere(
            shard,
            &users,
            &job.conv_id,
            job.seq,
            job.send_time,
            &job.sender,
            &job.left,
        );
        if here.is_empty() {
            return;
        }
        Recipients::from(here)
    } else {
        users
    };
    let d = Delivery {
        frame: job.frame.clone(),
        conv_id: job.conv_id.clone(),
        seq: job.seq,
        send_time: job.send_time,
        users,
        except_user: job.sender.clone(),
        except_device: job.sender_device.clone(),
        left: job.left.clone(),
        push: !clustered,
    };
    shard.post(target, move |shard| super::user::deliver(shard, &d));
}

/// Drains a conversation's fan-out queue, one chunk of recipients per loop turn.
async fn drain_fanout(shard: Rc<Shard>, conv_id: String) {
    loop {
        let job = {
            let mut convs = shard.convs.borrow_mut();
            let Some(c) = convs.get_mut(&conv_id) else {
                return;
            };
            match c.fanout.pop_front() {
                Some(j) => {
                    shard
                        .fanout_queued
                        .set(shard.fanout_queued.get().saturating_sub(1));
                    j
                }
                None => {
                    c.fanout_running = false;
                    return;
                }
            }
        };
        for (target, list) in job.targets.iter().enumerate() {
            for start in (0..list.len()).step_by(FANOUT_CHUNK) {
                let users = Recipients::range(list.clone(), start, start + FANOUT_CHUNK);
                deliver(&shard, &job, target, users);
                crate::rt::yield_now().await;
                // A full ring slows the fan-out instead of growing the outbox.
                shard.ring_room().await;
            }
        }
    }
}

/// Answers a pull: FORWARD from anchor_seq + 1 upwards, BACKWARD the `limit` seqs just
/// below anchor_seq (0 = from the newest); ascending either way; never at or below the
/// caller's clear_seq, never past what is durable. Stops early (with `has_more`) once
/// the messages reach `pull.max_bytes`, so paging by seq gets the rest.
pub async fn handle_pull(
    shard: &Rc<Shard>,
    pull: &PullCmd,
) -> Result<PullMessagesResponse, ApiError> {
    let conv = ConvRef::parse(&pull.conv_id)?;
    load_conv(shard, &pull.conv_id).await?;
    check_member(shard, &pull.conv_id, &conv, &pull.user)?;
    let max_seq = with_conv(shard, &pull.conv_id, |c| c.durable_seq)?;
    let floor = pull.clear_seq + 1;
    let (messages, has_more) = if pull.backward {
        let hi = if pull.anchor_seq == 0 {
            max_seq
        } else {
            (pull.anchor_seq - 1).min(max_seq)
        };
        let lo = floor.max(1);
        let msgs = shard
            .store
            .messages(
                &pull.conv_id,
                lo,
                hi,
                pull.limit as usize,
                true,
                pull.max_bytes as usize,
            )
            .await?;
        let more = msgs.first().is_some_and(|m| m.seq > lo);
        (msgs, more)
    } else {
        let lo = (pull.anchor_seq + 1).max(floor);
        let msgs = shard
            .store
            .messages(
                &pull.conv_id,
                lo,
                max_seq,
                pull.limit as usize,
                false,
                pull.max_bytes as usize,
            )
            .await?;
        let more = msgs.last().is_some_and(|m| m.seq < max_seq);
        (msgs, more)
    };
    Ok(PullMessagesResponse {
        messages,
        has_more,
        max_seq,
    })
}

/// The caller must be a party of the conversation (p2p: named in the conv_id; group:
/// a current member). The conversation is loaded ([`load_conv`]).
fn check_member(
    shard: &Shard,
    conv_id: &str,
    conv: &ConvRef<'_>,
    user: &str,
) -> Result<(), ApiError> {
    let ok = match conv {
        ConvRef::P2p { .. } => conv.p2p_has(user),
        ConvRef::Group { .. } => with_conv(shard, conv_id, |c| match &c.group {
            Some(g) => Ok(g.is_member(user)),
            None => Err(ApiError::NotFound("no such group")),
        })??,
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::Forbidden("not a member of this conversation"))
    }
}

/// Members who receive a conversation's notices, by owner shard.
fn members_of(shard: &Shard, conv_id: &str, conv: &ConvRef<'_>) -> ByShard {
    match conv {
        ConvRef::P2p { a, b } => Rc::new(split_by_shard(
            shard.n,
            [UserId::from(*a), UserId::from(*b)],
        )),
        ConvRef::Group { .. } => with_conv(shard, conv_id, |c| {
            c.group.as_ref().map(|g| g.by_shard.clone())
        })
        .ok()
        .flatten()
        .unwrap_or_default(),
    }
}

/// Answers messages by msg_id, in request order, skipping unknown ids and anything at
/// or below the caller's clear_seq. Stops at the first message that would take the
/// reply past `cmd.max_bytes` (the first found is always returned): the ids after it
/// are left out, and the client asks for them again.
pub async fn handle_by_ids(
    shard: &Rc<Shard>,
    cmd: ByIdsCmd,
) -> Result<GetMessagesByIdsResponse, ApiError> {
    let conv = ConvRef::parse(&cmd.conv_id)?;
    load_conv(shard, &cmd.conv_id).await?;
    check_member(shard, &cmd.conv_id, &conv, &cmd.user)?;
    let durable = with_conv(shard, &cmd.conv_id, |c| c.durable_seq)?;
    let messages = shard
        .store
        .messages_by_ids(
            &cmd.conv_id,
            cmd.msg_ids,
            cmd.clear_seq + 1,
            durable,
            cmd.max_bytes as usize,
        )
        .await?;
    Ok(GetMessagesByIdsResponse { messages })
}

/// Recalls a message: the sender (or, in groups, an owner/admin) within the recall
/// window. The stored message keeps its seq; status becomes 1 and content a recall
/// notice. Answered after the change is durable; then MSG_RECALL goes to every member.
/// Recalling a recalled message answers OK and changes nothing.
pub async fn handle_recall(shard: &Rc<Shard>, reply: ReplyTo<Recalled>, cmd: RecallCmd) {
    let prepared = async {
        let conv = ConvRef::parse(&cmd.conv_id)?;
        load_conv(shard, &cmd.conv_id).await?;
        check_member(shard, &cmd.conv_id, &conv, &cmd.operator)?;
        // Read together, before any await: the state may be evicted while reads wait.
        let (durable, group_admin) = with_conv(shard, &cmd.conv_id, |c| {
            let admin = c.group.as_ref().is_some_and(|g| g.is_admin(&cmd.operator));
            (c.durable_seq, admin)
        })?;
        let seq = shard
            .store
            .seq_of_msg_id(&cmd.conv_id, &cmd.msg_id)
            .await?
            .filter(|s| *s <= durable)
            .ok_or(ApiError::NotFound("no such message"))?;
        let mut msg = shard
            .store
            .message(&cmd.conv_id, seq)
            .await?
            .ok_or(ApiError::NotFound("no such message"))?;
        if msg.status == 1 {
            return Ok(None);
        }
        if msg.msg_type > crate::limits::MAX_USER_MSG_TYPE {
            return Err(ApiError::Forbidden("system messages cannot be recalled"));
        }
        if msg.from_uuid != cmd.operator && !group_admin {
            return Err(ApiError::Forbidden(
                "only the sender (or a group owner or admin) may recall this message",
            ));
        }
        let now = now_ms();
        if now - msg.send_time > shard.cfg.recall_window.as_millis() as i64 {
            return Err(ApiError::RecallExpired);
        }
        msg.status = 1;
        msg.content = serde_json::json!({
            "recalled": true, "operator": cmd.operator, "recall_time": now
        })
        .to_string();
        Ok::<_, ApiError>(Some(msg))
    }
    .await;
    let ok = RecallMessageResponse {};
    let msg = match prepared {
        Err(e) => return shard.reply(reply, Err(e)),
        Ok(None) => return shard.reply(reply, Ok(ok)),
        Ok(Some(m)) => m,
    };
    let mut write = WriteSet::new();
    write.message_update(&msg);
    let recall_time = now_ms();
    super::events::stage(shard, &mut write, |o| {
        crate::eventlog::record::message_recalled(
            o,
            &msg.conv_id,
            msg.seq,
            &msg.msg_id,
            &cmd.operator,
            recall_time,
        )
    });
    // Who hears of it, taken now: the state may be evicted while the write waits.
    let members = match ConvRef::parse(&msg.conv_id) {
        Ok(conv) => members_of(shard, &msg.conv_id, &conv),
        Err(_) => Rc::default(),
    };
    match shard.store.stage(write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return shard.reply(reply, Err(e.into())),
        Err(_) => {
            return shard.reply(
                reply,
                Err(ApiError::StoreUnavailable("store closed".into())),
            )
        }
    }
    super::events::notify(shard);
    shard.reply(reply, Ok(ok));
    let notice = RecallNotice {
        conv_id: msg.conv_id.clone(),
        msg_id: msg.msg_id.clone(),
        operator: cmd.operator.clone(),
        recall_time,
        seq: msg.seq,
    };
    let frame = notice_frame(kind::MSG_RECALL, &notice);
    notify_members(shard, &msg.conv_id, frame, &members);
}

/// Sends a notice frame to every member's shard (one message per shard, the member
/// lists shared by reference).
pub fn notify_members(shard: &Rc<Shard>, conv_id: &str, frame: Bytes, members: &ByShard) {
    if super::node::clustered(shard) {
        // On the conversation's channels, to the nodes holding a member's device.
        let users: Vec<UserId> = members.iter().flat_map(|l| l.iter().cloned()).collect();
        super::routes::publish_notice(shard, &frame, Some(conv_id), &users, None);
        return;
    }
    for (target, users) in members.iter().enumerate() {
        if !users.is_empty() {
            let n = Notice {
                frame: frame.clone(),
                users: Recipients::all(users.clone()),
            };
            shard.post(target, move |shard| {
                super::user::notify(shard, &n.frame, &n.users)
            });
        }
    }
}

/// Durable max seq and last message of each conversation.
pub async fn handle_info(
    shard: &Rc<Shard>,
    convs: &[String],
) -> Result<Vec<ConvSummary>, ApiError> {
    let mut items = Vec::with_capacity(convs.len());
    for conv_id in convs {
        let max_seq = on_conv(shard, conv_id, |c| c.durable_seq).await?;
        let last_msg = if max_seq > 0 {
            shard.store.message(conv_id, max_seq).await?
        } else {
            None
        };
        items.push(ConvSummary {
            conv_id: conv_id.clone(),
            max_seq,
            last_msg,
        });
    }
    Ok(items)
}
