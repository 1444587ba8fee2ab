//! From flags to a [`Report`]: checks what the host allows (open files, ephemeral
//! ports), loads the server's secret, builds the plan, runs the threads and merges
//! their results.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use serde_json::json;

use crate::cli::{Common, LoadArgs, Scenario};
use crate::client::{ConnSettings, Target};
use crate::report::{NodeDelta, Report};
use crate::runner::{self, RunError, Sync};
use crate::scenario::{self, Load, RunParams};
use crate::stats::Stats;
use crate::sys;

/// Connections one source address can hold: its ephemeral port range.
fn ports_per_address() -> usize {
    let (lo, hi) = sys::local_port_range();
    (hi - lo + 1) as usize
}

/// Why a run could not start (or its results could not be written).
#[derive(Debug)]
pub enum LoadgenError {
    /// A flag value that cannot work, with what to give instead.
    BadFlag(String),
    /// `--target` does not resolve.
    Target(String),
    /// The JWT secret could not be read.
    Secret(std::io::Error),
    /// The host cannot hold the requested connections; says what it lacks.
    Host(String),
    Run(RunError),
    /// Writing the JSON file.
    Json {
        path: String,
        error: std::io::Error,
    },
}

impl std::fmt::Display for LoadgenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadgenError::BadFlag(m) => write!(f, "{m}"),
            LoadgenError::Target(m) => write!(f, "--target: {m}"),
            LoadgenError::Secret(e) => write!(f, "JWT secret: {e}"),
            LoadgenError::Host(m) => write!(f, "this host cannot run that: {m}"),
            LoadgenError::Run(e) => write!(f, "{e}"),
            LoadgenError::Json { path, error } => write!(f, "cannot write {path}: {error}"),
        }
    }
}

impl std::error::Error for LoadgenError {}

fn resolve(target: &str) -> Result<SocketAddr, LoadgenError> {
    target
        .to_socket_addrs()
        .map_err(|e| LoadgenError::Target(format!("{target}: {e}")))?
        .next()
        .ok_or_else(|| LoadgenError::Target(format!("{target} resolves to nothing")))
}

/// `host:port` or several, comma-separated: the nodes connections are spread over.
fn resolve_targets(list: &str) -> Result<Vec<Target>, LoadgenError> {
    let targets = list
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            Ok(Target {
                addr: resolve(t)?,
                host: t.to_string(),
            })
        })
        .collect::<Result<Vec<_>, LoadgenError>>()?;
    if targets.is_empty() {
        return Err(LoadgenError::Target(format!("`{list}` names no address")));
    }
    Ok(targets)
}

/// Raises the open-files limit and checks it and the port ranges against `conns`.
fn check_host(conns: usize, source_addrs: usize) -> Result<(), LoadgenError> {
    let lim = sys::raise_open_files().map_err(|e| LoadgenError::Host(format!("getrlimit: {e}")))?;
    let need = conns as u64 + sys::FD_HEADROOM;
    if lim.soft < need {
        return Err(LoadgenError::Host(format!(
            "{conns} connections need {need} open files, but this process may open only {} \
             (soft limit {}, hard limit {}; the loadgen already raised soft to hard). \
             Raise `nofile` for this user (tuning/limits.conf, or LimitNOFILE= in a systemd unit; \
             the hard limit needs root or CAP_SYS_RESOURCE), or split the load over several \
             loadgen processes of at most {} connections each. Run `tuning/check --connections {conns} --loadgen` to see \
             what else the host lacks.",
            lim.soft,
            lim.soft,
            lim.hard,
            lim.hard.saturating_sub(sys::FD_HEADROOM)
        )));
    }
    let per_addr = ports_per_address();
    let capacity = per_addr * source_addrs.max(1);
    if conns > capacity {
        let (lo, hi) = sys::local_port_range();
        return Err(LoadgenError::Host(format!(
            "{conns} connections to one server port need {conns} source ports, but \
             net.ipv4.ip_local_port_range ({lo}-{hi}) gives {per_addr} per source address and \
             {} address(es) give {capacity}. Use --source-addrs {} or widen the range \
             (tuning/sysctl.conf; `tuning/check --connections {conns} --loadgen`).",
            source_addrs.max(1),
            conns.div_ceil(per_addr)
        )));
    }
    Ok(())
}

