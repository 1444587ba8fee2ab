//! Configuration: flags, `IMSHARD_*` environment variables and a TOML file (`--config`),
//! which agree key for key. Precedence: flag, then env var, then file, then default.
//!
//! | key (TOML) | flag | env | default | meaning |
//! |---|---|---|---|---|
//! | listen | --listen | IMSHARD_LISTEN | 0.0.0.0:8080 | address every shard listens on (SO_REUSEPORT) |
//! | admin_listen | --admin-listen | IMSHARD_ADMIN_LISTEN | (none) | if set: `/metrics`, `/healthz` and `/api/v1/admin/*` are served only here (404 on `listen`), and nothing else is |
//! | shards | --shards | IMSHARD_SHARDS | number of cores | shard threads, each pinned to a core |
//! | data_dir | --data-dir | IMSHARD_DATA_DIR | ./data | embedded store, shard count, generated JWT secret |
//! | heartbeat_timeout | --heartbeat-timeout | IMSHARD_HEARTBEAT_TIMEOUT | 90s | silent connections are closed after this |
//! | jwt_secret | --jwt-secret | IMSHARD_JWT_SECRET | generated into data_dir/jwt.secret | HS256 secret |
//! | max_frame_bytes | --max-frame-bytes | IMSHARD_MAX_FRAME_BYTES | 1048576 | largest WebSocket message; larger closes with 1009 |
//! | max_content_bytes | --max-content-bytes | IMSHARD_MAX_CONTENT_BYTES | 65536 | largest message content (41301) |
//! | recall_window | --recall-window | IMSHARD_RECALL_WINDOW | 120s | how long after send a message may be recalled |
//! | rate_limit | --rate-limit | IMSHARD_RATE_LIMIT | 200 | sends per second per user (0 = off), burst 2x (42901) |
//! | blocked_words | --blocked-words | IMSHARD_BLOCKED_WORDS | (none) | comma-separated words the content filter looks for |
//! | filter_mode | --filter-mode | IMSHARD_FILTER_MODE | reject | `reject` (42202) or `mask` (replace with `*`) |
//! | outbound_queue_bytes | --outbound-queue-bytes | IMSHARD_OUTBOUND_QUEUE_BYTES | 4194304 | a connection whose unsent bytes pass this is cut (slow reader) |
//! | max_connections | --max-connections | IMSHARD_MAX_CONNECTIONS | 1000000 | upgrades past this many open connections get HTTP 503; start-up warns when the open-files limit cannot hold it |
//! | frame_timeout | --frame-timeout | IMSHARD_FRAME_TIMEOUT | 10s | a started WebSocket message must complete within this (else close 1008) |
//! | frame_memory_bytes | --frame-memory-bytes | IMSHARD_FRAME_MEMORY_BYTES | 134217728 | per shard: bytes of unfinished incoming messages held at once; a connection that would pass it is closed (1013) |
//! | max_requests_in_flight | --max-requests-in-flight | IMSHARD_MAX_REQUESTS_IN_FLIGHT | 64 | per connection: requests being served at once; past it the connection is not read until one finishes |
//! | max_groups_owned | --max-groups-owned | IMSHARD_MAX_GROUPS_OWNED | 1000 | groups one user may create (40301 past it; 0 = no limit) |
//! | members_added_per_hour | --members-added-per-hour | IMSHARD_MEMBERS_ADDED_PER_HOUR | 100000 | member ids one user may name in creates and adds per hour (42901 past it; 0 = no limit) |
//! | shutdown_grace | --shutdown-grace | IMSHARD_SHUTDOWN_GRACE | 5s | on SIGTERM/SIGINT: how long to answer in-flight requests and spread the close frames |
//! | log | --log | IMSHARD_LOG | info,fjall=warn,lsm_tree=warn | tracing filter (e.g. `info,imshard=debug`) |
//!
//! Durations are written `90s`, `2m`, `1h`, `1d`, `250ms` or a number of seconds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(
    name = "imshard",
    version,
    about = "Thread-per-core instant-messaging connection server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up, so its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Print a token signed with the server's secret.
    Token(TokenArgs),
}

/// Settings shared by `serve` and `token` (so both find the same secret).
#[derive(Debug, Args, Default, Clone)]
pub struct CommonArgs {
    /// TOML file with any of the keys below.
    #[arg(long, env = "IMSHARD_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "IMSHARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "IMSHARD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
}

