//! [`EventLog`]: a shard's handle on the Kafka producer. Lives on the shard's thread;
//! every method returns at once.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;

use super::kafka::{Confirm, Outgoing, ShardLink};
use super::{AppendError, EventLogStats, Topic};

/// A shard's handle on the event log. Cheap to clone (an `Rc`); not `Send`.
///
/// Positions: every accepted [`EventLog::append`] gets the next position (1, 2, ...)
/// of this shard. [`EventLog::delivered`] is the cursor: every position up to it is in
/// Kafka (acknowledged by the partition leader, `acks=all`).
#[derive(Clone)]
pub struct EventLog(Rc<Inner>);

struct Inner {
    shard: usize,
    ring: RefCell<rtrb::Producer<Outgoing>>,
    confirms: RefCell<rtrb::Consumer<Confirm>>,
    link: ShardLink0,
    max_records: usize,
    max_bytes: usize,
    retry_backoff: Duration,
    st: RefCell<State>,
    /// The feeder is unparked once per loop turn that appended.
    kick_scheduled: Cell<bool>,
    retry_scheduled: Cell<bool>,
    /// Tasks waiting for the cursor to reach a position.
    waiters: RefCell<Vec<(u64, Waker)>>,
}

/// The parts of the link the handle keeps after taking the rings.
struct ShardLink0 {
    ret: std::sync::Arc<super::kafka::ShardReturn>,
    feeder: std::thread::Thread,
}

/// One record not yet known to be in Kafka.
struct Slot {
    topic: Topic,
    key: Bytes,
    value: Bytes,
    done: bool,
    /// Failed and waiting for the retry task.
    failed: bool,
}

#[derive(Default)]
struct State {
    /// The position the next append gets.
    next: u64,
    /// The cursor: every position <= `delivered` is in Kafka.
    delivered: u64,
    /// Positions `delivered + 1 ..= next - 1`, oldest first.
    pending: VecDeque<Slot>,
    pending_bytes: usize,
    stats: EventLogStats,
}

impl EventLog {
    /// The handle of the shard `link` was made for (call on that shard's thread,
    /// inside its monoio runtime, which must have its timer enabled). The shard's bell
    /// listener must call [`EventLog::wake_local`] when the bell rings.
    pub fn new(link: ShardLink) -> EventLog {
        let ShardLink {
            shard,
            ring,
            confirms,
            ret,
            feeder,
            cfg,
        } = link;
        EventLog(Rc::new(Inner {
            shard,
            ring: RefCell::new(ring),
            confirms: RefCell::new(confirms),
            link: ShardLink0 { ret, feeder },
            max_records: cfg.max_records.max(1),
            max_bytes: cfg.max_bytes,
            retry_backoff: cfg.retry_backoff,
            st: RefCell::new(State {
                next: 1,
                ..State::default()
            }),
            kick_scheduled: Cell::new(false),
            retry_scheduled: Cell::new(false),
            waiters: RefCell::new(Vec::new()),
        }))
    }

    /// The shard this handle belongs to.
    pub fn shard(&self) -> usize {
        self.0.shard
    }

    /// Queues one record for `topic` with `key` (the conversation id on the events
    /// topic, the recipient's uuid on the offline topic) and returns its position.
    /// Never blocks: the records of one loop turn are handed to the producer thread
    /// together at the end of the turn, and librdkafka batches them per partition.
    ///
    /// Refused with [`AppendError::Backlog`] when the records not yet in Kafka would
    /// pass the cap ([`super::EventLogConfig::max_records`] / `max_bytes`): Kafka is
    /// down or slow. Nothing is dropped; the caller keeps the event (it is in the
    /// outbox) and offers it again later ([`super::OutboxPump`] does this).
    pub fn append(&self, topic: Topic, key: &[u8], value: Bytes) -> Result<u64, AppendError> {
        self.drain_confirms();
        let inner = &self.0;
        let pos = {
            let mut st = inner.st.borrow_mut();
            let len = key.len() + value.len();
            if st.pending.len() >= inner.max_records
                || (st.pending_bytes + len > inner.max_bytes && !st.pending.is_empty())
            {
                st.stats.refused += 1;
                return Err(AppendError::Backlog {
                    records: st.pending.len(),
                    bytes: st.pending_bytes,
                });
            }
            let pos = st.next;
            st.next += 1;
            let key = Bytes::copy_from_slice(key);
            // Does not fail: the ring holds max_records, and every record on it is
            // pending (the feeder takes a record off before offering it). Were it
            // ever full, the record is kept as failed and offered again by the retry.
            let queued = inner
                .ring
                .borrow_mut()
                .push(Outgoing {
                    topic,
                    key: key.clone(),
                    value: value.clone(),
                    pos,
                })
                .is_ok();
            st.pending.push_back(Slot {
                topic,
                key,
                value,
                done: false,
                failed: !queued,
            });
            st.pending_bytes += len;
            st.stats.appended += 1;
            if !queued {
                st.stats.failed += 1;
            }
            (pos, queued)
        };
        let (pos, queued) = pos;
        if !queued {
            tracing::error!(target: "imshard::eventlog", "producer ring full at {pos}; retrying");
            self.schedule_retry();
        }
        self.kick();
        Ok(pos)
    }

