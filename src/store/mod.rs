//! Storage: one store per shard, behind the narrow interface of [`ShardStore`].
//!
//! # Guarantees
//! - **Ordering**: batches become durable in the order they were staged; a batch is
//!   durable only after every earlier batch of the same shard is.
//! - **Atomicity**: everything staged for one write (a message, its id index and its
//!   dedupe record) lands in one atomic store batch: all of it or none of it.
//! - **Durability**: [`ShardStore::stage`] returns a receiver that resolves `Ok` only
//!   after the batch is fsynced (`fdatasync`). Only then may the caller answer a client.
//! - **Batching**: writes staged during one loop turn form one batch; while an fsync
//!   is in flight, further batches queue and are committed and synced together.
//! - **Lazy writes**: a batch made only of [`ShardStore::stage_lazy`] writes (writes
//!   whose loss in a crash is harmless: a sender's own read mark) is committed at
//!   once and fsynced with the next batch that needs an fsync, or after
//!   [`embedded::LAZY_SYNC`] (50 ms). Without it every message paid a second fsync
//!   round for its sender's row.
//! - **Failure**: when a batch fails, it and every batch staged after it fail too
//!   (so no seq after a failed one is ever stored), until the shard has dropped its
//!   cached conversation state and called [`ShardStore::reset_after_failure`].
//! - **Read-your-writes**: reads see every batch whose receiver has resolved `Ok`;
//!   callers keep in-flight state (seq counters, pending dedupe) in memory.
//! - **Reads never block the loop**: every read is `async` and runs on the shard's
//!   reader thread ([`offloop`]), in the order asked; a page-cache miss stalls that
//!   thread, not the connections of the shard.
//!
//! The message code (`chat`) uses only [`ShardStore`]'s methods and [`WriteSet`]; this
//! module imports nothing from the shard runtime or the message code.
//!
//! # Keys (one fjall keyspace each; `\0` separates parts, ids never contain it)
//! | keyspace | key | value |
//! |---|---|---|
//! | msgs | conv_id `\0` seq (u64 big-endian) | MsgItem |
//! | msgids | conv_id `\0` msg_id | seq (u64 big-endian) |
//! | dedupe | conv_id `\0` sender `\0` client_msg_id | DedupeRecord |
//! | rows | user `\0` conv_id | ConvRow |
//! | groups | conv_id | GroupMeta |
//! | members | conv_id `\0` user | MemberRecord (one key per member: a change to a
//! 100,000-member group writes only the changed members) |
//!
//! Two backends sit behind [`ShardStore`], chosen at start (`--store`): fjall under
//! the data dir (these keyspaces; `embedded`) and Redis (the same writes mapped onto
//! hash-tagged keys; [`redis::backend`]). Both keep every guarantee above: on Redis a
//! batch is durable when the fenced round script that carries it answered (on disk with
//! Redis's `appendfsync always`; all of a round or none of it applies, and a round whose
//! conversations' stored max seq is not what the writer expects writes nothing), and
//! reads go over the shard's own connection. [`channels`]: the Redis pub/sub, publish
//! and presence reads of cluster mode.

pub mod channels;
pub mod embedded;
pub mod offloop;
pub mod redis;

pub use embedded::{Ks, Put, ShardStore, WriteSet};

use std::path::Path;

/// A store failure, with where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Opening a shard's store failed.
    Open(String),
    /// A read failed.
    Read(String),
    /// A stored record does not decode (corruption or a foreign file).
    Corrupt(String),
    /// A batch could not be committed or synced; nothing of it is acknowledged.
    Write(String),
    /// The Redis fence refused the batch's round: a conversation it adds messages to
    /// holds another number of messages than this shard expected (another node wrote
    /// to it after an ownership change). Nothing of the round was written; the shard
    /// drops its cached state and reloads.
    Fenced(String),
    /// The data dir was made with another shard count.
    Layout(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Open(e) => write!(f, "cannot open store: {e}"),
            StoreError::Read(e) => write!(f, "store read failed: {e}"),
            StoreError::Corrupt(e) => write!(f, "corrupt record: {e}"),
            StoreError::Write(e) => write!(f, "store write failed: {e}"),
            StoreError::Fenced(e) => write!(f, "store write refused by the fence: {e}"),
            StoreError::Layout(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<StoreError> for crate::codes::ApiError {
    fn from(e: StoreError) -> Self {
        crate::codes::ApiError::StoreUnavailable(e.to_string())
    }
}

const LAYOUT_FILE: &str = "layout.toml";

/// Records the shard count in `<data_dir>/layout.toml` on first start and refuses to
/// start with another count (data is placed by `hash % shards`).
pub fn check_layout(data_dir: &Path, shards: usize) -> Result<(), StoreError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| StoreError::Open(format!("{}: {e}", data_dir.display())))?;
    let path = data_dir.join(LAYOUT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let recorded = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("shards"))
                .and_then(|r| r.trim().strip_prefix('='))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    StoreError::Layout(format!("{} has no `shards = N` line", path.display()))
                })?;
            if recorded != shards {
                return Err(StoreError::Layout(format!(
                    "data dir {} was created with {recorded} shards but the server was started with {shards}; \
                     start with --shards {recorded} (changing the shard count of a data dir is not supported)",
                    data_dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = data_dir.join(format!("{LAYOUT_FILE}.tmp"));
            let body =
                format!("# written by imshard; do not edit\nformat = 1\nshards = {shards}\n");
            std::fs::write(&tmp, body)
                .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))
        }
        Err(e) => Err(StoreError::Open(format!("{}: {e}", path.display()))),
    }
}

/// Key helpers, shared by the backends.
pub mod keys {
    /// `conv \0 seq_be`
    pub fn msg(conv: &str, seq: i64) -> Vec<u8> {
        let mut k = Vec::with_capacity(conv.len() + 9);
        k.extend_from_slice(conv.as_bytes());
        k.push(0);
        k.extend_from_slice(&(seq as u64).to_be_bytes());
        k
    }

    /// `a \0 b`
    pub fn pair(a: &str, b: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(a.len() + b.len() + 1);
        k.extend_from_slice(a.as_bytes());
        k.push(0);
        k.extend_from_slice(b.as_bytes());
        k
    }

    /// `a \0 b \0 c`
    pub fn triple(a: &str, b: &str, c: &str) -> Vec<u8> {
        let mut k = pair(a, b);
        k.push(0);
        k.extend_from_slice(c.as_bytes());
        k
    }

    /// `a \0`: the prefix of every key that starts with part `a`.
    pub fn prefix(a: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(a.len() + 1);
        k.extend_from_slice(a.as_bytes());
        k.push(0);
        k
    }

    /// The seq at the end of a msgs key.
    pub fn seq_of(key: &[u8]) -> Option<i64> {
        let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
        Some(u64::from_be_bytes(tail) as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_recorded_and_enforced() {
        let d = tempfile::tempdir().unwrap();
        check_layout(d.path(), 2).unwrap();
        check_layout(d.path(), 2).unwrap();
        let e = check_layout(d.path(), 3).unwrap_err();
        assert!(e.to_string().contains("created with 2 shards"), "{e}");
    }

    #[test]
    fn msg_keys_sort_by_seq() {
        assert!(keys::msg("c", 2) < keys::msg("c", 10));
        assert!(keys::msg("c", 255) < keys::msg("c", 256));
        assert_eq!(keys::seq_of(&keys::msg("c", 300)), Some(300));
        assert!(keys::msg("c", i64::MAX) < keys::prefix("c0"));
    }
}
