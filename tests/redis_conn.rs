//! The Redis driver against a real `redis-server` started on a free loopback port:
//! big pipelines, replies split across reads, error replies, one write per loop
//! turn, timeouts, kill and restart, scripts, presence.

#[path = "common/redis_server.rs"]
mod redis_server;

#[path = "common/on_loop.rs"]
mod on_loop;

use std::time::{Duration, Instant};

use imshard::store::redis::presence::now_ms;
use imshard::store::redis::{
    online_devices, online_key, run_script, LuaScript, PresenceBatch, PresenceWriter, RedisConfig,
    RedisConn, RedisError,
};
use on_loop::run;
use redis::Value;
use redis_server::RedisServer;

async fn connect(server: &RedisServer) -> RedisConn {
    RedisConn::connect(server.quick_config(), Duration::from_secs(5))
        .await
        .expect("connect to the test redis")
}

fn set(k: &str, v: impl redis::ToRedisArgs) -> redis::Cmd {
    redis::cmd("SET").arg(k).arg(v).clone()
}

fn get(k: &str) -> redis::Cmd {
    redis::cmd("GET").arg(k).clone()
}

/// The `calls=` of `cmdstat_<name>` in `INFO commandstats`.
async fn command_calls(conn: &RedisConn, name: &str) -> u64 {
    let info = match conn
        .cmd(redis::cmd("INFO").arg("commandstats"))
        .await
        .unwrap()
    {
        Value::BulkString(b) => String::from_utf8(b).unwrap(),
        Value::VerbatimString { text, .. } => text,
        other => panic!("INFO answered {other:?}"),
    };
    let prefix = format!("cmdstat_{name}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Polls `f` until it returns true or `within` passes.
async fn eventually(within: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[test]
fn pipelines_of_ten_thousand_sets_and_gets() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let conn = connect(&server).await;
        let n = 10_000;
        let sets: Vec<_> = (0..n).map(|i| set(&format!("k{i}"), i)).collect();
        let gets: Vec<_> = (0..n).map(|i| get(&format!("k{i}"))).collect();
        let writes_before = conn.stats().writes;

        let t = Instant::now();
        let replies = conn.cmds(&sets).await.unwrap();
        let set_time = t.elapsed();
        assert_eq!(replies.len(), n);
        assert!(replies.iter().all(|v| *v == Value::Okay));

        let t = Instant::now();
        let replies = conn.cmds(&gets).await.unwrap();
        let get_time = t.elapsed();
        assert_eq!(replies.len(), n);
        for (i, v) in replies.into_iter().enumerate() {
            assert_eq!(v, Value::BulkString(i.to_string().into_bytes()), "k{i}");
        }
        assert_eq!(conn.stats().writes - writes_before, 2, "one write per call");
        eprintln!("{n} SETs in one call: {set_time:?}; {n} GETs: {get_time:?}");
    });
}

#[test]
fn a_four_mib_value_arrives_across_many_reads() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let conn = connect(&server).await;
        let big: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let reads_before = conn.stats().reads;
        let replies = conn
            .cmds(&[
                set("big", big.as_slice()),
                get("big"),
                redis::cmd("PING").clone(),
            ])
            .await
            .unwrap();
        assert_eq!(replies[0], Value::Okay);
        assert_eq!(replies[1], Value::BulkString(big));
        assert_eq!(replies[2], Value::SimpleString("PONG".into()));
        let reads = conn.stats().reads - reads_before;
        assert!(reads > 16, "4 MiB came in {reads} reads");
        eprintln!("4 MiB reply parsed across {reads} reads");
        assert_eq!(conn.cmd(&get("missing")).await.unwrap(), Value::Nil);
    });
}

#[test]
fn an_error_reply_goes_to_its_caller_only() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let conn = connect(&server).await;
        let writes_before = conn.stats().writes;
        let a = {
            let conn = conn.clone();
            monoio::spawn(async move {
                conn.cmds(&[
                    set("s", "not a number"),
                    redis::cmd("INCR").arg("s").clone(),
                    get("s"),
                ])
                .await
            })
        };
        let b = {
            let conn = conn.clone();
            monoio::spawn(async move {
                conn.cmds(&[
                    redis::cmd("RPUSH").arg("l").arg(1).arg(2).clone(),
                    redis::cmd("LRANGE").arg("l").arg(0).arg(-1).clone(),
                ])
                .await
            })
        };
        let a = a.await.unwrap();
        let b = b.await.unwrap();
        assert_eq!(a[0], Value::Okay);
        assert!(
            matches!(&a[1], Value::ServerError(e) if e.code() == "ERR"),
            "{:?}",
            a[1]
        );
        assert_eq!(a[2], Value::BulkString(b"not a number".to_vec()));
        assert_eq!(b[0], Value::Int(2));
        assert_eq!(
            b[1],
            Value::Array(vec![
                Value::BulkString(b"1".to_vec()),
                Value::BulkString(b"2".to_vec())
            ])
        );
        assert_eq!(
            conn.stats().writes - writes_before,
            1,
            "both calls in one write"
        );
        assert!(
            conn.is_connected(),
            "an error reply does not break the connection"
        );
    });
}

