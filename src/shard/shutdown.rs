//! Graceful shutdown of one shard (SIGTERM/SIGINT; the main thread sets
//! [`super::Global::shutting_down`] and rings every shard's bell).
//!
//! Phases, each bounded by `shutdown_grace`:
//! 1. Stop accepting: the accept loop ends and the listener closes.
//! 2. Close every connection with 1001 (going away), spread over the first half of the
//!    grace so a million clients do not reconnect in the same millisecond. A
//!    connection is closed only once its requests in flight are answered, so no client
//!    is left guessing whether a send it made was stored.
//! 3. Wait for the closes to finish (each lingers at most
//!    [`super::conn::CLOSE_LINGER_SECS`]) and for HTTP requests in flight.
//! 4. Wait until the store has made everything staged durable.
//!
//! The shard's loop keeps running meanwhile: other shards' calls are still answered
//! until the process exits, after every shard reported.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::conn::Conn;
use super::{Service, Shard};
use crate::codes::close;

/// How often the phases look at their progress.
const STEP: Duration = Duration::from_millis(10);

/// Runs the phases above on this shard; returns when they are done or the grace ran out.
pub async fn drain<S: Service>(shard: Rc<Shard<S>>, conns: Vec<Rc<Conn>>) {
    let grace = shard.cfg.shutdown_grace;
    let started = Instant::now();
    let close_by = started + grace / 2;
    let end = started + grace;
    let total = conns.len();
    let mut conns: VecDeque<Rc<Conn>> = conns.into();
    let steps = ((grace / 2).as_millis() / STEP.as_millis()).max(1) as usize;
    let per_step = total.div_ceil(steps).max(1);
    while !conns.is_empty() && Instant::now() < close_by {
        let mut deferred = Vec::new();
        for _ in 0..per_step.min(conns.len()) {
            let Some(c) = conns.pop_front() else { break };
            if c.has_requests_in_flight() {
                deferred.push(c);
            } else {
                c.close(&shard, close::GOING_AWAY, None);
            }
        }
        conns.extend(deferred);
        monoio::time::sleep(STEP).await;
    }
    for c in conns {
        c.close(&shard, close::GOING_AWAY, None);
    }
    while (shard.counters.connections.get() > 0 || shard.requests_in_flight.get() > 0)
        && Instant::now() < end
    {
        monoio::time::sleep(STEP).await;
    }
    let flush_by = Instant::now().max(end) + Duration::from_secs(2);
    while shard.unflushed() > 0 && Instant::now() < flush_by {
        monoio::time::sleep(STEP).await;
    }
    tracing::info!(
        shard = shard.id,
        closed = total,
        left_open = shard.counters.connections.get(),
        "shard drained"
    );
}