    /// How many more records [`EventLog::append`] accepts now.
    pub fn room(&self) -> usize {
        self.drain_confirms();
        let st = self.0.st.borrow();
        if st.pending_bytes >= self.0.max_bytes {
            return 0;
        }
        self.0.max_records.saturating_sub(st.pending.len())
    }

    /// The cursor: every position up to this one is in Kafka (0: none yet).
    pub fn delivered(&self) -> u64 {
        self.drain_confirms();
        self.0.st.borrow().delivered
    }

    /// The position the last accepted append got (0: none yet).
    pub fn last_appended(&self) -> u64 {
        self.0.st.borrow().next - 1
    }

    /// Waits until every position up to `pos` is in Kafka. Does not time out: while
    /// Kafka is down it waits (use `monoio::select!` with a timer to bound it).
    pub async fn wait_delivered(&self, pos: u64) {
        std::future::poll_fn(|cx| {
            if self.delivered() >= pos {
                return Poll::Ready(());
            }
            // One entry per task: a task that polls again (a select! with a timer,
            // a loop) replaces its entry instead of adding one each time.
            let mut waiters = self.0.waiters.borrow_mut();
            match waiters.iter_mut().find(|(_, w)| w.will_wake(cx.waker())) {
                Some(entry) => *entry = (pos, cx.waker().clone()),
                None => waiters.push((pos, cx.waker().clone())),
            }
            Poll::Pending
        })
        .await
    }

    /// The counters so far (`backlog` = records appended and not yet in Kafka).
    pub fn stats(&self) -> EventLogStats {
        self.drain_confirms();
        let st = self.0.st.borrow();
        let mut s = st.stats;
        s.backlog = st.pending.len() as u64;
        s.backlog_bytes = st.pending_bytes as u64;
        s.delivered_pos = st.delivered;
        s
    }

    /// Call from the shard's bell listener (on the shard's thread): takes the delivery
    /// reports that arrived, moves the cursor and wakes the tasks waiting for it.
    pub fn wake_local(&self) {
        self.drain_confirms();
    }

    /// Unparks the feeder once, after every task already queued in this loop turn.
    fn kick(&self) {
        if self.0.kick_scheduled.replace(true) {
            return;
        }
        let this = self.clone();
        monoio::spawn(async move {
            this.0.kick_scheduled.set(false);
            this.0.link.feeder.unpark();
        });
    }

    fn drain_confirms(&self) {
        let inner = &self.0;
        let mut any_failed = false;
        let mut moved = false;
        loop {
            {
                let mut ring = inner.confirms.borrow_mut();
                let mut st = inner.st.borrow_mut();
                while let Ok(c) = ring.pop() {
                    let base = st.delivered + 1;
                    let Some(idx) = c.pos.checked_sub(base) else {
                        continue;
                    };
                    let Some(slot) = st.pending.get_mut(idx as usize) else {
                        continue;
                    };
                    match c.result {
                        Ok(()) => {
                            slot.done = true;
                            st.stats.produced += 1;
                        }
                        Err(e) => {
                            slot.failed = true;
                            st.stats.failed += 1;
                            any_failed = true;
                            tracing::warn!(
                                target: "imshard::eventlog",
                                "shard {}: record {} not produced ({e}); retrying in {:?}",
                                inner.shard,
                                c.pos,
                                inner.retry_backoff
                            );
                        }
                    }
                }
                while st.pending.front().is_some_and(|s| s.done) {
                    if let Some(s) = st.pending.pop_front() {
                        st.pending_bytes -= s.key.len() + s.value.len();
                    }
                    st.delivered += 1;
                    moved = true;
                }
            }
            // Re-arm, then look once more: a report pushed between the last pop and
            // the re-arm would otherwise ring nobody.
            inner.link.ret.armed.store(true, Ordering::Release);
            if inner.confirms.borrow().is_empty() {
                break;
            }
        }
        if moved {
            let delivered = inner.st.borrow().delivered;
            let mut waiters = inner.waiters.borrow_mut();
            let mut i = 0;
            while i < waiters.len() {
                if waiters[i].0 <= delivered {
                    waiters.swap_remove(i).1.wake();
                } else {
                    i += 1;
                }
            }
        }
        if any_failed {
            self.schedule_retry();
        }
    }

    /// After the backoff, hands every failed record to the producer again (in
    /// position order).
    fn schedule_retry(&self) {
        if self.0.retry_scheduled.replace(true) {
            return;
        }
        let this = self.clone();
        monoio::spawn(async move {
            monoio::time::sleep(this.0.retry_backoff).await;
            this.0.retry_scheduled.set(false);
            this.retry_failed();
        });
    }

    fn retry_failed(&self) {
        let inner = &self.0;
        let mut n = 0u64;
        let mut left = false;
        {
            let mut st = inner.st.borrow_mut();
            let base = st.delivered + 1;
            let mut ring = inner.ring.borrow_mut();
            for (i, slot) in st.pending.iter_mut().enumerate() {
                if !slot.failed {
                    continue;
                }
                slot.failed = false;
                if ring
                    .push(Outgoing {
                        topic: slot.topic,
                        key: slot.key.clone(),
                        value: slot.value.clone(),
                        pos: base + i as u64,
                    })
                    .is_err()
                {
                    slot.failed = true;
                    left = true;
                    break;
                }
                n += 1;
            }
            st.stats.retried += n;
        }
        if n > 0 {
            self.kick();
        }
        if left {
            self.schedule_retry();
        }
    }
}
