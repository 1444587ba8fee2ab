//! What moves through the SPSC rings between shards: a connection handed over, a job
//! for the service on the target shard, or the typed answer to a call.
//!
//! The runtime carries the service's work without knowing it (seastar's
//! `sharded<T>::invoke_on`): a [`Job`] is a closure that runs on the target shard
//! with that shard's state; a call's answer is the value of the type the caller asked
//! for (`Call<R>`), moved back as is: no encoding, no bytes by command.

use std::any::Any;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::rc::Rc;

use super::Shard;
use crate::proto::json::Negotiated;

/// Where an answer of type `R` goes: the asking shard and its call token. Copy and
/// `Send`, so a service can keep it (e.g. in a list of waiters) and answer later.
pub struct ReplyTo<R> {
    pub shard: usize,
    pub token: u64,
    _answer: PhantomData<fn(R)>,
}

impl<R> ReplyTo<R> {
    pub(super) fn new(shard: usize, token: u64) -> ReplyTo<R> {
        ReplyTo {
            shard,
            token,
            _answer: PhantomData,
        }
    }
}

impl<R> Clone for ReplyTo<R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<R> Copy for ReplyTo<R> {}

impl<R> std::fmt::Debug for ReplyTo<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReplyTo({}#{})", self.shard, self.token)
    }
}

impl<R> PartialEq for ReplyTo<R> {
    fn eq(&self, other: &Self) -> bool {
        self.shard == other.shard && self.token == other.token
    }
}

impl<R> Eq for ReplyTo<R> {}

/// Work for the service of the target shard, run there with its state.
pub type Job<S> = Box<dyn FnOnce(&Rc<Shard<S>>) + Send>;

/// A message between shards.
pub enum ShardMsg<S> {
    /// A WebSocket upgrade that another shard accepted and authenticated, for a user
    /// this shard owns: this shard answers 101 and owns the connection from then on.
    HandOver(Box<HandOver>),
    /// Work for this shard's service (a command, a delivery, a query).
    Run(Job<S>),
    /// The answer to a call this shard made: the `R` of its `Call<R>`, boxed to cross
    /// the ring and unboxed by the waiting call.
    Reply {
        token: u64,
        value: Box<dyn Any + Send>,
    },
}

/// An upgrade handed from the accepting shard to the owner.
pub struct HandOver {
    pub fd: OwnedFd,
    pub user: String,
    pub device: String,
    pub device_type: String,
    pub ws_key: String,
    /// The subprotocol chosen from the client's `Sec-WebSocket-Protocol`.
    pub subprotocol: Negotiated,
    /// Bytes the client sent after the request head (normally none).
    pub leftover: Vec<u8>,
}
