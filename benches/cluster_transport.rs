//! Node-to-node transport on loopback, the measurement behind the choice in
//! `src/cluster/mod.rs`: a request from node A to node B and B's reply, 64-byte
//! payloads, A and B each a monoio runtime on its own thread.
//!
//! - `link`: direct TCP, `cluster::link` (length-prefixed frames, correlation ids).
//! - `pubsub`: through Redis: A publishes the request on B's channel
//!   (`imshard:node:b`), B (a `PubSubConn` on it) publishes the reply on A's channel,
//!   which A's `PubSubConn` receives. Both publish over an ordinary `RedisConn`.
//!
//! For each: latency of one request at a time (p50/p99/p99.9 of 20,000) and
//! throughput with 256 requests in flight (200,000 requests). Needs `redis-server`
//! (started on a free port by the bench, no persistence).
//!
//! Run: `cargo bench --bench cluster_transport`.

#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use imshard::cluster::link::{LinkConfig, LinkServer, Links};
use imshard::cluster::NodeId;
use imshard::store::redis::{publish, PubSubConn, PubSubEvent, RedisConfig, RedisConn};
use local_sync::oneshot;

const PAYLOAD: usize = 64;
const LATENCY_REQUESTS: usize = 20_000;
const THROUGHPUT_REQUESTS: usize = 200_000;
const IN_FLIGHT: usize = 256;

fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>> {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("monoio runtime")
}

/// Runs node B's side on its own thread until the returned flag is set.
fn node_b<F, Fut>(serve: F) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>, String)
where
    F: FnOnce(mpsc::Sender<String>) -> Fut + Send + 'static,
    Fut: Future<Output = Box<dyn std::any::Any>>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        runtime().block_on(async move {
            let keep = serve(tx).await;
            while !flag.load(Ordering::SeqCst) {
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
            drop(keep);
        })
    });
    let ready = rx.recv().expect("node b ready");
    (stop, thread, ready)
}

