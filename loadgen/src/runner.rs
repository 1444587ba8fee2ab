//! Thread-per-core: one pinned thread per CPU the process may use, each with its own
//! monoio io_uring runtime, driving its share of the connections. The threads agree on
//! phase changes through a few atomics ([`Sync`]); nothing else is shared until each
//! thread hands back its stats and checker report when it ends.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::checker::CheckReport;
use crate::stats::Stats;
use crate::sys;

/// Phase hand-offs between the main thread and the loadgen threads.
#[derive(Debug, Default)]
pub struct Sync {
    /// Threads that finished setup (connected, groups created).
    pub ready: AtomicUsize,
    /// Set by the main thread when every thread is ready: start the load.
    pub go: AtomicBool,
    /// Threads that finished the load and drain and now hold their connections open.
    pub holding: AtomicUsize,
    /// Set by the main thread after it measured the server with every connection open.
    pub release: AtomicBool,
    /// Monotonic ns when the main thread set `go`.
    go_ns: AtomicU64,
    /// Monotonic ns when the last thread finished draining.
    pub drained_ns: AtomicU64,
}

impl Sync {
    /// Waits (on the runtime, polling every millisecond) until `flag` is set.
    pub async fn wait(flag: &AtomicBool) {
        while !flag.load(Ordering::Acquire) {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// When the load started (monotonic ns).
    pub fn go_ns(&self) -> u64 {
        self.go_ns.load(Ordering::Acquire)
    }

    pub fn mark_drained(&self) {
        self.drained_ns.fetch_max(sys::now_ns(), Ordering::AcqRel);
    }
}

/// What one thread hands back.
pub struct ThreadResult {
    pub stats: Stats,
    pub check: CheckReport,
}

/// Why the threads could not run.
#[derive(Debug)]
pub enum RunError {
    Spawn(std::io::Error),
    /// A thread could not build its io_uring runtime.
    Runtime {
        thread: usize,
        error: std::io::Error,
    },
    Panicked(usize),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Spawn(e) => write!(f, "cannot start a loadgen thread: {e}"),
            RunError::Runtime { thread, error } => write!(
                f,
                "thread {thread}: cannot start io_uring ({error}); the loadgen needs Linux 5.6+ with kernel.io_uring_disabled=0"
            ),
            RunError::Panicked(t) => write!(f, "loadgen thread {t} panicked"),
        }
    }
}

/// Runs `make(thread)`'s future on each of `threads` pinned threads and, on the main
/// thread, `at_go` right before the load starts and `between` once every thread is
/// holding (to measure the server), then collects the results.
pub fn run<F, Fut>(
    threads: usize,
    sync: &Arc<Sync>,
    make: F,
    at_go: impl FnOnce(),
    between: impl FnOnce(),
) -> Result<Vec<ThreadResult>, RunError>
where
    F: Fn(usize) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = ThreadResult> + 'static,
{
    let cpus = sys::allowed_cpus();
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let make = make.clone();
        let sync = sync.clone();
        let cpu = (!cpus.is_empty()).then(|| cpus[t % cpus.len()]);
        let h = std::thread::Builder::new()
            .name(format!("loadgen-{t}"))
            .spawn(move || -> Result<ThreadResult, std::io::Error> {
                if let Some(cpu) = cpu {
                    // Pinning is an optimisation; an unpinned thread still works.
                    let _ = sys::pin_to(cpu);
                }
                // The server's loop set-up (no IPI per completion from another CPU).
                let rt = imshard::rt::build_runtime(4096);
                match rt {
                    Ok(mut rt) => Ok(rt.block_on(make(t))),
                    Err(e) => {
                        // Let the main thread's waits finish.
                        sync.ready.fetch_add(1, Ordering::AcqRel);
                        sync.holding.fetch_add(1, Ordering::AcqRel);
                        Err(e)
                    }
                }
            })
            .map_err(RunError::Spawn)?;
        handles.push(h);
    }
    // A thread that ended early (it panicked) will never count itself: stop waiting.
    let wait_for = |count: &AtomicUsize| {
        while count.load(Ordering::Acquire) < threads && !handles.iter().any(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    wait_for(&sync.ready);
    at_go();
    sync.go_ns.store(sys::now_ns(), Ordering::Release);
    sync.go.store(true, Ordering::Release);
    wait_for(&sync.holding);
    between();
    sync.release.store(true, Ordering::Release);
    let mut out = Vec::with_capacity(threads);
    for (t, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(r)) => out.push(r),
            Ok(Err(error)) => return Err(RunError::Runtime { thread: t, error }),
            Err(_) => return Err(RunError::Panicked(t)),
        }
    }
    Ok(out)
}
