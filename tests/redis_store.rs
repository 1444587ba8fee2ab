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