/// Latency of sequential requests and throughput with `IN_FLIGHT` concurrent ones.
async fn measure<F, Fut>(name: &str, request: F)
where
    F: Fn(u64) -> Fut + Clone + 'static,
    Fut: Future<Output = ()>,
{
    for i in 0..1000 {
        request(i).await;
    }
    let mut rtt = Vec::with_capacity(LATENCY_REQUESTS);
    for i in 0..LATENCY_REQUESTS as u64 {
        let t = Instant::now();
        request(i).await;
        rtt.push(t.elapsed());
    }
    rtt.sort();
    let pct = |p: f64| rtt[((rtt.len() as f64 * p) as usize).min(rtt.len() - 1)];
    let mean = rtt.iter().sum::<Duration>() / rtt.len() as u32;

    let t = Instant::now();
    let per_task = THROUGHPUT_REQUESTS / IN_FLIGHT;
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|k| {
            let request = request.clone();
            monoio::spawn(async move {
                for i in 0..per_task {
                    request((k * per_task + i) as u64).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await;
    }
    let elapsed = t.elapsed();
    let rate = (per_task * IN_FLIGHT) as f64 / elapsed.as_secs_f64();
    println!(
        "{name:<8} round trip p50 {:>6.1} us  p99 {:>6.1} us  p99.9 {:>6.1} us  mean {:>6.1} us | {IN_FLIGHT} in flight: {:>8.0} req/s",
        pct(0.5).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        pct(0.999).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
        rate
    );
}

/// The floor: one task per side, a fixed-size frame written and read back on a bare
/// monoio socket, no framework.
fn bench_raw() {
    use monoio::io::{AsyncReadRentExt, AsyncWriteRentExt};
    const FRAME: usize = 13 + PAYLOAD;
    let (stop, thread, addr) = node_b(|ready| async move {
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        ready
            .send(listener.local_addr().unwrap().to_string())
            .unwrap();
        let (mut s, _) = listener.accept().await.expect("accept");
        s.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; FRAME];
        loop {
            let (res, b) = s.read_exact(buf).await;
            if res.is_err() {
                break;
            }
            let (res, b) = s.write_all(b).await;
            if res.is_err() {
                break;
            }
            buf = b;
        }
        Box::new(()) as Box<dyn std::any::Any>
    });
    runtime().block_on(async {
        let mut s = monoio::net::TcpStream::connect(addr.as_str()).await.expect("connect");
        s.set_nodelay(true).unwrap();
        let mut buf = vec![b'x'; FRAME];
        let mut rtt = Vec::with_capacity(LATENCY_REQUESTS);
        for i in 0..LATENCY_REQUESTS + 1000 {
            let t = Instant::now();
            let (res, b) = s.write_all(buf).await;
            res.expect("write");
            let (res, b) = s.read_exact(b).await;
            res.expect("read");
            buf = b;
            if i >= 1000 {
                rtt.push(t.elapsed());
            }
        }
        rtt.sort();
        println!(
            "raw      round trip p50 {:>6.1} us  p99 {:>6.1} us (one frame at a time, no framework)",
            rtt[rtt.len() / 2].as_secs_f64() * 1e6,
            rtt[rtt.len() * 99 / 100].as_secs_f64() * 1e6
        );
    });
    stop.store(true, Ordering::SeqCst);
    thread.join().expect("node b");
}

fn bench_link() {
    let (stop, thread, addr) = node_b(|ready| async move {
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = LinkServer::start(
            listener,
            NodeId::new("b").unwrap(),
            LinkConfig::default(),
            |payload, r| r.reply(&payload),
        )
        .expect("link server");
        ready.send(server.local_addr().to_string()).unwrap();
        Box::new(server) as Box<dyn std::any::Any>
    });
    runtime().block_on(async {
        let links = Links::new(NodeId::new("a").unwrap(), LinkConfig::default());
        links.set_peers([(NodeId::new("b").unwrap(), addr.parse().unwrap())]);
        let b = NodeId::new("b").unwrap();
        let payload = Bytes::from(vec![b'x'; PAYLOAD]);
        let l = links.clone();
        measure("link", move |_| {
            let (l, b, payload) = (l.clone(), b.clone(), payload.clone());
            async move {
                let reply = l.request(&b, &payload).await.expect("link reply");
                assert_eq!(reply.len(), PAYLOAD);
            }
        })
        .await;
        let s = links.stats();
        println!(
            "link     client: {} requests in {} writes",
            s.requests, s.writes
        );
    });
    stop.store(true, Ordering::SeqCst);
    thread.join().expect("node b");
}

fn bench_pubsub(url: String) {
    let b_url = url.clone();
    let (stop, thread, _) = node_b(move |ready| async move {
        let conn = RedisConn::connect(RedisConfig::new(b_url.clone()), Duration::from_secs(5))
            .await
            .expect("b redis");
        let replier = conn.clone();
        let sub = PubSubConn::start(RedisConfig::new(b_url), move |e| {
            if let PubSubEvent::Message { payload, .. } = e {
                let conn = replier.clone();
                monoio::spawn(async move {
                    publish(&conn, b"imshard:node:a", &payload)
                        .await
                        .expect("publish reply");
                });
            }
        })
        .expect("b pub/sub");
        sub.subscribe(Bytes::from_static(b"imshard:node:b"));
        while !sub.is_confirmed(b"imshard:node:b") {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
        ready.send(String::new()).unwrap();
        Box::new((conn, sub)) as Box<dyn std::any::Any>
    });
    runtime().block_on(async {
        let conn = RedisConn::connect(RedisConfig::new(url.clone()), Duration::from_secs(5))
            .await
            .expect("a redis");
        type Waiting = Rc<RefCell<HashMap<u64, oneshot::Sender<Bytes>>>>;
        let waiting: Waiting = Rc::default();
        let w = waiting.clone();
        let sub = PubSubConn::start(RedisConfig::new(url), move |e| {
            if let PubSubEvent::Message { payload, .. } = e {
                let id = u64::from_be_bytes(payload[..8].try_into().expect("id"));
                if let Some(tx) = w.borrow_mut().remove(&id) {
                    let _ = tx.send(payload);
                }
            }
        })
        .expect("a pub/sub");
        sub.subscribe(Bytes::from_static(b"imshard:node:a"));
        while !sub.is_confirmed(b"imshard:node:a") {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
        let next = Rc::new(std::cell::Cell::new(0u64));
        measure("pubsub", move |_| {
            let (conn, waiting, next) = (conn.clone(), waiting.clone(), next.clone());
            async move {
                let id = next.get();
                next.set(id + 1);
                let mut msg = vec![b'x'; PAYLOAD];
                msg[..8].copy_from_slice(&id.to_be_bytes());
                let (tx, rx) = oneshot::channel();
                waiting.borrow_mut().insert(id, tx);
                let n = publish(&conn, b"imshard:node:b", &msg)
                    .await
                    .expect("publish");
                assert_eq!(n, 1);
                let reply = rx.await.expect("reply");
                assert_eq!(reply.len(), PAYLOAD);
            }
        })
        .await;
        drop(sub);
    });
    stop.store(true, Ordering::SeqCst);
    thread.join().expect("node b");
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would too: only run the
    // measurement when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    println!(
        "cluster transport, loopback, {PAYLOAD}-byte payloads, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    bench_raw();
    bench_link();
    let Some(server) = redis_server::RedisServer::start() else {
        return;
    };
    bench_pubsub(server.url());
    drop(server);
}
