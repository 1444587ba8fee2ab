//! What a shard holds of users and conversations is a cache with a byte budget, not a
//! copy of the store: users' conversation rows and conversations' states (seq counter,
//! group members) are loaded on first use and evicted, least recently used first, when
//! the shard's share of `cache_bytes` is passed. Memory is then bounded by connections
//! plus the budget, never by history or by how many ids clients ask about.
//!
//! Only idle entries are evicted, so nothing that was promised is forgotten:
//! - rows whose last write is settled in the store (a reload reads them back);
//! - conversations with no send queued or in flight, every assigned seq durable, no
//!   fan-out queued and nobody waiting for their load.
//!
//! Sizes are estimates (per row, per member, per entry), calibrated against RSS (a
//! user with one row measured ~480 bytes, a group member ~110-190, allocator slack
//! included); an entry records what it was charged so eviction gives back exactly that.
//! Eviction is second-chance (CLOCK) over a queue of loaded entries: an entry used
//! since the hand last passed gets another round.

use std::rc::Rc;

use super::Shard;

/// Estimated bytes of one conversation row in memory (row, key, target, table share).
pub const ROW_BYTES: usize = 250;
/// Estimated bytes of a user entry holding rows (map entry, slot, table).
pub const USER_BYTES: usize = 320;
/// Estimated bytes of a conversation's state without members.
pub const CONV_BYTES: usize = 400;
/// Estimated bytes of one group member (shared id, role map entry, per-shard list).
pub const MEMBER_BYTES: usize = 150;

/// A loaded entry, in the eviction queue.
pub enum CacheKey {
    Rows(Box<str>),
    Conv(Box<str>),
}

/// The shard's budget: its share of `cache_bytes`.
pub fn budget(shard: &Shard) -> usize {
    shard.cfg.cache_bytes / shard.n.max(1)
}

/// Charges a newly loaded entry. Past the budget, idle entries are evicted at the end
/// of this loop turn, so whoever loaded an entry can use it before it may go.
pub fn admit(shard: &Rc<Shard>, key: CacheKey, bytes: usize) {
    shard.cache_bytes.set(shard.cache_bytes.get() + bytes);
    shard.cache_queue.borrow_mut().push_back(key);
    if shard.cache_bytes.get() > budget(shard) && !shard.cache_pass_due.replace(true) {
        let shard = shard.clone();
        monoio::spawn(async move {
            crate::rt::yield_now().await;
            shard.cache_pass_due.set(false);
            evict_over_budget(&shard);
        });
    }
}

/// Charges growth of a loaded entry (a new row, new members).
pub fn grow(shard: &Shard, bytes: usize) {
    shard.cache_bytes.set(shard.cache_bytes.get() + bytes);
}

/// Gives back what an entry was charged.
pub fn release(shard: &Shard, bytes: usize) {
    shard
        .cache_bytes
        .set(shard.cache_bytes.get().saturating_sub(bytes));
}

/// What the hand found at a queue entry.
pub enum Visit {
    /// Evicted; its bytes were released.
    Evicted,
    /// Used since the last pass (now cleared) or busy: look again next round.
    Keep,
    /// No longer loaded (evicted or dropped another way): forget the queue entry.
    Gone,
}

/// Evicts idle entries, oldest first with a second chance, until the shard is under
/// budget or every queued entry was looked at twice.
pub fn evict_over_budget(shard: &Rc<Shard>) {
    let budget = budget(shard);
    if shard.cache_bytes.get() <= budget {
        return;
    }
    let mut visits = 2 * shard.cache_queue.borrow().len();
    while shard.cache_bytes.get() > budget && visits > 0 {
        visits -= 1;
        let Some(key) = shard.cache_queue.borrow_mut().pop_front() else {
            break;
        };
        let visit = match &key {
            CacheKey::Rows(user) => super::user::visit_for_eviction(shard, user),
            CacheKey::Conv(conv) => super::conv::visit_for_eviction(shard, conv),
        };
        match visit {
            Visit::Keep => shard.cache_queue.borrow_mut().push_back(key),
            Visit::Evicted => crate::shard::Counters::bump(&shard.stats.cache_evictions),
            Visit::Gone => {}
        }
    }
}
