//! Loop primitives every layer uses, knowing nothing of shards or chat: the [`bell`]
//! through which other threads wake a loop, and [`yield_now`].

pub mod bell;

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