/// What every scenario derives from [`Common`].
struct Prepared {
    params: Arc<RunParams>,
    threads: usize,
    server_shards: usize,
    prefix: String,
    /// Targets that run in cluster mode (`imshard_cluster_nodes` above 0): their
    /// channel counters are read before and after the load.
    cluster: bool,
}

/// Default pause before the load on a cluster (see `--settle`).
const CLUSTER_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

fn prepare(c: &Common, conns: usize) -> Result<Prepared, LoadgenError> {
    let targets = resolve_targets(&c.target)?;
    let cpus = sys::allowed_cpus().len().max(1);
    let threads = c.threads.unwrap_or(cpus).max(1);
    let loopback = targets
        .iter()
        .all(|t| t.addr.ip().is_loopback() && t.addr.is_ipv4());
    let source_addrs = match c.source_addrs {
        Some(n) if n > 0 && !loopback => {
            return Err(LoadgenError::BadFlag(format!(
                "--source-addrs uses 127.0.0.2.. which only reach a loopback target, not {}; give --source-addrs 0",
                c.target
            )))
        }
        Some(n) => n,
        None if loopback => conns.div_ceil(ports_per_address().saturating_sub(1000).max(1)),
        None => 0,
    };
    if source_addrs > 65_000 {
        return Err(LoadgenError::BadFlag(
            "--source-addrs is at most 65000".into(),
        ));
    }
    if c.ack_batch == 0 || c.ack_interval.is_zero() {
        return Err(LoadgenError::BadFlag(
            "--ack-batch and --ack-interval must be above 0 (--ack-batch 1 = one ack per push)"
                .into(),
        ));
    }
    if c.cpu_per_delivery && c.server_pid.is_empty() {
        return Err(LoadgenError::BadFlag(
            "--cpu-per-delivery reads /proc/PID/stat of the server: give --server-pid".into(),
        ));
    }
    check_host(conns, source_addrs)?;
    let (secret, _) =
        imshard::auth::load_or_create_secret(c.jwt_secret.as_deref(), &c.data_dir, false)
            .map_err(LoadgenError::Secret)?;
    // One /metrics read per target: does it run in cluster mode?
    let cluster = targets
        .iter()
        .any(|t| sys::NodeCounters::read(t.addr).is_some_and(|n| n.cluster_nodes > 0));
    let settle = c.settle.unwrap_or(if cluster {
        CLUSTER_SETTLE
    } else {
        Default::default()
    });
    let settings = ConnSettings {
        targets,
        path: c.path.clone(),
        connect_timeout: c.connect_timeout,
        push_ack: !c.no_push_ack,
        ack_batch: c.ack_batch,
        ack_interval: c.ack_interval,
        read_chunk: 4096,
    };
    let token_ttl = (c.duration + c.drain_timeout).as_secs() + 3600;
    let params = RunParams {
        settings,
        secret: secret.into(),
        token_ttl,
        source_addrs,
        heartbeat_interval: c.heartbeat_interval,
        duration: c.duration,
        drain_timeout: c.drain_timeout,
        connect_concurrency: c.connect_concurrency.max(1),
        settle,
    };
    Ok(Prepared {
        cluster,
        params: Arc::new(params),
        threads,
        server_shards: c.server_shards.unwrap_or(cpus).max(1),
        prefix: c.prefix.clone().unwrap_or_else(scenario::run_prefix),
    })
}

