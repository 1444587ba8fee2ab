//! What each connection has acknowledged: per conversation, the highest seq a PushAck
//! named. Acks are cumulative (an ack of seq `s` acknowledges every seq <= `s` of its
//! conversation), so one number per (connection, conversation) says it all; it is what
//! a later redelivery or "delivered" receipt builds on.
//!
//! Kept in memory on the connection's shard, never written to the store per ack. A
//! connection that never acked has no entry (idle connections cost nothing here); the
//! entry goes when the connection closes (a reconnecting client resyncs by seq). After
//! the first ack of a conversation, further acks of it allocate nothing.
//!
//! Cost, by our count of the allocations: a connection that acked one conversation
//! holds ~100 bytes here (its map slot, a one-entry `Vec`, the conv_id) and ~60 more per
//! further conversation, until it closes, also while it sits idle after its last ack.
//! A connection that never received a push holds nothing.

use std::collections::HashMap;

/// Conversations remembered per connection; past it the oldest entry is dropped.
pub const MAX_CONVS_PER_CONN: usize = 256;

/// Acked seqs of one shard's connections, by connection id.
#[derive(Debug, Default)]
pub struct AckTable {
    by_conn: HashMap<u64, Vec<(Box<str>, i64)>>,
}

impl AckTable {
    /// Records an ack of every seq <= `seq` of `conv_id` on connection `conn`; the
    /// acked seq only moves forward. Returns whether it moved. The caller has checked
    /// that `conv_id` is a valid conv_id (it bounds the memory an entry takes).
    pub fn ack(&mut self, conn: u64, conv_id: &str, seq: i64) -> bool {
        if seq <= 0 {
            return false;
        }
        let convs = self.by_conn.entry(conn).or_default();
        if let Some((_, acked)) = convs.iter_mut().find(|(c, _)| &**c == conv_id) {
            let moved = seq > *acked;
            *acked = (*acked).max(seq);
            return moved;
        }
        if convs.len() >= MAX_CONVS_PER_CONN {
            convs.remove(0);
        }
        if convs.capacity() == 0 {
            // Most connections ack one or two conversations: 24 bytes, not the 96 a
            // first push reserves.
            convs.reserve_exact(1);
        }
        convs.push((conv_id.into(), seq));
        true
    }

    /// The highest seq of `conv_id` that connection `conn` acknowledged.
    pub fn acked(&self, conn: u64, conv_id: &str) -> Option<i64> {
        self.by_conn
            .get(&conn)?
            .iter()
            .find(|(c, _)| &**c == conv_id)
            .map(|(_, s)| *s)
    }

    /// Forgets a connection that closed.
    pub fn forget(&mut self, conn: u64) {
        self.by_conn.remove(&conn);
    }

    /// Connections with at least one acked conversation.
    pub fn connections(&self) -> usize {
        self.by_conn.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_cumulative_and_only_move_forward() {
        let mut t = AckTable::default();
        assert_eq!(t.acked(1, "grp-g"), None);
        assert!(t.ack(1, "grp-g", 64));
        assert!(!t.ack(1, "grp-g", 10), "an older batch arriving late");
        assert!(!t.ack(1, "grp-g", 0));
        assert!(t.ack(1, "grp-g", 128));
        assert!(t.ack(1, "p2p-a-b", 3));
        assert!(t.ack(2, "grp-g", 5));
        assert_eq!(t.acked(1, "grp-g"), Some(128));
        assert_eq!(t.acked(1, "p2p-a-b"), Some(3));
        assert_eq!(t.acked(2, "grp-g"), Some(5));
        assert_eq!(t.connections(), 2);
        t.forget(1);
        assert_eq!(t.acked(1, "grp-g"), None);
        assert_eq!(t.connections(), 1);
        assert!(!t.ack(3, "grp-g", -5), "nothing below seq 1");
        assert_eq!(t.connections(), 1, "an ignored ack makes no entry");
    }

    #[test]
    fn memory_per_connection_is_bounded() {
        let mut t = AckTable::default();
        for i in 0..MAX_CONVS_PER_CONN + 10 {
            t.ack(1, &format!("grp-g{i}"), 1);
        }
        assert_eq!(t.by_conn[&1].len(), MAX_CONVS_PER_CONN);
        assert_eq!(t.acked(1, "grp-g0"), None, "the oldest went first");
        assert_eq!(
            t.acked(1, &format!("grp-g{}", MAX_CONVS_PER_CONN + 9)),
            Some(1)
        );
    }
}
