//! The results of a run: a human summary and the same numbers as JSON, with the host
//! facts a published number must carry (CPU, cores, kernel, rustc, server flags).

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::checker::CheckReport;
use crate::stats::Stats;
use crate::sys::{HostFacts, NetCounters, NodeCounters};

/// What one cluster node's counters grew by from the start of the load to the end of
/// the drain (read from its /metrics; `during` is `None` when it could not be read).
#[derive(Debug, Clone)]
pub struct NodeDelta {
    pub target: String,
    pub during: Option<NodeCounters>,
}

/// Everything a run measured.
pub struct Report {
    pub scenario: &'static str,
    /// The scenario's parameters, as given.
    pub params: Value,
    pub threads: usize,
    /// Seconds of the load phase (connect: of the whole run).
    pub load_secs: f64,
    /// Seconds from the start of the load to the end of the drain.
    pub active_secs: f64,
    pub stats: Stats,
    pub check: CheckReport,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    /// Connections the server had accepted before this run (from its `/metrics`;
    /// `None` when not known). Above 0, the server was not fresh: its RSS holds what
    /// earlier connections left (allocator caches), so growth per connection means
    /// nothing.
    pub served_before: Option<u64>,
    pub server_flags: Option<String>,
    /// With `--cpu-per-delivery`: the server's CPU time (all threads, user + system)
    /// from the start of the load to the end of the drain.
    pub server_cpu_ns: Option<u64>,
    /// Softnet drops and TCP retransmits on this host over the run (setup to drain).
    pub net_during: Option<NetCounters>,
    pub host: HostFacts,
    /// The `--target` addresses, in order (user i connected to `targets[i % len]`).
    pub targets: Vec<String>,
    /// `--server-pid`: RSS and CPU above are sums over these processes.
    pub server_pids: Vec<u32>,
    /// Pause before the load (`--settle`).
    pub settle_secs: f64,
    /// Cluster mode: each target's channel and forwarding counters over the load and
    /// drain (empty when no target runs in cluster mode).
    pub nodes: Vec<NodeDelta>,
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

fn hist_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({ "count": 0 });
    }
    json!({
        "count": h.len(),
        "mean_us": (h.mean() * 10.0).round() / 10.0,
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn hist_line(name: &str, h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("  {name:<12} (none)\n");
    }
    format!(
        "  {name:<12} p50 {} ms  p90 {} ms  p99 {} ms  p999 {} ms  max {} ms  (n={})\n",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

impl Report {
    /// Connect rate: successful connects over the connect phase, from the start of
    /// the first successful connect to the end of the last (never a near-zero
    /// interval: at least one connect's own duration).
    pub fn connect_rate(&self) -> f64 {
        let s = &self.stats;
        if s.connects_ok == 0 {
            return 0.0;
        }
        rate(
            s.connects_ok,
            s.last_connect_ns.saturating_sub(s.first_connect_ns) as f64 / 1e9,
        )
    }

    /// Server RSS growth per open connection, when it means something: a `connect`
    /// run against a fresh server whose RSS grew. See [`Report::rss_note`] otherwise.
    pub fn bytes_per_connection(&self) -> Option<f64> {
        let (b, a) = (self.rss_before?, self.rss_after?);
        let fresh = self.served_before.is_none_or(|n| n == 0);
        (self.scenario == "connect" && self.stats.connects_ok > 0 && fresh && a > b)
            .then(|| (a - b) as f64 / self.stats.connects_ok as f64)
    }

    /// Why a `connect` run with the server's RSS shows no bytes per connection.
    pub fn rss_note(&self) -> Option<String> {
        let (b, a) = (self.rss_before?, self.rss_after?);
        if self.scenario != "connect" || self.stats.connects_ok == 0 {
            return None;
        }
        match self.served_before {
            Some(n) if n > 0 => Some(format!(
                "not measured: the server was not fresh ({n} connections before this run; \
                 its RSS holds what they left). Restart it for a per-connection figure"
            )),
            _ if a <= b => Some(
                "not measured: the server's RSS did not grow (it was probably not fresh). \
                 Restart it for a per-connection figure"
                    .to_string(),
            ),
            _ => None,
        }
    }

    pub fn failures(&self) -> u64 {
        self.stats.failures()
    }

    /// Server CPU microseconds per delivered push (with `--cpu-per-delivery`).
    pub fn cpu_us_per_delivery(&self) -> Option<f64> {
        let ns = self.server_cpu_ns?;
        (self.stats.pushes > 0).then(|| ns as f64 / 1000.0 / self.stats.pushes as f64)
    }

    /// Server CPU over the active time, in percent of one core.
    pub fn server_cpu_percent(&self) -> Option<f64> {
        let ns = self.server_cpu_ns?;
        (self.active_secs > 0.0).then(|| ns as f64 / 1e9 / self.active_secs * 100.0)
    }

    /// Cluster counters over the load and drain, summed over the nodes whose /metrics
    /// could be read, and how many those were.
    pub fn cluster_totals(&self) -> Option<(NodeCounters, usize)> {
        let read: Vec<&NodeCounters> = self
            .nodes
            .iter()
            .filter_map(|n| n.during.as_ref())
            .collect();
        if read.is_empty() {
            return None;
        }
        let mut t = NodeCounters::default();
        for n in &read {
            t.publishes += n.publishes;
            t.channel_messages += n.channel_messages;
            t.forwarded += n.forwarded;
            t.served += n.served;
            t.messages_stored += n.messages_stored;
            t.pushes += n.pushes;
        }
        Some((t, read.len()))
    }

    /// Channel messages received (over every shard of every node) per publish: for
    /// group messages, the shards (with one shard per node: the nodes) that got each.
    pub fn receivers_per_publish(&self) -> Option<f64> {
        let (t, _) = self.cluster_totals()?;
        (t.publishes > 0).then(|| t.channel_messages as f64 / t.publishes as f64)
    }

    /// Pass: nothing failed and the checker found nothing wrong.
    pub fn passed(&self) -> bool {
        self.failures() == 0 && self.check.violations() == 0
    }

    pub fn human(&self) -> String {
        let s = &self.stats;
        let c = &self.check;
        let mut out = format!(
            "imshard-loadgen {} {} | {} threads | load {:.1} s\n",
            self.scenario, self.params, self.threads, self.load_secs
        );
        if self.targets.len() > 1 {
            out += &format!(
                "  targets      {} (user i on target i % {})\n",
                self.targets.join(", "),
                self.targets.len()
            );
        }
        out += &format!(
            "  connections  {} ok, {} failed, {:.0}/s\n",
            s.connects_ok,
            s.connects_failed,
            self.connect_rate()
        );
        if s.sends > 0 || self.scenario != "connect" {
            out += &format!(
                "  sends        {} ({:.0}/s), acked {} ({:.0}/s), refused {}, unanswered {}\n",
                s.sends,
                rate(s.sends, self.load_secs),
                s.acks_ok,
                rate(s.acks_ok, self.active_secs),
                s.send_errors.values().sum::<u64>(),
                s.unanswered
            );
            out += &format!(
                "  deliveries   {} pushes ({:.0}/s), {} push acks sent\n",
                s.pushes,
                rate(s.pushes, self.active_secs),
                s.push_acks
            );
            if let (Some(us), Some(pct)) = (self.cpu_us_per_delivery(), self.server_cpu_percent()) {
                out += &format!(
                    "  server CPU   {us:.2} us per delivery ({pct:.0} % of one core over the load and drain)\n"
                );
            }
        }
        if s.groups_created + s.groups_failed > 0 {
            out += &format!(
                "  groups       {} created, {} failed\n",
                s.groups_created, s.groups_failed
            );
        }
        out += &hist_line("connect", &s.connect_us);
        if s.sends > 0 {
            out += &hist_line("send->ack", &s.ack_us);
            out += &hist_line("send->push", &s.push_us);
            out += &hist_line("write->push", &s.push_write_us);
        }
        if s.heartbeats > 0 {
            out += &hist_line("heartbeat", &s.heartbeat_us);
        }
        out += &format!(
            "  check        expected {} delivered {} | lost {} duplicated {} out-of-order {} seq-gaps {} seq-reused {} unexpected {} (system pushes {})\n",
            c.expected, c.delivered, c.lost, c.duplicated, c.out_of_order, c.seq_gaps, c.seq_reused, c.unexpected, c.system_pushes
        );
        out += &format!(
            "  failures     {} (connect {}, refused sends {:?}, unanswered {}, groups {}, disconnects {}, kicked {}, bad frames {})\n",
            self.failures(),
            s.connects_failed,
            s.send_errors,
            s.unanswered,
            s.groups_failed,
            s.disconnects,
            s.kicked,
            s.bad_frames
        );
        if s.send_errors.contains_key(&42901) {
            out += "  hint         42901 = the server's per-user rate limit; start it with --rate-limit 0 for load runs\n";
        }
        for f in &s.failure_samples {
            out += &format!("    e.g. {f}\n");
        }
        if let (Some(b), Some(a)) = (self.rss_before, self.rss_after) {
            out += &format!(
                "  server RSS   before {:.1} MiB, after {:.1} MiB",
                b as f64 / 1048576.0,
                a as f64 / 1048576.0,
            );
            // Only idle connections on a fresh server make growth per connection
            // meaningful.
            if let Some(per) = self.bytes_per_connection() {
                out += &format!(", {per:.0} B per connection");
            }
            out += "\n";
            if let Some(note) = self.rss_note() {
                out += &format!("  WARNING      per connection {note}\n");
            }
        }
        out += &format!(
            "  host         {} | {} cores | {} | {} | netdev_max_backlog {}\n",
            self.host.cpu_model,
            self.host.cores,
            self.host.kernel,
            self.host.rustc.as_deref().unwrap_or("rustc unknown"),
            self.host
                .netdev_max_backlog
                .map_or("unknown".to_string(), |v| v.to_string())
        );
        if let Some(n) = &self.net_during {
            out += &format!(
                "  network      {} softnet drops, {} TCP retransmits during the run{}\n",
                n.softnet_dropped,
                n.tcp_retrans_segs,
                if n.softnet_dropped > 0 {
                    " (netdev_max_backlog too small: tuning/check)"
                } else {
                    ""
                }
            );
        }
        if let Some((t, read)) = self.cluster_totals() {
            out += &format!(
                "  cluster      {read} of {} nodes read: {} published, {} channel messages received ({}), {} stored, requests forwarded {} / served {}\n",
                self.nodes.len(),
                t.publishes,
                t.channel_messages,
                self.receivers_per_publish()
                    .map_or("-".to_string(), |r| format!("{r:.2} per publish")),
                t.messages_stored,
                t.forwarded,
                t.served
            );
        }
        if let Some(f) = &self.server_flags {
            out += &format!("  server       {f}\n");
        }
        out += if self.passed() {
            "RESULT: PASS\n"
        } else {
            "RESULT: FAIL (failures or delivery violations above)\n"
        };
        out
    }

    fn cluster_json(&self) -> Value {
        let Some((t, read)) = self.cluster_totals() else {
            return Value::Null;
        };
        let node = |n: &NodeCounters| {
            json!({
                "publishes": n.publishes,
                "channel_messages": n.channel_messages,
                "requests_forwarded": n.forwarded,
                "requests_served": n.served,
                "messages_stored": n.messages_stored,
                "pushes": n.pushes,
            })
        };
        json!({
            "nodes_read": read,
            "publishes": t.publishes,
            "channel_messages": t.channel_messages,
            "channel_messages_per_publish": self.receivers_per_publish(),
            "requests_forwarded": t.forwarded,
            "requests_served": t.served,
            "messages_stored": t.messages_stored,
            "pushes": t.pushes,
            "per_node": self.nodes.iter().map(|n| json!({
                "target": n.target,
                "during": n.during.as_ref().map(node),
            })).collect::<Vec<_>>(),
        })
    }

    pub fn json(&self) -> Value {
        let s = &self.stats;
        let c = &self.check;
        json!({
            "scenario": self.scenario,
            "params": self.params,
            "targets": self.targets,
            "settle_secs": self.settle_secs,
            "threads": self.threads,
            "load_secs": self.load_secs,
            "active_secs": self.active_secs,
            "passed": self.passed(),
            "connections": {
                "ok": s.connects_ok,
                "failed": s.connects_failed,
                "per_sec": self.connect_rate(),
                "latency": hist_json(&s.connect_us),
            },
            "sends": {
                "sent": s.sends,
                "sent_per_sec": rate(s.sends, self.load_secs),
                "acked": s.acks_ok,
                "acked_per_sec": rate(s.acks_ok, self.active_secs),
                "refused": s.send_errors.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "unanswered": s.unanswered,
                "ack_latency": hist_json(&s.ack_us),
            },
            "deliveries": {
                "pushes": s.pushes,
                "per_sec": rate(s.pushes, self.active_secs),
                "push_latency": hist_json(&s.push_us),
                "push_latency_from_write": hist_json(&s.push_write_us),
                "push_acks_sent": s.push_acks,
            },
            "heartbeats": {
                "sent": s.heartbeats,
                "answered": s.heartbeat_replies,
                "latency": hist_json(&s.heartbeat_us),
            },
            "groups": { "created": s.groups_created, "failed": s.groups_failed },
            "check": {
                "expected": c.expected,
                "delivered": c.delivered,
                "lost": c.lost,
                "duplicated": c.duplicated,
                "out_of_order": c.out_of_order,
                "seq_gaps": c.seq_gaps,
                "seq_reused": c.seq_reused,
                "unexpected": c.unexpected,
                "system_pushes": c.system_pushes,
            },
            "failures": {
                "total": self.failures(),
                "connect": s.connects_failed,
                "unanswered": s.unanswered,
                "groups": s.groups_failed,
                "disconnects": s.disconnects,
                "kicked": s.kicked,
                "bad_frames": s.bad_frames,
                "samples": s.failure_samples,
            },
            "server": {
                "rss_before": self.rss_before,
                "rss_after": self.rss_after,
                "bytes_per_connection": self.bytes_per_connection(),
                "bytes_per_connection_note": self.rss_note(),
                "connections_before": self.served_before,
                "flags": self.server_flags,
                "pids": self.server_pids,
                "cpu_secs": self.server_cpu_ns.map(|ns| ns as f64 / 1e9),
                "cpu_us_per_delivery": self.cpu_us_per_delivery(),
                "cpu_percent_of_one_core": self.server_cpu_percent(),
            },
            "cluster": self.cluster_json(),
            "host": {
                "cpu_model": self.host.cpu_model,
                "cores": self.host.cores,
                "kernel": self.host.kernel,
                "rustc": self.host.rustc,
                "netdev_max_backlog": self.host.netdev_max_backlog,
                "softnet_dropped_during_run": self.net_during.map(|n| n.softnet_dropped),
                "tcp_retrans_segs_during_run": self.net_during.map(|n| n.tcp_retrans_segs),
            },
        })
    }
}
