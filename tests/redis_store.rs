//! The Redis store (`--store redis`) against a real redis-server: what only Redis can
//! do to the server. Every other integration test also runs on Redis with
//! `IMSHARD_TEST_STORE=redis` (`.ci/run` does both).

mod common;

use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{users_on_shards, Server};
use imshard::ids::p2p_conv_id;
use imshard::proto::pb::PullDirection;

/// A server on its own redis-server (with `appendfsync always`).
fn server_on_redis(extra: &[&str]) -> Option<(Server, RedisServer)> {
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])?;
    let url = redis.url();
    let mut args = vec![
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--redis-timeout",
        "1s",
    ];
    args.extend_from_slice(extra);
    Some((Server::start(2, &args), redis))
}

#[test]
fn redis_down_fails_fast_with_50301_then_service_resumes_without_a_seq_gap() {
    let Some((server, mut redis)) = server_on_redis(&["--rate-limit", "0"]) else {
        return;
    };
    let (alice, bob) = users_on_shards(2, "outage", false);
    let mut a = server.connect(&alice, "d");
    let mut b = server.connect(&bob, "d");
    for i in 1..=5 {
        assert_eq!(
            a.send_p2p(&bob, &format!("m{i}"), "{}").map(|r| r.seq),
            Ok(i)
        );
    }
    redis.kill();
    // A hang would end in the client's read timeout and fail the test.
    let mut refused = 0;
    for i in 6..=8 {
        match a.send_p2p(&bob, &format!("down{i}"), "{}") {
            Err(50301) => refused += 1,
            other => panic!("a send while Redis is down: {other:?}"),
        }
    }
    assert_eq!(refused, 3);
    // Connections and heartbeats stay up meanwhile.
    let r = a.request(imshard::proto::pb::client_frame::Body::Heartbeat(
        imshard::proto::pb::Heartbeat { client_ts: 1 },
    ));
    assert_eq!(r.code, 0);
    redis.restart();
    // Service resumes by itself: retry (same client_msg_id) until accepted.
    let deadline = Instant::now() + Duration::from_secs(20);
    let seq = loop {
        match a.send_p2p(&bob, "after", "{}") {
            Ok(r) => break r.seq,
            Err(50301) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => panic!("after the restart: {other:?}"),
        }
    };
    assert_eq!(seq, 6, "no seq was lost or reused across the outage");
    let conv = p2p_conv_id(&alice, &bob);
    let pulled = b.pull(&conv, 0, 50, PullDirection::Forward).expect("pull");
    let seqs: Vec<i64> = pulled.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn acknowledged_messages_survive_kill_9_of_imshard_on_redis() {
    let Some((mut server, _redis)) = server_on_redis(&["--rate-limit", "0"]) else {
        return;
    };
    let (alice, bob) = users_on_shards(2, "k9r", false);
    let mut a = server.connect(&alice, "d");
    let mut acked = Vec::new();
    for i in 1..=50 {
        acked.push(
            a.send_p2p(&bob, &format!("m{i}"), "{}")
                .expect("send")
                .msg_id,
        );
    }
    server.kill9();
    server.restart();
    let mut b = server.connect(&bob, "d");
    let conv = p2p_conv_id(&alice, &bob);
    let pulled = b.pull(&conv, 0, 100, PullDirection::Forward).expect("pull");
    let ids: Vec<String> = pulled.messages.into_iter().map(|m| m.msg_id).collect();
    assert_eq!(ids, acked);
    // The seq counter continues from what Redis holds.
    let mut a = server.connect(&alice, "d");
    assert_eq!(a.send_p2p(&bob, "after", "{}").map(|r| r.seq), Ok(51));
}

/// One inline command to Redis; the raw reply.
fn redis_raw(redis: &RedisServer, command: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port)).expect("connect redis");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(format!("{command}\r\n").as_bytes())
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The ZSET score of `device` in `user:online:{user}`, if it is there.
fn presence_score(redis: &RedisServer, user: &str, device: &str) -> Option<i64> {
    let reply = redis_raw(redis, &format!("ZSCORE user:online:{{{user}}} {device}"));
    let mut lines = reply.lines();
    match lines.next()? {
        l if l.starts_with('$') && l != "$-1" => lines.next()?.parse().ok(),
        _ => None,
    }
}