fn check_load(l: &LoadArgs, senders: usize) -> Result<Load, LoadgenError> {
    if !(l.rate >= 0.0 && l.rate.is_finite()) {
        return Err(LoadgenError::BadFlag("--rate must be a number >= 0".into()));
    }
    if l.window == 0 {
        return Err(LoadgenError::BadFlag("--window must be at least 1".into()));
    }
    Ok(Load {
        rate_per_sender: if senders == 0 {
            0.0
        } else {
            l.rate / senders as f64
        },
        window: l.window,
        size: l.size,
    })
}

/// Runs the scenario the flags name.
pub fn run(scenario: Scenario) -> Result<Report, LoadgenError> {
    let sync = Arc::new(Sync::default());
    let (common, name, params_json, prepared, thread_fn): (
        Common,
        &'static str,
        serde_json::Value,
        Prepared,
        ThreadFn,
    ) = match scenario {
        Scenario::Connect {
            common,
            connections,
            rate,
        } => {
            if !(rate >= 0.0 && rate.is_finite()) {
                return Err(LoadgenError::BadFlag("--rate must be a number >= 0".into()));
            }
            let p = prepare(&common, connections)?;
            let plans = scenario::plan_connect(&p.prefix, connections, p.threads);
            let per_thread = rate / p.threads as f64;
            let params = json!({ "connections": connections, "rate": rate });
            (
                common,
                "connect",
                params,
                p,
                ThreadFn::Connect(plans, per_thread),
            )
        }
        Scenario::P2p {
            common,
            pairs,
            load,
        } => {
            let p = prepare(&common, pairs * 2)?;
            let plans = scenario::plan_p2p(&p.prefix, pairs, p.server_shards, p.threads);
            let l = check_load(&load, pairs * 2)?;
            let params = json!({
                "pairs": pairs, "rate": load.rate, "window": load.window, "size": load.size,
                "server_shards": p.server_shards,
            });
            (common, "p2p", params, p, ThreadFn::Traffic(plans, l))
        }
        Scenario::Group {
            common,
            groups,
            members,
            senders,
            online,
            load,
        } => {
            if members < 2 {
                return Err(LoadgenError::BadFlag("--members must be at least 2".into()));
            }
            let online = online.unwrap_or(members).min(members);
            if online == 0 {
                return Err(LoadgenError::BadFlag("--online must be at least 1".into()));
            }
            let p = prepare(&common, groups * online)?;
            let plans =
                scenario::plan_group(&p.prefix, groups, members, online, senders, p.threads);
            let l = check_load(&load, groups * senders.min(online))?;
            let mut params = json!({
                "groups": groups, "members": members, "senders": senders,
                "rate": load.rate, "window": load.window, "size": load.size,
            });
            if online < members {
                params["online"] = json!(online);
            }
            (common, "group", params, p, ThreadFn::Traffic(plans, l))
        }
    };
    let pids = common.server_pid.clone();
    let targets: Vec<Target> = prepared.params.settings.targets.clone();
    let rss_before = sum_over(&pids, sys::rss_bytes);
    let served_before = match (pids.is_empty(), name) {
        (false, "connect") => targets
            .iter()
            .map(|t| sys::connections_served(t.addr))
            .sum::<Option<u64>>(),
        _ => None,
    };
    let server_flags = match &common.server_flags {
        Some(f) => {
            let args: Vec<String> = f.split_whitespace().map(String::from).collect();
            Some(sys::redact_secrets(&args).join(" "))
        }
        None => pids
            .iter()
            .map(|&p| sys::cmdline(p))
            .collect::<Option<Vec<String>>>()
            .filter(|v| !v.is_empty())
            .map(|v| v.join(" | ")),
    };
    let mut rss_after = None;
    let cpu_pids: Vec<u32> = if common.cpu_per_delivery {
        pids.clone()
    } else {
        Vec::new()
    };
    let mut cpu_at_go = None;
    let mut cpu_at_end = None;
    let read_nodes = |targets: &[Target]| -> Vec<Option<sys::NodeCounters>> {
        targets
            .iter()
            .map(|t| sys::NodeCounters::read(t.addr))
            .collect()
    };
    let mut nodes_at_go = Vec::new();
    let mut nodes_at_end = Vec::new();
    let net_before = sys::net_counters();
    let mut net_after = None;
    let params = prepared.params.clone();
    let seed = sys::now_ns();
    let results = {
        let sync2 = sync.clone();
        let thread_fn = Arc::new(thread_fn);
        let at_go = || {
            if prepared.cluster {
                nodes_at_go = read_nodes(&targets);
            }
            cpu_at_go = sum_over(&cpu_pids, sys::cpu_ns);
        };
        let between = || {
            cpu_at_end = sum_over(&cpu_pids, sys::cpu_ns);
            net_after = Some(sys::net_counters());
            rss_after = sum_over(&pids, sys::rss_bytes);
            if prepared.cluster {
                nodes_at_end = read_nodes(&targets);
            }
        };
        let make = move |t: usize| {
            let (params, sync, thread_fn) = (params.clone(), sync2.clone(), thread_fn.clone());
            let seed = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(t as u64 + 1);
            thread_fn.start(t, params, sync, seed)
        };
        runner::run(prepared.threads, &sync, make, at_go, between).map_err(LoadgenError::Run)?
    };
    let nodes: Vec<NodeDelta> = targets
        .iter()
        .zip(nodes_at_go.iter().zip(nodes_at_end.iter()))
        .map(|(t, (a, b))| NodeDelta {
            target: t.host.clone(),
            during: match (a, b) {
                (Some(a), Some(b)) => Some(b.since(a)),
                _ => None,
            },
        })
        .collect();
    let go_ns = sync.go_ns();
    let mut stats = Stats::default();
    let mut check = crate::checker::CheckReport::default();
    for r in results {
        stats.merge(r.stats);
        check.add(&r.check);
    }
    let drained = sync.drained_ns.load(std::sync::atomic::Ordering::Acquire);
    let report = Report {
        scenario: name,
        params: params_json,
        threads: prepared.threads,
        load_secs: common.duration.as_secs_f64(),
        active_secs: drained.saturating_sub(go_ns) as f64 / 1e9,
        stats,
        check,
        rss_before,
        rss_after,
        served_before,
        server_flags,
        server_cpu_ns: match (cpu_at_go, cpu_at_end) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
        net_during: net_after.map(|a| a.since(&net_before)),
        host: sys::host_facts(),
        targets: targets.iter().map(|t| t.host.clone()).collect(),
        server_pids: pids,
        settle_secs: prepared.params.settle.as_secs_f64(),
        nodes,
    };
    if let Some(path) = &common.json {
        let text = serde_json::to_string_pretty(&report.json()).unwrap_or_default();
        std::fs::write(path, text + "\n").map_err(|error| LoadgenError::Json {
            path: path.display().to_string(),
            error,
        })?;
    }
    Ok(report)
}

/// The sum of `f(pid)` over `pids`; `None` without pids or when one cannot be read.
fn sum_over(pids: &[u32], f: impl Fn(u32) -> Option<u64>) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| f(p)).sum()
}

/// The per-thread program of a scenario, with each thread's share of the plan.
enum ThreadFn {
    /// Users per thread and connects per second per thread.
    Connect(Vec<Vec<scenario::User>>, f64),
    Traffic(Vec<scenario::ThreadPlan>, Load),
}

impl ThreadFn {
    fn start(
        &self,
        t: usize,
        params: Arc<RunParams>,
        sync: Arc<Sync>,
        seed: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = runner::ThreadResult>>> {
        match self {
            ThreadFn::Connect(users, rate) => Box::pin(scenario::connect_thread(
                params,
                sync,
                seed,
                users[t].clone(),
                *rate,
            )),
            ThreadFn::Traffic(plans, load) => Box::pin(scenario::traffic_thread(
                params,
                sync,
                seed,
                plans[t].clone(),
                *load,
            )),
        }
    }
}
