//! Work that may block (a store read that misses the page cache) runs on a helper
//! thread of the shard, never on its loop: the loop hands the thread a closure and
//! awaits its result, and the thread rings the shard's bell when results are ready.
//!
//! - **Order**: closures run one at a time, in the order they were handed over.
//! - **Batching**: the thread takes every closure queued, runs them, and rings the bell
//!   once for all of them; the loop wakes each waiting task then.
//! - **Failure**: a closure that panics aborts the process (see `server`); if the thread
//!   is gone, [`OffLoop::run`] fails with [`StoreError::Read`] at once.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use local_sync::oneshot;

use super::StoreError;
use crate::rt::bell::Bell;

type Output = Box<dyn Any + Send>;
type Job<C> = (u64, Box<dyn FnOnce(&C) -> Output + Send>);

/// Shared between the loop and its helper thread.
struct Shared {
    /// The loop's completion task.
    waker: AtomicWaker,
    /// Jobs finished so far (the loop compares it with what it took).
    finished: AtomicU64,
    bell: Arc<Bell>,
}

/// A shard's handle on its helper thread; lives on the shard's thread.
pub struct OffLoop<C> {
    jobs: mpsc::Sender<Job<C>>,
    done: mpsc::Receiver<(u64, Output)>,
    waiting: RefCell<HashMap<u64, oneshot::Sender<Output>>>,
    next: Cell<u64>,
    shared: Arc<Shared>,
}

impl<C: Send + 'static> OffLoop<C> {
    /// Starts the helper thread `name` owning `ctx`, and the loop's completion task
    /// (call from inside the shard's runtime).
    pub fn start(name: String, ctx: C, bell: Arc<Bell>) -> std::io::Result<Rc<Self>> {
        let (jobs, job_rx) = mpsc::channel::<Job<C>>();
        let (done_tx, done) = mpsc::channel();
        let shared = Arc::new(Shared {
            waker: AtomicWaker::new(),
            finished: AtomicU64::new(0),
            bell,
        });
        {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || helper_thread(ctx, job_rx, done_tx, shared))?;
        }
        let this = Rc::new(OffLoop {
            jobs,
            done,
            waiting: RefCell::new(HashMap::new()),
            next: Cell::new(1),
            shared,
        });
        monoio::spawn(complete(this.clone()));
        Ok(this)
    }

    /// Runs `f` on the helper thread and returns its result.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&C) -> R + Send + 'static,
    ) -> Result<R, StoreError> {
        let id = self.next.get();
        self.next.set(id + 1);
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(id, tx);
        let job: Box<dyn FnOnce(&C) -> Output + Send> = Box::new(move |c| Box::new(f(c)));
        if self.jobs.send((id, job)).is_err() {
            self.waiting.borrow_mut().remove(&id);
            return Err(StoreError::Read("the store's reader thread is gone".into()));
        }
        match rx.await {
            Ok(out) => out
                .downcast::<R>()
                .map(|r| *r)
                .map_err(|_| StoreError::Read("reader answered another type".into())),
            Err(_) => Err(StoreError::Read("the read was dropped".into())),
        }
    }

    /// Called by the shard's bell listener: lets the completion task look.
    pub fn wake_local(&self) {
        self.shared.waker.wake();
    }

    /// Jobs handed over and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.waiting.borrow().len()
    }
}

fn helper_thread<C>(
    ctx: C,
    jobs: mpsc::Receiver<Job<C>>,
    done: mpsc::Sender<(u64, Output)>,
    shared: Arc<Shared>,
) {
    while let Ok(first) = jobs.recv() {
        let mut n = 0u64;
        let mut next = Some(first);
        while let Some((id, job)) = next {
            let out = job(&ctx);
            if done.send((id, out)).is_err() {
                return;
            }
            n += 1;
            next = jobs.try_recv().ok();
        }
        shared.finished.fetch_add(n, Ordering::AcqRel);
        shared.bell.ring();
    }
}

/// Hands results to the waiting tasks whenever the helper reports.
async fn complete<C>(this: Rc<OffLoop<C>>) {
    let mut seen = 0u64;
    loop {
        std::future::poll_fn(|cx| {
            this.shared.waker.register(cx.waker());
            if this.shared.finished.load(Ordering::Acquire) > seen {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        while let Ok((id, out)) = this.done.try_recv() {
            seen += 1;
            let waiter = this.waiting.borrow_mut().remove(&id);
            if let Some(tx) = waiter {
                let _ = tx.send(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_to_the_loop_in_any_number() {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("io_uring runtime");
        rt.block_on(async {
            let bell = Arc::new(Bell::new().expect("eventfd"));
            let off = OffLoop::start("test-offloop".into(), 10u64, bell.clone()).expect("start");
            {
                let off = off.clone();
                monoio::spawn(async move {
                    bell.listen(|| off.wake_local()).await;
                });
            }
            let mut tasks = Vec::new();
            for i in 0..1000u64 {
                let off = off.clone();
                tasks.push(monoio::spawn(async move { off.run(move |c| c * i).await }));
            }
            for (i, t) in tasks.into_iter().enumerate() {
                assert_eq!(t.await, Ok(10 * i as u64));
            }
            let s: Result<String, _> = off.run(|c| format!("ctx {c}")).await;
            assert_eq!(s.as_deref(), Ok("ctx 10"));
            assert_eq!(off.in_flight(), 0);
        });
    }
}