#[test]
fn presence_zsets_follow_connections_with_the_last_heartbeat_as_score() {
    let Some((server, redis)) = server_on_redis(&[]) else {
        return;
    };
    let before = imshard::store::redis::presence::now_ms();
    let mut phone = server.connect("pres", "phone");
    let _laptop = server.connect("pres", "laptop");
    let deadline = Instant::now() + Duration::from_secs(10);
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        while !cond() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("both devices online", &|| {
        presence_score(&redis, "pres", "phone").is_some()
            && presence_score(&redis, "pres", "laptop").is_some()
    });
    let first = presence_score(&redis, "pres", "phone").expect("score");
    assert!(first >= before, "the score is the time the device was seen");
    std::thread::sleep(Duration::from_millis(20));
    let r = phone.request(imshard::proto::pb::client_frame::Body::Heartbeat(
        imshard::proto::pb::Heartbeat { client_ts: 1 },
    ));
    assert_eq!(r.code, 0);
    wait("a heartbeat refreshes the score", &|| {
        presence_score(&redis, "pres", "phone").is_some_and(|s| s > first)
    });
    drop(phone);
    wait("a closed device is removed", &|| {
        presence_score(&redis, "pres", "phone").is_none()
    });
    assert!(presence_score(&redis, "pres", "laptop").is_some());
    // The key expires heartbeat_timeout after its newest score.
    let ttl = redis_raw(&redis, "PTTL user:online:{pres}");
    let ms: i64 = ttl.trim().trim_start_matches(':').parse().expect("PTTL");
    assert!(ms > 0 && ms <= 90_000, "PTTL {ms}");
}

#[test]
fn with_wait_replicas_a_send_is_answered_only_once_a_replica_has_it() {
    let Some(primary) =
        RedisServer::start_with(&["--appendonly", "no", "--repl-diskless-sync-delay", "0"])
    else {
        return;
    };
    let port = primary.port.to_string();
    let Some(mut replica) = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !redis_raw(&primary, "INFO replication").contains("state=online") {
        assert!(Instant::now() < deadline, "the replica never connected");
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = primary.url();
    let server = Server::start(
        2,
        &[
            "--store",
            "redis",
            "--redis-url",
            &url,
            "--redis-timeout",
            "2s",
            "--redis-wait-replicas",
            "1",
        ],
    );
    let (alice, bob) = users_on_shards(2, "repl", false);
    let mut a = server.connect(&alice, "d");
    // A replica that just came online may still be catching up: resend (same
    // client_msg_id) until a replica acknowledged it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        match a.send_p2p(&bob, "m1", "{}") {
            Err(50301) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => break other,
        }
    };
    assert_eq!(first.map(|r| r.seq), Ok(1));
    // The replica has it once the send is answered.
    let conv = p2p_conv_id(&alice, &bob);
    let hlen = redis_raw(&replica, &format!("HLEN im:{{{conv}}}:m"));
    assert_eq!(hlen.trim(), ":1", "{hlen}");
    replica.kill();
    assert_eq!(
        a.send_p2p(&bob, "m2", "{}"),
        Err(50301),
        "no replica acknowledged: not answered as durable"
    );
}

// ---- fencing and pipelined rounds, on RedisBackend directly ----

mod fencing {
    use std::cell::RefCell;
    use std::future::Future;
    use std::rc::Rc;
    use std::time::Duration;

    use imshard::store::redis::backend::{is_fence_failure, RedisBackend, RoundError, RoundSink};
    use imshard::store::redis::{RedisConfig, RedisConn};
    use imshard::store::{keys, Ks, Put, StoreError};

    use super::RedisServer;

