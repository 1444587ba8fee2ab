//! Admin operations (admin token only): kick, broadcast, presence. Each runs on the
//! shards that own the users concerned; the accepting shard gathers the answers.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;

use crate::codes::{close, kick, ApiError};
use crate::shard::Shard;

/// Kicks one device (or every device, `ALL`) of a user this shard owns: KICKOUT, then
/// close. Returns how many connections were kicked.
pub fn kick_local(shard: &Rc<Shard>, user: &str, device: &str) -> u64 {
    let mut n = 0;
    for c in super::user::devices(shard, user) {
        if c.is_open() && (device == "ALL" || *c.device == *device) {
            c.close(shard, close::KICKED, Some(kick::ADMIN));
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

/// `{"user": ["device", ...]}` for users this shard owns.
pub fn presence_local(shard: &Rc<Shard>, users: &[String]) -> Result<Bytes, ApiError> {
    let mut out: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for u in users {
        let devices = super::user::devices(shard, u)
            .iter()
            .filter(|c| c.is_open())
            .map(|c| c.device.to_string())
            .collect();
        out.insert(u, devices);
    }
    serde_json::to_vec(&out)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(e.to_string()))
}
