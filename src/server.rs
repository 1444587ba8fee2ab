//! Start-up and shutdown: checks the data dir, loads the secret, starts one pinned
//! thread per shard (each with its own io_uring runtime, store, listener, timer wheel
//! and ring consumer), then waits for SIGINT/SIGTERM.
//!
//! Shutdown needs no flush: everything answered is already durable, so the process
//! exits as soon as a signal arrives.

use std::sync::mpsc;
use std::sync::Arc;

use crate::auth::{self, SecretSource};
use crate::chat::filter::{Filter, FilterError};
use crate::config::Config;
use crate::shard::{accept, conn, ring, Shard};
use crate::store::{self, ShardStore};

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    Store(store::StoreError),
    Secret(std::io::Error),
    Filter(FilterError),
    /// The eventfds shards wake each other with could not be created.
    Mesh(std::io::Error),
    Shard {
        shard: usize,
        error: String,
    },
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Store(e) => write!(f, "{e}"),
            StartError::Secret(e) => write!(f, "JWT secret: {e}"),
            StartError::Filter(e) => write!(f, "{e}"),
            StartError::Mesh(e) => write!(f, "cannot create the shards' eventfds: {e}"),
            StartError::Shard { shard, error } => write!(f, "shard {shard}: {error}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(cfg: Config) -> Result<(), StartError> {
    store::check_layout(&cfg.data_dir, cfg.shards).map_err(StartError::Store)?;
    let (secret, source) =
        auth::load_or_create_secret(cfg.jwt_secret.as_deref(), &cfg.data_dir, true)
            .map_err(StartError::Secret)?;
    if source == SecretSource::Generated {
        tracing::info!(
            path = %cfg.data_dir.join("jwt.secret").display(),
            "generated a JWT secret; mint a token with: imshard token --data-dir {} --user alice --device phone",
            cfg.data_dir.display()
        );
    }
    let filter =
        Arc::new(Filter::new(&cfg.blocked_words, cfg.filter_mode).map_err(StartError::Filter)?);
    check_open_files(cfg.max_connections);
    block_signals();
    let cfg = Arc::new(cfg);
    let secret: Arc<[u8]> = secret.into();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, StartError>>();
    for parts in ring::mesh(cfg.shards).map_err(StartError::Mesh)? {
        let id = parts.id();
        let cfg = cfg.clone();
        let secret = secret.clone();
        let filter = filter.clone();
        let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        let ready = ready_tx.clone();
        std::thread::Builder::new()
            .name(format!("imshard-shard-{id}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .with_entries(4096)
                    .enable_timer()
                    .build();
                let mut rt = match rt {
                    Ok(rt) => rt,
                    Err(e) => {
                        let error = format!("cannot start io_uring ({e}); imshard needs Linux 5.6+ with io_uring enabled (kernel.io_uring_disabled=0)");
                        let _ = ready.send(Err(StartError::Shard { shard: id, error }));
                        return;
                    }
                };
                rt.block_on(shard_main(id, cfg, filter, secret, parts, ready));
            })
            .map_err(|e| StartError::Shard { shard: id, error: e.to_string() })?;
    }
    drop(ready_tx);
    for _ in 0..cfg.shards {
        match ready_rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(StartError::Shard {
                    shard: 0,
                    error: "a shard thread died".into(),
                })
            }
        }
    }
    tracing::info!(listen = %cfg.listen, shards = cfg.shards, data_dir = %cfg.data_dir.display(), "imshard is serving");
    let sig = wait_for_signal();
    tracing::info!(
        signal = sig,
        "shutting down; every answered message is already durable"
    );
    Ok(())
}

async fn shard_main(
    id: usize,
    cfg: Arc<Config>,
    filter: Arc<Filter>,
    secret: Arc<[u8]>,
    parts: ring::EndpointParts,
    ready: mpsc::Sender<Result<usize, StartError>>,
) {
    let fail = |error: String| {
        let _ = ready.send(Err(StartError::Shard { shard: id, error }));
    };
    let bell = parts.bell();
    let store = match ShardStore::open(&cfg.data_dir, id, bell.clone()) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let shard = Shard::new(id, cfg, filter, &secret, store, parts.into_endpoint());
    let listener = match accept::bind(&shard) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", shard.cfg.listen)),
    };
    monoio::spawn(accept::accept_loop(shard.clone(), listener));
    monoio::spawn(conn::heartbeat_ticker(shard.clone()));
    {
        let shard = shard.clone();
        monoio::spawn(async move {
            let error = bell
                .listen(|| {
                    shard.ring.wake_local();
                    shard.store.wake_local();
                })
                .await;
            // Without its bell a shard would hear of other shards' messages and of
            // durable writes only when idle: stop rather than serve slowly.
            tracing::error!(shard = shard.id, %error, "shard bell failed; stopping");
            std::process::exit(1);
        });
    }
    let _ = ready.send(Ok(id));
    let handler = shard.clone();
    shard
        .ring
        .clone()
        .consume(move |msg| handler.handle(msg))
        .await;
}

/// The open-files limit (RLIMIT_NOFILE) after [`raise_open_files`].
#[derive(Debug, Clone, Copy)]
pub struct FileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit (as far as the host allows) and
/// returns both. The server and the loadgen call it at start.
pub fn raise_open_files() -> std::io::Result<FileLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Ok(FileLimit {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// Raises the soft open-files limit to the hard one and warns when that cannot hold
/// `max_connections` (see tuning/).
fn check_open_files(max_connections: usize) {
    let Ok(lim) = raise_open_files() else {
        return;
    };
    let want = max_connections as u64 + 1024;
    if lim.soft < want {
        tracing::warn!(
            open_files = lim.soft,
            max_connections,
            "the open-files limit cannot hold --max-connections; raise LimitNOFILE / nofile (run tuning/check)"
        );
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT/SIGTERM in this thread before the shard threads start (they inherit
/// the mask), so only `wait_for_signal` sees them.
fn block_signals() {
    let set = signal_set();
    // SAFETY: valid signal set; changes only this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn wait_for_signal() -> i32 {
    let set = signal_set();
    let mut sig = 0;
    // SAFETY: valid set and out-pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}
