//! The Kafka event log (`--kafka-brokers`, cluster mode): every stored message, recall,
//! read mark and membership change goes to the events topic (default
//! `imshard.events`) keyed by conv_id, and an offline push per recipient with no
//! online device goes to the offline topic (default `imshard.offline`) keyed by the
//! recipient. Record format: `src/proto/events.proto` ([`crate::proto::events_pb`]);
//! builders in [`record`].
//!
//! # Pieces
//! - [`KafkaLog`] ([`kafka`]): the process's one producer, started once with a bell per
//!   shard; returns a [`ShardLink`] per shard.
//! - [`EventLog`] ([`log`]): a shard's handle, made on the shard's thread from its link.
//!   `append` never blocks; the cursor `delivered()` says "every position up to N is
//!   in Kafka"; `stats()` gives produced / failed / backlog counters.
//! - [`Outbox`] / [`OutboxPump`] ([`outbox`]): durability across Kafka outages and
//!   crashes; the Redis outbox is [`crate::store::redis::outbox`].
//!
//! # Decision: rdkafka on a dedicated thread, not our own producer on the shard loops
//! `rdkafka` 0.39 (librdkafka 2.12.1 built from source, statically, with
//! `default-features = false`: no zlib, no TLS, no SASL libraries) builds here with the
//! C toolchain alone (gcc, g++, make): its mklove `configure` + `make` needs neither
//! cmake nor libcurl (only the `cmake-build` feature would), so `.ci/run` installs no
//! new apt package for it. Build time: `cargo clean -p rdkafka-sys && cargo build --lib`
//! (librdkafka, rdkafka, imshard) took 1 min 59 s wall, 69 s CPU, on this 2-core box
//! at load average 6 (other builds running); DEPENDENCIES.md measured 31-32 s for
//! rdkafka alone on an idle box. It brings what a home-made producer on `kafka-protocol` would have
//! to grow and prove: metadata and leader changes, per-partition batching, retries that
//! keep order, the idempotent producer, the Java client's murmur2 partitioner,
//! reconnects with backoff. Its calls are not async, so no shard calls it:
//! - a shard's [`EventLog::append`] pushes the record onto the shard's SPSC ring
//!   (`rtrb`) and, once per loop turn, unparks the feeder thread;
//! - the feeder thread hands records to librdkafka (`rd_kafka_producev`, which copies
//!   and never blocks; when librdkafka's queue is full the feeder waits, not a shard);
//! - librdkafka's delivery reports (on rdkafka's polling thread) go back through a
//!   confirmation ring per shard and ring the shard's [`crate::rt::bell::Bell`] once
//!   per drain, so the cursor moves on the shard's next loop turn.
//!
//! Threads: the feeder, rdkafka's polling thread and librdkafka's own (main, one per
//! broker, ...), all parked while idle. The cost is one copy into librdkafka per
//! record. `kafka-protocol` stays the fallback if librdkafka's threads ever matter.
//!
//! # Ordering and delivery guarantee
//! - Key = conv_id on the events topic, so one partition holds a conversation; the
//!   partitioner is `murmur2_random` (the Java client's), so other producers agree.
//! - Per partition, librdkafka keeps order across retries: with
//!   [`EventLogConfig::idempotent`] (`enable.idempotence`, up to 5 requests in flight,
//!   no duplicates from its own retries) or without it by
//!   `max.in.flight.requests.per.connection=1`. `message.timeout.ms=0`: a record is
//!   never given up for time, so while Kafka is down records wait, in order, and go
//!   out when it is back. The default is `idempotent = false`: against tansu restarted
//!   with memory storage (which forgets producer ids) an idempotent producer stalled
//!   for good after the restart (records stayed in the backlog, `failed` stayed 0). A
//!   Kafka cluster keeps producer state; turn it on there.
//! - A record librdkafka refuses or fails for good (too large, unknown topic with
//!   auto-create off, authorization) is counted in `failed`, kept, and retried after
//!   [`EventLogConfig::retry_backoff`] for ever; if it then succeeds it lands after
//!   newer records of its key. The cursor does not pass it until it is in Kafka.
//! - At least once: after a crash, the outbox is produced again from its first entry
//!   not yet trimmed, so a consumer may see a record twice (dedupe keys in
//!   `events.proto`).
//!
//! # Bounded memory; Kafka down
//! Each shard holds at most [`EventLogConfig::max_records`] records and
//! [`EventLogConfig::max_bytes`] bytes not yet in Kafka (librdkafka's queue is sized
//! to the sum, so it never refuses first). Past that, `append` returns
//! [`AppendError::Backlog`]; nothing is dropped: the outbox keeps the event and the
//! pump offers it again when there is room. So while Kafka is down, memory in this
//! process stays at the cap, and what grows is the outbox in Redis
//! ([`PumpStats::outbox_len`]); `stats().backlog` and `outbox_len` are the numbers to
//! alert on.
//!
//! # Durability: the outbox (chosen over a "produced up to" cursor + re-read)
//! Acknowledged data is in Redis first. Each event is written to an outbox, a Redis
//! stream per shard, **in the same `MULTI`/`EXEC` round** as the data it reports
//! ([`crate::store::redis::outbox::xadd`]); [`OutboxPump`] reads the stream, appends
//! to the [`EventLog`], and trims (`XTRIM MINID`) what the cursor says Kafka has. On
//! start the pump reads from the first entry left. Why not a cursor per shard or slot
//! plus a trait that re-reads events from the store: messages have a position (conv,
//! seq), but recalls, read marks and membership changes do not share one, and
//! "which conversations changed since the cursor" is itself an index to keep
//! atomically; the outbox is that index, covers every event kind the same way, needs no
//! store reads to rebuild an event, and an event exists exactly when its data does (a
//! round that fails adds no outbox entry, so nothing is produced for data that was not
//! stored). Cost: the event bytes are written to Redis and read back once (one `XRANGE`
//! per loop turn with events, on the shard's own connection), and an `XTRIM` per
//! confirmation batch.
//!
//! What the store and chat layers do (not in this module): chat builds each event with
//! [`record`] when it stages the data; the store adds `outbox::xadd(..)` to that
//! round; after the round is durable, chat calls [`OutboxPump::notify`]. An event that
//! need not survive a crash may also go straight to [`EventLog::append`].
//!
//! # Wiring (what server, shard and chat do; not done yet)
//! ```text
//! server start:  let (kafka, links) = KafkaLog::start(&cfg, bells)?;   // one per process
//! shard start:   let log = EventLog::new(link);                        // on the shard
//!                bell listener: ... log.wake_local(); ...
//!                let outbox = RedisOutbox::new(conn.clone(), outbox_key(node, shard));
//!                let pump = OutboxPump::start(outbox, log.clone(), PumpConfig::default());
//! chat, staging: let r = record::message_stored(&origin, &msg);        // or recalled, ...
//!                store round += outbox::xadd(&key, r.topic, &r.key, &r.value);
//! chat, durable: pump.notify();                                        // then reply
//! /metrics:      METRICS with log.stats().metric_values(Some(&pump.stats()))
//! shutdown:      pump.stop(); kafka.shutdown(Duration::from_secs(5))
//! ```
//!
//! # Does a send's reply wait for Kafka?
//! No. The reply waits for Redis (the message and its outbox entry are durable in one
//! round); Kafka gets the event right after, from the outbox. Waiting would add the
//! append-to-confirmation latency measured below to every send, and make sends fail
//! while Kafka is down although nothing would be lost by answering.
//!
//! # Numbers (this box: 2 cores shared by the test, tansu and other builds)
//! `cargo test --release --test eventlog_kafka -- --ignored --nocapture measure`: one
//! shard, tansu 0.6 in memory on loopback, 114-byte `MessageStored` records over 64
//! conversations, topic of 4 partitions, `linger.ms=0`, `acks=all`, every record read
//! back from the topic afterwards (250,500 of 250,500).
//!
//! | what | result (6 runs, `--test-threads=1 measure`, load average 1.7-4.6) |
//! |---|---|
//! | throughput, 200,000 records, default cap (16,384 in flight) | 1.05-1.55 M records/s |
//! | append -> confirmed, 1 record per loop turn | p50 0.19-0.27 ms, p99 0.31-4.3 ms |
//! | append -> confirmed, 100 records per loop turn | p50 0.59-0.66 ms, p99 1.2-6.6 ms |
//!
//! The durable path, `... -- --ignored --nocapture measure_outbox` (redis-server 7.0
//! as a third process on the same 2 cores): events `XADD`ed in `MULTI`/`EXEC` rounds,
//! read by the pump, produced, confirmed and trimmed:
//!
//! | what | result (same 6 runs) |
//! |---|---|
//! | 100,000 entries in rounds of 100, until all trimmed | 167,000-274,000 entries/s |
//! | a round of 10 durable -> its events in Kafka | p50 0.51-0.77 ms, p99 4.7-5.5 ms |
//!
//! Earlier runs while other builds kept the load average at 6-10 gave p99s up to 12 ms
//! (direct) and 42 ms (outbox path): the tails follow the load of the box.
//!
//! With `linger.ms=1` the one-record p50 was 1.5 ms, with 5 it was 5.6 ms
//! (`IMSHARD_BENCH_LINGER_MS=N`); throughput was about the same (librdkafka batches
//! while a request is in flight anyway), hence the default of 0. These are the numbers
//! behind "the reply does not wait for Kafka": even on loopback, waiting would add
//! 0.2-0.7 ms at p50 and milliseconds at p99 to a send whose Redis round is tens of
//! microseconds, and a real cluster (replication, `acks=all` across brokers) adds more.
//!
//! # Test broker notes (tansu 0.6)
//! tansu acknowledges a produce to a topic that does not exist and drops it (a Kafka
//! broker answers UNKNOWN_TOPIC_OR_PARTITION and librdkafka retries until the topic
//! exists); its high watermarks lag behind what it serves. The tests therefore create
//! topics before letting clients in (a proxy that cuts clients off while the broker is
//! down) and check delivery by reading records back, not by watermarks.