#[test]
fn concurrent_callers_of_one_turn_share_one_write_and_keep_their_order() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let conn = connect(&server).await;
        let before = conn.stats();
        let calls_before = command_calls(&conn, "incr").await;
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let conn = conn.clone();
                monoio::spawn(async move { conn.cmd(redis::cmd("INCR").arg("n")).await })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        let after = conn.stats();
        // Tasks spawned in one turn ran in spawn order, so INCR replies are 1..=200.
        assert_eq!(got, (1..=200).map(Value::Int).collect::<Vec<_>>());
        // INFO above is one write; the 200 INCRs are one more.
        assert_eq!(after.writes - before.writes, 2);
        assert_eq!(command_calls(&conn, "incr").await - calls_before, 200);
    });
}

#[test]
fn callers_in_lockstep_send_one_write_per_round() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let conn = connect(&server).await;
        let (tasks, rounds) = (50, 20);
        let before = conn.stats().writes;
        let handles: Vec<_> = (0..tasks)
            .map(|i| {
                let conn = conn.clone();
                monoio::spawn(async move {
                    for _ in 0..rounds {
                        let r = conn.cmd(redis::cmd("INCR").arg(format!("r{i}"))).await;
                        assert!(matches!(r, Ok(Value::Int(_))), "{r:?}");
                    }
                })
            })
            .collect();
        for h in handles {
            h.await;
        }
        let writes = conn.stats().writes - before;
        eprintln!("{rounds} rounds of {tasks} callers: {writes} writes");
        // Each round's replies wake every task in (about) one turn, and their next
        // calls share a write; a reply stream split across reads can split a round.
        assert!(
            writes <= 2 * rounds,
            "{writes} writes for {rounds} rounds of {tasks} callers"
        );
        let n = conn.cmd(&get("r7")).await.unwrap();
        assert_eq!(n, Value::BulkString(rounds.to_string().into()));
    });
}

#[test]
fn an_atomic_pipeline_returns_the_exec_reply() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let conn = connect(&server).await;
        let mut p = redis::pipe();
        p.atomic().cmd("SET").arg("t").arg(1).cmd("INCR").arg("t");
        let replies = conn.pipeline(&p).await.unwrap();
        assert_eq!(replies.len(), 4, "{replies:?}");
        assert_eq!(replies[0], Value::Okay);
        assert_eq!(
            replies[3],
            Value::Array(vec![Value::Okay, Value::Int(2)]),
            "{replies:?}"
        );
    });
}

#[test]
fn a_stalled_server_times_calls_out_and_service_resumes() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let conn = connect(&server).await;
        assert_eq!(conn.cmd(&set("a", 1)).await.unwrap(), Value::Okay);

        server.pause(true);
        let t = Instant::now();
        let e = conn.cmd(&get("a")).await.unwrap_err();
        let waited = t.elapsed();
        assert_eq!(e, RedisError::Timeout(Duration::from_millis(500)));
        assert!(e.is_retryable());
        assert!(
            waited < Duration::from_millis(900),
            "timed out after {waited:?}"
        );
        assert!(!conn.is_connected());

        // While it is down, calls fail at once.
        let t = Instant::now();
        let e = conn.cmd(&get("a")).await.unwrap_err();
        assert!(matches!(e, RedisError::Unavailable(_)), "{e}");
        assert!(e.is_retryable());
        assert!(t.elapsed() < Duration::from_millis(50));

        server.pause(false);
        let back = eventually(Duration::from_secs(5), async || {
            conn.cmd(&get("a")).await == Ok(Value::BulkString(b"1".to_vec()))
        })
        .await;
        assert!(
            back,
            "no service after the server came back: {:?}",
            conn.stats()
        );
        let stats = conn.stats();
        assert!(stats.connected);
        assert!(stats.reconnects >= 1, "{stats:?}");
        assert_eq!(stats.timeouts, 1, "{stats:?}");
    });
}

