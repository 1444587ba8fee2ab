//! Configuration: flags, `IMSHARD_*` environment variables and a TOML file (`--config`),
//! which agree key for key. Precedence: flag, then env var, then file, then default.
//!
//! Every key is declared once, in the [`config_keys!`] invocation below: its type,
//! default, parser, value name, unit and meaning. From that one declaration come the
//! `serve` flags and their `--help` text, the env var, the TOML key, the field of
//! [`Config`], and [`KEYS`], the table that [`markdown_table`] renders into README's
//! "Configuration" section (a test keeps the README equal to it). Flags, env vars and
//! the file all go through the same parser, so a value means the same in each.
//!
//! Durations are written `90s`, `2m`, `1h`, `1d`, `250ms` or a number of seconds;
//! byte sizes as a number of bytes or with `KiB`, `MiB` or `GiB`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// One configuration key: its names and documentation (see [`KEYS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The TOML key and [`Config`] field.
    pub name: &'static str,
    /// The environment variable, `IMSHARD_` and the name in capitals.
    pub env: &'static str,
    /// What the server uses when no source sets the key.
    pub default: &'static str,
    /// The value's unit or form.
    pub unit: &'static str,
    /// What the key does.
    pub meaning: &'static str,
}

/// Declares every configuration key once and generates from that list: [`KEYS`],
/// [`CommonArgs`] / [`ServeArgs`] (the flags, read as text), [`Config`] (typed fields
/// with their meaning as doc) and its merge of flag/env, file and default.
///
/// Per key: `name: Type = default_expr, parser, "VALUE_NAME", "IMSHARD_ENV",
/// "default as shown", "unit", "meaning";` and optional extra `#[arg(..)]` attributes.
/// `common` keys are shared with `imshard token` (so it finds the same secret).
macro_rules! config_keys {
    (
        common { $(
            $(#[$cattr:meta])*
            $cname:ident: $cty:ty = $cdefault:expr, $cparse:expr,
            $cvalue:literal, $cenv:literal, $cdtext:literal, $cunit:literal, $cmeaning:literal;
        )* }
        serve { $(
            $(#[$sattr:meta])*
            $sname:ident: $sty:ty = $sdefault:expr, $sparse:expr,
            $svalue:literal, $senv:literal, $sdtext:literal, $sunit:literal, $smeaning:literal;
        )* }
    ) => {
        /// Every configuration key, in the order `--help` and README list them.
        pub const KEYS: &[Key] = &[
            $( Key { name: stringify!($cname), env: $cenv, default: $cdtext, unit: $cunit, meaning: $cmeaning }, )*
            $( Key { name: stringify!($sname), env: $senv, default: $sdtext, unit: $sunit, meaning: $smeaning }, )*
        ];

        /// Settings shared by `serve` and `token` (so both find the same secret).
        #[derive(Debug, Args, Default, Clone)]
        pub struct CommonArgs {
            /// TOML file with any of the configuration keys.
            #[arg(long, env = "IMSHARD_CONFIG", value_name = "FILE", long_help = config_file_help())]
            pub config: Option<PathBuf>,
            $(
                #[arg(long, env = $cenv, value_name = $cvalue,
                    help = concat!($cmeaning, " [default: ", $cdtext, "; ", $cunit, "]"))]
                $(#[$cattr])*
                pub $cname: Option<String>,
            )*
        }

        /// The flags of `imshard serve`, as text: each is parsed, like the env var and
        /// the file's value, by its key's parser in [`Config::from_serve_args`].
        #[derive(Debug, Args, Default, Clone)]
        pub struct ServeArgs {
            #[command(flatten)]
            pub common: CommonArgs,
            $(
                #[arg(long, env = $senv, value_name = $svalue,
                    help = concat!($smeaning, " [default: ", $sdtext, "; ", $sunit, "]"))]
                $(#[$sattr])*
                pub $sname: Option<String>,
            )*
        }

        /// The settings the server runs with, after merging.
        #[derive(Debug, Clone)]
        pub struct Config {
            $( #[doc = $cmeaning] pub $cname: $cty, )*
            $( #[doc = $smeaning] pub $sname: $sty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Config {
                    $( $cname: $cdefault, )*
                    $( $sname: $sdefault, )*
                }
            }
        }

        impl Config {
    /// Whether this node is one of a cluster (`node_id` set).
    pub fn clustered(&self) -> bool {
        !self.node_id.is_empty()
    }

    /// The node-to-node address: `node_listen`, or listen's host with its port + 1000.
    pub fn node_addr(&self) -> SocketAddr {
        self.node_listen.unwrap_or_else(|| {
            let mut a = self.listen;
            a.set_port(a.port().wrapping_add(1000));
            a
        })
    }

            /// Merges flags/env (already combined by clap) over the file over the
            /// defaults, then checks the result.
            pub fn from_serve_args(a: &ServeArgs) -> Result<Config, ConfigError> {
                let file = FileValues::read(a.common.config.as_deref())?;
                let c = Config {
                    $( $cname: setting(stringify!($cname), a.common.$cname.as_deref(), &file,
                        $cparse, || $cdefault)?, )*
                    $( $sname: setting(stringify!($sname), a.$sname.as_deref(), &file,
                        $sparse, || $sdefault)?, )*
                };
                c.validate()?;
                Ok(c)
            }

        }

        /// The settings `imshard token` shares with `serve` (data dir and secret).
        #[derive(Debug, Clone)]
        pub struct CommonConfig {
            $( #[doc = $cmeaning] pub $cname: $cty, )*
        }

        impl CommonConfig {
            /// Reads the common keys the same way as `serve` does.
            pub fn from_args(a: &CommonArgs) -> Result<CommonConfig, ConfigError> {
                let file = FileValues::read(a.config.as_deref())?;
                Ok(CommonConfig {
                    $( $cname: setting(stringify!($cname), a.$cname.as_deref(), &file,
                        $cparse, || $cdefault)?, )*
                })
            }
        }

        /// Each default written out in [`KEYS`] parses to the value [`Config`] uses
        /// (defaults shown in parentheses are descriptions, not values).
        #[cfg(test)]
        fn check_default_texts() {
            $( if !$cdtext.starts_with('(') {
                assert_eq!($cparse($cdtext).ok(), Some($cdefault), "default of {}", stringify!($cname));
            } )*
            $( if !$sdtext.starts_with('(') {
                assert_eq!($sparse($sdtext).ok(), Some($sdefault), "default of {}", stringify!($sname));
            } )*
        }
    };
}

config_keys! {
    common {
        data_dir: PathBuf = PathBuf::from("./data"), parse_path,
            "DIR", "IMSHARD_DATA_DIR", "./data", "path",
            "embedded store, shard count and generated JWT secret; one imshard per data dir";
        #[arg(hide_env_values = true)]
        jwt_secret: Option<String> = None, parse_secret,
            "SECRET", "IMSHARD_JWT_SECRET", "(generated into data_dir/jwt.secret)", "text, 16+ bytes",
            "HS256 secret tokens are signed with";
    }
    serve {
        listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8080)), parse_addr,
            "ADDR", "IMSHARD_LISTEN", "0.0.0.0:8080", "HOST:PORT or PORT",
            "address every shard listens on (SO_REUSEPORT); refused at start if another process holds it";
        admin_listen: Option<SocketAddr> = None, parse_optional_addr,
            "ADDR", "IMSHARD_ADMIN_LISTEN", "(none)", "HOST:PORT or PORT",
            "if set: `/metrics`, `/healthz` and `/api/v1/admin/*` are served only here (404 on `listen`), and nothing else is";
        shards: usize = cores(), parse_num::<usize>,
            "N", "IMSHARD_SHARDS", "(number of cores)", "count, 1-1024",
            "shard threads, each pinned to a core; a data dir keeps the count it was created with";
        heartbeat_timeout: Duration = Duration::from_secs(90), parse_duration,
            "DURATION", "IMSHARD_HEARTBEAT_TIMEOUT", "90s", "duration",
            "silent connections are closed (1001) after this";
        max_frame_bytes: usize = 1 << 20, parse_bytes,
            "BYTES", "IMSHARD_MAX_FRAME_BYTES", "1MiB", "bytes",
            "largest WebSocket message; larger closes with 1009";
        max_content_bytes: usize = 64 * 1024, parse_bytes,
            "BYTES", "IMSHARD_MAX_CONTENT_BYTES", "64KiB", "bytes",
            "largest message content (41301); at least 4 KiB below max_frame_bytes";
        recall_window: Duration = Duration::from_secs(120), parse_duration,
            "DURATION", "IMSHARD_RECALL_WINDOW", "120s", "duration",
            "how long after send a message may be recalled (42201 after)";
        rate_limit: u32 = 200, parse_num::<u32>,
            "N", "IMSHARD_RATE_LIMIT", "200", "requests/s per user",
            "request budget per user (a send costs 1, heavier operations more), burst 2x; 42901 past it; 0 = off";
        blocked_words: Vec<String> = Vec::new(), parse_words,
            "WORDS", "IMSHARD_BLOCKED_WORDS", "(none)", "comma-separated words",
            "words the content filter looks for (ASCII case-insensitive)";
        filter_mode: FilterMode = FilterMode::Reject, parse_filter_mode,
            "MODE", "IMSHARD_FILTER_MODE", "reject", "reject or mask",
            "`reject` refuses a message with a blocked word (42202); `mask` replaces the word with `*`";
        outbound_queue_bytes: usize = 4 << 20, parse_bytes,
            "BYTES", "IMSHARD_OUTBOUND_QUEUE_BYTES", "4MiB", "bytes",
            "a connection whose unsent bytes pass this is cut (KICKOUT slow_reader)";
        max_connections: usize = default_max_connections(), parse_num::<usize>,
            "N", "IMSHARD_MAX_CONNECTIONS", "(open-files limit minus 1024)", "connections",
            "upgrades past this many open connections get HTTP 503; start-up warns when the open-files limit cannot hold it";
        frame_timeout: Duration = Duration::from_secs(10), parse_duration,
            "DURATION", "IMSHARD_FRAME_TIMEOUT", "10s", "duration",
            "a started WebSocket message must complete within this (else close 1008)";
        frame_memory_bytes: usize = 128 << 20, parse_bytes,
            "BYTES", "IMSHARD_FRAME_MEMORY_BYTES", "128MiB", "bytes per shard",
            "bytes of unfinished incoming messages a shard holds at once; a connection that would pass it is closed (1013)";
        max_requests_in_flight: u16 = 64, parse_num::<u16>,
            "N", "IMSHARD_MAX_REQUESTS_IN_FLIGHT", "64", "requests per connection",
            "requests of one connection served at once; past it the connection is not read until one finishes";
        max_groups_owned: u32 = 1000, parse_num::<u32>,
            "N", "IMSHARD_MAX_GROUPS_OWNED", "1000", "groups per user",
            "groups one user may create (40301 past it; 0 = no limit)";
        members_added_per_hour: u32 = 100_000, parse_num::<u32>,
            "N", "IMSHARD_MEMBERS_ADDED_PER_HOUR", "100000", "member ids per user per hour",
            "member ids one user may name in creates and adds per hour (42901 past it; 0 = no limit)";
        store: StoreKind = StoreKind::Embedded, parse_store_kind,
            "KIND", "IMSHARD_STORE", "embedded", "embedded or redis",
            "where messages, rows and groups live: `embedded` (fjall under data_dir, one node, no other service) or `redis` (redis_url)";
        redis_url: String = "redis://127.0.0.1:6379/0".to_string(), parse_text,
            "URL", "IMSHARD_REDIS_URL", "redis://127.0.0.1:6379/0", "redis://[:password@]host:port/db",
            "the Redis of `--store redis`, one connection per shard (give an IP address: a host name is resolved on the shard's thread)";
        redis_timeout: Duration = Duration::from_secs(2), parse_duration,
            "DURATION", "IMSHARD_REDIS_TIMEOUT", "2s", "duration",
            "a Redis call with no answer after this fails fast (writes answer 50301) and the connection is made again";
        redis_wait_replicas: u32 = 0, parse_num::<u32>,
            "N", "IMSHARD_REDIS_WAIT_REPLICAS", "0", "replicas",
            "with `--store redis`: a write is answered only after this many replicas acknowledged it (Redis `WAIT`, within redis_timeout; else 50301); 0 = the primary alone";
        node_id: String = String::new(), parse_text,
            "ID", "IMSHARD_NODE_ID", "(none: a single node)", "1-64 of [A-Za-z0-9_.@-]",
            "cluster mode (needs `--store redis`): this node's name; nodes on one Redis with distinct ids form one cluster";
        node_listen: Option<SocketAddr> = None, parse_optional_addr,
            "ADDR", "IMSHARD_NODE_LISTEN", "(listen's host, listen's port + 1000)", "HOST:PORT or PORT",
            "cluster mode: the node-to-node address (every shard listens, SO_REUSEPORT); other nodes reach this node there";
        cluster_lease: Duration = Duration::from_secs(6), parse_duration,
            "DURATION", "IMSHARD_CLUSTER_LEASE", "6s", "duration, 300ms-10s",
            "cluster mode: a node that has not renewed its lease in Redis for this long is out of the cluster and its conversations move to the others";
        kafka_brokers: String = String::new(), parse_text,
            "HOST:PORT,..", "IMSHARD_KAFKA_BROKERS", "(none: no event log)", "host:port list",
            "with `--store redis`: produce every stored message, recall, read mark and membership change (keyed by conv_id) to kafka_topic, and offline pushes to kafka_offline_topic, through a durable outbox in Redis";
        kafka_topic: String = "imshard.events".to_string(), parse_text,
            "TOPIC", "IMSHARD_KAFKA_TOPIC", "imshard.events", "topic name",
            "the event log's topic (records: src/proto/events.proto)";
        kafka_offline_topic: String = "imshard.offline".to_string(), parse_text,
            "TOPIC", "IMSHARD_KAFKA_OFFLINE_TOPIC", "imshard.offline", "topic name",
            "offline-push events (a recipient with no device online), keyed by the user";
        cache_bytes: usize = 256 << 20, parse_bytes,
            "BYTES", "IMSHARD_CACHE_BYTES", "256MiB", "bytes for the whole process",
            "memory for cached conversation rows, conversation states and group member lists (split over the shards); the least recently used idle entries are evicted past it";
        shutdown_grace: Duration = Duration::from_secs(5), parse_duration,
            "DURATION", "IMSHARD_SHUTDOWN_GRACE", "5s", "duration, at most 10m",
            "on SIGTERM/SIGINT: how long to answer in-flight requests and spread the close frames";
        demo: bool = true, parse_bool,
            "BOOL", "IMSHARD_DEMO", "true", "true or false",
            "serve the browser chat page at `/demo` (on by default while the embedded store is the only store)";
        log: String = "info,fjall=warn,lsm_tree=warn".to_string(), parse_text,
            "FILTER", "IMSHARD_LOG", "info,fjall=warn,lsm_tree=warn", "tracing filter",
            "what is logged (to stdout), e.g. `info,imshard=debug`";
    }
}

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
    #[command(
        long_about = "Run the server.\n\nEvery setting can be given as a flag, an IMSHARD_* \
                      environment variable or a key in the --config TOML file; a flag wins \
                      over the env var, which wins over the file, which wins over the default."
    )]
    Serve(ServeArgs),
    /// Print a token signed with the server's secret (the same --data-dir or
    /// --jwt-secret as the server).
    Token(TokenArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The user uuid (`sub`): 1-64 chars of [A-Za-z0-9_.@].
    #[arg(long)]
    pub user: String,
    /// The device id (`did`): 1-64 chars of [A-Za-z0-9_.@].
    #[arg(long, default_value = "web")]
    pub device: String,
    /// The device type (`dty`): mobile, desktop, web or pad.
    #[arg(long, default_value = "web")]
    pub device_type: String,
    /// Sets the `adm` claim (admin API).
    #[arg(long)]
    pub admin: bool,
    /// How long the token is valid (250ms, 90s, 2m, 24h, 7d or seconds; more than 0).
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Print a link to the chat page at `/demo` that signs in with the token. The
    /// optional value is the server's base URL (default: `http://127.0.0.1:PORT`, the
    /// port of `listen` from IMSHARD_LISTEN or the --config file).
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "BASE_URL")]
    pub demo_url: Option<String>,
}

