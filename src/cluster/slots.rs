//! Slots and their owners: which node runs a conversation.
//!
//! - [`slot_of`]: a conversation's slot, `xxh3_64(conv_id) % SLOTS`. [`SLOTS`] is fixed
//!   for the life of a deployment (changing it moves almost every conversation).
//! - [`owner_of`]: the slot's owner node among the live nodes, by rendezvous (highest
//!   random weight) hashing: every node scores `xxh3_64_with_seed(node_id, slot)` and
//!   the highest score wins (ties, which need a 64-bit collision, go to the greater
//!   node id). [`SlotMap`] is the same answer for all slots, computed once per live set.
//! - Inside the owner node, the owner **shard** is the one-node rule,
//!   `shard::shard_of_conv(conv_id, shards)` = `xxh3_64(conv_id) % shards`: the slot
//!   picks the node, the same hash modulo the node's shard count picks the shard. Both
//!   use the same 64-bit hash, so when the shard count divides [`SLOTS`] (a power of
//!   two up to 4096) the shard is also `slot % shards` and a slot lives on exactly
//!   one shard of its node; with other shard counts a slot's conversations spread
//!   over the node's shards, which is fine: ownership moves between nodes by slot, and
//!   inside a node nothing moves. Nodes may run different shard counts.
//!
//! # Guarantees
//! - **Pure and deterministic**: the owner depends only on the slot and the *set* of
//!   live node ids (not their order, not their addresses, not the epoch), so every
//!   node that sees the same live set computes the same owners, with no coordination.
//! - **Minimal movement**: when a node joins, only the slots it now wins move, all of
//!   them to it (about `SLOTS / (N + 1)` of them); when a node leaves, only its slots
//!   move, spread over the others. Tested in the unit tests below.
//! - **Balance**: each of N nodes owns about `SLOTS / N` slots (statistically; with
//!   4096 slots the spread is a few percent). Not weighted: nodes are assumed equal.
//!
//! Not guaranteed: that two nodes agree *at the same moment*. Each node computes from
//! the live set it last read (see [`super::membership`]); during a change two nodes
//! may both believe they own a slot for a moment, which the store's fencing script
//! resolves (DESIGN.md "Fencing").

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::NodeId;

/// Number of slots. Fixed: every node of a deployment must use the same value.
pub const SLOTS: u16 = 4096;

/// A slot number, `0..SLOTS`.
pub type Slot = u16;

/// The slot of a conversation.
pub fn slot_of(conv_id: &str) -> Slot {
    (xxh3_64(conv_id.as_bytes()) % SLOTS as u64) as Slot
}

/// The rendezvous weight of `node` for `slot`: the highest weight owns the slot.
pub fn weight(slot: Slot, node: &NodeId) -> u64 {
    xxh3_64_with_seed(node.as_str().as_bytes(), slot as u64)
}

/// The owner of `slot` among `nodes` (`None` if there are none). Order-independent.
pub fn owner_of<'a>(slot: Slot, nodes: impl IntoIterator<Item = &'a NodeId>) -> Option<&'a NodeId> {
    nodes
        .into_iter()
        .max_by(|a, b| (weight(slot, a), a.as_str()).cmp(&(weight(slot, b), b.as_str())))
}

/// The owner of every slot for one live set, computed once (`SLOTS x N` hashes) when
/// the set changes, then a table look-up per call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// The membership epoch of the live set this map was computed from.
    epoch: u64,
    /// The live nodes, sorted by id, without duplicates.
    nodes: Vec<NodeId>,
    /// `owners[slot]` is an index into `nodes`; empty when there are no nodes.
    owners: Vec<u16>,
}

impl SlotMap {
    /// The map for `nodes` (any order; duplicates ignored) at membership `epoch`.
    /// At most `u16::MAX` nodes.
    pub fn new(epoch: u64, nodes: impl IntoIterator<Item = NodeId>) -> SlotMap {
        let mut nodes: Vec<NodeId> = nodes.into_iter().collect();
        nodes.sort();
        nodes.dedup();
        nodes.truncate(u16::MAX as usize);
        let owners = if nodes.is_empty() {
            Vec::new()
        } else {
            (0..SLOTS)
                .map(|slot| {
                    let mut best = 0usize;
                    let mut best_weight = weight(slot, &nodes[0]);
                    for (i, n) in nodes.iter().enumerate().skip(1) {
                        // Sorted ascending, so `>=` gives ties to the greater id, as
                        // `owner_of` does.
                        let w = weight(slot, n);
                        if w >= best_weight {
                            best = i;
                            best_weight = w;
                        }
                    }
                    best as u16
                })
                .collect()
        };
        SlotMap {
            epoch,
            nodes,
            owners,
        }
    }

