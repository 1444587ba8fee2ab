//! A real Kafka-compatible broker for tests: tansu
//! (`cargo install tansu --locked --features dynostore`; `.ci/run` installs it) on a
//! free loopback port with in-memory storage, behind a proxy that can cut clients off,
//! stopped by PID; and a consumer that reads a topic back.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imshard::proto::events_pb::Event;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

/// How long a test waits for something that should happen within milliseconds; only a
/// bound against hanging, never a measurement.
pub const PARTITIONS: i32 = 4;

pub const PATIENCE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------- the broker

/// A tansu broker on its own port, in memory, stopped (by PID) when dropped.
///
/// Clients reach it through [`Proxy`] (tansu advertises the proxy's port), so a test
/// can cut every client off, restart the broker, create its topics (with tansu's CLI,
/// straight to the broker) and only then let clients back. Without that, a client
/// reconnecting to a restarted in-memory tansu before its topics exist again gets its
/// records acknowledged and dropped (tansu 0.6 acknowledges a produce to an unknown
/// topic; a Kafka broker answers UNKNOWN_TOPIC_OR_PARTITION and the producer retries).
pub struct Tansu {
    bin: String,
    /// The broker's own port.
    port: u16,
    proxy: Proxy,
    child: Option<Child>,
    topics: Vec<String>,
    direct: bool,
}

fn tansu_bin() -> Option<String> {
    let mut candidates = vec!["tansu".to_string()];
    if let Ok(home) = std::env::var("HOME") {
        candidates.push(format!("{home}/.cargo/bin/tansu"));
    }
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Tansu {
    /// A broker with `topics` (each [`PARTITIONS`] partitions), or `None` (after
    /// saying SKIPPED) when tansu is missing and `IMSHARD_SKIP_KAFKA=1`. Panics when
    /// tansu is missing otherwise.
    pub fn start(topics: &[&str]) -> Option<Tansu> {
        let Some(bin) = tansu_bin() else {
            if std::env::var("IMSHARD_SKIP_KAFKA").is_ok_and(|v| v == "1") {
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED (IMSHARD_SKIP_KAFKA=1): tansu is not installed"
                );
                return None;
            }
            panic!(
                "tansu (the Kafka-compatible test broker) is not installed: run \
                 `cargo install tansu --locked --features dynostore` (.ci/run does), or set \
                 IMSHARD_SKIP_KAFKA=1 to skip the Kafka tests"
            );
        };
        let port = free_port();
        let mut t = Tansu {
            bin,
            port,
            proxy: Proxy::start(port),
            child: None,
            topics: topics.iter().map(|s| s.to_string()).collect(),
            direct: false,
        };
        t.spawn();
        t.proxy.set_open(true);
        Some(t)
    }

    /// The same without the proxy (clients straight to the broker), for measuring.
    pub fn start_direct(topics: &[&str]) -> Option<Tansu> {
        let mut t = Tansu::start(topics)?;
        t.stop();
        t.direct = true;
        t.spawn();
        Some(t)
    }

    /// What clients connect to (the proxy, unless direct).
    pub fn brokers(&self) -> String {
        let port = if self.direct {
            self.port
        } else {
            self.proxy.port
        };
        format!("127.0.0.1:{port}")
    }

    fn spawn(&mut self) {
        let listen = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://{}", self.brokers());
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &listen,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                "memory://tansu/",
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu on port {} did not come up",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for topic in &self.topics {
            let status = Command::new(&self.bin)
                .args(["topic", "create", "--broker", &listen, "--partitions"])
                .arg(PARTITIONS.to_string())
                .arg(topic)
                .stdout(Stdio::null())
                .status()
                .expect("tansu topic create");
            assert!(status.success(), "tansu topic create {topic}: {status}");
        }
    }

    /// Cuts every client off and kills the broker (SIGKILL by PID).
    pub fn stop(&mut self) {
        self.proxy.set_open(false);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new broker (memory storage: it starts empty) with the topics again, then lets
    /// clients back in.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.proxy.set_open(true);
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP forwarder in front of the broker: while closed it drops every connection
/// and refuses new ones (they are accepted and closed at once).
struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let open = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        {
            let open = open.clone();
            let conns = conns.clone();
            // Lives until the test process ends (blocked in accept when idle).
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    if !open.load(Ordering::SeqCst) {
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                        client.try_clone(),
                        server.try_clone(),
                        client.try_clone(),
                        server.try_clone(),
                    ) else {
                        continue;
                    };
                    if let Ok(mut list) = conns.lock() {
                        list.push(c3);
                        list.push(s3);
                    }
                    pipe(client, server);
                    pipe(s2, c2);
                }
            });
        }
        Proxy { port, open, conns }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
        if !open {
            if let Ok(mut list) = self.conns.lock() {
                for s in list.drain(..) {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// Copies `from` to `to` on a thread until either side closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Got {
    pub partition: i32,
    pub key: Vec<u8>,
    pub event: Event,
}

/// Reads `topic` from the beginning of every partition until `want` records came
/// (panics after [`PATIENCE`]); returns them in partition order, each partition in
/// offset order.
pub fn consume(brokers: &str, topic: &str, want: usize) -> Vec<Got> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "imshard-eventlog-test")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(20))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("partition");
        }
    }
    assert!(tpl.count() > 0, "topic {topic} has no partitions");
    consumer.assign(&tpl).expect("assign");
    let mut by_partition: HashMap<i32, Vec<(i64, Got)>> = HashMap::new();
    let mut n = 0;
    let deadline = Instant::now() + PATIENCE;
    while n < want {
        assert!(
            Instant::now() < deadline,
            "consumed {n} of {want} records of {topic}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let event = Event::decode(m.payload().unwrap_or_default()).expect("an Event");
                by_partition.entry(m.partition()).or_default().push((
                    m.offset(),
                    Got {
                        partition: m.partition(),
                        key: m.key().unwrap_or_default().to_vec(),
                        event,
                    },
                ));
                n += 1;
            }
            Some(Err(e)) => panic!("consume {topic}: {e}"),
            None => {}
        }
    }
    let mut parts: Vec<_> = by_partition.into_iter().collect();
    parts.sort_by_key(|(p, _)| *p);
    parts
        .into_iter()
        .flat_map(|(_, mut v)| {
            v.sort_by_key(|(o, _)| *o);
            v.into_iter().map(|(_, g)| g)
        })
        .collect()
}