#[test]
fn a_killed_server_fails_calls_fast_and_a_restart_is_picked_up() {
    let Some(mut server) =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    else {
        return;
    };
    run(async {
        let conn = connect(&server).await;
        assert_eq!(conn.cmd(&set("durable", "yes")).await.unwrap(), Value::Okay);

        // Calls in flight while the server dies.
        let in_flight: Vec<_> = (0..20)
            .map(|i| {
                let conn = conn.clone();
                monoio::spawn(async move {
                    let t = Instant::now();
                    let mut last = Ok(Vec::new());
                    for _ in 0..200 {
                        last = conn.cmds(&[set(&format!("f{i}"), i), get("durable")]).await;
                        if last.is_err() {
                            break;
                        }
                    }
                    (last, t.elapsed())
                })
            })
            .collect();
        monoio::time::sleep(Duration::from_millis(5)).await;
        server.kill();
        for t in in_flight {
            let (last, _) = t.await;
            match last {
                Ok(_) => {} // finished its 200 rounds before the kill
                Err(e) => assert!(
                    matches!(e, RedisError::Disconnected(_) | RedisError::Unavailable(_)),
                    "{e}"
                ),
            }
        }
        let t = Instant::now();
        let e = conn.cmd(&get("durable")).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "a call while the server is gone took {:?}",
            t.elapsed()
        );

        // The driver keeps trying while the server is gone.
        monoio::time::sleep(Duration::from_millis(150)).await;
        assert!(conn.stats().connect_failures >= 1, "{:?}", conn.stats());
        server.restart();
        let back = eventually(Duration::from_secs(5), async || {
            conn.cmd(&get("durable")).await == Ok(Value::BulkString(b"yes".to_vec()))
        })
        .await;
        assert!(back, "no service after restart: {:?}", conn.stats());
        let stats = conn.stats();
        assert!(stats.reconnects >= 1, "{stats:?}");
        assert!(stats.failed_calls >= 1, "{stats:?}");
    });
}

#[test]
fn evalsha_falls_back_to_eval_on_noscript() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let conn = connect(&server).await;
        let add = LuaScript::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
        let r = run_script(&conn, &add, &[b"c"], &[b"5"]).await.unwrap();
        assert_eq!(r, Value::Int(5));
        assert_eq!(command_calls(&conn, "eval").await, 1, "NOSCRIPT -> EVAL");
        let r = run_script(&conn, &add, &[b"c"], &[b"2"]).await.unwrap();
        assert_eq!(r, Value::Int(7));
        assert_eq!(command_calls(&conn, "evalsha").await, 2);
        assert_eq!(command_calls(&conn, "eval").await, 1, "cached after EVAL");

        // A flushed script cache (a restarted server, a failover) is reloaded.
        let flushed = conn.cmd(redis::cmd("SCRIPT").arg("FLUSH")).await.unwrap();
        assert_eq!(flushed, Value::Okay);
        let r = run_script(&conn, &add, &[b"c"], &[b"1"]).await.unwrap();
        assert_eq!(r, Value::Int(8));
        assert_eq!(command_calls(&conn, "eval").await, 2);

        // A script's own error is a server error, not a connection failure.
        let fenced = LuaScript::new("return redis.error_reply('FENCED max seq is ' .. ARGV[1])");
        let e = run_script(&conn, &fenced, &[b"c"], &[b"41"])
            .await
            .unwrap_err();
        assert_eq!(
            e,
            RedisError::Server {
                code: "FENCED".into(),
                detail: "max seq is 41".into()
            }
        );
        assert!(!e.is_retryable());
        assert!(conn.is_connected());
    });
}