    /// The membership epoch this map belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The live nodes, sorted by id.
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// The owner of `slot` (`None` when no node is live or `slot >= SLOTS`).
    pub fn owner(&self, slot: Slot) -> Option<&NodeId> {
        let i = *self.owners.get(slot as usize)?;
        self.nodes.get(i as usize)
    }

    /// The owner node of a conversation.
    pub fn owner_of_conv(&self, conv_id: &str) -> Option<&NodeId> {
        self.owner(slot_of(conv_id))
    }

    /// The slots `node` owns, ascending.
    pub fn slots_of<'a>(&'a self, node: &'a NodeId) -> impl Iterator<Item = Slot> + 'a {
        let index = self.nodes.binary_search(node).ok();
        self.owners
            .iter()
            .enumerate()
            .filter(move |(_, &o)| Some(o as usize) == index)
            .map(|(s, _)| s as Slot)
    }

    /// The slots whose owner differs between `self` and `other`, ascending.
    pub fn moved(&self, other: &SlotMap) -> Vec<Slot> {
        (0..SLOTS)
            .filter(|&s| self.owner(s) != other.owner(s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<NodeId> {
        (0..n)
            .map(|i| NodeId::new(format!("node-{i}")).unwrap())
            .collect()
    }

    #[test]
    fn slot_is_pinned() {
        // Every node of every version must compute the same slot: a change to the hash
        // or to SLOTS would silently split ownership across a rolling upgrade.
        assert_eq!(SLOTS, 4096);
        assert_eq!(slot_of(""), 1218);
        assert_eq!(slot_of("p2p-alice-bob"), 833);
        assert_eq!(
            weight(7, &NodeId::new("node-1").unwrap()),
            13467770030113818640
        );
        assert!((0..10_000).all(|i| slot_of(&format!("grp-{i}")) < SLOTS));
    }

    #[test]
    fn owner_is_order_independent_and_matches_the_map() {
        let nodes = ids(7);
        let mut reversed = nodes.clone();
        reversed.reverse();
        let a = SlotMap::new(3, nodes.clone());
        let b = SlotMap::new(3, reversed.iter().cloned().chain(nodes.iter().cloned()));
        assert_eq!(a, b);
        for s in 0..SLOTS {
            assert_eq!(a.owner(s), owner_of(s, &nodes));
            assert_eq!(a.owner(s), owner_of(s, &reversed));
        }
        assert_eq!(a.owner(SLOTS), None);
        assert_eq!(SlotMap::new(0, Vec::new()).owner(0), None);
        assert_eq!(owner_of(0, &[]), None);
        let conv = "p2p-alice-bob";
        assert_eq!(a.owner_of_conv(conv), a.owner(slot_of(conv)));
        let total: usize = nodes.iter().map(|n| a.slots_of(n).count()).sum();
        assert_eq!(total, SLOTS as usize);
    }

    #[test]
    fn balanced() {
        for n in [2usize, 3, 5, 8, 16] {
            let map = SlotMap::new(1, ids(n));
            let fair = SLOTS as f64 / n as f64;
            for node in map.nodes() {
                let owned = map.slots_of(node).count() as f64;
                assert!(
                    (owned - fair).abs() < fair * 0.25,
                    "{n} nodes: {node} owns {owned}, fair share {fair}"
                );
            }
        }
    }

    #[test]
    fn a_join_moves_about_one_in_n_plus_one_slots_all_to_the_newcomer() {
        for n in 1..=12usize {
            let all = ids(n + 1);
            let before = SlotMap::new(1, all[..n].to_vec());
            let after = SlotMap::new(2, all.clone());
            let moved = before.moved(&after);
            let expected = SLOTS as f64 / (n + 1) as f64;
            assert!(
                (moved.len() as f64 - expected).abs() < expected * 0.25,
                "{n} -> {} nodes moved {} slots, expected about {expected}",
                n + 1,
                moved.len()
            );
            for s in moved {
                assert_eq!(after.owner(s), Some(&all[n]), "slot {s} moved elsewhere");
            }
        }
    }

    #[test]
    fn a_leave_moves_only_the_leavers_slots() {
        let all = ids(6);
        let before = SlotMap::new(1, all.clone());
        let gone = &all[2];
        let after = SlotMap::new(2, all.iter().filter(|n| *n != gone).cloned());
        let moved = before.moved(&after);
        let owned: Vec<Slot> = before.slots_of(gone).collect();
        assert_eq!(moved, owned);
        assert!(after.slots_of(gone).next().is_none());
    }
}
