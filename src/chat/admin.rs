//! Admin operations (admin token only): kick, broadcast, presence. Each runs on the
//! shards that own the users concerned; the accepting shard gathers the answers.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;

use super::Shard;
use crate::codes::{close, kick, ApiError};
use crate::limits::MAX_KICK_REASON_BYTES;

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
