//! What `/metrics` shows beyond the plain counters of [`crate::api::METRICS`]: latency
//! histograms, refusals by code, connection cuts by reason, queue depths, and whether
//! each shard answered the scrape.
//!
//! Recording is meant for the request path: a histogram is a fixed array of `Cell`
//! counters on the shard's own thread (the store's sync thread uses the atomic twin),
//! so an observation is a bucket search over 14 bounds and two adds; no lock, no
//! allocation. A scrape asks every shard for a [`ShardMetrics`] snapshot over the rings
//! and renders them all, one series per shard (`shard="i"`).

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::chat::Shard;
use crate::codes::{close, kick, ApiError};
use crate::proto::pb::client_frame::Body;

/// Upper bounds of the latency buckets, in µs (a last bucket, `+Inf`, takes the rest).
pub const BUCKET_BOUNDS_MICROS: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000,
];
/// Buckets per histogram, with `+Inf`.
pub const SLOTS: usize = BUCKET_BOUNDS_MICROS.len() + 1;

fn slot_of(micros: u64) -> usize {
    BUCKET_BOUNDS_MICROS.partition_point(|&b| b < micros)
}

/// A latency histogram owned by one shard's thread.
#[derive(Default)]
pub struct Histogram {
    counts: [Cell<u64>; SLOTS],
    sum_micros: Cell<u64>,
}

impl Histogram {
    pub fn observe(&self, micros: u64) {
        let c = &self.counts[slot_of(micros)];
        c.set(c.get() + 1);
        self.sum_micros.set(self.sum_micros.get() + micros);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.counts[i].get()),
            sum_micros: self.sum_micros.get(),
        }
    }
}

/// A latency histogram written by another thread (the store's sync thread, its only
/// writer) and read by the shard.
#[derive(Default)]
pub struct AtomicHistogram {
    counts: [AtomicU64; SLOTS],
    sum_micros: AtomicU64,
}

impl AtomicHistogram {
    pub fn observe(&self, micros: u64) {
        self.counts[slot_of(micros)].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed)),
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
        }
    }
}

/// Bucket counts (not cumulative) and the sum of a histogram at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub counts: [u64; SLOTS],
    pub sum_micros: u64,
}

/// The client operations whose latency is measured, as labelled in `op="..."`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Send,
    Pull,
    ByIds,
    Recall,
    GetConversations,
    MarkRead,
    Delete,
    UpdateSettings,
    GetUnread,
    CreateGroup,
    UpdateMembers,
}

impl Op {
    pub const COUNT: usize = 11;
    /// Every operation, in slot order (`ALL[i] as usize == i`).
    pub const ALL: [Op; Op::COUNT] = [
        Op::Send,
        Op::Pull,
        Op::ByIds,
        Op::Recall,
        Op::GetConversations,
        Op::MarkRead,
        Op::Delete,
        Op::UpdateSettings,
        Op::GetUnread,
        Op::CreateGroup,
        Op::UpdateMembers,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Op::Send => "send",
            Op::Pull => "pull",
            Op::ByIds => "by_ids",
            Op::Recall => "recall",
            Op::GetConversations => "get_conversations",
            Op::MarkRead => "mark_read",
            Op::Delete => "delete",
            Op::UpdateSettings => "update_settings",
            Op::GetUnread => "get_unread",
            Op::CreateGroup => "create_group",
            Op::UpdateMembers => "update_members",
        }
    }

    /// The measured operation of a request; heartbeats and push acks are not measured.
    pub fn of(body: &Body) -> Option<Op> {
        Some(match body {
            Body::Send(_) => Op::Send,
            Body::Pull(_) => Op::Pull,
            Body::GetByIds(_) => Op::ByIds,
            Body::Recall(_) => Op::Recall,
            Body::GetConversations(_) => Op::GetConversations,
            Body::MarkRead(_) => Op::MarkRead,
            Body::DeleteConversation(_) => Op::Delete,
            Body::UpdateSettings(_) => Op::UpdateSettings,
            Body::GetUnread(_) => Op::GetUnread,
            Body::CreateGroup(_) => Op::CreateGroup,
            Body::UpdateMembers(_) => Op::UpdateMembers,
            Body::Heartbeat(_) | Body::PushAck(_) => return None,
        })
    }
}

/// The error codes refusals are counted by (docs/PROTOCOL.md); anything else is `other`.
pub const REFUSAL_CODES: [i32; 10] = [
    40001, 40101, 40301, 40401, 41301, 42201, 42202, 42901, 50001, 50301,
];
/// Refusal slots: one per code, then `other`.
pub const REFUSAL_SLOTS: usize = REFUSAL_CODES.len() + 1;

