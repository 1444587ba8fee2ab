//! The scenarios: who connects, who sends to whom, and the per-thread program that runs
//! them. The main thread builds a plan (users and conversations) and deals it out to
//! the threads; all members of one conversation go to the same thread, so each thread's
//! checker sees both the acks and the pushes of its conversations.
//!
//! Per thread: setup (connect; create groups) -> wait for every thread -> load for
//! `--duration` -> drain (no new sends; wait for outstanding acks and pushes, at most
//! `--drain-timeout`) -> hold (the main thread reads the server's RSS) -> close.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use imshard::ids::{group_conv_id, p2p_conv_id};
use imshard::proto::pb::{self, client_frame::Body};
use imshard::shard::shard_of_user;
use monoio::time::{sleep, sleep_until, Instant};

use crate::client::{self, Conn, ConnSettings, Ctx, Phase};
use crate::runner::{Sync, ThreadResult};
use crate::sys;

/// Device id of every loadgen connection.
pub const DEVICE: &str = "lg";
/// How long setup waits for a CreateGroup answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of a run that every thread shares.
#[derive(Debug, Clone)]
pub struct RunParams {
    pub settings: ConnSettings,
    pub secret: Arc<[u8]>,
    /// Lifetime of minted tokens, seconds.
    pub token_ttl: u64,
    /// Source addresses 127.0.0.2.. (0: let the kernel choose).
    pub source_addrs: usize,
    pub heartbeat_interval: Duration,
    pub duration: Duration,
    pub drain_timeout: Duration,
    /// Most connects in flight at once per thread.
    pub connect_concurrency: usize,
    /// Pause after connecting and after creating groups, before the load (a cluster
    /// subscribes to push channels asynchronously; see `--settle`).
    pub settle: Duration,
}

/// A user the loadgen connects as; `global` picks its source address and its target
/// (round robin over `--target`).
#[derive(Debug, Clone)]
pub struct User {
    pub global: usize,
    pub id: String,
}

/// One sender of a conversation.
#[derive(Debug, Clone)]
pub struct SenderPlan {
    /// Position in the conversation's members.
    pub member: usize,
    /// Peer user (p2p) or group id (group).
    pub target: String,
    pub conv_type: pb::ConvType,
}

/// One conversation of a thread.
#[derive(Debug, Clone)]
pub struct ConvPlan {
    pub conv_id: String,
    /// Indexes into the thread's users.
    pub members: Vec<usize>,
    pub senders: Vec<SenderPlan>,
    /// For groups: the group id, created by member 0 before the load starts.
    pub create_group: Option<String>,
    /// For groups: members that never connect (listed in the CreateGroup only).
    pub offline: Vec<String>,
}

/// One thread's share of a traffic scenario.
#[derive(Debug, Clone, Default)]
pub struct ThreadPlan {
    pub users: Vec<User>,
    pub convs: Vec<ConvPlan>,
}

/// How senders send.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Sends per second of each sender; 0 = as fast as the window allows.
    pub rate_per_sender: f64,
    /// Sends in flight per sender.
    pub window: u32,
    /// Content bytes (padding after the timestamp).
    pub size: usize,
}

/// A run id that keeps users and conversations of different runs apart.
pub fn run_prefix() -> String {
    let mut n = sys::unix_ms();
    let mut s = Vec::new();
    while n > 0 {
        s.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
    }
    s.reverse();
    format!("lg{}", String::from_utf8_lossy(&s))
}

/// `connect`: user i goes to thread i % threads.
pub fn plan_connect(prefix: &str, n: usize, threads: usize) -> Vec<Vec<User>> {
    let mut out = vec![Vec::new(); threads];
    for i in 0..n {
        out[i % threads].push(User {
            global: i,
            id: format!("{prefix}c{i}"),
        });
    }
    out
}

