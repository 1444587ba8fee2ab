//! Admin operations (admin token only): kick, broadcast, presence. Each runs on the
//! shards that own the users concerned; the accepting shard gathers the answers.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;

use super::Shard;
use crate::cluster::events::{decode_event, ClusterEvent, BROADCAST_CHANNEL};
use crate::codes::{close, kick, ApiError};
use crate::limits::MAX_KICK_REASON_BYTES;
use crate::proto::envelope::envelope_frame;
use crate::store::channels::ChannelEvent;

/// The KICKOUT reason of an admin kick: the given one, or `admin` when empty. At most
/// [`MAX_KICK_REASON_BYTES`] bytes and no control characters (it also goes into the
/// close frame), else 40001.
pub fn kick_reason(given: &str) -> Result<String, ApiError> {
    if given.is_empty() {
        return Ok(kick::ADMIN.to_string());
    }
    if given.len() > MAX_KICK_REASON_BYTES || given.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "reason must be at most {MAX_KICK_REASON_BYTES} bytes without control characters"
        )));
    }
    Ok(given.to_string())
}

/// Kicks one device (or every device, `ALL`) of a user this shard owns: KICKOUT with
/// `reason`, then close. Returns how many connections were kicked.
pub fn kick_local(shard: &Rc<Shard>, user: &str, device: &str, reason: &str) -> u64 {
    let mut n = 0;
    for c in super::user::devices(shard, user) {
        if c.is_open() && (device == "ALL" || *c.device == *device) {
            c.close(shard, close::KICKED, Some(reason));
            n += 1;
        }
    }
    n
}

/// Writes `frame` to the connections of `users` on this shard (all when `None`).
pub fn broadcast_local(shard: &Rc<Shard>, frame: &Bytes, users: Option<&[String]>) -> u64 {
    let conns: Vec<_> = match users {
        Some(list) => list
            .iter()
            .flat_map(|u| super::user::devices(shard, u))
            .collect(),
        None => shard
            .users
            .borrow()
            .values()
            .flat_map(|u| u.conns.iter().cloned())
            .collect(),
    };
    let mut n = 0;
    for c in conns {
        if c.is_open() {
            c.send(shard, frame.clone());
            n += 1;
        }
    }
    n
}

/// The open devices of each of `users` (owned by this shard).
pub fn presence_local(shard: &Rc<Shard>, users: &[String]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for u in users {
        let devices = super::user::devices(shard, u)
            .iter()
            .filter(|c| c.is_open())
            .map(|c| c.device.to_string())
            .collect();
        out.insert(u.clone(), devices);
    }
    out
}

/// Notes (on shard 0) that this node published `payload` on the broadcast channel
/// after writing it to its own connections.
pub fn note_own_broadcast(shard: &Rc<Shard>, payload: &[u8]) {
    let hash = xxhash_rust::xxh3::xxh3_64(payload);
    shard.post(0, move |s| {
        if let Some(ctx) = s.node.get() {
            let mut own = ctx.own_broadcasts.borrow_mut();
            let now = std::time::Instant::now();
            own.retain(|(_, at)| now.duration_since(*at) < std::time::Duration::from_secs(30));
            own.push((hash, now));
        }
    });
}

/// Whether `payload` is this node's own broadcast coming back (forgotten once seen).
fn is_own_broadcast(shard: &Shard, payload: &[u8]) -> bool {
    let Some(ctx) = shard.node.get() else {
        return false;
    };
    let hash = xxhash_rust::xxh3::xxh3_64(payload);
    let mut own = ctx.own_broadcasts.borrow_mut();
    match own.iter().position(|(h, _)| *h == hash) {
        Some(i) => {
            own.swap_remove(i);
            true
        }
        None => false,
    }
}

/// A message on shard 0's control subscription (cluster mode): a change of the live
/// set, a KickEvent or a BroadcastEvent (protobuf), from any node or any other
/// publisher. Each node acts on the connections it holds.
pub fn on_control(shard: &Rc<Shard>, ev: ChannelEvent) {
    let ChannelEvent::Message { channel, payload } = ev else {
        if let Some(m) = shard.node.get().and_then(|c| c.membership.get()) {
            // After a break: read the live set again at once.
            m.refresh_now();
        }
        return;
    };
    if channel == BROADCAST_CHANNEL.as_bytes() && is_own_broadcast(shard, &payload) {
        return;
    }
    // Decoded and checked (ids, a broadcast's type) once, for every channel.
    match decode_event(&channel, payload) {
        Ok(ClusterEvent::NodesChanged(_)) => {
            if let Some(m) = shard.node.get().and_then(|c| c.membership.get()) {
                m.refresh_now();
            }
        }
        Ok(ClusterEvent::Kick(ev)) => {
            let reason = match kick_reason(&ev.reason) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "a KickEvent with a bad reason: dropped");
                    return;
                }
            };
            let target = shard.user_shard(&ev.user_uuid);
            shard.post(target, move |s| {
                kick_local(s, &ev.user_uuid, &ev.device_id, &reason);
            });
        }
        Ok(ClusterEvent::Broadcast(ev)) => {
            let Some(envelope) = ev.message else { return };
            let frame = envelope_frame(&envelope);
            for t in 0..shard.n {
                let users: Option<Vec<String>> = if ev.user_uuids.is_empty() {
                    None
                } else {
                    let mine: Vec<String> = ev
                        .user_uuids
                        .iter()
                        .filter(|u| shard.user_shard(u) == t)
                        .cloned()
                        .collect();
                    if mine.is_empty() {
                        continue;
                    }
                    Some(mine)
                };
                let frame = frame.clone();
                shard.post(t, move |s| {
                    broadcast_local(s, &frame, users.as_deref());
                });
            }
        }
        Err(e) => tracing::warn!(error = %e, "a cluster event was dropped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kick_reasons() {
        assert_eq!(kick_reason(""), Ok("admin".to_string()));
        assert_eq!(kick_reason("banned"), Ok("banned".to_string()));
        assert_eq!(kick_reason("违规 spam"), Ok("违规 spam".to_string()));
        let max = "x".repeat(MAX_KICK_REASON_BYTES);
        assert_eq!(kick_reason(&max), Ok(max.clone()));
        for bad in [
            format!("{max}x"),
            "a\nb".into(),
            "\0".into(),
            "\u{7f}".into(),
        ] {
            assert_eq!(
                kick_reason(&bad).map_err(|e| e.code()),
                Err(40001),
                "{bad:?}"
            );
        }
    }
}