impl TokenArgs {
    /// The page link `imshard token --demo-url` prints: the base URL (or the local
    /// address of `listen`, read like `serve` reads it) + `/demo#token=...`. The token
    /// is in the fragment, which the browser never sends to the server.
    pub fn demo_link(&self, base: &str, token: &str) -> Result<String, ConfigError> {
        let base = if base.is_empty() {
            let file = FileValues::read(self.common.config.as_deref())?;
            let env = std::env::var("IMSHARD_LISTEN").ok();
            // `listen` is not a common key: read it as `serve` would, default included.
            let port = match setting(
                "listen",
                env.as_deref(),
                &file,
                |s| parse_addr(s).map(Some),
                || None,
            )? {
                Some(addr) => addr.port(),
                None => key("listen")
                    .and_then(|k| parse_addr(k.default).ok())
                    .map_or(8080, |a| a.port()),
            };
            format!("http://127.0.0.1:{port}")
        } else {
            base.trim_end_matches('/').to_string()
        };
        Ok(format!("{base}/demo#token={token}"))
    }
}

/// Where a shard's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// fjall under `data_dir`: one node, no other service.
    Embedded,
    /// Redis at `redis_url`.
    Redis,
}

fn parse_store_kind(s: &str) -> Result<StoreKind, String> {
    match s.trim() {
        "embedded" => Ok(StoreKind::Embedded),
        "redis" => Ok(StoreKind::Redis),
        _ => Err(format!("store must be embedded or redis, got {s:?}")),
    }
}