pub mod kafka;
pub mod log;
pub mod outbox;
pub mod record;

pub use kafka::{KafkaLog, ShardLink};
pub use log::EventLog;
pub use outbox::{Outbox, OutboxEntry, OutboxError, OutboxId, OutboxPump, PumpConfig, PumpStats};

use std::time::Duration;

/// The two topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Topic {
    /// Stored messages, recalls, read marks, membership changes; key = conv_id.
    Events = 0,
    /// Offline pushes; key = recipient uuid.
    Offline = 1,
}

impl Topic {
    /// Its code in the outbox (`e` / `o`).
    pub fn code(self) -> &'static str {
        match self {
            Topic::Events => "e",
            Topic::Offline => "o",
        }
    }

    pub fn from_code(code: &[u8]) -> Option<Topic> {
        match code {
            b"e" => Some(Topic::Events),
            b"o" => Some(Topic::Offline),
            _ => None,
        }
    }
}

/// How the event log runs.
#[derive(Debug, Clone)]
pub struct EventLogConfig {
    /// `host:port` of one or more brokers (`--kafka-brokers a:9092,b:9092`).
    pub brokers: Vec<String>,
    /// The events topic.
    pub topic: String,
    /// The offline-push topic.
    pub offline_topic: String,
    /// This node's id (client id, and the `node` of events).
    pub node: String,
    /// Records not yet in Kafka a shard holds at most (default 16,384). Also the size
    /// of the shard's two rings to and from the producer thread, allocated at start:
    /// about 110 bytes a slot, 1.8 MB per shard at the default.
    pub max_records: usize,
    /// Bytes (keys + values) not yet in Kafka a shard holds at most (default 16 MiB).
    pub max_bytes: usize,
    /// librdkafka's `linger.ms`: how long a partition's batch waits for more records.
    pub linger_ms: u32,
    /// `enable.idempotence` (needs a broker with idempotent-producer support that
    /// keeps producer state across its restarts).
    pub idempotent: bool,
    /// Wait before a failed record is produced again.
    pub retry_backoff: Duration,
    /// Extra librdkafka properties (`security.protocol`, `acks`, ...), set last.
    pub kafka_properties: Vec<(String, String)>,
}

