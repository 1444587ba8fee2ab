//! Start-up and shutdown: checks the data dir and the addresses before anything is
//! written (a data dir that is a file or that another imshard holds, an address another
//! process listens on: refused, nothing written), locks the data dir, loads the secret,
//! starts one pinned thread per shard (each with its own io_uring runtime, store,
//! listener, timer wheel and ring consumer), then waits for SIGINT/SIGTERM.
//!
//! Shutdown is graceful ([`crate::shard::shutdown`]): every shard stops accepting,
//! answers its requests in flight, sends close 1001 to every connection (spread over
//! `shutdown_grace`) and lets its store finish; the process then exits 0. A second
//! signal exits at once (status 130).
//!
//! Failures are loud, never a zombie: a panic anywhere logs and aborts the process
//! (a shard thread that unwound would leave the others queueing to it forever), and
//! so does a failed fsync (see the store). The supervisor (systemd, Kubernetes)
//! restarts it; the store's journal recovers everything that was acknowledged.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use crate::auth::{self, SecretSource};
use crate::chat::filter::{Filter, FilterError};
use crate::chat::{Chat, Shard};
use crate::config::{Config, StoreKind};
use crate::shard::accept::Port;
use crate::shard::{accept, conn, ring, shutdown, Global};
use crate::store::{self, ShardStore};

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// `data_dir` exists and is a file (or something else that is not a directory).
    DataDirNotADirectory(PathBuf),
    /// Another imshard process holds `data_dir` (it would corrupt the store).
    DataDirInUse(PathBuf),
    /// `data_dir` cannot be read, created or locked.
    DataDir(PathBuf, std::io::Error),
    /// Another process (another imshard, say) listens on this address.
    AddressInUse {
        key: &'static str,
        addr: SocketAddr,
    },
    /// The address cannot be listened on (not an address of this host, a privileged
    /// port, ...).
    Listen {
        key: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
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
            StartError::DataDirNotADirectory(p) => write!(
                f,
                "data dir {} is not a directory; give --data-dir a directory (it is created if missing)",
                p.display()
            ),
            StartError::DataDirInUse(p) => write!(
                f,
                "data dir {} is in use by another imshard process; stop it or give another --data-dir",
                p.display()
            ),
            StartError::DataDir(p, e) => write!(f, "data dir {}: {e}", p.display()),
            StartError::AddressInUse { key, addr } => write!(
                f,
                "cannot listen on {addr} ({key}): address in use (another imshard or another \
                 program listens there); stop it or give another --{}",
                key.replace('_', "-")
            ),
            StartError::Listen { key, addr, error } => {
                write!(f, "cannot listen on {addr} ({key}): {error}")
            }
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
///
/// Everything that can be checked without writing is checked first (data dir, its
/// lock, the addresses), so a start that fails for those writes nothing; a data dir
/// this start created is removed again if a later step fails.
pub fn run(cfg: Config) -> Result<(), StartError> {
    let existed = check_data_dir(&cfg.data_dir)?;
    check_addresses(&cfg)?;
    let data_dir = cfg.data_dir.clone();
    let served = serve(cfg);
    if served.is_err() && !existed {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    served
}

fn serve(cfg: Config) -> Result<(), StartError> {
    let _lock = lock_data_dir(&cfg.data_dir)?;
    store::check_layout(&cfg.data_dir, cfg.shards).map_err(StartError::Store)?;
    let (secret, source) =
        auth::load_or_create_secret(cfg.jwt_secret.as_deref(), &cfg.data_dir, true)
            .map_err(StartError::Secret)?;
    if source == SecretSource::Generated {
        let dir = cfg.data_dir.display();
        let exe = std::env::args().next().unwrap_or_else(|| "imshard".into());
        tracing::info!(
            path = %cfg.data_dir.join("jwt.secret").display(),
            "generated a JWT secret; mint a token with: {exe} token --data-dir {dir} --user alice --device phone \
             (from the source tree: cargo run --release -- token --data-dir {dir} --user alice --device phone)"
        );
    }
    let filter =
        Arc::new(Filter::new(&cfg.blocked_words, cfg.filter_mode).map_err(StartError::Filter)?);
    check_open_files(cfg.max_connections);
    abort_on_panic();
    block_signals();
    let cfg = Arc::new(cfg);
    let global = Arc::new(Global::default());
    let (drained_tx, drained_rx) = mpsc::channel::<usize>();
    let mut bells = Vec::with_capacity(cfg.shards);
    let secret: Arc<[u8]> = secret.into();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, StartError>>();
    let mesh = ring::mesh(cfg.shards).map_err(StartError::Mesh)?;
    // The Kafka event log: one producer for the process, a link per shard.
    let (kafka, mut kafka_links) = if cfg.kafka_brokers.is_empty() {
        (None, Vec::new())
    } else {
        let shard_bells = mesh.iter().map(|p| p.bell()).collect();
        let (log, links) = crate::eventlog::KafkaLog::start(&eventlog_config(&cfg), shard_bells)
            .map_err(|e| StartError::Shard {
                shard: 0,
                error: format!("Kafka event log: {e}"),
            })?;
        (Some(log), links.into_iter().map(Some).collect())
    };
    for parts in mesh {
        let id = parts.id();
        bells.push(parts.bell());
        let kafka_link = kafka_links.get_mut(id).and_then(Option::take);
        let global = global.clone();
        let drained = drained_tx.clone();
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
                let rt = crate::rt::build_runtime(4096);
                let mut rt = match rt {
                    Ok(rt) => rt,
                    Err(e) => {
                        let error = format!("cannot start io_uring ({e}); imshard needs Linux 5.6+ with io_uring enabled (kernel.io_uring_disabled=0)");
                        let _ = ready.send(Err(StartError::Shard { shard: id, error }));
                        return;
                    }
                };
                let started = Started {
                    id,
                    cfg,
                    filter,
                    secret,
                    global,
                    ready,
                    drained,
                    kafka: kafka_link,
                };
                rt.block_on(shard_main(started, parts));
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
    tracing::info!(listen = %cfg.listen, admin_listen = ?cfg.admin_listen, shards = cfg.shards, data_dir = %cfg.data_dir.display(), "imshard is serving");
    let sig = wait_for_signal();
    let grace = cfg.shutdown_grace;
    tracing::info!(
        signal = sig,
        grace_ms = grace.as_millis() as u64,
        "shutting down: closing connections (a second signal exits at once)"
    );
    global
        .shutting_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for bell in &bells {
        bell.ring();
    }
    std::thread::spawn(|| {
        let sig = wait_for_signal();
        eprintln!("imshard: second signal ({sig}); exiting now");
        std::process::exit(130);
    });
    let deadline = std::time::Instant::now() + grace + std::time::Duration::from_secs(5);
    for _ in 0..cfg.shards {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if drained_rx.recv_timeout(left).is_err() {
            tracing::warn!("a shard did not finish draining in time; exiting anyway");
            break;
        }
    }
    if let Some(k) = kafka {
        // What the outboxes hold and is not yet in Kafka is produced on the next start.
        if let Err(e) = k.shutdown(std::time::Duration::from_secs(2)) {
            tracing::warn!(error = %e, "the Kafka producer did not flush in time; the outbox keeps what is not yet produced");
        }
    }
    tracing::info!("stopped; every answered message is durable");
    Ok(())
}

/// The event log's settings from the config.
fn eventlog_config(cfg: &Config) -> crate::eventlog::EventLogConfig {
    crate::eventlog::EventLogConfig {
        brokers: crate::eventlog::EventLogConfig::parse_brokers(&cfg.kafka_brokers)
            .unwrap_or_default(),
        topic: cfg.kafka_topic.clone(),
        offline_topic: cfg.kafka_offline_topic.clone(),
        node: if cfg.node_id.is_empty() {
            "imshard".into()
        } else {
            cfg.node_id.clone()
        },
        ..crate::eventlog::EventLogConfig::default()
    }
}

/// What a shard thread starts with.
struct Started {
    id: usize,
    cfg: Arc<Config>,
    filter: Arc<Filter>,
    secret: Arc<[u8]>,
    global: Arc<Global>,
    ready: mpsc::Sender<Result<usize, StartError>>,
    /// Told the shard's id once it drained after a shutdown signal.
    drained: mpsc::Sender<usize>,
    /// This shard's link to the Kafka producer (`--kafka-brokers`).
    kafka: Option<crate::eventlog::ShardLink>,
}

async fn shard_main(
    started: Started,
    parts: ring::EndpointParts<crate::shard::msg::ShardMsg<Chat>>,
) {
    let Started {
        id,
        cfg,
        filter,
        secret,
        global,
        ready,
        drained,
        kafka,
    } = started;
    let fail = |error: String| {
        let _ = ready.send(Err(StartError::Shard { shard: id, error }));
    };
    let bell = parts.bell();
    let store = match cfg.store {
        StoreKind::Embedded => match ShardStore::open(&cfg.data_dir, id, bell.clone()) {
            Ok(s) => s,
            Err(e) => return fail(e.to_string()),
        },
        StoreKind::Redis => {
            let opened = ShardStore::open_redis(
                &cfg.redis_url,
                cfg.redis_timeout,
                cfg.redis_wait_replicas,
                cfg.heartbeat_timeout.as_millis() as i64,
                bell.clone(),
            )
            .await;
            match opened {
                Ok(s) => s,
                Err(e) => return fail(e.to_string()),
            }
        }
    };
    let shard = Shard::new(
        id,
        cfg,
        &secret,
        parts.into_endpoint(),
        global,
        Chat::new(store, filter),
    );
    let listener = match accept::bind(shard.cfg.listen) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", shard.cfg.listen)),
    };
    monoio::spawn(accept::accept_loop(shard.clone(), listener, Port::Public));
    if let Some(addr) = shard.cfg.admin_listen {
        let admin = match accept::bind(addr) {
            Ok(l) => l,
            Err(e) => return fail(format!("cannot listen on {addr} (admin): {e}")),
        };
        monoio::spawn(accept::accept_loop(shard.clone(), admin, Port::Admin));
    }
    monoio::spawn(conn::heartbeat_ticker(shard.clone()));
    if shard.cfg.clustered() {
        if let Err(e) = start_cluster(&shard) {
            return fail(e);
        }
    }
    if let Some(link) = kafka {
        let log = crate::eventlog::EventLog::new(link);
        let node = if shard.cfg.clustered() {
            shard.cfg.node_id.clone()
        } else {
            "imshard".to_string()
        };
        let outbox = match shard.store.start_outbox(&node, id, log.clone()) {
            Ok(o) => o,
            Err(e) => return fail(e.to_string()),
        };
        let events = crate::chat::events::Events {
            origin: crate::eventlog::record::Origin {
                node,
                shard: id as u32,
            },
            log: log.clone(),
            outbox,
        };
        let _ = shard.events.set(events);
    }
    {
        let shard = shard.clone();
        monoio::spawn(async move {
            let error = bell
                .listen(|| {
                    shard.ring.wake_local();
                    crate::shard::Service::on_bell(&**shard);
                    let stop = shard
                        .global
                        .shutting_down
                        .load(std::sync::atomic::Ordering::SeqCst);
                    if stop && shard.begin_draining() {
                        let conns = crate::shard::Service::conns(&**shard);
                        let shard = shard.clone();
                        let drained = drained.clone();
                        monoio::spawn(async move {
                            // Cluster mode: give up the lease first, so the other
                            // nodes take this node's conversations at once.
                            if let Some(m) = shard.node.get().and_then(|c| c.membership.get()) {
                                match m.leave().await {
                                    Ok(epoch) => tracing::info!(epoch, "left the cluster"),
                                    Err(e) => tracing::warn!(error = %e, "leaving the cluster failed; the lease runs out by itself"),
                                }
                            }
                            shutdown::drain(shard.clone(), conns).await;
                            let _ = drained.send(shard.id);
                        });
                    }
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
/// `max_connections` (only an explicit one can be larger: the default is what the
/// limit holds; see tuning/).
fn check_open_files(max_connections: usize) {
    let Ok(lim) = raise_open_files() else {
        return;
    };
    let holds = crate::config::connections_for_open_files(lim.soft);
    if holds < max_connections {
        tracing::warn!(
            open_files = lim.soft,
            max_connections,
            holds,
            "the open-files limit cannot hold --max-connections; raise LimitNOFILE / nofile (run tuning/check) or lower --max-connections"
        );
    }
}

/// Checks the data dir without writing anything: it must be a directory if it exists.
/// Returns whether it exists.
fn check_data_dir(dir: &Path) -> Result<bool, StartError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(true),
        Ok(_) => Err(StartError::DataDirNotADirectory(dir.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            Err(StartError::DataDirNotADirectory(dir.to_path_buf()))
        }
        Err(e) => Err(StartError::DataDir(dir.to_path_buf(), e)),
    }
}

/// Creates the data dir if needed and takes an exclusive `flock` on the directory
/// itself (no lock file), held while the returned file is open: a second imshard on
/// the same data dir is refused before it touches the store.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StartError> {
    let fail = |e| StartError::DataDir(dir.to_path_buf(), e);
    std::fs::create_dir_all(dir).map_err(fail)?;
    let file = std::fs::File::open(dir).map_err(fail)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(StartError::DataDirInUse(dir.to_path_buf()));
        }
        return Err(fail(e));
    }
    Ok(file)
}

/// Refuses addresses another process listens on. The shards bind with SO_REUSEPORT,
/// which would let a second imshard share the port with the first (the kernel would
/// split clients between two servers with different secrets and stores), so each
/// address is first bound by a plain probe socket without SO_REUSEPORT, closed again
/// before the shards bind. Port 0 (a port per shard) is not probed.
///
/// An address in use is probed again for [`ADDRESS_IN_USE_PATIENCE`]: the listeners of
/// a server that just died (a restart after `kill -9`) stay bound for some
/// milliseconds, until the kernel tears down its io_uring instances, which hold them.
fn check_addresses(cfg: &Config) -> Result<(), StartError> {
    let mut addrs = vec![("listen", cfg.listen)];
    addrs.extend(cfg.admin_listen.map(|a| ("admin_listen", a)));
    for (key, addr) in addrs {
        if addr.port() == 0 {
            continue;
        }
        let give_up = std::time::Instant::now() + ADDRESS_IN_USE_PATIENCE;
        loop {
            // std's bind sets SO_REUSEADDR (a restart is not blocked by TIME_WAIT) but
            // not SO_REUSEPORT, so it fails while any socket listens on the address.
            match std::net::TcpListener::bind(addr) {
                Ok(probe) => break drop(probe),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    if std::time::Instant::now() >= give_up {
                        return Err(StartError::AddressInUse { key, addr });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(error) => return Err(StartError::Listen { key, addr, error }),
            }
        }
    }
    Ok(())
}

/// How long an address must stay in use before the start is refused (see
/// [`check_addresses`]).
const ADDRESS_IN_USE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// A panic in any thread logs and aborts the whole process (see the module docs).
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!(%info, "a thread panicked; aborting the process");
        std::process::abort();
    }));
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

/// Cluster mode on one shard (`node_id` set): its view of the cluster, its push
/// channels, its end of the node link (every shard listens on `node_addr`,
/// SO_REUSEPORT); shard 0 also holds the node's lease and the control channels (the
/// live set's changes, `connect:events:kick`, `connect:events:broadcast`) and tells
/// every shard of each change.
fn start_cluster(shard: &std::rc::Rc<Shard>) -> Result<(), String> {
    use crate::chat::node::{self, NodeCtx};
    use crate::cluster::link::{LinkConfig, LinkServer, Links};
    use crate::cluster::membership::{Membership, MembershipConfig, MembershipEvent};
    use crate::cluster::slots::SlotMap;
    use crate::cluster::NodeId;

    let me = NodeId::new(shard.cfg.node_id.clone())?;
    let ctx = NodeCtx {
        me: me.clone(),
        map: std::cell::RefCell::new(Arc::new(SlotMap::new(0, Vec::new()))),
        active: std::cell::Cell::new(false),
        links: Links::new(me.clone(), LinkConfig::default()),
        forwarded: std::cell::Cell::new(0),
        served: std::cell::Cell::new(0),
        routes: std::cell::OnceCell::new(),
        link_server: std::cell::OnceCell::new(),
        membership: std::cell::OnceCell::new(),
        control: std::cell::OnceCell::new(),
        own_broadcasts: std::cell::RefCell::new(Vec::new()),
    };
    if shard.node.set(ctx).is_err() {
        return Err("cluster mode started twice".into());
    }
    let Some(ctx) = shard.node.get() else {
        return Err("cluster mode did not start".into());
    };
    let routes = crate::chat::routes::Routes::start(shard).map_err(|e| e.to_string())?;
    let _ = ctx.routes.set(routes);
    let addr = shard.cfg.node_addr();
    let listener =
        accept::bind(addr).map_err(|e| format!("cannot listen on {addr} (node link): {e}"))?;
    let handler_shard = shard.clone();
    let server = LinkServer::start(
        listener,
        me.clone(),
        LinkConfig::default(),
        move |payload, responder| node::serve(&handler_shard, payload, responder),
    )
    .map_err(|e| format!("node link: {e}"))?;
    let _ = ctx.link_server.set(server);
    if shard.id != 0 {
        return Ok(());
    }
    let conn = shard
        .store
        .redis_handle()
        .ok_or("cluster mode needs --store redis")?;
    let mut config = MembershipConfig::new(me, addr);
    config.lease = shard.cfg.cluster_lease;
    let weak = std::rc::Rc::downgrade(shard);
    let membership = Membership::start(conn, config, move |ev| {
        let Some(shard) = weak.upgrade() else { return };
        match ev {
            MembershipEvent::Active => post_active(&shard, true),
            MembershipEvent::SteppedDown { reason } => {
                tracing::warn!(%reason, "this node stepped down: it owns nothing until its lease is back");
                post_active(&shard, false);
            }
            MembershipEvent::Changed { epoch, .. } => {
                let Some(live) = shard
                    .node
                    .get()
                    .and_then(|c| c.membership.get())
                    .map(|m| m.live())
                else {
                    return;
                };
                tracing::info!(epoch, nodes = live.nodes.len(), "cluster membership changed");
                let map = Arc::new(SlotMap::new(epoch, live.ids().cloned()));
                let peers: Vec<_> = live.nodes.iter().map(|n| (n.id.clone(), n.addr)).collect();
                for t in 0..shard.n {
                    let (map, peers) = (map.clone(), peers.clone());
                    shard.post(t, move |s| node::apply_map(s, map, peers));
                }
            }
        }
    })
    .map_err(|e| format!("cluster membership: {e}"))?;
    let _ = ctx.membership.set(membership);
    let weak = std::rc::Rc::downgrade(shard);
    let control = shard
        .store
        .channels(&shard.cfg.redis_url, shard.cfg.redis_timeout, move |ev| {
            if let Some(shard) = weak.upgrade() {
                crate::chat::admin::on_control(&shard, ev);
            }
        })
        .map_err(|e| e.to_string())?;
    control.subscribe(
        crate::cluster::membership::NODES_CHANGED_CHANNEL
            .as_bytes()
            .to_vec(),
    );
    control.subscribe(crate::cluster::events::KICK_CHANNEL.as_bytes().to_vec());
    control.subscribe(
        crate::cluster::events::BROADCAST_CHANNEL
            .as_bytes()
            .to_vec(),
    );
    let _ = ctx.control.set(control);
    Ok(())
}

/// Tells every shard whether this node holds its lease.
fn post_active(shard: &std::rc::Rc<Shard>, active: bool) {
    for t in 0..shard.n {
        shard.post(t, move |s| crate::chat::node::set_active(s, active));
    }
}