/// What the content filter does with a blocked word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterMode {
    /// Refuse the message with 42202.
    Reject,
    /// Replace the word with `*` and accept.
    Mask,
}

impl Key {
    /// The command-line flag, e.g. `--max-frame-bytes`.
    pub fn flag(&self) -> String {
        format!("--{}", self.name.replace('_', "-"))
    }
}

fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// The long help of `--config`: the keys a file may hold.
fn config_file_help() -> String {
    let names: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
    format!(
        "TOML file with any of these keys (the flag names with `_`; meanings, defaults and units \
         as for the flags below): {}.\n\nExample:\n  listen = \"0.0.0.0:8080\"\n  \
         heartbeat_timeout = \"90s\"\n  blocked_words = [\"spam\", \"scam\"]",
        names.join(", ")
    )
}

/// The Markdown table of every key (README's "Configuration" section is this).
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| key (TOML) | flag | env | default | unit | meaning |\n|---|---|---|---|---|---|\n",
    );
    for k in KEYS {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            k.name,
            k.flag(),
            k.env,
            k.default,
            k.unit,
            k.meaning
        ));
    }
    out
}

/// A configuration that cannot be used, with what is wrong.
#[derive(Debug)]
pub enum ConfigError {
    /// The `--config` file cannot be read.
    Read(PathBuf, std::io::Error),
    /// The `--config` file is not TOML, or has a key that does not exist.
    Parse(PathBuf, String),
    /// A value does not parse: the key, where it came from, and why.
    Value {
        key: &'static str,
        from: String,
        error: String,
    },
    /// Values that parse but cannot be used (together).
    Invalid(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read(p, e) => write!(f, "cannot read config {}: {e}", p.display()),
            ConfigError::Parse(p, e) => write!(f, "bad config {}: {e}", p.display()),
            ConfigError::Value { key, from, error } => write!(f, "bad {key} ({from}): {error}"),
            ConfigError::Invalid(e) => write!(f, "bad setting: {e}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The `--config` file's values, each as the text the key's parser reads (a number as
/// its digits, a list of words joined with `,`).
#[derive(Debug, Default)]
struct FileValues {
    path: PathBuf,
    values: BTreeMap<String, String>,
}

impl FileValues {
    fn read(path: Option<&Path>) -> Result<FileValues, ConfigError> {
        let Some(path) = path else {
            return Ok(FileValues::default());
        };
        let bad = |e: String| ConfigError::Parse(path.to_path_buf(), e);
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut values = BTreeMap::new();
        for (name, value) in table {
            if key(&name).is_none() {
                let known: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
                return Err(bad(format!(
                    "unknown key `{name}`; the keys are: {}",
                    known.join(", ")
                )));
            }
            let text =
                match value {
                    toml::Value::Array(items) => {
                        let mut words = Vec::with_capacity(items.len());
                        for item in items {
                            words.push(scalar_text(item).ok_or_else(|| {
                                bad(format!("`{name}` must be a list of strings"))
                            })?);
                        }
                        words.join(",")
                    }
                    other => scalar_text(other)
                        .ok_or_else(|| bad(format!("`{name}` must be a string or a number")))?,
                };
            values.insert(name, text);
        }
        Ok(FileValues {
            path: path.to_path_buf(),
            values,
        })
    }
}

fn scalar_text(v: toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(n) => Some(n.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// One key's value: the flag or env var (`given`, combined by clap), else the file's,
/// else the default; flag, env and file text all go through `parse`.
fn setting<T>(
    name: &'static str,
    given: Option<&str>,
    file: &FileValues,
    parse: impl Fn(&str) -> Result<T, String>,
    default: impl FnOnce() -> T,
) -> Result<T, ConfigError> {
    let bad = |from: String, error: String| ConfigError::Value {
        key: name,
        from,
        error,
    };
    if let Some(text) = given {
        let (flag, env) = key(name).map_or((String::new(), ""), |k| (k.flag(), k.env));
        return parse(text).map_err(|e| bad(format!("{flag} or {env}"), e));
    }
    if let Some(text) = file.values.get(name) {
        return parse(text).map_err(|e| bad(format!("in {}", file.path.display()), e));
    }
    Ok(default())
}

impl Config {
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
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1".into());
        }
        if !self.kafka_brokers.is_empty() {
            if let Err(e) = crate::eventlog::EventLogConfig::parse_brokers(&self.kafka_brokers) {
                return bad(e.to_string());
            }
            if self.store != StoreKind::Redis {
                return bad(
                    "kafka_brokers (the event log) needs store = redis: its outbox is in Redis"
                        .into(),
                );
            }
            if self.kafka_topic.is_empty() || self.kafka_offline_topic.is_empty() {
                return bad("kafka_topic and kafka_offline_topic must not be empty".into());
            }
        }
        if !self.node_id.is_empty() {
            if let Err(e) = crate::cluster::NodeId::new(self.node_id.clone()) {
                return bad(format!("node_id: {e}"));
            }
            if self.store != StoreKind::Redis {
                return bad("node_id (cluster mode) needs store = redis".into());
            }
            if !(Duration::from_millis(300)..=Duration::from_secs(10)).contains(&self.cluster_lease)
            {
                return bad("cluster_lease must be 300ms-10s".into());
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

/// Open files kept for the stores, listeners, rings and logs beside the connections:
/// 1,024, or half the limit when that is smaller.
pub fn open_files_reserve(open_files: u64) -> u64 {
    (open_files / 2).min(1024)
}

/// How many connections an open-files limit holds after [`open_files_reserve`]
/// (at most 1,000,000 when the limit is unlimited).
pub fn connections_for_open_files(open_files: u64) -> usize {
    let n = open_files.saturating_sub(open_files_reserve(open_files));
    usize::try_from(n.min(1_000_000)).unwrap_or(1_000_000)
}

/// The default `max_connections`: what the open-files limit holds once the soft limit
/// is raised to the hard one (the server does that at start).
fn default_max_connections() -> usize {
    match crate::server::raise_open_files() {
        Ok(lim) => connections_for_open_files(lim.soft),
        Err(_) => connections_for_open_files(1024),
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `HOST:PORT`, `:PORT` or `PORT` (all interfaces). A host name resolves to its first
/// IPv4 address (else its first address): `localhost:8080` is `127.0.0.1:8080`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let form = || {
        format!("expected HOST:PORT or PORT (e.g. 0.0.0.0:8080, 127.0.0.1:8080, localhost:8080 or 8080), got {s:?}")
    };
    let port_only = s.strip_prefix(':').unwrap_or(s);
    if !port_only.is_empty() && port_only.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = port_only.parse().map_err(|_| form())?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(form());
    };
    if host.is_empty() || host.contains(['/', ' ']) || port.parse::<u16>().is_err() {
        return Err(form());
    }
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?} ({e}); {}", form()))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{host:?} resolves to no address"))
}

fn parse_optional_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    parse_addr(s).map(Some)
}

fn parse_num<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("expected a whole number, got {s:?}"))
}