impl Default for EventLogConfig {
    fn default() -> Self {
        EventLogConfig {
            brokers: Vec::new(),
            topic: "imshard.events".into(),
            offline_topic: "imshard.offline".into(),
            node: "imshard".into(),
            max_records: 16_384,
            max_bytes: 16 << 20,
            linger_ms: 0,
            idempotent: false,
            retry_backoff: Duration::from_secs(1),
            kafka_properties: Vec::new(),
        }
    }
}

impl EventLogConfig {
    /// Parses `--kafka-brokers host:port[,host:port...]`.
    pub fn parse_brokers(list: &str) -> Result<Vec<String>, EventLogError> {
        let brokers: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if brokers.is_empty() {
            return Err(EventLogError::Config("--kafka-brokers is empty".into()));
        }
        for b in &brokers {
            let ok = b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(EventLogError::Config(format!(
                    "bad Kafka broker {b:?}: expected host:port"
                )));
            }
        }
        Ok(brokers)
    }
}

/// A shard's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventLogStats {
    /// Records accepted by `append`.
    pub appended: u64,
    /// Records Kafka acknowledged.
    pub produced: u64,
    /// Failed produce attempts (each is retried).
    pub failed: u64,
    /// Records handed to the producer again after a failure.
    pub retried: u64,
    /// Appends refused because the backlog was at its cap.
    pub refused: u64,
    /// Records appended and not yet in Kafka.
    pub backlog: u64,
    /// Their bytes (keys + values).
    pub backlog_bytes: u64,
    /// The cursor: every position up to this is in Kafka.
    pub delivered_pos: u64,
}