#[test]
fn presence_add_refresh_remove_read() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let conn = connect(&server).await;
        let now = now_ms();
        let mut b = PresenceBatch::new();
        b.set_online("u1", "phone", now + 10_000);
        b.set_online("u1", "pc", now + 20_000);
        b.set_online("u2", "pad", now - 1); // already expired
        b.send(&conn, now).await.unwrap();
        let online = online_devices(&conn, &["u1", "u2", "u3"], now)
            .await
            .unwrap();
        assert_eq!(
            online,
            vec![vec!["phone".to_string(), "pc".to_string()], vec![], vec![]]
        );
        // The expired device was pruned, so u2's key is gone.
        let exists = conn
            .cmd(redis::cmd("EXISTS").arg(online_key("u2")))
            .await
            .unwrap();
        assert_eq!(exists, Value::Int(0));
        // The key expires with its newest device.
        let pttl = conn
            .cmd(redis::cmd("PTTL").arg(online_key("u1")))
            .await
            .unwrap();
        assert!(
            matches!(pttl, Value::Int(ms) if ms > 15_000 && ms <= 20_000),
            "{pttl:?}"
        );

        // A refresh moves the expiry; a close removes the device.
        let mut b = PresenceBatch::new();
        b.set_online("u1", "phone", now + 30_000);
        b.set_offline("u1", "pc");
        b.send(&conn, now).await.unwrap();
        let score = conn
            .cmd(redis::cmd("ZSCORE").arg(online_key("u1")).arg("phone"))
            .await
            .unwrap();
        assert_eq!(score, Value::BulkString((now + 30_000).to_string().into()));
        let online = online_devices(&conn, &["u1"], now).await.unwrap();
        assert_eq!(online, vec![vec!["phone".to_string()]]);
        // Seen from later than its expiry, the device is offline.
        let later = online_devices(&conn, &["u1"], now + 30_000).await.unwrap();
        assert_eq!(later, vec![Vec::<String>::new()]);

        // The writer sends what several tasks stage in one turn as one batch.
        let writer = PresenceWriter::new(conn.clone());
        let zadds_before = command_calls(&conn, "zadd").await;
        let writes_before = conn.stats().writes;
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let writer = writer.clone();
                monoio::spawn(async move {
                    writer.set_online(&format!("w{i}"), "phone", now_ms() + 60_000);
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        monoio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            conn.stats().writes - writes_before,
            1,
            "one batch, one write"
        );
        assert_eq!(writer.failed_batches(), 0);
        assert_eq!(command_calls(&conn, "zadd").await - zadds_before, 50);
        let users: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let online = online_devices(&conn, &users, now_ms()).await.unwrap();
        assert!(
            online.iter().all(|d| d == &["phone".to_string()]),
            "{online:?}"
        );
    });
}

#[test]
fn auth_and_db_come_from_the_url() {
    let Some(server) = RedisServer::start_with(&["--requirepass", "s3cret"]) else {
        return;
    };
    run(async {
        let mut c = server.quick_config();
        c.url = format!("redis://:s3cret@127.0.0.1:{}/2", server.port);
        let conn = RedisConn::connect(c.clone(), Duration::from_secs(5))
            .await
            .unwrap();
        let info = conn.cmd(redis::cmd("CLIENT").arg("INFO")).await.unwrap();
        let Value::BulkString(info) = info else {
            panic!("{info:?}")
        };
        let info = String::from_utf8(info).unwrap();
        assert!(info.contains(" db=2 "), "{info}");

        c.url = format!("redis://:not-the-password@127.0.0.1:{}/2", server.port);
        let e = RedisConn::connect(c, Duration::from_millis(300))
            .await
            .err()
            .expect("a wrong password is refused");
        assert!(matches!(e, RedisError::Handshake(_)), "{e}");
        assert!(!e.is_retryable());
        assert!(!e.to_string().contains("not-the-password"), "{e}");
    });
}

#[test]
fn a_bad_url_is_refused_at_start() {
    run(async {
        let e = RedisConn::start(RedisConfig::new("http://127.0.0.1:1/"))
            .err()
            .expect("not a redis url");
        assert!(matches!(e, RedisError::BadUrl(_)), "{e}");
        assert!(!e.is_retryable());
    });
}

#[test]
fn dropping_the_last_handle_closes_the_connection() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let watcher = connect(&server).await;
        let clients = async || match watcher.cmd(redis::cmd("CLIENT").arg("LIST")).await {
            Ok(Value::BulkString(list)) => list
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count(),
            other => panic!("CLIENT LIST answered {other:?}"),
        };
        let conn = connect(&server).await;
        let clone = conn.clone();
        assert_eq!(clients().await, 2);
        drop(conn);
        assert_eq!(
            clone.cmd(&redis::cmd("PING")).await.unwrap(),
            Value::SimpleString("PONG".into())
        );
        drop(clone);
        let closed = eventually(Duration::from_secs(2), async || clients().await == 1).await;
        assert!(closed, "the dropped connection is still open");
    });
}
