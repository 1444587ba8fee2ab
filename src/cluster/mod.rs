//! Cluster mode's building blocks (DESIGN.md "Cluster mode"): which nodes are live,
//! which node owns a conversation, and how a request reaches that node.
//!
//! # Layout
//! - [`membership`]: a node's lease in Redis and the live set every node reads
//!   (join/leave events with a membership epoch); when a node must stop owning slots.
//! - [`slots`]: `slot_of(conv_id)` and the owner node of a slot (rendezvous hashing
//!   over the live set); the owner shard inside it is `shard::shard_of_conv`.
//! - [`link`]: the node-to-node transport: an opaque request to node X, its reply,
//!   one hop, batched per loop turn.
//! - [`events`]: the channels every node holds (kick, broadcast, membership
//!   changes) and their payloads decoded into checked events.
//!
//! The subscribed Redis connection the cluster channels arrive on (kick, broadcast,
//! `imshard:nodes:changed`, later the delivery channels) is
//! [`crate::store::redis::pubsub`]; `PUBLISH` goes over a shard's ordinary
//! [`crate::store::redis::RedisConn`].
//!
//! These pieces know nothing of chat or shards: the chat layer defines the typed
//! requests that travel over [`link`] and decides what a shard does when the slot
//! map changes.
//!
//! # How they compose (what integration wires up)
//! 1. One shard per node runs [`membership::Membership`] and a
//!    [`crate::store::redis::PubSubConn`] holding the channels of
//!    [`events::subscribe_cluster_channels`]: a
//!    [`events::ClusterEvent::NodesChanged`] calls
//!    [`membership::Membership::refresh_now`]; kicks and broadcasts go to the shards
//!    that hold the users' connections. After a
//!    [`crate::store::redis::PubSubEvent::Resubscribed`], the node also reads the
//!    live set, and its clients are told to resync by seq (DESIGN.md).
//! 2. On every [`membership::MembershipEvent::Changed`] that shard builds a
//!    [`slots::SlotMap`] from the live set and hands it (and the peers' addresses,
//!    for [`link::Links::set_peers`]) to every shard through the rings.
//! 3. A conversation operation on shard s of node A: `owner = map.owner_of_conv(c)`.
//!    If it is A and A [is active](membership::Membership::is_active), it goes to
//!    `shard_of_conv(c, shards)` as today; if it is another node B, shard s sends it
//!    with its own [`link::Links`] to B, whose [`link::LinkServer`] hands it to B's
//!    owner shard and answers; if no node is active for it, the answer is 50301.
//!    B listens on one advertised address: whichever shard accepts a link passes
//!    each request through the rings to `shard_of_conv` (one ring hop inside B; a
//!    port per shard, advertised with the shard count, would save it: measure
//!    first). A slot gained on a join waits
//!    [`membership::MembershipConfig::handover_delay`] before it is served.
//! 4. Fencing in the store's batch script catches the moments when two nodes both
//!    believe they own a slot.
//!
//! # Node-to-node transport: direct TCP, not Redis pub/sub
//! Measured with `cargo bench --bench cluster_transport` (2026-11-25, 2 vCPU AMD EPYC
//! guest, kernel 6.18, rustc 1.95, Redis 7.0.15, loopback; node A and node B each a
//! monoio runtime on its own thread, Redis a third process on the same 2 cores;
//! 64-byte payloads; two runs):
//!
//! | path | round trip p50 | p99 | 256 requests in flight |
//! | --- | --- | --- | --- |
//! | bare monoio sockets, one frame at a time (the floor) | 52.5-55.5 us | 75-76 us | - |
//! | (a) direct TCP, [`link`] | 54.4-54.8 us | 76-77 us | 1.76-1.83 M req/s |
//! | (b) Redis pub/sub: publish on B's channel, B publishes the reply on A's | 94-104 us | 140-146 us | 0.34-0.35 M req/s |
//!
//! The floor is this guest's cost of waking the other thread twice per round trip;
//! [`link`] adds about 2 us to it. Through Redis a round trip is about twice as long
//! and throughput a fifth, and Redis, which every node shares and which also carries
//! the store, does two `PUBLISH`es and two deliveries per forwarded request, so the
//! cost grows with the cluster, on the one process that cannot be scaled by adding
//! nodes. Pub/sub is also at-most-once with no notice of a lost request short of a
//! timeout, where a broken TCP connection fails its requests at once.
//!
//! **Decision: [`link`], direct TCP between nodes** (one connection per peer per
//! shard, addresses from the live set). Redis pub/sub stays for what is addressed to
//! *every* node or to whichever nodes hold a channel: kick, broadcast, membership
//! changes, routed deliveries.

pub mod events;
pub mod link;
pub mod membership;
pub mod slots;

use std::fmt;

/// Longest node id, in bytes.
pub const NODE_ID_MAX: usize = 64;

/// A node's name in the cluster (`--node-id`): 1-64 bytes of `[A-Za-z0-9_.@-]`.
/// Stable across restarts of the same node, unique among live nodes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    /// Checks the form; the error says what is wrong.
    pub fn new(id: impl Into<String>) -> Result<NodeId, String> {
        let id = id.into();
        if id.is_empty() || id.len() > NODE_ID_MAX {
            return Err(format!(
                "node id must be 1-{NODE_ID_MAX} bytes, got {}",
                id.len()
            ));
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-')))
        {
            return Err(format!(
                "node id {id:?} has {c:?}: only [A-Za-z0-9_.@-] are allowed"
            ));
        }
        Ok(NodeId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        assert!(NodeId::new("node-1").is_ok());
        assert!(NodeId::new("a.b@c_d").is_ok());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("x".repeat(65)).is_err());
        assert!(NodeId::new("has space").unwrap_err().contains("' '"));
        assert!(NodeId::new("ü").is_err());
    }
}