#[derive(Debug, Args, Default, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[arg(long, env = "IMSHARD_LISTEN")]
    pub listen: Option<SocketAddr>,
    #[arg(long, env = "IMSHARD_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    #[arg(long, env = "IMSHARD_SHARDS")]
    pub shards: Option<usize>,
    #[arg(long, env = "IMSHARD_HEARTBEAT_TIMEOUT", value_parser = parse_duration)]
    pub heartbeat_timeout: Option<Duration>,
    #[arg(long, env = "IMSHARD_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    #[arg(long, env = "IMSHARD_MAX_CONTENT_BYTES")]
    pub max_content_bytes: Option<usize>,
    #[arg(long, env = "IMSHARD_RECALL_WINDOW", value_parser = parse_duration)]
    pub recall_window: Option<Duration>,
    #[arg(long, env = "IMSHARD_RATE_LIMIT")]
    pub rate_limit: Option<u32>,
    #[arg(long, env = "IMSHARD_BLOCKED_WORDS", value_delimiter = ',')]
    pub blocked_words: Option<Vec<String>>,
    #[arg(long, env = "IMSHARD_FILTER_MODE", value_parser = parse_filter_mode)]
    pub filter_mode: Option<FilterMode>,
    #[arg(long, env = "IMSHARD_OUTBOUND_QUEUE_BYTES")]
    pub outbound_queue_bytes: Option<usize>,
    #[arg(long, env = "IMSHARD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    #[arg(long, env = "IMSHARD_FRAME_TIMEOUT", value_parser = parse_duration)]
    pub frame_timeout: Option<Duration>,
    #[arg(long, env = "IMSHARD_FRAME_MEMORY_BYTES")]
    pub frame_memory_bytes: Option<usize>,
    #[arg(long, env = "IMSHARD_MAX_REQUESTS_IN_FLIGHT")]
    pub max_requests_in_flight: Option<u16>,
    #[arg(long, env = "IMSHARD_MAX_GROUPS_OWNED")]
    pub max_groups_owned: Option<u32>,
    #[arg(long, env = "IMSHARD_MEMBERS_ADDED_PER_HOUR")]
    pub members_added_per_hour: Option<u32>,
    #[arg(long, env = "IMSHARD_SHUTDOWN_GRACE", value_parser = parse_duration)]
    pub shutdown_grace: Option<Duration>,
    #[arg(long, env = "IMSHARD_LOG")]
    pub log: Option<String>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[arg(long)]
    pub user: String,
    #[arg(long)]
    pub device: String,
    /// mobile, desktop, web or pad.
    #[arg(long, default_value = "web")]
    pub device_type: String,
    /// Sets the `adm` claim.
    #[arg(long)]
    pub admin: bool,
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
}

/// What the content filter does with a blocked word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterMode {
    /// Refuse the message with 42202.
    Reject,
    /// Replace the word with `*` and accept.
    Mask,
}

/// The TOML file: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    shards: Option<usize>,
    data_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_duration")]
    heartbeat_timeout: Option<Duration>,
    jwt_secret: Option<String>,
    max_frame_bytes: Option<usize>,
    max_content_bytes: Option<usize>,
    #[serde(default, deserialize_with = "de_duration")]
    recall_window: Option<Duration>,
    rate_limit: Option<u32>,
    blocked_words: Option<Vec<String>>,
    filter_mode: Option<FilterMode>,
    outbound_queue_bytes: Option<usize>,
    max_connections: Option<usize>,
    #[serde(default, deserialize_with = "de_duration")]
    frame_timeout: Option<Duration>,
    frame_memory_bytes: Option<usize>,
    max_requests_in_flight: Option<u16>,
    max_groups_owned: Option<u32>,
    members_added_per_hour: Option<u32>,
    #[serde(default, deserialize_with = "de_duration")]
    shutdown_grace: Option<Duration>,
    log: Option<String>,
}