/// `p2p`: pairs cycle through every (shard of a, shard of b) combination of the
/// server's shards, so every shard serves users and both local and cross-shard sends
/// happen. Both parties of a pair send. Pair i goes to thread i % threads.
pub fn plan_p2p(
    prefix: &str,
    pairs: usize,
    server_shards: usize,
    threads: usize,
) -> Vec<ThreadPlan> {
    let shards = server_shards.max(1);
    let mut pools: Vec<VecDeque<String>> = vec![VecDeque::new(); shards];
    let mut next = 0usize;
    let mut take = |shard: usize, pools: &mut Vec<VecDeque<String>>| loop {
        if let Some(u) = pools[shard].pop_front() {
            return u;
        }
        let id = format!("{prefix}u{next}");
        next += 1;
        pools[shard_of_user(&id, shards)].push_back(id);
    };
    let mut plans = vec![ThreadPlan::default(); threads];
    let mut global = 0;
    for i in 0..pairs {
        let combo = i % (shards * shards);
        let a = take(combo / shards, &mut pools);
        let b = take(combo % shards, &mut pools);
        let plan = &mut plans[i % threads];
        let base = plan.users.len();
        for id in [&a, &b] {
            plan.users.push(User {
                global,
                id: id.clone(),
            });
            global += 1;
        }
        plan.convs.push(ConvPlan {
            conv_id: p2p_conv_id(&a, &b),
            members: vec![base, base + 1],
            senders: vec![
                SenderPlan {
                    member: 0,
                    target: b.clone(),
                    conv_type: pb::ConvType::P2p,
                },
                SenderPlan {
                    member: 1,
                    target: a.clone(),
                    conv_type: pb::ConvType::P2p,
                },
            ],
            create_group: None,
            offline: Vec::new(),
        });
    }
    plans
}

/// `group`: G groups of M members, the first `online` of which connect; members 0..K
/// send. Group i goes to thread i % threads. Connected users are numbered across all
/// groups (their `global` index), so with several targets the online members of a
/// group go round robin over the nodes.
pub fn plan_group(
    prefix: &str,
    groups: usize,
    members: usize,
    online: usize,
    senders: usize,
    threads: usize,
) -> Vec<ThreadPlan> {
    let online = online.min(members);
    let mut plans = vec![ThreadPlan::default(); threads];
    let mut global = 0;
    for g in 0..groups {
        let group_id = format!("{prefix}g{g}");
        let plan = &mut plans[g % threads];
        let base = plan.users.len();
        for m in 0..online {
            plan.users.push(User {
                global,
                id: format!("{group_id}m{m}"),
            });
            global += 1;
        }
        plan.convs.push(ConvPlan {
            conv_id: group_conv_id(&group_id),
            members: (base..base + online).collect(),
            offline: (online..members)
                .map(|m| format!("{group_id}m{m}"))
                .collect(),
            senders: (0..senders.min(online))
                .map(|member| SenderPlan {
                    member,
                    target: group_id.clone(),
                    conv_type: pb::ConvType::Group,
                })
                .collect(),
            create_group: Some(group_id),
        });
    }
    plans
}

fn token(p: &RunParams, user: &str) -> Result<String, String> {
    imshard::auth::mint(&p.secret, user, DEVICE, "web", false, p.token_ttl)
        .map_err(|e| format!("cannot mint a token for {user}: {e}"))
}

async fn connect_one(ctx: &Rc<Ctx>, p: &RunParams, user: &User) -> Option<Rc<Conn>> {
    let t = match token(p, &user.id) {
        Ok(t) => t,
        Err(e) => {
            let mut st = ctx.stats.borrow_mut();
            st.connects_failed += 1;
            st.note_failure(|| e);
            return None;
        }
    };
    let source = sys::source_addr(user.global, p.source_addrs);
    let target = p.settings.target_for(user.global);
    client::connect(ctx, user.id.clone(), target, source, &t)
        .await
        .ok()
}

/// How early a paced sender may send: one tick of monoio's timer wheel.
const PACE_EARLY: Duration = Duration::from_millis(1);

