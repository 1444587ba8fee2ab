//! The mesh of bounded SPSC rings between shards: one ring per ordered pair.
//!
//! - A producer that finds the target parked rings the target's [`Bell`] (an eventfd
//!   the target reads through io_uring, so even a busy target sees it on its next loop
//!   turn; see [`crate::rt::bell`]). A target that is draining is not rung.
//! - A full ring never drops: the message waits in a per-target outbox (keeping order),
//!   and a flusher task moves it once the consumer frees space and wakes the producer.
//!   Callers that produce work from client input check [`Endpoint::backlog`] and stop
//!   reading their sockets while it is high: that is the backpressure.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;

use crate::rt::bell::Bell;

/// Ring capacity (messages) per ordered pair of shards.
pub const RING_CAPACITY: usize = 4096;
/// Messages taken from one ring before looking at the others and yielding.
const DRAIN_BUDGET: usize = 256;
/// Above this many queued outbox messages, socket readers pause.
pub const BACKLOG_HIGH: usize = 8 * RING_CAPACITY;

/// Wake-up state of one shard's inbox, shared with every producer.
pub struct Signal {
    /// Rung by other threads; the shard's listener then wakes the wakers below that
    /// its own tasks registered.
    pub bell: Arc<Bell>,
    /// The consumer task of the shard, registered while parked.
    inbox: AtomicWaker,
    parked: AtomicBool,
    /// `space[p]`: the outbox flusher of producer `p`, waiting for room in ring p -> self.
    space: Vec<AtomicWaker>,
    space_wanted: Vec<AtomicBool>,
}

/// One shard's ends of the mesh. Lives on that shard's thread.
pub struct Endpoint<M> {
    pub id: usize,
    to: Vec<Option<RefCell<rtrb::Producer<M>>>>,
    from: Vec<Option<RefCell<rtrb::Consumer<M>>>>,
    signals: Vec<Arc<Signal>>,
    outbox: RefCell<Vec<VecDeque<M>>>,
    flushing: Vec<Cell<bool>>,
    backlog: Cell<usize>,
}

/// Builds the endpoints of all `n` shards (on the main thread; each is then moved to
/// its shard's thread). Fails only when an eventfd cannot be created.
pub fn mesh<M>(n: usize) -> std::io::Result<Vec<EndpointParts<M>>> {
    let signals = (0..n)
        .map(|_| {
            Ok(Arc::new(Signal {
                bell: Arc::new(Bell::new()?),
                inbox: AtomicWaker::new(),
                parked: AtomicBool::new(false),
                space: (0..n).map(|_| AtomicWaker::new()).collect(),
                space_wanted: (0..n).map(|_| AtomicBool::new(false)).collect(),
            }))
        })
        .collect::<std::io::Result<Vec<Arc<Signal>>>>()?;
    let mut parts: Vec<EndpointParts<M>> = (0..n)
        .map(|id| EndpointParts {
            id,
            to: (0..n).map(|_| None).collect(),
            from: (0..n).map(|_| None).collect(),
            signals: signals.clone(),
        })
        .collect();
    for p in 0..n {
        for c in 0..n {
            if p != c {
                let (tx, rx) = rtrb::RingBuffer::new(RING_CAPACITY);
                parts[p].to[c] = Some(tx);
                parts[c].from[p] = Some(rx);
            }
        }
    }
    Ok(parts)
}

/// The `Send` pieces of an endpoint, before it reaches its thread.
pub struct EndpointParts<M> {
    id: usize,
    to: Vec<Option<rtrb::Producer<M>>>,
    from: Vec<Option<rtrb::Consumer<M>>>,
    signals: Vec<Arc<Signal>>,
}

impl<M> EndpointParts<M> {
    pub fn id(&self) -> usize {
        self.id
    }

    /// This shard's bell (the store's sync thread rings it too).
    pub fn bell(&self) -> Arc<Bell> {
        self.signals[self.id].bell.clone()
    }

    pub fn into_endpoint(self) -> Endpoint<M> {
        let n = self.to.len();
        Endpoint {
            id: self.id,
            to: self.to.into_iter().map(|p| p.map(RefCell::new)).collect(),
            from: self.from.into_iter().map(|c| c.map(RefCell::new)).collect(),
            signals: self.signals,
            outbox: RefCell::new((0..n).map(|_| VecDeque::new()).collect()),
            flushing: (0..n).map(|_| Cell::new(false)).collect(),
            backlog: Cell::new(0),
        }
    }
}