/// The event log's series for `/metrics` (name, kind, help), in the order of
/// [`EventLogStats::metric_values`]; per shard, like the other shard counters.
pub const METRICS: [(&str, &str, &str); 7] = [
    (
        "imshard_eventlog_produced_total",
        "counter",
        "event-log records Kafka acknowledged",
    ),
    (
        "imshard_eventlog_failed_total",
        "counter",
        "event-log produce attempts that failed (each is retried)",
    ),
    (
        "imshard_eventlog_refused_total",
        "counter",
        "event-log appends refused because the shard's backlog was at its cap",
    ),
    (
        "imshard_eventlog_backlog",
        "gauge",
        "event-log records appended and not yet in Kafka",
    ),
    (
        "imshard_eventlog_backlog_bytes",
        "gauge",
        "bytes of event-log records appended and not yet in Kafka",
    ),
    (
        "imshard_eventlog_outbox_entries",
        "gauge",
        "entries in the shard's durable outbox (not yet produced, or produced and not yet trimmed)",
    ),
    (
        "imshard_eventlog_outbox_errors_total",
        "counter",
        "failed outbox reads and trims",
    ),
];

impl EventLogStats {
    /// The values of [`METRICS`], with the shard's pump (if it runs one).
    pub fn metric_values(&self, pump: Option<&PumpStats>) -> [u64; 7] {
        [
            self.produced,
            self.failed,
            self.refused,
            self.backlog,
            self.backlog_bytes,
            pump.map_or(0, |p| p.outbox_len),
            pump.map_or(0, |p| p.errors),
        ]
    }
}

/// Why [`EventLog::append`] refused a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendError {
    /// The shard's records not yet in Kafka are at the cap (Kafka down or slow).
    Backlog { records: usize, bytes: usize },
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendError::Backlog { records, bytes } => write!(
                f,
                "event log backlog full ({records} records, {bytes} bytes not yet in Kafka)"
            ),
        }
    }
}

impl std::error::Error for AppendError {}

/// Starting or stopping the producer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventLogError {
    /// A configuration librdkafka or we refuse.
    Config(String),
    /// Kafka did not take what it held in time (at shutdown).
    Kafka(String),
}

impl std::fmt::Display for EventLogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventLogError::Config(e) => write!(f, "event log configuration: {e}"),
            EventLogError::Kafka(e) => write!(f, "kafka: {e}"),
        }
    }
}

impl std::error::Error for EventLogError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brokers_parse() {
        assert_eq!(
            EventLogConfig::parse_brokers("a:9092, 127.0.0.1:1").expect("ok"),
            vec!["a:9092".to_string(), "127.0.0.1:1".to_string()]
        );
        assert!(EventLogConfig::parse_brokers("").is_err());
        assert!(EventLogConfig::parse_brokers("a").is_err());
        assert!(EventLogConfig::parse_brokers("a:x").is_err());
        assert_eq!(
            Topic::from_code(Topic::Offline.code().as_bytes()),
            Some(Topic::Offline)
        );
    }
}