    fn run<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("monoio runtime")
            .block_on(f)
    }

    async fn backend(redis: &RedisServer) -> Rc<RedisBackend> {
        let conn = RedisConn::connect(RedisConfig::new(redis.url()), Duration::from_secs(5))
            .await
            .expect("connect");
        RedisBackend::new(conn, 0, 0)
    }

    /// The writes of a new message, as `WriteSet::message` stages them: the message
    /// (its content names the writer) and its id index.
    fn message(conv: &str, seq: i64, writer: &str) -> [Put; 2] {
        let msg = imshard::proto::pb::MsgItem {
            msg_id: format!("{writer}-{seq}"),
            conv_id: conv.to_string(),
            seq,
            content: writer.to_string(),
            ..Default::default()
        };
        [
            Put {
                ks: Ks::Msgs,
                key: keys::msg(conv, seq),
                value: Some(prost::Message::encode_to_vec(&msg)),
            },
            Put {
                ks: Ks::MsgIds,
                key: keys::pair(conv, &msg.msg_id),
                value: Some((seq as u64).to_be_bytes().to_vec()),
            },
        ]
    }

    fn messages(conv: &str, seqs: std::ops::RangeInclusive<i64>, writer: &str) -> Vec<Put> {
        seqs.flat_map(|s| message(conv, s, writer)).collect()
    }

    fn row(user: &str, conv: &str) -> Put {
        Put {
            ks: Ks::Rows,
            key: keys::pair(user, conv),
            value: Some(vec![1, 2, 3]),
        }
    }

    /// The writer of each stored seq of `conv`, 1..=max.
    async fn writers(b: &RedisBackend, conv: &str) -> Vec<String> {
        let max = b.max_seq(conv).await.expect("max seq");
        let msgs = b
            .messages(conv, 1, max, max as usize, false, usize::MAX)
            .await
            .expect("messages");
        assert_eq!(msgs.len() as i64, max, "seqs 1..=max without gaps");
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.seq, i as i64 + 1);
        }
        msgs.into_iter().map(|m| m.content).collect()
    }

    #[test]
    fn a_stale_writer_is_refused_and_writes_nothing_of_its_round() {
        let Some(redis) = RedisServer::start() else {
            return;
        };
        run(async {
            let a = backend(&redis).await;
            let b = backend(&redis).await;
            // Both load the conversation empty and believe they own it.
            assert_eq!(a.max_seq("c").await, Ok(0));
            assert_eq!(b.max_seq("c").await, Ok(0));
            a.write_once(messages("c", 1..=3, "a"))
                .await
                .expect("a stores 1..=3");
            // b's round also carries another conversation and a row: none of it lands.
            let mut round = messages("c", 1..=2, "b");
            round.extend(messages("other", 1..=1, "b"));
            round.push(row("u", "other"));
            let refused = b.write_once(round).await.expect_err("b is fenced");
            assert!(refused.is_fenced(), "{refused}");
            assert!(refused.to_string().contains("im:{c}:m"), "{refused}");
            assert!(is_fence_failure(&StoreError::from(refused)));
            assert_eq!(writers(&a, "c").await, ["a", "a", "a"]);
            assert_eq!(a.max_seq("other").await, Ok(0));
            assert_eq!(a.rows("u").await.map(|r| r.len()), Ok(0));
            // A writer that skips a seq is refused too (no gap).
            let gap = a.write_once(messages("c", 5..=5, "a")).await;
            assert!(gap.as_ref().is_err_and(RoundError::is_fenced), "{gap:?}");
            // Updates of stored messages (recall) are not fenced; new ones continue.
            let [update, _] = message("c", 2, "a-recalled");
            let mut round = vec![update];
            round.extend(messages("c", 4..=4, "a"));
            a.write_once(round).await.expect("update and append");
            assert_eq!(writers(&b, "c").await, ["a", "a-recalled", "a", "a"]);
        });
    }

    #[test]
    fn two_writers_racing_for_one_conversation_never_store_a_duplicate_or_a_gap() {
        let Some(redis) = RedisServer::start() else {
            return;
        };
        run(async {
            let a = backend(&redis).await;
            let b = backend(&redis).await;
            let stored: Rc<RefCell<Vec<(i64, String)>>> = Rc::default();
            // Each writer: load the max seq (as a shard does on first touch and after
            // a failure), write a few rounds of 1-3 messages, reload when fenced.
            let writer = |be: Rc<RedisBackend>, name: &'static str| {
                let stored = stored.clone();
                async move {
                    let mut next = be.max_seq("race").await.expect("max") + 1;
                    let mut fenced = 0;
                    for round in 0..200 {
                        let n = 1 + round % 3;
                        let seqs = next..=next + n - 1;
                        match be.write_once(messages("race", seqs.clone(), name)).await {
                            Ok(()) => {
                                stored
                                    .borrow_mut()
                                    .extend(seqs.map(|s| (s, name.to_string())));
                                next += n;
                            }
                            Err(e) => {
                                assert!(e.is_fenced(), "{e}");
                                fenced += 1;
                                next = be.max_seq("race").await.expect("max") + 1;
                            }
                        }
                        if round % 7 == 0 {
                            monoio::time::sleep(Duration::from_micros(200)).await;
                        }
                    }
                    fenced
                }
            };
            let ha = monoio::spawn(writer(a.clone(), "a"));
            let hb = monoio::spawn(writer(b.clone(), "b"));
            let (fa, fb) = (ha.await, hb.await);
            assert!(
                fa + fb > 0,
                "the writers never collided: the test proves nothing"
            );
            let on_redis = writers(&a, "race").await;
            let mut acked = stored.borrow().clone();
            acked.sort();
            assert_eq!(
                acked.len(),
                on_redis.len(),
                "every acknowledged seq once, no other"
            );
            for (i, (seq, name)) in acked.iter().enumerate() {
                assert_eq!(*seq, i as i64 + 1);
                assert_eq!(&on_redis[i], name, "seq {seq} is the acknowledged writer's");
            }
        });
    }

    type Report = (u64, Result<(), RoundError>);

    #[test]
    fn within_a_round_the_last_write_of_a_field_wins() {
        let Some(redis) = RedisServer::start() else {
            return;
        };
        let row = |v: u8| Put {
            ks: Ks::Rows,
            key: keys::pair("lw", "conv"),
            value: Some(prost::Message::encode_to_vec(
                &imshard::proto::store_pb::ConvRow {
                    read_seq: i64::from(v),
                    ..Default::default()
                },
            )),
        };
        run(async {
            let be = backend(&redis).await;
            let mut round = vec![row(1), row(2)];
            round.extend(messages("lwc", 1..=1, "first"));
            round.push(row(3));
            let [update, _] = message("lwc", 1, "updated");
            round.push(update);
            be.write_once(round).await.expect("write");
            let rows = be.rows("lw").await.expect("rows");
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].1.read_seq, 3);
            assert_eq!(writers(&be, "lwc").await, ["updated"]);
        });
    }

    #[test]
    fn dedupe_records_live_in_day_buckets_that_expire() {
        let Some(redis) = RedisServer::start() else {
            return;
        };
        let now = imshard::store::redis::presence::now_ms();
        let record = |msg_id: &str, send_time: i64| imshard::proto::store_pb::DedupeRecord {
            msg_id: msg_id.to_string(),
            seq: 1,
            send_time,
        };
        let put = |cmid: &str, rec: &imshard::proto::store_pb::DedupeRecord| Put {
            ks: Ks::Dedupe,
            key: keys::triple("dd", "alice", cmid),
            value: Some(prost::Message::encode_to_vec(rec)),
        };
        run(async {
            let be = backend(&redis).await;
            let today = record("m-today", now);
            let yesterday = record("m-yesterday", now - 86_400_000);
            let old = record("m-old", now - 2 * 86_400_000);
            be.write_once(vec![put("t", &today), put("y", &yesterday), put("o", &old)])
                .await
                .expect("write");
            let asked = ["t", "y", "o", "none"]
                .iter()
                .map(|c| ("alice".to_string(), c.to_string()))
                .collect();
            let got = be.dedupe_many("dd", asked).await.expect("read");
            assert_eq!(got, vec![Some(today), Some(yesterday), None, None]);
        });
        let day = now / 86_400_000;
        let ttl = super::redis_raw(&redis, &format!("TTL im:{{dd}}:d:{day}"));
        let secs: i64 = ttl.trim().trim_start_matches(':').parse().expect("TTL");
        assert!(
            secs > 86_400 && secs <= 2 * 86_400,
            "today's bucket expires after tomorrow: {secs}"
        );
    }

    /// Records what the writer reports.
    #[derive(Clone, Default)]
    struct Sink {
        failed: Rc<std::cell::Cell<bool>>,
        reports: Rc<RefCell<Vec<Report>>>,
    }

    impl RoundSink for Sink {
        fn failed(&self) -> bool {
            self.failed.get()
        }
        fn report(&self, upto: u64, _took: Duration, result: Result<(), RoundError>) {
            if result.is_err() {
                self.failed.set(true);
            }
            self.reports.borrow_mut().push((upto, result));
        }
    }

    #[test]
    fn pipelined_rounds_report_in_order_and_a_failure_fails_every_later_round() {
        let Some(redis) = RedisServer::start() else {
            return;
        };
        run(async {
            let be = backend(&redis).await;
            let sink = Sink::default();
            // Batch 3 expects seq 7 where 5 is next: fenced. Batches 1-2 land; 3 and
            // every later one is reported failed, and nothing after the gap is stored.
            let batches = [
                messages("p", 1..=2, "w"),
                messages("p", 3..=4, "w"),
                messages("p", 7..=7, "w"),
                messages("p", 8..=9, "w"),
                messages("q", 1..=1, "w"),
            ];
            for (i, puts) in batches.into_iter().enumerate() {
                // true: no writer runs (none yet, or it finished the earlier rounds).
                if be.enqueue(i as u64 + 1, puts) {
                    monoio::spawn(be.clone().run_writer(sink.clone()));
                }
                // One round per batch: let the writer send it before the next.
                for _ in 0..3 {
                    imshard::rt::yield_now().await;
                }
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while sink.reports.borrow().last().map(|r| r.0) != Some(5) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{:?}",
                    sink.reports.borrow()
                );
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
            let reports = sink.reports.borrow().clone();
            assert_eq!(reports[0], (1, Ok(())));
            assert_eq!(reports[1], (2, Ok(())));
            assert!(
                matches!(&reports[2], (_, Err(e)) if e.is_fenced()),
                "{reports:?}"
            );
            assert!(reports[2..].iter().all(|(_, r)| r.is_err()), "{reports:?}");
            let mut uptos: Vec<u64> = reports.iter().map(|r| r.0).collect();
            uptos.dedup();
            assert!(
                uptos.windows(2).all(|w| w[0] < w[1]),
                "in order: {reports:?}"
            );
            assert_eq!(writers(&be, "p").await.len(), 4, "nothing after the gap");
        });
    }

    #[test]
    fn a_long_queue_is_split_into_rounds_of_about_a_megabyte() {
        let Some(redis) = RedisServer::start() else {
            return;
        };
        let big = |user: &str| -> Vec<Put> {
            (0..600)
                .map(|i| Put {
                    ks: Ks::Rows,
                    key: keys::pair(user, &format!("c{i}")),
                    value: Some(vec![7; 1000]),
                })
                .collect()
        };
        run(async {
            let be = backend(&redis).await;
            let sink = Sink::default();
            // Queued in one turn: 600 KB each; the writer starts after the turn.
            for (id, user) in [(1, "b1"), (2, "b2"), (3, "b3")] {
                if be.enqueue(id, big(user)) {
                    monoio::spawn(be.clone().run_writer(sink.clone()));
                }
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while sink.reports.borrow().last().map(|r| r.0) != Some(3) {
                assert!(std::time::Instant::now() < deadline);
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(*sink.reports.borrow(), vec![(2, Ok(())), (3, Ok(()))]);
        });
        for user in ["b1", "b2", "b3"] {
            let n = super::redis_raw(&redis, &format!("HLEN im:{{{user}}}:r"));
            assert_eq!(n.trim(), ":600", "{user}");
        }
    }
}