fn refusal_slot(code: i32) -> usize {
    REFUSAL_CODES
        .iter()
        .position(|&c| c == code)
        .unwrap_or(REFUSAL_CODES.len())
}

/// Why the server closed a connection, as labelled in `reason="..."`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    SlowReader,
    Heartbeat,
    /// Close 1001 sent while the shard drains for a graceful shutdown.
    Shutdown,
    Replaced,
    Admin,
    /// The client sent a close frame; the server answered it.
    ClientClose,
    ProtocolError,
    TextFrame,
    InvalidPayload,
    /// A started message did not complete within `frame_timeout` (1008).
    FrameTimeout,
    TooBig,
    /// The shard held too many unfinished incoming messages (1013).
    TryAgainLater,
    Other,
}

impl Cut {
    pub const COUNT: usize = 13;
    /// Every reason, in slot order (`ALL[i] as usize == i`).
    pub const ALL: [Cut; Cut::COUNT] = [
        Cut::SlowReader,
        Cut::Heartbeat,
        Cut::Shutdown,
        Cut::Replaced,
        Cut::Admin,
        Cut::ClientClose,
        Cut::ProtocolError,
        Cut::TextFrame,
        Cut::InvalidPayload,
        Cut::FrameTimeout,
        Cut::TooBig,
        Cut::TryAgainLater,
        Cut::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Cut::SlowReader => "slow_reader",
            Cut::Heartbeat => "heartbeat",
            Cut::Shutdown => "shutdown",
            Cut::Replaced => "replaced",
            Cut::Admin => "admin",
            Cut::ClientClose => "client_close",
            Cut::ProtocolError => "protocol_error",
            Cut::TextFrame => "text_frame",
            Cut::InvalidPayload => "invalid_payload",
            Cut::FrameTimeout => "frame_timeout",
            Cut::TooBig => "too_big",
            Cut::TryAgainLater => "try_again_later",
            Cut::Other => "other",
        }
    }

    /// The reason of a close frame with `code` (and the KICKOUT reason, if any), sent
    /// while the shard is `draining` for shutdown or not.
    pub fn of(code: u16, kick_reason: Option<&str>, draining: bool) -> Cut {
        match (code, kick_reason) {
            (close::KICKED, Some(kick::SLOW_READER)) => Cut::SlowReader,
            (close::KICKED, Some(kick::REPLACED)) => Cut::Replaced,
            (close::KICKED, Some(kick::ADMIN)) => Cut::Admin,
            (close::GOING_AWAY, _) if draining => Cut::Shutdown,
            (close::GOING_AWAY, _) => Cut::Heartbeat,
            (close::NORMAL, _) => Cut::ClientClose,
            (close::PROTOCOL_ERROR, _) => Cut::ProtocolError,
            (close::UNSUPPORTED_DATA, _) => Cut::TextFrame,
            (close::INVALID_PAYLOAD, _) => Cut::InvalidPayload,
            (close::POLICY_VIOLATION, _) => Cut::FrameTimeout,
            (close::MESSAGE_TOO_BIG, _) => Cut::TooBig,
            (close::TRY_AGAIN_LATER, _) => Cut::TryAgainLater,
            _ => Cut::Other,
        }
    }
}

/// What one shard records on its own thread (part of `shard::Counters`).
#[derive(Default)]
pub struct Recorded {
    /// Request latency by [`Op`], on the user's shard around the operation.
    pub op_latency: [Histogram; Op::COUNT],
    /// Requests answered with an error, by [`REFUSAL_CODES`] slot.
    pub refusals: [Cell<u64>; REFUSAL_SLOTS],
    /// Connections closed by the server, by [`Cut`].
    pub cuts: [Cell<u64>; Cut::COUNT],
    /// How long queued frames (pushes, replies) waited for their socket write: from
    /// when the writer took the queue up (the first frame's queueing, or the end of
    /// the previous write) to the completion of the write that carried them.
    pub write_wait: Histogram,
}

impl Recorded {
    /// Records one finished operation: its latency (if measured) and a refusal.
    pub fn request<T>(&self, op: Option<Op>, micros: u64, result: &Result<T, ApiError>) {
        if let Some(op) = op {
            self.op_latency[op as usize].observe(micros);
        }
        if let Err(e) = result {
            let c = &self.refusals[refusal_slot(e.code())];
            c.set(c.get() + 1);
        }
    }

    pub fn cut(&self, why: Cut) {
        let c = &self.cuts[why as usize];
        c.set(c.get() + 1);
    }
}