/// The settings the server runs with, after merging.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The operators' address: metrics, health and admin API move here when set.
    pub admin_listen: Option<SocketAddr>,
    pub shards: usize,
    pub data_dir: PathBuf,
    pub heartbeat_timeout: Duration,
    pub jwt_secret: Option<String>,
    pub max_frame_bytes: usize,
    pub max_content_bytes: usize,
    pub recall_window: Duration,
    pub rate_limit: u32,
    pub blocked_words: Vec<String>,
    pub filter_mode: FilterMode,
    pub outbound_queue_bytes: usize,
    pub max_connections: usize,
    pub frame_timeout: Duration,
    pub frame_memory_bytes: usize,
    pub max_requests_in_flight: u16,
    pub max_groups_owned: u32,
    pub members_added_per_hour: u32,
    pub shutdown_grace: Duration,
    pub log: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: None,
            shards: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            data_dir: PathBuf::from("./data"),
            heartbeat_timeout: Duration::from_secs(90),
            jwt_secret: None,
            max_frame_bytes: 1 << 20,
            max_content_bytes: 64 * 1024,
            recall_window: Duration::from_secs(120),
            rate_limit: 200,
            blocked_words: Vec::new(),
            filter_mode: FilterMode::Reject,
            outbound_queue_bytes: 4 << 20,
            max_connections: 1_000_000,
            frame_timeout: Duration::from_secs(10),
            frame_memory_bytes: 128 << 20,
            max_requests_in_flight: 64,
            max_groups_owned: 1000,
            members_added_per_hour: 100_000,
            shutdown_grace: Duration::from_secs(5),
            log: "info,fjall=warn,lsm_tree=warn".to_string(),
        }
    }
}

/// A configuration that cannot be used, with what is wrong.
#[derive(Debug)]
pub enum ConfigError {
    Read(PathBuf, std::io::Error),
    Parse(PathBuf, String),
    Invalid(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read(p, e) => write!(f, "cannot read config {}: {e}", p.display()),
            ConfigError::Parse(p, e) => write!(f, "bad config {}: {e}", p.display()),
            ConfigError::Invalid(e) => write!(f, "bad setting: {e}"),
        }
    }
}

impl std::error::Error for ConfigError {}

fn read_file(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e.to_string()))
}

impl Config {
    /// Merges flags/env (already combined by clap) over the file over the defaults.
    pub fn from_serve_args(a: &ServeArgs) -> Result<Config, ConfigError> {
        let f = read_file(a.common.config.as_deref())?;
        let d = Config::default();
        let c = Config {
            listen: a.listen.or(f.listen).unwrap_or(d.listen),
            admin_listen: a.admin_listen.or(f.admin_listen),
            shards: a.shards.or(f.shards).unwrap_or(d.shards),
            data_dir: a
                .common
                .data_dir
                .clone()
                .or(f.data_dir)
                .unwrap_or(d.data_dir),
            heartbeat_timeout: a
                .heartbeat_timeout
                .or(f.heartbeat_timeout)
                .unwrap_or(d.heartbeat_timeout),
            jwt_secret: a.common.jwt_secret.clone().or(f.jwt_secret),
            max_frame_bytes: a
                .max_frame_bytes
                .or(f.max_frame_bytes)
                .unwrap_or(d.max_frame_bytes),
            max_content_bytes: a
                .max_content_bytes
                .or(f.max_content_bytes)
                .unwrap_or(d.max_content_bytes),
            recall_window: a
                .recall_window
                .or(f.recall_window)
                .unwrap_or(d.recall_window),
            rate_limit: a.rate_limit.or(f.rate_limit).unwrap_or(d.rate_limit),
            blocked_words: a
                .blocked_words
                .clone()
                .or(f.blocked_words)
                .unwrap_or(d.blocked_words)
                .into_iter()
                .map(|w| w.trim().to_string())
                .filter(|w| !w.is_empty())
                .collect(),
            filter_mode: a.filter_mode.or(f.filter_mode).unwrap_or(d.filter_mode),
            outbound_queue_bytes: a
                .outbound_queue_bytes
                .or(f.outbound_queue_bytes)
                .unwrap_or(d.outbound_queue_bytes),
            max_connections: a
                .max_connections
                .or(f.max_connections)
                .unwrap_or(d.max_connections),
            frame_timeout: a
                .frame_timeout
                .or(f.frame_timeout)
                .unwrap_or(d.frame_timeout),
            frame_memory_bytes: a
                .frame_memory_bytes
                .or(f.frame_memory_bytes)
                .unwrap_or(d.frame_memory_bytes),
            max_requests_in_flight: a
                .max_requests_in_flight
                .or(f.max_requests_in_flight)
                .unwrap_or(d.max_requests_in_flight),
            max_groups_owned: a
                .max_groups_owned
                .or(f.max_groups_owned)
                .unwrap_or(d.max_groups_owned),
            members_added_per_hour: a
                .members_added_per_hour
                .or(f.members_added_per_hour)
                .unwrap_or(d.members_added_per_hour),
            shutdown_grace: a
                .shutdown_grace
                .or(f.shutdown_grace)
                .unwrap_or(d.shutdown_grace),
            log: a.log.clone().or(f.log).unwrap_or(d.log),
        };
        c.validate()?;
        Ok(c)
    }

