//! The durable side: an outbox the store writes in the same atomic batch as the data,
//! and [`OutboxPump`], which produces what the outbox holds and trims what Kafka has.
//!
//! The store implements [`Outbox`] (Redis: [`crate::store::redis::outbox::RedisOutbox`],
//! a stream per shard); the chat layer puts each event into the store batch that
//! stores what the event reports (see [`crate::store::redis::outbox::xadd`]) and calls
//! [`OutboxPump::notify`] once the batch is durable.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;

use super::{AppendError, EventLog, Topic};

/// An outbox entry's id: Redis stream ids (`ms-seq`), ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct OutboxId {
    pub ms: u64,
    pub seq: u64,
}

impl OutboxId {
    /// Parses `ms-seq`.
    pub fn parse(s: &str) -> Option<OutboxId> {
        let (ms, seq) = s.split_once('-')?;
        Some(OutboxId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The smallest id after this one.
    pub fn next(self) -> OutboxId {
        match self.seq.checked_add(1) {
            Some(seq) => OutboxId { ms: self.ms, seq },
            None => OutboxId {
                ms: self.ms + 1,
                seq: 0,
            },
        }
    }
}

impl fmt::Display for OutboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One stored event waiting to be produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub id: OutboxId,
    pub topic: Topic,
    pub key: Bytes,
    pub value: Bytes,
}

/// An outbox failure (the pump logs it and tries again after its backoff).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxError {
    /// The store is unreachable or failed the call; retryable.
    Unavailable(String),
    /// An entry or reply of a shape we never write.
    Corrupt(String),
}

impl fmt::Display for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutboxError::Unavailable(e) => write!(f, "outbox unavailable: {e}"),
            OutboxError::Corrupt(e) => write!(f, "outbox corrupt: {e}"),
        }
    }
}

impl std::error::Error for OutboxError {}

/// The store-side hook: a durable, ordered list of events of one shard. Entries are
/// added by the store, in the same atomic write as the data they report (so an event
/// is stored exactly when its data is), and removed only by [`Outbox::trim`].
///
/// Futures run on the shard's loop and need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait Outbox {
    /// Up to `limit` entries with ids after `after` (all from the start when `None`),
    /// oldest first.
    async fn read(
        &self,
        after: Option<OutboxId>,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, OutboxError>;
    /// Removes every entry with an id <= `upto`.
    async fn trim(&self, upto: OutboxId) -> Result<(), OutboxError>;
    /// How many entries it holds (produced-but-not-trimmed ones included).
    async fn stored(&self) -> Result<u64, OutboxError>;
}

/// How the pump works.
#[derive(Debug, Clone)]
pub struct PumpConfig {
    /// Entries read per outbox call.
    pub batch: usize,
    /// Looks at the outbox at least this often, notified or not (catches entries
    /// another writer of the same outbox added, and notifications that were missed).
    pub poll_interval: Duration,
    /// Wait after an outbox error before the next call.
    pub error_backoff: Duration,
}

impl Default for PumpConfig {
    fn default() -> Self {
        PumpConfig {
            batch: 1024,
            poll_interval: Duration::from_millis(500),
            error_backoff: Duration::from_millis(500),
        }
    }
}

/// What the pump did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PumpStats {
    /// Entries read from the outbox and appended to the log.
    pub read: u64,
    /// Entries trimmed from the outbox (delivered to Kafka).
    pub trimmed: u64,
    /// Entries read and appended, not yet confirmed by Kafka.
    pub in_flight: u64,
    /// Outbox length at the last look (what Kafka does not have yet, plus what was
    /// confirmed but not trimmed yet).
    pub outbox_len: u64,
    /// Failed outbox calls.
    pub errors: u64,
    /// Times the log refused an entry because its backlog cap was reached.
    pub held_back: u64,
}

/// Produces a shard's outbox through its [`EventLog`] and trims what Kafka confirmed.
/// One per shard; runs as a task on the shard's loop.
pub struct OutboxPump<O: Outbox> {
    outbox: O,
    log: EventLog,
    cfg: PumpConfig,
    /// The last entry appended to the log.
    read_upto: Cell<Option<OutboxId>>,
    /// (log position, outbox id) of entries appended, not yet trimmed, oldest first.
    in_flight: RefCell<VecDeque<(u64, OutboxId)>>,
    notified: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    stopped: Cell<bool>,
    stats: Cell<PumpStats>,
}