/// A byte size: a number of bytes, or with `KiB`, `MiB` or `GiB` (`K`, `M`, `G` too).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("bad size {s:?}: use e.g. 65536, 64KiB, 1MiB"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return Err(format!("bad size unit in {s:?}: use KiB, MiB or GiB")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("expected a path".into());
    }
    Ok(PathBuf::from(s))
}

fn parse_secret(s: &str) -> Result<Option<String>, String> {
    Ok(Some(s.to_string()))
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim() {
        "true" | "on" | "1" => Ok(true),
        "false" | "off" | "0" => Ok(false),
        _ => Err(format!("expected true or false, got {s:?}")),
    }
}

fn parse_text(s: &str) -> Result<String, String> {
    Ok(s.to_string())
}

/// Comma-separated words; blanks around them and empty ones are dropped.
fn parse_words(s: &str) -> Result<Vec<String>, String> {
    Ok(s.split(',')
        .map(|w| w.trim().to_string())
        .filter(|w| !w.is_empty())
        .collect())
}

fn parse_filter_mode(s: &str) -> Result<FilterMode, String> {
    match s.trim() {
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

/// A token lifetime: a duration of at least one second (a token that expires as it is
/// made is useless, and `exp` counts whole seconds).
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("--ttl must be at least 1s, got {s:?}"));
    }
    Ok(d)
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
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("0s").is_err());
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn sizes_and_addresses() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert!(parse_bytes("1MB").is_err());
        let all = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
        assert_eq!(parse_addr("8080"), Ok(all(8080)));
        assert_eq!(parse_addr(":8080"), Ok(all(8080)));
        assert_eq!(
            parse_addr("127.0.0.1:9"),
            Ok("127.0.0.1:9".parse().unwrap())
        );
        assert_eq!(parse_addr("[::1]:9"), Ok("[::1]:9".parse().unwrap()));
        assert_eq!(
            parse_addr("localhost:8080"),
            Ok("127.0.0.1:8080".parse().unwrap())
        );
        for bad in [
            "",
            "http://x:1",
            "70000",
            "host:",
            "1.2.3.4",
            "no.such.host.invalid:1",
        ] {
            let e = parse_addr(bad).unwrap_err();
            assert!(
                e.contains("HOST:PORT") || e.contains("resolve"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn defaults_match_the_table() {
        check_default_texts();
        for k in KEYS {
            assert_eq!(k.env, format!("IMSHARD_{}", k.name.to_uppercase()));
        }
    }

    #[test]
    fn open_files_hold_the_default_connections() {
        assert_eq!(connections_for_open_files(20_000), 20_000 - 1024);
        assert_eq!(connections_for_open_files(1024), 512);
        assert_eq!(connections_for_open_files(u64::MAX), 1_000_000);
    }

    /// README's "Configuration" table is [`markdown_table`]. With
    /// `IMSHARD_BLESS_README=1` the test rewrites it instead.
    #[test]
    fn readme_config_table_is_generated() {
        const BEGIN: &str = "<!-- config table: generated from src/config.rs -->\n";
        const END: &str = "<!-- end of config table -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let start = readme
            .find(BEGIN)
            .expect("README has the table's start marker")
            + BEGIN.len();
        let end = readme[start..]
            .find(END)
            .expect("README has the end marker")
            + start;
        let want = markdown_table();
        if std::env::var_os("IMSHARD_BLESS_README").is_some() {
            let new = format!("{}{want}{}", &readme[..start], &readme[end..]);
            std::fs::write(path, new).unwrap();
            return;
        }
        assert!(
            readme[start..end] == want,
            "README's config table differs from src/config.rs; run \
             IMSHARD_BLESS_README=1 cargo test --lib readme_config_table or paste:\n{want}"
        );
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "shards = 3\nheartbeat_timeout = \"30s\"\nrate_limit = 5\nblocked_words = [\"a\", \" b \"]\nmax_frame_bytes = \"2MiB\"\n",
        )
        .unwrap();
        let mut a = ServeArgs::default();
        a.common.config = Some(p.clone());
        a.rate_limit = Some("7".into());
        let c = Config::from_serve_args(&a).unwrap();
        assert_eq!(c.shards, 3);
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(c.rate_limit, 7);
        assert_eq!(c.blocked_words, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(c.max_frame_bytes, 2 << 20);
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
        std::fs::write(&p, "shards = \"many\"\n").unwrap();
        assert!(matches!(
            Config::from_serve_args(&a),
            Err(ConfigError::Value { key: "shards", .. })
        ));
        a.rate_limit = Some("fast".into());
        let e = Config::from_serve_args(&ServeArgs {
            rate_limit: Some("fast".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("--rate-limit"), "{e}");
    }
}
