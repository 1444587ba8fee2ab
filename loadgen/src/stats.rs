//! Per-thread counters and latency histograms. Each loadgen thread owns one [`Stats`]
//! and touches nothing shared while traffic flows; the threads' stats are merged once,
//! at the end, with [`Stats::merge`].

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

/// Highest latency a histogram records, in microseconds (larger values are clamped).
const MAX_US: u64 = 120_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3)
        .expect("1 us .. 120 s at 3 digits is a valid histogram")
}

/// Records a duration given in nanoseconds.
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    let us = (ns / 1000).clamp(1, MAX_US);
    // In range by the clamp above.
    let _ = h.record(us);
}

/// Everything one thread counted.
#[derive(Debug)]
pub struct Stats {
    /// TCP connect + WebSocket upgrade.
    pub connect_us: Histogram<u64>,
    /// Send due (its slot in the schedule; with `--rate 0`, when it was written) ->
    /// its RESPONSE read.
    pub ack_us: Histogram<u64>,
    /// Send due (timestamp in the content) -> MSG_PUSH read on a receiver.
    pub push_us: Histogram<u64>,
    /// Send written (second timestamp in the content) -> MSG_PUSH read: without the
    /// time a send waited for its turn in the loadgen.
    pub push_write_us: Histogram<u64>,
    /// Heartbeat written -> its RESPONSE read.
    pub heartbeat_us: Histogram<u64>,
    pub connects_ok: u64,
    pub connects_failed: u64,
    pub sends: u64,
    pub acks_ok: u64,
    /// Send refused by the server, by error code.
    pub send_errors: BTreeMap<i32, u64>,
    /// Sends still unanswered when the drain phase ended.
    pub unanswered: u64,
    /// MSG_PUSH envelopes of user messages read (duplicates included).
    pub pushes: u64,
    /// PushAck frames sent (cumulative, batched per conversation).
    pub push_acks: u64,
    pub heartbeats: u64,
    pub heartbeat_replies: u64,
    pub groups_created: u64,
    pub groups_failed: u64,
    /// Connections the server closed or reset while the run was going.
    pub disconnects: u64,
    /// KICKOUT envelopes received.
    pub kicked: u64,
    /// Frames or envelopes that did not decode.
    pub bad_frames: u64,
    /// Monotonic ns when the first successful connect began and when the last one
    /// ended: the connect phase, over which the connect rate is computed.
    pub first_connect_ns: u64,
    pub last_connect_ns: u64,
    /// The first few failure descriptions, for the summary.
    pub failure_samples: Vec<String>,
}

/// How many failure descriptions each thread keeps.
const FAILURE_SAMPLES: usize = 5;

impl Default for Stats {
    fn default() -> Self {
        Stats {
            connect_us: histogram(),
            ack_us: histogram(),
            push_us: histogram(),
            push_write_us: histogram(),
            heartbeat_us: histogram(),
            connects_ok: 0,
            connects_failed: 0,
            sends: 0,
            acks_ok: 0,
            send_errors: BTreeMap::new(),
            unanswered: 0,
            pushes: 0,
            push_acks: 0,
            heartbeats: 0,
            heartbeat_replies: 0,
            groups_created: 0,
            groups_failed: 0,
            disconnects: 0,
            kicked: 0,
            bad_frames: 0,
            first_connect_ns: 0,
            last_connect_ns: 0,
            failure_samples: Vec::new(),
        }
    }
}

impl Stats {
    /// Keeps a description of a failure (the first few only).
    pub fn note_failure(&mut self, what: impl FnOnce() -> String) {
        if self.failure_samples.len() < FAILURE_SAMPLES {
            self.failure_samples.push(what());
        }
    }

    /// Counts a successful connect that began at `started` and ended at `done`.
    pub fn connected(&mut self, started: u64, done: u64) {
        if self.first_connect_ns == 0 || started < self.first_connect_ns {
            self.first_connect_ns = started;
        }
        self.last_connect_ns = self.last_connect_ns.max(done);
        self.connects_ok += 1;
    }

    /// Everything that counts as a failure of the run (the checker's violations aside).
    pub fn failures(&self) -> u64 {
        self.connects_failed
            + self.send_errors.values().sum::<u64>()
            + self.unanswered
            + self.groups_failed
            + self.disconnects
            + self.kicked
            + self.bad_frames
    }

    pub fn merge(&mut self, o: Stats) {
        // Histograms with the same bounds always add.
        let _ = self.connect_us.add(&o.connect_us);
        let _ = self.ack_us.add(&o.ack_us);
        let _ = self.push_us.add(&o.push_us);
        let _ = self.push_write_us.add(&o.push_write_us);
        let _ = self.heartbeat_us.add(&o.heartbeat_us);
        self.connects_ok += o.connects_ok;
        self.connects_failed += o.connects_failed;
        self.sends += o.sends;
        self.acks_ok += o.acks_ok;
        for (code, n) in o.send_errors {
            *self.send_errors.entry(code).or_insert(0) += n;
        }
        self.unanswered += o.unanswered;
        self.pushes += o.pushes;
        self.push_acks += o.push_acks;
        self.heartbeats += o.heartbeats;
        self.heartbeat_replies += o.heartbeat_replies;
        self.groups_created += o.groups_created;
        self.groups_failed += o.groups_failed;
        self.disconnects += o.disconnects;
        self.kicked += o.kicked;
        self.bad_frames += o.bad_frames;
        if o.first_connect_ns != 0
            && (self.first_connect_ns == 0 || o.first_connect_ns < self.first_connect_ns)
        {
            self.first_connect_ns = o.first_connect_ns;
        }
        self.last_connect_ns = self.last_connect_ns.max(o.last_connect_ns);
        for f in o.failure_samples {
            if self.failure_samples.len() < 2 * FAILURE_SAMPLES {
                self.failure_samples.push(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_counts_and_histograms() {
        let mut a = Stats::default();
        let mut b = Stats::default();
        record_ns(&mut a.ack_us, 1_000_000);
        record_ns(&mut b.ack_us, 3_000_000);
        b.send_errors.insert(42901, 2);
        b.connected(10, 15);
        a.connected(12, 20);
        a.merge(b);
        assert_eq!(a.ack_us.len(), 2);
        assert_eq!(a.failures(), 2);
        assert_eq!(
            (a.first_connect_ns, a.last_connect_ns, a.connects_ok),
            (10, 20, 2)
        );
    }
}