impl<M: 'static> Endpoint<M> {
    /// Messages waiting in outboxes because rings were full.
    pub fn backlog(&self) -> usize {
        self.backlog.get()
    }

    /// Messages in this shard's outgoing rings that their consumers have not taken yet.
    pub fn queued_in_rings(&self) -> usize {
        self.to
            .iter()
            .flatten()
            .map(|p| RING_CAPACITY.saturating_sub(p.borrow().slots()))
            .sum()
    }

    /// Sends to another shard, in order, without blocking. `target != self.id`.
    pub fn send(self: &Rc<Self>, target: usize, msg: M) {
        let queued = !self.outbox.borrow()[target].is_empty();
        let msg = if queued {
            Err(msg)
        } else {
            self.try_push(target, msg)
        };
        match msg {
            Ok(()) => self.wake(target),
            Err(msg) => {
                self.outbox.borrow_mut()[target].push_back(msg);
                self.backlog.set(self.backlog.get() + 1);
                if !self.flushing[target].replace(true) {
                    monoio::spawn(flush_outbox(self.clone(), target));
                }
            }
        }
    }

    fn try_push(&self, target: usize, msg: M) -> Result<(), M> {
        match &self.to[target] {
            Some(p) => p
                .borrow_mut()
                .push(msg)
                .map_err(|rtrb::PushError::Full(m)| m),
            None => Err(msg),
        }
    }

    fn wake(&self, target: usize) {
        let s = &self.signals[target];
        fence(Ordering::SeqCst);
        if s.parked.swap(false, Ordering::SeqCst) {
            s.bell.ring();
        }
    }

    /// Called by this shard's bell listener, on this shard's thread: wakes whatever of
    /// ours waits on the mesh (the consumer, outbox flushers waiting for space).
    pub fn wake_local(&self) {
        self.signals[self.id].inbox.wake();
        for s in &self.signals {
            s.space[self.id].wake();
        }
    }

    /// Waits for messages and hands each to `handle`; never returns.
    pub async fn consume(self: Rc<Self>, mut handle: impl FnMut(M)) {
        let me = &self.signals[self.id];
        loop {
            let mut got = 0;
            for src in 0..self.from.len() {
                let Some(c) = &self.from[src] else { continue };
                let mut taken = 0;
                while taken < DRAIN_BUDGET {
                    // Pop with the borrow released before the handler runs (it may send).
                    let next = c.borrow_mut().pop();
                    let Ok(msg) = next else { break };
                    taken += 1;
                    handle(msg);
                }
                if taken > 0 {
                    got += taken;
                    let s = &self.signals[self.id];
                    if s.space_wanted[src].swap(false, Ordering::AcqRel) {
                        self.signals[src].bell.ring();
                    }
                }
            }
            if got > 0 {
                super::yield_now().await;
                continue;
            }
            std::future::poll_fn(|cx| {
                me.inbox.register(cx.waker());
                me.parked.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                let any = self.from.iter().flatten().any(|c| !c.borrow().is_empty());
                if any {
                    me.parked.store(false, Ordering::SeqCst);
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
            me.parked.store(false, Ordering::SeqCst);
        }
    }
}

/// Moves queued messages into a full ring as space frees up.
async fn flush_outbox<M: 'static>(ep: Rc<Endpoint<M>>, target: usize) {
    loop {
        loop {
            let Some(msg) = ep.outbox.borrow_mut()[target].pop_front() else {
                ep.flushing[target].set(false);
                // What this round moved must not sit in a parked target's ring.
                ep.wake(target);
                return;
            };
            match ep.try_push(target, msg) {
                Ok(()) => {
                    ep.backlog.set(ep.backlog.get() - 1);
                }
                Err(msg) => {
                    ep.outbox.borrow_mut()[target].push_front(msg);
                    break;
                }
            }
        }
        ep.wake(target);
        let sig = ep.signals[target].clone();
        let me = ep.id;
        std::future::poll_fn(|cx| {
            sig.space[me].register(cx.waker());
            sig.space_wanted[me].store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let has_room = ep.to[target]
                .as_ref()
                .is_some_and(|p| p.borrow().slots() > 0);
            if has_room {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>> {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("io_uring runtime")
    }

    /// Runs the shard's bell listener, as the server does.
    fn listen(ep: &Rc<Endpoint<u64>>) {
        let ep = ep.clone();
        let bell = ep.signals[ep.id].bell.clone();
        monoio::spawn(async move {
            bell.listen(|| ep.wake_local()).await;
        });
    }

    /// Five times the ring capacity, sent at once: the overflow goes through the outbox
    /// and every message arrives, in order, on a consumer that parks in between.
    #[test]
    fn overflow_arrives_in_order_across_threads() {
        const N: u64 = 5 * RING_CAPACITY as u64;
        let mut parts = mesh(2).expect("mesh");
        let consumer_parts = parts.pop().expect("parts");
        let producer_parts = parts.pop().expect("parts");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let consumer = std::thread::spawn(move || {
            runtime().block_on(async move {
                let ep = Rc::new(consumer_parts.into_endpoint());
                listen(&ep);
                let mut next = 0u64;
                let done = std::cell::Cell::new(false);
                let consume = ep.clone().consume(|msg| {
                    assert_eq!(msg, next, "out of order");
                    next += 1;
                    if next == N {
                        done.set(true);
                    }
                });
                let watch = async {
                    while !done.get() {
                        monoio::time::sleep(Duration::from_millis(5)).await;
                    }
                };
                monoio::select! {
                    _ = consume => {}
                    _ = watch => {}
                }
                let _ = done_tx.send(());
            });
        });
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let ep = Rc::new(producer_parts.into_endpoint());
                listen(&ep);
                for token in 0..N {
                    ep.send(1, token);
                }
                // Keep the runtime (and its outbox flusher) alive, busy: a loop that
                // never parks must still hear the consumer's space wake-ups.
                let until = std::time::Instant::now() + Duration::from_secs(30);
                while std::time::Instant::now() < until {
                    crate::shard::yield_now().await;
                }
            });
        });
        done_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("every message arrives (no lost wake-up)");
        consumer.join().expect("consumer");
    }
}
