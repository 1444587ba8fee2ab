//! Criterion benchmarks of the Redis driver (`store::redis::RedisConn`) against a real
//! `redis-server` the bench starts on a free loopback port (no persistence):
//!
//! - `redis/ping_round_trip`: one PING call, awaited, on an idle connection.
//! - `redis/ping_raw_socket`: the floor under it: `PING\r\n` written and `+PONG\r\n`
//!   read by one task on its own monoio socket, no driver, no parser.
//! - `redis/pipelined_set/N`: one call of N SETs (100-byte values).
//! - `redis/callers_one_turn/64`: 64 tasks each make one SET call in the same loop
//!   turn (they share one write); per SET.
//!
//! Run: `cargo bench --bench redis -- --warm-up-time 1 --measurement-time 3`.
//! Results and the host they were measured on: `benches/README.md`.

#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use imshard::store::redis::{RedisConfig, RedisConn};

fn redis(c: &mut Criterion) {
    let Some(server) = redis_server::RedisServer::start() else {
        return;
    };
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("monoio runtime");
    let conn = rt
        .block_on(RedisConn::connect(
            RedisConfig::new(server.url()),
            Duration::from_secs(5),
        ))
        .expect("connect to the bench redis");
    let value = vec![b'v'; 100];
    let mut g = c.benchmark_group("redis");

    let ping = redis::cmd("PING");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ping_round_trip", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    conn.cmd(&ping).await.expect("PING");
                }
                t.elapsed()
            })
        })
    });

    let mut raw = rt
        .block_on(monoio::net::TcpStream::connect(("127.0.0.1", server.port)))
        .expect("raw socket");
    g.bench_function("ping_raw_socket", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
                let mut buf = Vec::with_capacity(64);
                let t = Instant::now();
                for _ in 0..iters {
                    let (res, _) = raw.write_all(b"PING\r\n".as_slice()).await;
                    res.expect("write PING");
                    buf.clear();
                    let (res, b) = raw.read(buf).await;
                    buf = b;
                    assert_eq!(res.expect("read PONG"), 7);
                }
                t.elapsed()
            })
        })
    });

    for n in [100usize, 10_000] {
        let sets: Vec<redis::Cmd> = (0..n)
            .map(|i| redis::cmd("SET").arg(format!("k{i}")).arg(&value).clone())
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("pipelined_set", n), &sets, |b, sets| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        conn.cmds(sets).await.expect("SETs");
                    }
                    t.elapsed()
                })
            })
        });
    }

    let callers = 64usize;
    g.throughput(Throughput::Elements(callers as u64));
    g.bench_with_input(
        BenchmarkId::new("callers_one_turn", callers),
        &callers,
        |b, &callers| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        let tasks: Vec<_> = (0..callers)
                            .map(|i| {
                                let conn = conn.clone();
                                let set =
                                    redis::cmd("SET").arg(format!("c{i}")).arg(&value).clone();
                                monoio::spawn(async move { conn.cmd(&set).await })
                            })
                            .collect();
                        for task in tasks {
                            task.await.expect("SET");
                        }
                    }
                    t.elapsed()
                })
            })
        },
    );
    g.finish();
    let stats = conn.stats();
    eprintln!(
        "redis driver: {} commands in {} writes and {} reads",
        stats.commands, stats.writes, stats.reads
    );
    drop(conn);
    drop(server);
}

criterion_group!(benches, redis);
criterion_main!(benches);
