//! `imshard-loadgen`: measures an imshard server the way its users will, and checks
//! that it delivers what it acknowledges.
//!
//! # Scenarios
//! - `connect`: ramps to `--connections` idle authenticated WebSocket connections at
//!   `--rate` per second, heartbeats them every `--heartbeat-interval`, holds them until
//!   `--duration` ends. Reports the connect rate and latency, failures and, with
//!   `--server-pid`, the server's RSS before and after, i.e. bytes per connection.
//! - `p2p`: `--pairs` pairs of users; both users of a pair send to each other at a total
//!   of `--rate` sends/s over all senders (`--rate 0`: as fast as acks allow, with
//!   `--window` sends in flight per sender). User ids are picked so that pairs cover
//!   every (shard, shard) combination of `--server-shards`. Reports send->ack and
//!   send->push latency.
//! - `group`: `--groups` groups of `--members` members, created with CreateGroupRequest
//!   before the load; the first `--senders` (`--senders-per-group`) members of each
//!   group send. Reports deliveries/s and send->push latency; with
//!   `--cpu-per-delivery` the server's CPU µs per delivery.
//!
//! With a fixed `--rate`, latencies count from each send's slot in its sender's
//! schedule (no coordinated omission). Every connection acknowledges its pushes with
//! cumulative PushAcks, one per conversation every `--ack-interval` or `--ack-batch`
//! pushes ([`client::ack_ticker`]).
//!
//! Every scenario runs setup, then the load for `--duration`, then a drain (no new
//! sends; at most `--drain-timeout` waiting for outstanding acks and pushes), and stops
//! by itself. Every push is checked by [`checker`]: exactly once, in seq order per
//! conversation, no gaps. The process exits non-zero when anything failed or the checker
//! found a violation.
//!
//! # Layout
//! - [`cli`]: flags. [`app`]: host checks, secret, plan, run, merge.
//! - [`runner`]: one pinned thread per CPU, each with its own io_uring (monoio) runtime;
//!   phase hand-offs through a few atomics.
//! - [`scenario`]: plans (who connects, who sends to whom) and the per-thread programs.
//! - [`client`]: one thread's connections: connect, reader and writer tasks, envelope
//!   handling. [`ws`]: the client side of RFC 6455 (upgrade, masked frames).
//! - [`checker`]: the delivery checker. [`stats`]: per-thread counters and hdrhistograms.
//! - [`report`]: human summary and JSON. [`sys`]: rlimits, CPUs, clock, sockets,
//!   /proc facts.
//!
//! State ownership: each thread owns its connections, stats and checker outright (all
//! members of a conversation live on one thread); the main thread only sees them after
//! the threads end.

pub mod app;
pub mod checker;
pub mod cli;
pub mod client;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod stats;
pub mod sys;
pub mod ws;