/// Sends a heartbeat on every connection once per `interval`, spread over the interval
/// in 100 ms slices, while the load runs.
async fn heartbeats(ctx: Rc<Ctx>, interval: Duration) {
    const TICK: Duration = Duration::from_millis(100);
    let slices = (interval.as_millis() / TICK.as_millis()).max(1) as usize;
    let mut tick = 0usize;
    loop {
        sleep(TICK).await;
        if ctx.phase.get() != Phase::Load {
            return;
        }
        tick += 1;
        let slice = tick % slices;
        let conns: Vec<Rc<Conn>> = ctx
            .conns
            .borrow()
            .iter()
            .enumerate()
            .filter(|(i, _)| i % slices == slice)
            .map(|(_, c)| c.clone())
            .collect();
        for c in conns {
            c.heartbeat(&ctx);
        }
    }
}

/// Drains, holds the connections open until the main thread has measured the server,
/// then closes them and returns this thread's results.
async fn finish(ctx: Rc<Ctx>, p: &RunParams, sync: &Sync) -> ThreadResult {
    ctx.phase.set(Phase::Drain);
    ctx.wake_senders();
    let deadline = Instant::now() + p.drain_timeout;
    while Instant::now() < deadline
        && (ctx.pending_requests() > 0 || ctx.checker.borrow().outstanding() > 0)
    {
        sleep(Duration::from_millis(2)).await;
    }
    ctx.stats.borrow_mut().unanswered = ctx.pending_requests();
    sync.mark_drained();
    sync.holding.fetch_add(1, Ordering::AcqRel);
    Sync::wait(&sync.release).await;
    ctx.close_all();
    // Let readers and writers see the shutdown before the runtime goes away.
    sleep(Duration::from_millis(20)).await;
    let check = ctx.checker.borrow().finish();
    let stats = std::mem::take(&mut *ctx.stats.borrow_mut());
    ThreadResult { stats, check }
}

/// `connect` on one thread: ramp to its users at `rate` per second (0 = as fast as
/// `connect_concurrency` allows), heartbeat them, hold until `--duration` ends.
pub async fn connect_thread(
    p: Arc<RunParams>,
    sync: Arc<Sync>,
    seed: u64,
    users: Vec<User>,
    rate: f64,
) -> ThreadResult {
    let ctx = Ctx::new(p.settings.clone(), seed);
    sync.ready.fetch_add(1, Ordering::AcqRel);
    Sync::wait(&sync.go).await;
    ctx.phase.set(Phase::Load);
    let start = Instant::now();
    let end = start + p.duration;
    monoio::spawn(heartbeats(ctx.clone(), p.heartbeat_interval));
    let in_flight = Rc::new(Cell::new(0usize));
    for (i, user) in users.into_iter().enumerate() {
        if rate > 0.0 {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            if at >= end {
                break;
            }
            sleep_until(at).await;
        }
        while in_flight.get() >= p.connect_concurrency && Instant::now() < end {
            sleep(Duration::from_millis(1)).await;
        }
        if Instant::now() >= end {
            break;
        }
        in_flight.set(in_flight.get() + 1);
        let (ctx, p, in_flight) = (ctx.clone(), p.clone(), in_flight.clone());
        monoio::spawn(async move {
            connect_one(&ctx, &p, &user).await;
            in_flight.set(in_flight.get() - 1);
        });
    }
    sleep_until(end).await;
    let give_up = Instant::now() + p.connect_timeout_or_drain();
    while in_flight.get() > 0 && Instant::now() < give_up {
        sleep(Duration::from_millis(2)).await;
    }
    finish(ctx, &p, &sync).await
}

impl RunParams {
    fn connect_timeout_or_drain(&self) -> Duration {
        self.settings.connect_timeout.max(self.drain_timeout)
    }
}

/// Connects `users` with at most `connect_concurrency` connects in flight.
async fn connect_all(ctx: &Rc<Ctx>, p: &Arc<RunParams>, users: &[User]) -> Vec<Option<Rc<Conn>>> {
    let slots: Rc<Vec<Cell<Option<Rc<Conn>>>>> =
        Rc::new((0..users.len()).map(|_| Cell::new(None)).collect());
    let in_flight = Rc::new(Cell::new(0usize));
    for (i, user) in users.iter().enumerate() {
        while in_flight.get() >= p.connect_concurrency {
            sleep(Duration::from_millis(1)).await;
        }
        in_flight.set(in_flight.get() + 1);
        let (ctx, p, user, slots, in_flight) = (
            ctx.clone(),
            p.clone(),
            user.clone(),
            slots.clone(),
            in_flight.clone(),
        );
        monoio::spawn(async move {
            slots[i].set(connect_one(&ctx, &p, &user).await);
            in_flight.set(in_flight.get() - 1);
        });
    }
    while in_flight.get() > 0 {
        sleep(Duration::from_millis(1)).await;
    }
    slots.iter().map(|s| s.take()).collect()
}

