//! Command-line flags. Every scenario shares [`Common`]; each has its own sizes.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "imshard-loadgen",
    version,
    about = "Load generator for imshard: idle connections, p2p and group traffic, with a delivery checker"
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Ramp to N idle authenticated connections, heartbeat them, measure server RSS.
    Connect {
        #[command(flatten)]
        common: Common,
        /// Connections to open.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// New connections per second (0 = as fast as --connect-concurrency allows).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
    },
    /// P pairs of users sending to each other: send->ack and send->push latency.
    P2p {
        #[command(flatten)]
        common: Common,
        /// Pairs of users; both users of a pair send.
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// G groups of M members, K senders per group: deliveries/s and send->push latency.
    Group {
        #[command(flatten)]
        common: Common,
        /// Groups to create.
        #[arg(long, default_value_t = 10)]
        groups: usize,
        /// Members per group (all connected unless --online says otherwise).
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Senders per group (the first K members).
        #[arg(long, visible_alias = "senders-per-group", default_value_t = 1)]
        senders: usize,
        /// Members of each group that connect (the first K; default: all). The others
        /// are members that never connect: their rows are updated, nothing is pushed.
        #[arg(long)]
        online: Option<usize>,
        #[command(flatten)]
        load: LoadArgs,
    },
}

/// How hard the senders push.
#[derive(Debug, Args, Clone)]
pub struct LoadArgs {
    /// Total sends per second over all senders (0 = as fast as acks allow).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Sends in flight per sender.
    #[arg(long, default_value_t = 8)]
    pub window: u32,
    /// Message content bytes (JSON: timestamp + padding).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

/// Flags of every scenario.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Server address; several, comma-separated (`host:port,host:port`), for the nodes
    /// of a cluster: user i connects to target i % N (round robin by user index, so the
    /// two parties of a pair and the members of a group land on different nodes).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub target: String,
    /// WebSocket path.
    #[arg(long, default_value = "/ws")]
    pub path: String,
    /// The server's JWT secret (else read from `<data-dir>/jwt.secret`).
    #[arg(long, env = "IMSHARD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// The server's data dir, to read jwt.secret from.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Loadgen threads, each pinned with its own io_uring runtime (default: the CPUs
    /// this process may use; see taskset).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Source addresses 127.0.0.2, 127.0.0.3, ... to connect from (each gives one
    /// ephemeral port range). Default: enough for the connections on a loopback target,
    /// none (kernel's choice) otherwise. 0 = none.
    #[arg(long)]
    pub source_addrs: Option<usize>,
    /// Length of the load (connect: of the whole run).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// After the load: longest wait for outstanding acks and pushes.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Timeout of one TCP connect + WebSocket upgrade.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Most connects in flight per thread.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Heartbeat period of every connection (the server closes silent ones after its
    /// heartbeat_timeout, 90 s by default).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Do not answer MSG_PUSH with PushAck.
    #[arg(long)]
    pub no_push_ack: bool,
    /// Send the cumulative PushAcks of a connection once this many pushes are
    /// unacknowledged (1 = one ack per push).
    #[arg(long, default_value_t = 64)]
    pub ack_batch: u32,
    /// ... or once per this interval, whichever comes first.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub ack_interval: Duration,
    /// Report the server's CPU time (utime + stime from /proc/PID/stat, all its
    /// threads) from the start of the load to the end of the drain, per delivery
    /// (needs --server-pid).
    #[arg(long)]
    pub cpu_per_delivery: bool,
    /// The server's shard count: user ids are picked so that every shard gets users
    /// (default: the cores of this host, the server's default).
    #[arg(long)]
    pub server_shards: Option<usize>,
    /// The server's pid: report its RSS before and after (bytes per connection) and its
    /// command line. Several, comma-separated, for the nodes of a cluster: RSS and CPU
    /// are summed over them.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Wait this long after connecting (and again after creating groups) before the
    /// load starts. A cluster node subscribes to a user's and a group's push channels
    /// asynchronously, and Redis pub/sub is at most once: a push published before the
    /// subscription is in place is lost (the client would pull it). Default: 1s when a
    /// target reports cluster mode in its /metrics, else 0.
    #[arg(long, value_parser = parse_duration)]
    pub settle: Option<Duration>,
    /// The server's flags, recorded in the JSON (default: read with --server-pid).
    #[arg(long)]
    pub server_flags: Option<String>,
    /// Prefix of user and group ids (default: a fresh one per run).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Parses `10s`, `500ms`, `2m`, `1h` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (use 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3x").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "x",
            "p2p",
            "--pairs",
            "3",
            "--rate",
            "0",
            "--duration",
            "2s",
        ])
        .expect("parses");
        assert!(matches!(c.scenario, Scenario::P2p { pairs: 3, .. }));
    }
}
