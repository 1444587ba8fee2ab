//! The conversation side, on the conversation's shard: the seq counter, the dedupe of
//! (sender, client_msg_id), the durable write of a message, its fan-out, and pulls.
//!
//! Invariants (per conversation, all on this shard's thread):
//! - `next_seq - 1` is the highest seq handed out; seqs go to the store in that order.
//! - `durable_seq` is the highest seq whose write is durable; pulls never see past it.
//! - A send whose (sender, client_msg_id) is in flight waits for the first and gets the
//!   same answer; one that is durable is answered from the store's dedupe record.

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use prost::Message as _;

use super::{PullCmd, SendCmd};
use crate::codes::ApiError;
use crate::ids::ConvRef;
use crate::limits::DEDUPE_WINDOW_MS;
use crate::proto::envelope::{now_ms, push_frame};
use crate::proto::pb::{MsgItem, PullMessagesResponse, SendMessageResponse};
use crate::proto::store_pb::DedupeRecord;
use crate::shard::msg::{Delivery, ReplyTo, ShardMsg};
use crate::shard::Shard;
use crate::store::embedded::WriteSet;

/// A conversation this shard owns, as far as it was touched since start.
#[derive(Debug)]
pub struct ConvState {
    /// The seq the next message gets.
    next_seq: i64,
    /// The highest seq that is durable.
    durable_seq: i64,
    /// Sends in flight by (sender, client_msg_id), with callers waiting for the same.
    in_flight: HashMap<(String, String), Vec<ReplyTo>>,
}

impl ConvState {
    /// Callers waiting for in-flight sends (answered with an error on a store reset).
    pub fn into_waiters(self) -> impl Iterator<Item = ReplyTo> {
        self.in_flight.into_values().flatten()
    }
}

/// Loads (or returns) the state of a conversation: its seq counter continues after the
/// highest stored seq.
fn with_conv<R>(
    shard: &Shard,
    conv_id: &str,
    f: impl FnOnce(&mut ConvState) -> R,
) -> Result<R, ApiError> {
    let mut convs = shard.convs.borrow_mut();
    if let Some(c) = convs.get_mut(conv_id) {
        return Ok(f(c));
    }
    let max = shard.store.max_seq(conv_id)?;
    let c = convs.entry(conv_id.to_string()).or_insert(ConvState {
        next_seq: max + 1,
        durable_seq: max,
        in_flight: HashMap::new(),
    });
    Ok(f(c))
}

fn encode_sent(msg_id: &str, conv_id: &str, seq: i64, send_time: i64) -> Bytes {
    SendMessageResponse {
        msg_id: msg_id.to_string(),
        conv_id: conv_id.to_string(),
        seq,
        send_time,
    }
    .encode_to_vec()
    .into()
}

/// Stores a message and answers after it is durable; then pushes it.
pub fn handle_send(shard: &Rc<Shard>, reply: ReplyTo, cmd: SendCmd) {
    shard.reset_after_store_failure();
    let dedupe_key = (cmd.sender.clone(), cmd.client_msg_id.clone());
    let has_key = !cmd.client_msg_id.is_empty();
    // A resend of a durable message: answer from the store.
    if has_key {
        let in_flight = with_conv(shard, &cmd.conv_id, |c| {
            if let Some(waiters) = c.in_flight.get_mut(&dedupe_key) {
                waiters.push(reply);
                true
            } else {
                false
            }
        });
        match in_flight {
            Err(e) => return shard.reply(reply, Err(e)),
            Ok(true) => return,
            Ok(false) => {}
        }
        match shard
            .store
            .dedupe(&cmd.conv_id, &cmd.sender, &cmd.client_msg_id)
        {
            Err(e) => return shard.reply(reply, Err(e.into())),
            Ok(Some(rec)) if now_ms() - rec.send_time < DEDUPE_WINDOW_MS => {
                let body = encode_sent(&rec.msg_id, &cmd.conv_id, rec.seq, rec.send_time);
                return shard.reply(reply, Ok(body));
            }
            Ok(_) => {}
        }
    }
    let seq = match with_conv(shard, &cmd.conv_id, |c| {
        let seq = c.next_seq;
        c.next_seq += 1;
        if has_key {
            c.in_flight.insert(dedupe_key.clone(), Vec::new());
        }
        seq
    }) {
        Ok(s) => s,
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
    let durable = shard.store.stage(write);
    let shard = shard.clone();
    monoio::spawn(async move {
        let result = durable
            .await
            .unwrap_or_else(|_| Err(crate::store::StoreError::Write("store closed".into())));
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
                    .counters
                    .messages_stored
                    .set(shard.counters.messages_stored.get() + 1);
                let body = encode_sent(&msg.msg_id, &msg.conv_id, seq, send_time);
                shard.reply(reply, Ok(body.clone()));
                for w in waiters {
                    shard.reply(w, Ok(body.clone()));
                }
                fan_out(&shard, &msg, &cmd.members, &cmd.sender_device);
            }
            Err(e) => {
                let err = ApiError::from(e);
                shard.reply(reply, Err(err.clone()));
                for w in waiters {
                    shard.reply(w, Err(err.clone()));
                }
                shard.reset_after_store_failure();
            }
        }
    });
}

/// Encodes the push once and sends one delivery per recipient shard.
fn fan_out(shard: &Rc<Shard>, msg: &MsgItem, members: &[String], sender_device: &str) {
    let frame = push_frame(msg);
    let mut by_shard: Vec<Vec<String>> = vec![Vec::new(); shard.n];
    for m in members {
        by_shard[shard.user_shard(m)].push(m.clone());
    }
    for (target, users) in by_shard.into_iter().enumerate() {
        if users.is_empty() {
            continue;
        }
        shard.post(
            target,
            ShardMsg::Deliver(Box::new(Delivery {
                frame: frame.clone(),
                conv_id: msg.conv_id.clone(),
                seq: msg.seq,
                send_time: msg.send_time,
                users,
                except_user: msg.from_uuid.clone(),
                except_device: sender_device.to_string(),
            })),
        );
    }
}

/// Answers a pull: FORWARD from anchor_seq + 1 upwards, BACKWARD the `limit` seqs just
/// below anchor_seq (0 = from the newest); ascending either way; never at or below the
/// caller's clear_seq, never past what is durable.
pub fn handle_pull(shard: &Rc<Shard>, pull: &PullCmd) -> Result<Bytes, ApiError> {
    let conv = ConvRef::parse(&pull.conv_id)?;
    if let ConvRef::P2p { .. } = conv {
        if !conv.p2p_has(&pull.user) {
            return Err(ApiError::Forbidden("not a member of this conversation"));
        }
    }
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
            .messages(&pull.conv_id, lo, hi, pull.limit, true)?;
        let more = msgs.first().is_some_and(|m| m.seq > lo);
        (msgs, more)
    } else {
        let lo = (pull.anchor_seq + 1).max(floor);
        let msgs = shard
            .store
            .messages(&pull.conv_id, lo, max_seq, pull.limit, false)?;
        let more = msgs.last().is_some_and(|m| m.seq < max_seq);
        (msgs, more)
    };
    Ok(PullMessagesResponse {
        messages,
        has_more,
        max_seq,
    }
    .encode_to_vec()
    .into())
}