/// `p2p` and `group` on one thread.
pub async fn traffic_thread(
    p: Arc<RunParams>,
    sync: Arc<Sync>,
    seed: u64,
    plan: ThreadPlan,
    load: Load,
) -> ThreadResult {
    let ctx = Ctx::new(p.settings.clone(), seed);
    monoio::spawn(client::ack_ticker(ctx.clone()));
    let conns = connect_all(&ctx, &p, &plan.users).await;
    if !p.settle.is_zero() {
        sleep(p.settle).await;
    }
    let mut senders = Vec::new();
    for conv in &plan.convs {
        let members: Option<Vec<Rc<Conn>>> =
            conv.members.iter().map(|&m| conns[m].clone()).collect();
        let Some(members) = members else {
            // A member could not connect (already counted): its pushes cannot arrive,
            // so this conversation sends nothing.
            continue;
        };
        // Streams first: a push may arrive before the CreateGroup answer.
        let checker_conv = ctx.checker.borrow_mut().add_conv();
        let streams: Vec<_> = members
            .iter()
            .map(|c| {
                let s = ctx.checker.borrow_mut().add_stream(checker_conv);
                c.add_stream(conv.conv_id.clone(), s);
                s
            })
            .collect();
        if let Some(group_id) = &conv.create_group {
            let ids = conv
                .members
                .iter()
                .map(|&m| plan.users[m].id.clone())
                .chain(conv.offline.iter().cloned())
                .collect();
            let answer = members[0]
                .call(
                    Body::CreateGroup(pb::CreateGroupRequest {
                        group_id: group_id.clone(),
                        name: group_id.clone(),
                        members: ids,
                    }),
                    CALL_TIMEOUT,
                )
                .await;
            let mut st = ctx.stats.borrow_mut();
            match answer {
                Some(r) if r.code == 0 => st.groups_created += 1,
                other => {
                    st.groups_failed += 1;
                    st.note_failure(|| match other {
                        Some(r) => format!("CreateGroup {group_id}: {} {}", r.code, r.message),
                        None => format!("CreateGroup {group_id}: no answer"),
                    });
                    continue;
                }
            }
        }
        for s in &conv.senders {
            senders.push((members[s.member].clone(), streams[s.member], s.clone()));
        }
    }
    if !p.settle.is_zero() && plan.convs.iter().any(|c| c.create_group.is_some()) {
        // The members' nodes learn of the new groups from the creation's push and
        // subscribe to the group channels then.
        sleep(p.settle).await;
    }
    sync.ready.fetch_add(1, Ordering::AcqRel);
    Sync::wait(&sync.go).await;
    ctx.phase.set(Phase::Load);
    monoio::spawn(heartbeats(ctx.clone(), p.heartbeat_interval));
    let pad: Rc<str> = "x".repeat(load.size).into();
    let n = senders.len().max(1);
    for (i, (conn, stream, plan)) in senders.into_iter().enumerate() {
        // Spread the senders' first sends over one interval.
        let phase = (i as f64 + 0.5) / n as f64;
        monoio::spawn(sender(
            ctx.clone(),
            conn,
            stream,
            plan,
            load,
            pad.clone(),
            phase,
        ));
    }
    sleep(p.duration).await;
    finish(ctx, &p, &sync).await
}

