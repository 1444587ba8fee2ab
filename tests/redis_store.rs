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