    /// The data dir and secret for `imshard token`, read the same way as for `serve`.
    pub fn secret_settings(a: &CommonArgs) -> Result<(PathBuf, Option<String>), ConfigError> {
        let f = read_file(a.config.as_deref())?;
        let dir = a
            .data_dir
            .clone()
            .or(f.data_dir)
            .unwrap_or_else(|| Config::default().data_dir);
        Ok((dir, a.jwt_secret.clone().or(f.jwt_secret)))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        if self.shards == 0 || self.shards > 1024 {
            return bad(format!("shards must be 1..=1024, got {}", self.shards));
        }
        if self.heartbeat_timeout < Duration::from_secs(1) {
            return bad("heartbeat_timeout must be at least 1s".into());
        }
        if self.max_content_bytes == 0 || self.max_content_bytes + 4096 > self.max_frame_bytes {
            return bad(format!(
                "max_content_bytes ({}) must be > 0 and at least 4096 below max_frame_bytes ({})",
                self.max_content_bytes, self.max_frame_bytes
            ));
        }
        if self.max_frame_bytes > 64 << 20 {
            return bad("max_frame_bytes must be at most 64 MiB".into());
        }
        if self.outbound_queue_bytes < self.max_frame_bytes {
            return bad("outbound_queue_bytes must be at least max_frame_bytes".into());
        }
        if let Some(admin) = self.admin_listen {
            if admin.port() == self.listen.port() && admin.port() != 0 {
                return bad(format!(
                    "admin_listen ({admin}) must use another port than listen ({})",
                    self.listen
                ));
            }
        }
        if self.frame_timeout < Duration::from_secs(1) {
            return bad("frame_timeout must be at least 1s".into());
        }
        if self.frame_memory_bytes < self.max_frame_bytes {
            return bad("frame_memory_bytes must be at least max_frame_bytes".into());
        }
        if self.max_requests_in_flight == 0 {
            return bad("max_requests_in_flight must be at least 1".into());
        }
        if self.shutdown_grace > Duration::from_secs(600) {
            return bad("shutdown_grace must be at most 10m".into());
        }
        if matches!(&self.jwt_secret, Some(s) if s.len() < 16) {
            return bad("jwt_secret must be at least 16 bytes".into());
        }
        Ok(())
    }
}

fn parse_filter_mode(s: &str) -> Result<FilterMode, String> {
    match s {
        "reject" => Ok(FilterMode::Reject),
        "mask" => Ok(FilterMode::Mask),
        _ => Err(format!("filter mode must be reject or mask, got {s:?}")),
    }
}

/// Parses `250ms`, `90s`, `2m`, `1h`, `1d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use e.g. 90s, 2m, 1h"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m, h or d")),
    };
    Ok(Duration::from_millis(ms))
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(n) => Ok(Some(Duration::from_secs(n))),
        Raw::Text(t) => parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "shards = 3\nheartbeat_timeout = \"30s\"\nrate_limit = 5\n",
        )
        .unwrap();
        let mut a = ServeArgs::default();
        a.common.config = Some(p.clone());
        a.rate_limit = Some(7);
        let c = Config::from_serve_args(&a).unwrap();
        assert_eq!(c.shards, 3);
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(c.rate_limit, 7);
        assert_eq!(c.admin_listen, None);
        std::fs::write(&p, "admin_listen = \"127.0.0.1:9090\"\n").unwrap();
        let c = Config::from_serve_args(&a).unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        std::fs::write(&p, "admin_listen = \"127.0.0.1:8080\"\n").unwrap();
        assert!(matches!(
            Config::from_serve_args(&a),
            Err(ConfigError::Invalid(..))
        ));
        std::fs::write(&p, "shard = 3\n").unwrap();
        assert!(matches!(
            Config::from_serve_args(&a),
            Err(ConfigError::Parse(..))
        ));
        std::fs::write(&p, "shards = 0\n").unwrap();
        assert!(matches!(
            Config::from_serve_args(&a),
            Err(ConfigError::Invalid(..))
        ));
    }
}
