//! Loop primitives every layer uses, knowing nothing of shards or chat: the [`bell`]
//! through which other threads wake a loop, and [`yield_now`].

pub mod bell;

/// The io_uring set-up of every loop thread: monoio's defaults plus
/// `IORING_SETUP_COOP_TASKRUN`.
///
/// Without it a completion that another CPU produces (a socket of ours made readable
/// by the peer's softirq, the doorbell eventfd written by another shard) interrupts
/// this thread with an IPI to run io_uring's task work at once; a busy loop thread on
/// a VM takes thousands of such interrupts per second. With it the task work waits
/// until the thread next enters the kernel, which a monoio loop does on every park and
/// submit, so nothing is delayed past the current loop turn. A sleeping loop is woken
/// as before. Linux 5.19+; older kernels refuse the flag and the loop falls back to
/// the defaults (see [`build_runtime`]).
pub fn uring_builder() -> io_uring::Builder {
    let mut b = io_uring::IoUring::builder();
    b.setup_coop_taskrun();
    b
}

/// A loop thread's monoio runtime with `entries` submission slots and timers, set up
/// by [`uring_builder`]; on a kernel that refuses that set-up, monoio's defaults.
pub fn build_runtime(
    entries: u32,
) -> std::io::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>> {
    let with = |urb: io_uring::Builder| {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(entries)
            .uring_builder(urb)
            .enable_timer()
            .build()
    };
    with(uring_builder()).or_else(|_| with(io_uring::IoUring::builder()))
}

use std::future::Future;
use std::task::Poll;

/// Lets every other ready task run once before continuing.
///
/// monoio puts a task that wakes itself during its own poll at the *front* of the run
/// queue (its "yield" runs the task again at once), so `wake_by_ref` + `Pending` would
/// starve every other task of the shard: a busy ring consumer or a large fan-out
/// would never let connections run, and a test producer spinning on it never let its
/// outbox flusher run. Instead the wake comes from a tiny task spawned behind
/// everything already queued; woken from outside its poll, this task goes to the back.
pub fn yield_now() -> impl Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            let waker = cx.waker().clone();
            monoio::spawn(async move { waker.wake() });
            Poll::Pending
        }
    })
}
