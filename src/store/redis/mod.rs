//! Redis, driven from a shard's own io_uring loop: the groundwork of the Redis store
//! backend of DESIGN.md (messages, rows and presence in Redis; every cluster node).
//!
//! The `redis` crate is used only as the RESP codec (commands encoded with
//! [`::redis::Cmd`] / [`::redis::Pipeline`], replies parsed with
//! [`::redis::Parser`]); all socket I/O is a `monoio::net::TcpStream` on the shard's
//! thread. No tokio, no extra thread.
//!
//! # Layout
//! - [`conn`]: [`RedisConn`], one connection with its driver task, pipelining and
//!   reconnect; [`RedisConn::queue`] queues commands at once and hands back a
//!   [`Pending`] to await later, so a caller keeps several calls in flight in order.
//! - [`backend`]: the store on Redis: key layout, reads, and the writer that sends the
//!   shard's batches as fenced rounds, several in flight.
//! - [`script`]: [`run_script`], a Lua script by `EVALSHA`, falling back to `EVAL`.
//! - [`pubsub`]: [`PubSubConn`], a subscribed connection of its own (channels held by
//!   the owner, re-subscribed on reconnect, which it reports); `PUBLISH` goes over a
//!   [`RedisConn`] ([`publish`]).
//! - [`presence`]: the `user:online:{uuid}` ZSETs: [`PresenceBatch`] (changes sent as
//!   one pipeline), [`PresenceWriter`] (a shard's changes of one loop turn, sent at the
//!   end of the turn) and [`online_devices`].
//!
//! # What [`RedisConn`] guarantees
//! - **Ordering**: one TCP connection at a time; commands reach Redis in the order the
//!   calls were made on the shard, and replies are matched to callers in that order.
//!   Commands of one call are contiguous (no other caller's command in between), but
//!   only a `MULTI`/`EXEC` pipeline or a script makes them atomic.
//! - **One write per loop turn**: a call only appends its encoded commands to the
//!   connection's output buffer and wakes the writer task. The writer runs after every
//!   task already queued in the turn, so the calls of one turn go out in one `write`
//!   (counted in [`RedisStats::writes`]). While a write is in flight, new calls gather
//!   for the next one, which waits until the tasks queued when the write completed
//!   have run.
//! - **Timeout**: a call with no complete answer after [`RedisConfig::timeout`] fails
//!   with [`RedisError::Timeout`] and the connection is dropped (its reply stream can
//!   no longer be trusted to line up), failing every other call in flight with it.
//! - **Failure**: when the connection breaks (I/O error, EOF, protocol error, timeout)
//!   every call written or queued on it fails at once with
//!   [`RedisError::Disconnected`]; calls made while there is no connection fail at
//!   once with [`RedisError::Unavailable`]. Both are retryable. For `Disconnected` and
//!   `Timeout` the outcome is unknown: the commands may or may not have run, so writes
//!   that must not run twice go through a script that checks what is stored first
//!   (the fencing of DESIGN.md).
//! - **Reconnect**: a driver task reconnects in the background with exponential
//!   backoff (from [`RedisConfig::backoff_min`] doubling to
//!   [`RedisConfig::backoff_max`], each wait jittered to 50-100%), sends `AUTH` and
//!   `SELECT` before anything else, and service resumes by itself. Nothing is replayed
//!   on the new connection.
//! - **Server errors are values**: an `-ERR` reply is the [`::redis::Value::ServerError`]
//!   of the command that caused it, returned to that caller only; the other replies of
//!   the same write are unaffected, and the connection stays up.
//! - **Cancellation**: dropping a call's future does not withdraw its commands once
//!   queued; their replies are read and dropped.
//! - **Shared connection state**: calls share the connection, so a call must leave it
//!   as it found it: `MULTI` only with its `EXEC` in the same call (or use an atomic
//!   [`::redis::Pipeline`]), no `WATCH`, `SELECT`, `AUTH`, `SUBSCRIBE` or
//!   `CLIENT REPLY` (the driver sends `AUTH`/`SELECT` itself on every connection).
//!
//! Not done here: TLS and unix sockets (refused as [`RedisError::BadUrl`]), RESP3,
//! subscribing (a subscribed connection cannot carry calls: it is a connection of its
//! own, [`pubsub`]), Redis Cluster redirections (`MOVED`/`ASK` come back as server
//! errors; keys carry hash tags so a cluster client can be added). A host name in the URL is
//! resolved by the system resolver on the shard's thread at each connection attempt:
//! give an IP address where that matters. Queued calls are bounded by time (the call
//! timeout), not by count.
//!
//! Tested against a real `redis-server` in `tests/redis_conn.rs`; measured by
//! `benches/redis.rs` (numbers in `benches/README.md`).

