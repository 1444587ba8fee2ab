//! The delivery checker: did every expected push arrive exactly once, in seq order per
//! conversation, with no gaps in the seqs the server handed out?
//!
//! The model: a *conversation* has *streams*, one per receiving connection (one device of
//! one member). When a send is acknowledged with seq `s`, every stream of that
//! conversation except the sender's own expects a push of `s` (docs/PROTOCOL.md: a push goes to
//! every online device of every member except the device that sent it). Pushes are fed
//! in as they arrive; [`Checker::finish`] compares both sides once traffic has drained.
//!
//! What it counts (all must be 0 on a healthy run, except `system_pushes`):
//! - `lost`: an acknowledged seq that a stream expected and never received;
//! - `duplicated`: every receipt of a seq beyond the first on one stream;
//! - `out_of_order`: a first receipt of a seq lower than one the stream already saw;
//! - `seq_gaps`: seqs missing between the lowest and highest seq known in a conversation
//!   (acknowledged or pushed), i.e. the server skipped a number;
//! - `seq_reused`: two acknowledged sends that got the same seq;
//! - `unexpected`: a pushed seq that no send acknowledged and is not a system message
//!   (msg_type 100+), or a push of a message to the device that sent it.
//!
//! The checker is plain data owned by one loadgen thread (all members of a conversation
//! live on the same thread), so it needs no locking; per-thread reports are summed.

use std::collections::{HashMap, HashSet};

/// Index of a conversation in one [`Checker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvId(u32);

/// Index of a receiving stream (one connection in one conversation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId(u32);

#[derive(Debug, Default)]
struct Conv {
    /// Every stream of the conversation (the receivers of a push).
    streams: Vec<StreamId>,
    /// Acknowledged seq -> the stream of the device that sent it.
    acked: HashMap<i64, StreamId>,
    /// Seqs of system messages (msg_type 100+) seen on any stream: known seqs that no
    /// send of ours produced.
    system: HashSet<i64>,
    /// Seqs acknowledged twice.
    reused: u64,
}

#[derive(Debug)]
struct Stream {
    conv: ConvId,
    /// seq -> how many times it arrived.
    seen: HashMap<i64, u32>,
    /// Highest seq received so far; a first receipt below it is out of order.
    max_seen: i64,
    out_of_order: u64,
}

/// Totals of a check; summed over threads with [`CheckReport::add`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Pushes the acknowledged sends called for.
    pub expected: u64,
    /// Expected pushes that arrived (first receipts).
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub seq_gaps: u64,
    pub seq_reused: u64,
    pub unexpected: u64,
    /// System messages (msg_type 100+) pushed; informational.
    pub system_pushes: u64,
}

impl CheckReport {
    pub fn add(&mut self, o: &CheckReport) {
        self.expected += o.expected;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.out_of_order += o.out_of_order;
        self.seq_gaps += o.seq_gaps;
        self.seq_reused += o.seq_reused;
        self.unexpected += o.unexpected;
        self.system_pushes += o.system_pushes;
    }

    /// Number of violations: anything here means the server (or the network) broke the
    /// delivery contract.
    pub fn violations(&self) -> u64 {
        self.lost
            + self.duplicated
            + self.out_of_order
            + self.seq_gaps
            + self.seq_reused
            + self.unexpected
    }
}

/// Tracks acknowledged sends and received pushes of one loadgen thread.
#[derive(Debug, Default)]
pub struct Checker {
    convs: Vec<Conv>,
    streams: Vec<Stream>,
    /// Pushes the acks so far call for, and first receipts of user messages so far:
    /// their difference is a cheap "still waiting" figure for the drain phase.
    expected_so_far: u64,
    received_so_far: u64,
}