/// One sender: keeps at most `window` sends in flight and, with a rate, sends on a
/// fixed schedule (catching up in bursts when behind, never beyond the window).
async fn sender(
    ctx: Rc<Ctx>,
    conn: Rc<Conn>,
    stream: crate::checker::StreamId,
    plan: SenderPlan,
    load: Load,
    pad: Rc<str>,
    phase: f64,
) {
    let interval =
        (load.rate_per_sender > 0.0).then(|| Duration::from_secs_f64(1.0 / load.rate_per_sender));
    let mut next = Instant::now() + interval.map(|iv| iv.mul_f64(phase)).unwrap_or_default();
    loop {
        if ctx.phase.get() != Phase::Load || conn.is_closed() {
            return;
        }
        if conn.in_flight.get() >= load.window {
            conn.window_room(&ctx, load.window).await;
            continue;
        }
        let mut due_ns = None;
        if let Some(iv) = interval {
            let now = Instant::now();
            // monoio's timers fire on whole milliseconds, up to one late: a sender
            // that slept until its slot sent ~1.5 ms after it, on average, and every
            // latency carried that. It wakes one tick early instead and sends within
            // the tick before its slot; an early send's latency counts from when it
            // was written (see `send_message`), so nothing is understated.
            if next > now + PACE_EARLY {
                sleep_until(next - PACE_EARLY).await;
                continue;
            }
            // The slot this send was due in, on the clock the timestamps use.
            due_ns = Some(
                sys::now_ns().saturating_sub(now.saturating_duration_since(next).as_nanos() as u64),
            );
            next += iv;
        }
        conn.send_message(&ctx, stream, plan.conv_type, &plan.target, &pad, due_ns);
        if interval.is_none() && conn.in_flight.get() >= load.window {
            // Let the writer flush the window's worth in one write.
            monoio::time::sleep(Duration::ZERO).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2p_pairs_cover_every_shard_combination() {
        let plans = plan_p2p("t", 8, 2, 2);
        let mut combos = std::collections::HashSet::new();
        for plan in &plans {
            for conv in &plan.convs {
                let a = &plan.users[conv.members[0]].id;
                let b = &plan.users[conv.members[1]].id;
                combos.insert((shard_of_user(a, 2), shard_of_user(b, 2)));
                assert!(imshard::ids::is_valid_id(a) && imshard::ids::is_valid_id(b));
            }
        }
        assert_eq!(combos.len(), 4);
        assert_eq!(plans.iter().map(|p| p.users.len()).sum::<usize>(), 16);
    }

    #[test]
    fn group_plan_keeps_a_group_on_one_thread() {
        let plans = plan_group("t", 3, 5, 5, 2, 2);
        assert_eq!(plans[0].convs.len(), 2);
        assert_eq!(plans[1].convs.len(), 1);
        assert_eq!(plans[0].users.len(), 10);
        assert_eq!(plans[0].convs[1].members, (5..10).collect::<Vec<_>>());
        assert_eq!(plans[0].convs[1].senders.len(), 2);
        assert!(plans[0].convs[1].offline.is_empty());
    }

    #[test]
    fn group_plan_with_offline_members_numbers_only_the_online_ones() {
        let plans = plan_group("t", 3, 100, 10, 1, 1);
        let plan = &plans[0];
        assert_eq!(plan.users.len(), 30);
        assert_eq!(plan.convs[2].members.len(), 10);
        assert_eq!(plan.convs[2].offline.len(), 90);
        assert_eq!(plan.convs[2].offline[0], "tg2m10");
        // Global indexes run over the connected users only: with 10 targets the 10
        // online members of a group land on 10 different nodes.
        let globals: Vec<usize> = plan.convs[2]
            .members
            .iter()
            .map(|&m| plan.users[m].global % 10)
            .collect();
        let distinct: std::collections::HashSet<_> = globals.iter().collect();
        assert_eq!(distinct.len(), 10);
    }

    #[test]
    fn pairs_and_groups_spread_over_targets() {
        // Round robin by global index: the two parties of a pair differ.
        for plan in plan_p2p("t", 6, 1, 2) {
            for conv in &plan.convs {
                let a = plan.users[conv.members[0]].global;
                let b = plan.users[conv.members[1]].global;
                assert_ne!(a % 3, b % 3);
                assert_ne!(a % 2, b % 2);
            }
        }
    }
}
