//! Running test code on a monoio loop, as the server's shards run (included with
//! `#[path]` by the tests that drive library parts directly).

use std::future::Future;
use std::time::{Duration, Instant};

/// Runs `f` to completion on a fresh io_uring loop with timers.
pub fn run<F: Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("monoio runtime")
        .block_on(f)
}

/// Polls `f` every 10 ms until it holds or `within` has passed; its last answer.
#[allow(dead_code)] // not every test that runs on a loop waits for a condition
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}
