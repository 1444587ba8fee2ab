//! The Kafka event log from the chat service's side (`--kafka-brokers`): which events
//! a shard writes, and when.
//!
//! - **Stored messages, recalls, read marks and membership changes** are written as
//!   outbox entries *in the same atomic store round* as the data they report
//!   ([`stage`]), so an event exists exactly when its data does; the shard's outbox
//!   pump produces them to the events topic (keyed by conv_id: one partition keeps a
//!   conversation's order) once the round is durable ([`notify`]), and again after a
//!   crash or a Kafka outage until Kafka has them (at least once).
//! - **Offline pushes**: after a message is durable, the conversation's owner looks up
//!   which recipients have no device seen within heartbeat_timeout on any node (the
//!   presence ZSETs) and appends an offline-push event for each to the offline topic
//!   ([`offline_pushes`]). These go straight to the producer, not through the outbox:
//!   one lost in a crash is a missed notification, never a lost message. Groups of more
//!   than [`OFFLINE_PUSH_MAX_MEMBERS`] members get none (a notification service for
//!   big groups reads the events topic instead).
//!
//! Order: a conversation's messages, recalls and membership changes are made by its
//! owner shard, one producer, so they reach the conversation's partition in seq order.
//! A read mark is made by the reader's owner shard: it is in order with that user's
//! other read marks, not with the owner's events (a consumer orders it by `read_seq`).
//!
//! A send's reply does not wait for Kafka: it waits for Redis, where the message and
//! its outbox entry are durable together (see `crate::eventlog` for the numbers).

use std::rc::Rc;

use super::Shard;
use crate::eventlog::record::{self, Origin, Record};
use crate::eventlog::EventLog;
use crate::proto::pb::MsgItem;
use crate::store::channels::OutboxHandle;
use crate::store::WriteSet;

/// Groups larger than this get no offline-push events (one presence read per member
/// per message would cost more than the message).
pub const OFFLINE_PUSH_MAX_MEMBERS: usize = 1_000;

/// A shard's event log.
pub struct Events {
    pub origin: Origin,
    pub log: EventLog,
    pub outbox: OutboxHandle,
}

fn events(shard: &Shard) -> Option<&Events> {
    shard.events.get()
}

/// The shard's origin, when it keeps an event log.
pub fn origin(shard: &Shard) -> Option<&Origin> {
    events(shard).map(|e| &e.origin)
}

/// Adds the event `make` builds to `write` (the same round as its data); nothing when
/// there is no event log.
pub fn stage(shard: &Shard, write: &mut WriteSet, make: impl FnOnce(&Origin) -> Record) {
    if let Some(e) = events(shard) {
        let r = make(&e.origin);
        write.event(&e.outbox.tag, r.topic.code(), &r.key, &r.value);
    }
}

/// A round with events is durable: the pump may produce them.
pub fn notify(shard: &Shard) {
    if let Some(e) = events(shard) {
        e.outbox.notify();
    }
}

/// Offline-push events for the recipients of `msg` (not its sender) with no device
/// online on any node.
pub fn offline_pushes(shard: &Rc<Shard>, msg: &MsgItem, recipients: Vec<String>) {
    if events(shard).is_none() || recipients.len() > OFFLINE_PUSH_MAX_MEMBERS {
        return;
    }
    let recipients: Vec<String> = recipients
        .into_iter()
        .filter(|u| *u != msg.from_uuid)
        .collect();
    if recipients.is_empty() {
        return;
    }
    let shard = shard.clone();
    let msg = msg.clone();
    monoio::spawn(async move {
        let window = shard.cfg.heartbeat_timeout.as_millis() as i64;
        let online = match shard.store.online_devices(&recipients, window).await {
            Ok(Some(o)) => o,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "no presence for offline pushes");
                return;
            }
        };
        let Some(e) = events(&shard) else { return };
        for (user, devices) in recipients.iter().zip(online) {
            if devices.is_empty() {
                let r = record::offline_push(&e.origin, user, &msg);
                if let Err(err) = e.log.append(r.topic, &r.key, r.value) {
                    tracing::debug!(error = ?err, "an offline push was not appended");
                }
            }
        }
    });
}
