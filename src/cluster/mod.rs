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
//!
//! The pub/sub connection the cluster channels arrive on is
//! [`crate::store::redis::pubsub`].
//!
//! These pieces know nothing of chat or shards: the chat layer defines the typed
//! requests that travel over [`link`] and decides what a shard does when the slot
//! map changes.

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