impl<O: Outbox + 'static> OutboxPump<O> {
    /// Starts the pump task on the current loop. On start it reads the outbox from its
    /// first entry: whatever a previous run left (not produced, or produced and not
    /// trimmed) is produced now, so delivery is at least once.
    pub fn start(outbox: O, log: EventLog, cfg: PumpConfig) -> Rc<OutboxPump<O>> {
        let pump = Rc::new(OutboxPump {
            outbox,
            log,
            cfg,
            read_upto: Cell::new(None),
            in_flight: RefCell::new(VecDeque::new()),
            notified: Cell::new(true),
            waker: RefCell::new(None),
            stopped: Cell::new(false),
            stats: Cell::new(PumpStats::default()),
        });
        monoio::spawn(run(pump.clone()));
        pump
    }

    /// Tells the pump the outbox has new entries (call after a durable batch that
    /// added some). Cheap; several calls in one turn are one look.
    pub fn notify(&self) {
        self.notified.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Stops the task at its next step.
    pub fn stop(&self) {
        self.stopped.set(true);
        self.notify();
    }

    pub fn stats(&self) -> PumpStats {
        let mut s = self.stats.get();
        s.in_flight = self.in_flight.borrow().len() as u64;
        s
    }

    /// The outbox this pump drains.
    pub fn outbox(&self) -> &O {
        &self.outbox
    }

    fn count(&self, f: impl FnOnce(&mut PumpStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Reads and appends what fits the log's room; true when the outbox may hold more.
    async fn fill(&self) -> Result<bool, OutboxError> {
        let room = self.log.room().min(self.cfg.batch);
        if room == 0 {
            self.count(|s| s.held_back += 1);
            return Ok(false);
        }
        let entries = self.outbox.read(self.read_upto.get(), room).await?;
        let full = entries.len() == room;
        for e in entries {
            match self.log.append(e.topic, &e.key, e.value) {
                Ok(pos) => {
                    self.in_flight.borrow_mut().push_back((pos, e.id));
                    self.read_upto.set(Some(e.id));
                    self.count(|s| s.read += 1);
                }
                Err(AppendError::Backlog { .. }) => {
                    // Read again from here once the log has room.
                    self.count(|s| s.held_back += 1);
                    return Ok(false);
                }
            }
        }
        Ok(full)
    }

    /// Trims the entries Kafka has.
    async fn trim(&self) -> Result<(), OutboxError> {
        let delivered = self.log.delivered();
        let mut upto = None;
        let mut n = 0u64;
        {
            let q = self.in_flight.borrow();
            for (pos, id) in q.iter() {
                if *pos > delivered {
                    break;
                }
                upto = Some(*id);
                n += 1;
            }
        }
        if let Some(id) = upto {
            self.outbox.trim(id).await?;
            let mut q = self.in_flight.borrow_mut();
            for _ in 0..n {
                q.pop_front();
            }
            self.count(|s| s.trimmed += n);
        }
        Ok(())
    }

    /// Waits for a notification, a delivery of the oldest entry in flight, or the poll
    /// interval.
    async fn wait(&self) {
        let first = self.in_flight.borrow().front().map(|(p, _)| *p);
        let notified = std::future::poll_fn(|cx| {
            if self.notified.replace(false) {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        });
        match first {
            Some(pos) => {
                monoio::select! {
                    _ = notified => {},
                    _ = self.log.wait_delivered(pos) => {},
                    _ = monoio::time::sleep(self.cfg.poll_interval) => {},
                }
            }
            None => {
                monoio::select! {
                    _ = notified => {},
                    _ = monoio::time::sleep(self.cfg.poll_interval) => {},
                }
            }
        }
    }
}

async fn run<O: Outbox + 'static>(pump: Rc<OutboxPump<O>>) {
    let mut polls = 0u64;
    while !pump.stopped.get() {
        let step = async {
            pump.trim().await?;
            let more = pump.fill().await?;
            Ok::<bool, OutboxError>(more)
        }
        .await;
        match step {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                pump.count(|s| s.errors += 1);
                tracing::warn!(target: "imshard::eventlog", "shard {}: {e}", pump.log.shard());
                monoio::time::sleep(pump.cfg.error_backoff).await;
                continue;
            }
        }
        // The length is a metric: look now and then, not every turn.
        polls += 1;
        if polls % 8 == 1 {
            if let Ok(n) = pump.outbox.stored().await {
                pump.count(|s| s.outbox_len = n);
            }
        }
        pump.wait().await;
    }
}