/// This shard's snapshot for a scrape.
pub fn snapshot(shard: &Shard) -> ShardMetrics {
    let r = &shard.counters.recorded;
    ShardMetrics {
        counters: crate::api::metric_values(shard).to_vec(),
        outbox_backlog: shard.ring.backlog() as u64,
        ring_queued: shard.ring.queued_in_rings() as u64,
        store_waiting: shard.store.waiting_writes() as u64,
        op_latency: std::array::from_fn(|i| r.op_latency[i].snapshot()),
        store_round: shard.store.round_histogram(),
        write_wait: r.write_wait.snapshot(),
        refusals: std::array::from_fn(|i| r.refusals[i].get()),
        cuts: std::array::from_fn(|i| r.cuts[i].get()),
    }
}

/// One shard's answer to a scrape, moved to the scraping shard as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMetrics {
    /// Values of [`crate::api::METRICS`], in order.
    pub counters: Vec<u64>,
    /// Messages waiting in this shard's outboxes because rings were full.
    pub outbox_backlog: u64,
    /// Messages in this shard's outgoing rings, not yet taken by their consumers.
    pub ring_queued: u64,
    /// Staged store writes whose callers still wait for them to be durable.
    pub store_waiting: u64,
    pub op_latency: [HistogramSnapshot; Op::COUNT],
    /// The store's commit + fsync rounds.
    pub store_round: HistogramSnapshot,
    /// Queued frames' wait for their socket write.
    pub write_wait: HistogramSnapshot,
    pub refusals: [u64; REFUSAL_SLOTS],
    pub cuts: [u64; Cut::COUNT],
}

/// A gauge of the snapshot: name, help, value.
type Gauge = (&'static str, &'static str, fn(&ShardMetrics) -> u64);

/// Prometheus text for every shard; `None` is a shard that did not answer in time: it
/// shows as `imshard_shard_up{shard="i"} 0` and has no other series.
pub fn render(counters: &[(&str, &str, &str)], shards: &[Option<ShardMetrics>]) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let answered = || {
        shards
            .iter()
            .enumerate()
            .filter_map(|(s, m)| Some((s, m.as_ref()?)))
    };
    help(
        &mut out,
        "imshard_shard_up",
        "gauge",
        "1 if the shard answered this scrape in time, else 0",
    );
    for (s, m) in shards.iter().enumerate() {
        let up = u8::from(m.is_some());
        let _ = writeln!(out, "imshard_shard_up{{shard=\"{s}\"}} {up}");
    }
    for (i, (name, kind, text)) in counters.iter().enumerate() {
        help(&mut out, name, kind, text);
        for (s, m) in answered() {
            let Some(v) = m.counters.get(i) else { continue };
            if *name == "imshard_store_sync_seconds_total" {
                let _ = writeln!(out, "{name}{{shard=\"{s}\"}} {}", secs(*v));
            } else {
                let _ = writeln!(out, "{name}{{shard=\"{s}\"}} {v}");
            }
        }
    }
    let gauges: [Gauge; 3] = [
        (
            "imshard_ring_outbox_backlog",
            "messages waiting in the shard's outboxes because a ring to another shard was full",
            |m| m.outbox_backlog,
        ),
        (
            "imshard_ring_queued",
            "messages in the shard's outgoing rings not yet taken by the other shards",
            |m| m.ring_queued,
        ),
        (
            "imshard_store_waiting_writes",
            "staged store writes whose callers wait for them to be durable",
            |m| m.store_waiting,
        ),
    ];
    for (name, text, get) in gauges {
        help(&mut out, name, "gauge", text);
        for (s, m) in answered() {
            let _ = writeln!(out, "{name}{{shard=\"{s}\"}} {}", get(m));
        }
    }
    let name = "imshard_request_duration_seconds";
    help(
        &mut out,
        name,
        "histogram",
        "client operations from start to answer, on the user's shard",
    );
    for (s, m) in answered() {
        for (op, h) in Op::ALL.iter().zip(&m.op_latency) {
            let labels = format!("shard=\"{s}\",op=\"{}\"", op.label());
            histogram(&mut out, name, &labels, h);
        }
    }
    let name = "imshard_store_round_seconds";
    help(
        &mut out,
        name,
        "histogram",
        "store commit + fsync rounds of the shard's sync thread",
    );
    for (s, m) in answered() {
        histogram(&mut out, name, &format!("shard=\"{s}\""), &m.store_round);
    }
    let name = "imshard_write_wait_seconds";
    help(
        &mut out,
        name,
        "histogram",
        "queued frames (pushes, replies) from queueing to their socket write's completion",
    );
    for (s, m) in answered() {
        histogram(&mut out, name, &format!("shard=\"{s}\""), &m.write_wait);
    }
    let name = "imshard_refusals_total";
    help(
        &mut out,
        name,
        "counter",
        "client operations answered with an error, by code (42901 = rate limited)",
    );
    for (s, m) in answered() {
        let codes = REFUSAL_CODES.iter().map(|c| c.to_string());
        for (code, n) in codes.chain(["other".to_string()]).zip(m.refusals) {
            let _ = writeln!(out, "{name}{{shard=\"{s}\",code=\"{code}\"}} {n}");
        }
    }
    let name = "imshard_connection_cuts_total";
    help(
        &mut out,
        name,
        "counter",
        "connections the server closed (sent a close frame), by reason",
    );
    for (s, m) in answered() {
        for (why, n) in Cut::ALL.iter().zip(m.cuts) {
            let reason = why.label();
            let _ = writeln!(out, "{name}{{shard=\"{s}\",reason=\"{reason}\"}} {n}");
        }
    }
    out
}

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
}