impl Checker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_conv(&mut self) -> ConvId {
        self.convs.push(Conv::default());
        ConvId(self.convs.len() as u32 - 1)
    }

    /// Adds a receiving stream (one connected device) to a conversation.
    pub fn add_stream(&mut self, conv: ConvId) -> StreamId {
        let id = StreamId(self.streams.len() as u32);
        self.streams.push(Stream {
            conv,
            seen: HashMap::new(),
            max_seen: i64::MIN,
            out_of_order: 0,
        });
        self.convs[conv.0 as usize].streams.push(id);
        id
    }

    /// A send from `sender`'s device was acknowledged with `seq`.
    pub fn acked(&mut self, sender: StreamId, seq: i64) {
        let conv_id = self.streams[sender.0 as usize].conv;
        let conv = &mut self.convs[conv_id.0 as usize];
        if conv.acked.insert(seq, sender).is_some() {
            conv.reused += 1;
        } else {
            self.expected_so_far += conv.streams.len().saturating_sub(1) as u64;
        }
    }

    /// A push of `seq` arrived on `stream`; `system` for msg_type 100+.
    pub fn pushed(&mut self, stream: StreamId, seq: i64, system: bool) {
        let s = &mut self.streams[stream.0 as usize];
        let count = s.seen.entry(seq).or_insert(0);
        *count += 1;
        if *count == 1 {
            if seq < s.max_seen {
                s.out_of_order += 1;
            }
            s.max_seen = s.max_seen.max(seq);
            if system {
                self.convs[s.conv.0 as usize].system.insert(seq);
            } else {
                self.received_so_far += 1;
            }
        }
    }

    /// Expected pushes not yet received (approximate while traffic flows: a push may
    /// arrive before the sender's ack). 0 means the drain can stop.
    pub fn outstanding(&self) -> u64 {
        self.expected_so_far.saturating_sub(self.received_so_far)
    }

    /// Compares what was acknowledged with what arrived.
    pub fn finish(&self) -> CheckReport {
        let mut r = CheckReport::default();
        for (i, s) in self.streams.iter().enumerate() {
            let me = StreamId(i as u32);
            let conv = &self.convs[s.conv.0 as usize];
            r.out_of_order += s.out_of_order;
            for (seq, &count) in &s.seen {
                r.duplicated += u64::from(count - 1);
                match conv.acked.get(seq) {
                    Some(&sender) if sender == me => r.unexpected += 1,
                    Some(_) => r.delivered += 1,
                    None if conv.system.contains(seq) => r.system_pushes += 1,
                    None => r.unexpected += 1,
                }
            }
        }
        for conv in &self.convs {
            r.seq_reused += conv.reused;
            for (seq, sender) in &conv.acked {
                for st in conv.streams.iter().filter(|st| *st != sender) {
                    r.expected += 1;
                    if !self.streams[st.0 as usize].seen.contains_key(seq) {
                        r.lost += 1;
                    }
                }
            }
            let mut known: HashSet<i64> = conv.acked.keys().copied().collect();
            for st in &conv.streams {
                known.extend(self.streams[st.0 as usize].seen.keys().copied());
            }
            if let (Some(lo), Some(hi)) = (known.iter().min(), known.iter().max()) {
                r.seq_gaps += (hi - lo + 1) as u64 - known.len() as u64;
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A p2p conversation: streams a and b; a sends seqs `sent`, b receives `received`.
    fn p2p(sent: &[i64], received: &[i64]) -> CheckReport {
        let mut c = Checker::new();
        let conv = c.add_conv();
        let a = c.add_stream(conv);
        let b = c.add_stream(conv);
        for &s in sent {
            c.acked(a, s);
        }
        for &s in received {
            c.pushed(b, s, false);
        }
        c.finish()
    }

    #[test]
    fn clean_stream_passes() {
        let r = p2p(&[1, 2, 3, 4], &[1, 2, 3, 4]);
        assert_eq!(r.violations(), 0, "{r:?}");
        assert_eq!((r.expected, r.delivered), (4, 4));
    }

    #[test]
    fn missing_push_is_lost() {
        let r = p2p(&[1, 2, 3, 4], &[1, 2, 4]);
        assert_eq!(r.lost, 1, "{r:?}");
        assert_eq!(r.violations(), 1);
    }

    #[test]
    fn duplicated_push_is_counted() {
        let r = p2p(&[1, 2, 3], &[1, 2, 2, 3]);
        assert_eq!(r.duplicated, 1, "{r:?}");
        assert_eq!(r.out_of_order, 0);
        assert_eq!(r.violations(), 1);
    }

    #[test]
    fn reordered_push_is_counted() {
        let r = p2p(&[1, 2, 3, 4], &[1, 3, 2, 4]);
        assert_eq!(r.out_of_order, 1, "{r:?}");
        assert_eq!((r.lost, r.duplicated), (0, 0));
        assert_eq!(r.violations(), 1);
    }

    #[test]
    fn push_before_ack_is_fine() {
        let mut c = Checker::new();
        let conv = c.add_conv();
        let a = c.add_stream(conv);
        let b = c.add_stream(conv);
        c.pushed(b, 1, false);
        assert_eq!(c.outstanding(), 0);
        c.acked(a, 1);
        c.acked(a, 2);
        assert_eq!(c.outstanding(), 1, "seq 1 arrived early, seq 2 is awaited");
        c.pushed(b, 2, false);
        assert_eq!(c.outstanding(), 0);
        assert_eq!(c.finish().violations(), 0);
    }

    #[test]
    fn seq_gap_and_reuse_are_counted() {
        let r = p2p(&[1, 2, 4], &[1, 2, 4]);
        assert_eq!(r.seq_gaps, 1, "{r:?}");
        let r = p2p(&[1, 1], &[1]);
        assert_eq!(r.seq_reused, 1, "{r:?}");
    }

    #[test]
    fn both_parties_sending_leaves_no_false_gaps() {
        let mut c = Checker::new();
        let conv = c.add_conv();
        let a = c.add_stream(conv);
        let b = c.add_stream(conv);
        for seq in 1..=6 {
            let (from, to) = if seq % 2 == 1 { (a, b) } else { (b, a) };
            c.acked(from, seq);
            c.pushed(to, seq, false);
        }
        assert_eq!(c.finish().violations(), 0);
    }

    #[test]
    fn group_with_system_message() {
        let mut c = Checker::new();
        let conv = c.add_conv();
        let s: Vec<StreamId> = (0..4).map(|_| c.add_stream(conv)).collect();
        for st in &s {
            c.pushed(*st, 1, true);
        }
        c.acked(s[0], 2);
        c.acked(s[0], 3);
        for st in &s[1..] {
            c.pushed(*st, 2, false);
            c.pushed(*st, 3, false);
        }
        let r = c.finish();
        assert_eq!(r.violations(), 0, "{r:?}");
        assert_eq!((r.expected, r.delivered, r.system_pushes), (6, 6, 4));
        // A group where one member missed seq 2 and another got seq 1 twice.
        let mut c2 = Checker::new();
        let conv = c2.add_conv();
        let s: Vec<StreamId> = (0..3).map(|_| c2.add_stream(conv)).collect();
        c2.acked(s[0], 1);
        c2.acked(s[0], 2);
        c2.pushed(s[1], 1, false);
        c2.pushed(s[1], 2, false);
        c2.pushed(s[2], 1, false);
        c2.pushed(s[2], 1, false);
        let r = c2.finish();
        assert_eq!((r.lost, r.duplicated), (1, 1), "{r:?}");
    }

    #[test]
    fn push_to_the_sending_device_is_unexpected() {
        let mut c = Checker::new();
        let conv = c.add_conv();
        let a = c.add_stream(conv);
        let b = c.add_stream(conv);
        c.acked(a, 1);
        c.pushed(b, 1, false);
        c.pushed(a, 1, false);
        c.pushed(b, 7, false);
        let r = c.finish();
        assert_eq!(r.unexpected, 2, "{r:?}");
    }
}
