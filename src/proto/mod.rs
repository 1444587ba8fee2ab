//! The protocol in layers: WebSocket frames ([`ws`]) carry protobuf `ClientFrame` /
//! `MessageEnvelope` ([`pb`], generated from `imshard.proto`), HTTP ([`http`]) carries the
//! upgrade and the JSON API; [`json`] is the same messages as JSON text frames (the
//! `imshard.v1.json` subprotocol). Every parser here is a pure function over bytes.

pub mod envelope;
pub mod http;
pub mod json;
pub mod ws;

/// Generated code, nested as prost's cross-package paths expect.
#[allow(clippy::all, missing_docs)]
pub mod imshard {
    /// The wire contract of docs/PROTOCOL.md (from `imshard.proto`).
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/imshard.v1.rs"));
    }
    pub mod store {
        /// Records of the embedded store (from `store.proto`).
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/imshard.store.v1.rs"));
        }
    }
    pub mod node {
        /// What nodes of a cluster ask each other (from `node.proto`).
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/imshard.node.v1.rs"));
        }
    }
    pub mod events {
        /// Records of the Kafka event log (from `events.proto`; see [`crate::eventlog`]).
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/imshard.events.v1.rs"));
        }
    }
}

pub use imshard::events::v1 as events_pb;
pub use imshard::node::v1 as node_pb;
pub use imshard::store::v1 as store_pb;
pub use imshard::v1 as pb;