pub mod backend;
pub mod conn;
pub mod outbox;
pub mod presence;
pub mod pubsub;
pub mod script;

pub use conn::{Pending, RedisConfig, RedisConn, RedisStats};
pub use presence::{online_devices, online_key, PresenceBatch, PresenceWriter};
pub use pubsub::{publish, PubSubConn, PubSubEvent, PubSubStats};
pub use script::{run_script, LuaScript};

use std::time::Duration;

/// A Redis failure: what went wrong, and (with [`RedisError::is_retryable`]) whether
/// trying again later can succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisError {
    /// The URL does not parse or names a transport we do not drive (unix socket, TLS).
    /// Not retryable: fix the configuration.
    BadUrl(String),
    /// There is no connection right now (connecting, or waiting to reconnect after a
    /// failure); nothing was sent. Retryable. Holds the last connection error.
    Unavailable(String),
    /// The connection broke while the call was queued or in flight; the commands may
    /// or may not have run. Retryable.
    Disconnected(String),
    /// No complete reply within the call timeout; the connection was dropped and the
    /// commands may or may not have run. Retryable.
    Timeout(Duration),
    /// The server refused `AUTH` or `SELECT` while connecting. Not retryable without a
    /// configuration change (the driver keeps trying, in case the server is fixed).
    Handshake(String),
    /// The server answered a helper's command with an error reply (`code` is its first
    /// word, e.g. `ERR`, `WRONGTYPE`, `LOADING`). Retryable only for the codes of a
    /// busy or failing-over server.
    Server { code: String, detail: String },
    /// A reply of a shape the helper does not expect (a bug or a foreign key type).
    /// Not retryable.
    UnexpectedReply(String),
}

impl RedisError {
    /// Whether the same call may succeed later without a configuration change.
    pub fn is_retryable(&self) -> bool {
        match self {
            RedisError::Unavailable(_) | RedisError::Disconnected(_) | RedisError::Timeout(_) => {
                true
            }
            RedisError::Server { code, .. } => matches!(
                code.as_str(),
                "LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" | "READONLY"
            ),
            RedisError::BadUrl(_) | RedisError::Handshake(_) | RedisError::UnexpectedReply(_) => {
                false
            }
        }
    }

    /// The error of a server error reply.
    pub fn from_server(e: &::redis::ServerError) -> RedisError {
        RedisError::Server {
            code: e.code().to_string(),
            detail: e.details().unwrap_or("").to_string(),
        }
    }
}

impl std::fmt::Display for RedisError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisError::BadUrl(e) => write!(f, "bad redis url: {e}"),
            RedisError::Unavailable(e) => write!(f, "redis unavailable: {e}"),
            RedisError::Disconnected(e) => write!(f, "redis connection lost: {e}"),
            RedisError::Timeout(t) => write!(f, "redis did not answer within {t:?}"),
            RedisError::Handshake(e) => write!(f, "redis refused the connection: {e}"),
            RedisError::Server { code, detail } => write!(f, "redis error: {code} {detail}"),
            RedisError::UnexpectedReply(e) => write!(f, "unexpected redis reply: {e}"),
        }
    }
}

impl std::error::Error for RedisError {}