fn secs(micros: u64) -> f64 {
    micros as f64 / 1e6
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) {
    let mut cumulative = 0;
    for (i, n) in h.counts.iter().enumerate() {
        cumulative += n;
        let le = BUCKET_BOUNDS_MICROS
            .get(i)
            .map_or_else(|| "+Inf".to_string(), |&b| secs(b).to_string());
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", secs(h.sum_micros));
    let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_enums() {
        assert!(Op::ALL.iter().enumerate().all(|(i, op)| *op as usize == i));
        assert!(Cut::ALL.iter().enumerate().all(|(i, c)| *c as usize == i));
    }

    #[test]
    fn buckets_are_upper_bounds() {
        assert_eq!(slot_of(0), 0);
        assert_eq!(slot_of(100), 0);
        assert_eq!(slot_of(101), 1);
        assert_eq!(slot_of(2_500_000), SLOTS - 2);
        assert_eq!(slot_of(u64::MAX), SLOTS - 1);
    }

    #[test]
    fn snapshot_renders_cumulative_buckets() {
        let rec = Recorded::default();
        rec.request(Some(Op::Pull), 300, &Ok(()));
        rec.request::<()>(Some(Op::Pull), 3_000_000, &Err(ApiError::RateLimited));
        rec.cut(Cut::of(close::KICKED, Some(kick::SLOW_READER), false));
        assert_eq!(Cut::of(close::GOING_AWAY, None, true), Cut::Shutdown);
        assert_eq!(Cut::of(close::GOING_AWAY, None, false), Cut::Heartbeat);
        let m = ShardMetrics {
            counters: vec![7, 8],
            outbox_backlog: 1,
            ring_queued: 2,
            store_waiting: 3,
            op_latency: std::array::from_fn(|i| rec.op_latency[i].snapshot()),
            store_round: HistogramSnapshot::default(),
            write_wait: rec.write_wait.snapshot(),
            refusals: std::array::from_fn(|i| rec.refusals[i].get()),
            cuts: std::array::from_fn(|i| rec.cuts[i].get()),
        };
        let text = render(
            &[("a_total", "counter", "a"), ("b_total", "counter", "b")],
            &[None, Some(m)],
        );
        for line in [
            "imshard_shard_up{shard=\"0\"} 0",
            "imshard_shard_up{shard=\"1\"} 1",
            "b_total{shard=\"1\"} 8",
            "imshard_request_duration_seconds_bucket{shard=\"1\",op=\"pull\",le=\"0.00025\"} 0",
            "imshard_request_duration_seconds_bucket{shard=\"1\",op=\"pull\",le=\"0.0005\"} 1",
            "imshard_request_duration_seconds_bucket{shard=\"1\",op=\"pull\",le=\"2.5\"} 1",
            "imshard_request_duration_seconds_bucket{shard=\"1\",op=\"pull\",le=\"+Inf\"} 2",
            "imshard_request_duration_seconds_count{shard=\"1\",op=\"pull\"} 2",
            "imshard_request_duration_seconds_sum{shard=\"1\",op=\"pull\"} 3.0003",
            "imshard_refusals_total{shard=\"1\",code=\"42901\"} 1",
            "imshard_connection_cuts_total{shard=\"1\",reason=\"slow_reader\"} 1",
            "imshard_ring_queued{shard=\"1\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        assert!(
            !text.contains("shard=\"0\",op"),
            "a silent shard has no series"
        );
    }
}
