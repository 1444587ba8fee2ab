//! imshard: a thread-per-core instant-messaging connection server.
//!
//! # Layout
//! - [`server`]: start-up (threads, pinning, runtimes) and shutdown.
//! - [`shard`]: the per-core runtime. A [`shard::Shard`] owns, on its one thread, the
//!   connections and conversation rows of the users with `hash(user) % N == i` and the
//!   seq counters, messages and dedupe of conversations with `hash(conv) % N == i`.
//!   [`shard::ring`]: SPSC rings between shards; [`shard::msg`]: every message they
//!   carry; [`shard::conn`]: a WebSocket connection; [`shard::accept`]: accept,
//!   upgrade, hand-over; [`shard::timer`]: the heartbeat wheel; [`shard::acks`]: the
//!   highest seq each connection acknowledged per conversation (PushAck).
//! - [`chat`]: message logic. [`chat::execute`] runs a client operation on the
//!   caller's shard; [`chat::conv`] is the conversation side (seq, dedupe, durable
//!   send, pull, recall, fan-out); [`chat::group`] members, roles and membership
//!   changes; [`chat::convlist`] conversation lists, read marks, unread;
//!   [`chat::user`] the user side (devices, rows, delivery); [`chat::cache`] the byte
//!   budget over loaded rows and conversation states.
//! - [`api`]: the HTTP JSON API, `/healthz`, `/metrics`; [`metrics`]: histograms,
//!   refusal and cut counters each shard records, and the scrape's rendering.
//! - [`proto`]: wire formats: protobuf types, WebSocket frames, HTTP, envelopes.
//! - [`store`]: the storage interface and its embedded (fjall) backend: writes batched
//!   and synced by a sync thread per shard, reads on a reader thread per shard
//!   ([`store::offloop`]); it knows nothing of shards or chat. [`store::redis`]: a
//!   Redis connection per shard on its io_uring loop, scripts and presence, which the
//!   Redis backend builds on.
//! - [`cluster`]: cluster mode's building blocks: [`cluster::membership`] (a node's
//!   lease in Redis, the live set and its epoch), [`cluster::slots`] (`slot_of`, owner
//!   node by rendezvous hashing), [`cluster::link`] (node-to-node requests, one hop),
//!   [`cluster::events`] (the kick / broadcast / membership channels).
//!   The subscribed Redis connection is [`store::redis::pubsub`].
//! - [`eventlog`]: the Kafka event log (cluster mode): a per-shard [`eventlog::EventLog`]
//!   handle fed to one rdkafka producer thread, and the outbox pump that makes it
//!   survive Kafka outages and crashes.
//! - [`rt`]: loop primitives: [`rt::bell`], the eventfd through which other threads
//!   (shards, the store's threads) wake a busy loop; [`rt::yield_now`].
//! - [`web`]: the browser chat page at `/demo` (static files in the binary).
//! - [`auth`]: JWT verification and minting; [`config`]: flags, env, TOML.
//! - [`codes`]: error codes, close codes, kick reasons; [`limits`]: protocol limits;
//!   [`ids`]: identifiers and conversation ids.

pub mod api;
pub mod auth;
pub mod chat;
pub mod cluster;
pub mod codes;
pub mod config;
pub mod eventlog;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod proto;
pub mod rt;
pub mod server;
pub mod shard;
pub mod store;
pub mod web;
