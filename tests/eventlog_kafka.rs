//! The Kafka event log against a real Kafka-compatible broker: tansu
//! (`cargo install tansu --locked --features dynostore`; `.ci/run` installs it), one per
//! test on a free loopback port with in-memory storage, stopped by PID.
//!
//! When tansu is missing these tests fail, saying so, unless `IMSHARD_SKIP_KAFKA=1`
//! is set (then they print SKIPPED and pass).
//!
//! The measurement (records/s, append-to-confirmation p50/p99) is an ignored test:
//! `cargo test --release --test eventlog_kafka -- --ignored --nocapture measure`
//! (`IMSHARD_BENCH_LINGER_MS=N` sets librdkafka's linger.ms; default 0).

#[path = "common/redis_server.rs"]
mod redis_server;

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use imshard::eventlog::record::{self, Origin};
use imshard::eventlog::{
    AppendError, EventLog, EventLogConfig, KafkaLog, Outbox, OutboxPump, PumpConfig, Topic,
};
use imshard::proto::events_pb::{event::Body, Event};
use imshard::proto::pb::MsgItem;
use imshard::rt::bell::Bell;
use imshard::store::redis::outbox::{outbox_key, xadd, RedisOutbox};
use imshard::store::redis::{RedisConfig, RedisConn};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

/// How long a test waits for something that should happen within milliseconds; only a
/// bound against hanging, never a measurement.
const PATIENCE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------- the broker

/// A tansu broker on its own port, in memory, stopped (by PID) when dropped.
///
/// Clients reach it through [`Proxy`] (tansu advertises the proxy's port), so a test
/// can cut every client off, restart the broker, create its topics (with tansu's CLI,
/// straight to the broker) and only then let clients back. Without that, a client
/// reconnecting to a restarted in-memory tansu before its topics exist again gets its
/// records acknowledged and dropped (tansu 0.6 acknowledges a produce to an unknown
/// topic; a Kafka broker answers UNKNOWN_TOPIC_OR_PARTITION and the producer retries).
struct Tansu {
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
    fn start(topics: &[&str]) -> Option<Tansu> {
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
    fn start_direct(topics: &[&str]) -> Option<Tansu> {
        let mut t = Tansu::start(topics)?;
        t.stop();
        t.direct = true;
        t.spawn();
        Some(t)
    }

    /// What clients connect to (the proxy, unless direct).
    fn brokers(&self) -> String {
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
    fn stop(&mut self) {
        self.proxy.set_open(false);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new broker (memory storage: it starts empty) with the topics again, then lets
    /// clients back in.
    fn restart(&mut self) {
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

// ---------------------------------------------------------------- helpers

fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>> {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("io_uring runtime")
}

const PARTITIONS: i32 = 4;

fn config(brokers: &str, topic: &str, offline: &str) -> EventLogConfig {
    EventLogConfig {
        brokers: EventLogConfig::parse_brokers(brokers).expect("brokers"),
        topic: topic.into(),
        offline_topic: offline.into(),
        node: "test".into(),
        retry_backoff: Duration::from_millis(200),
        ..EventLogConfig::default()
    }
}

/// Starts the producer for one shard and its [`EventLog`] on the current runtime, with
/// the bell listener a shard runs.
fn start_log(cfg: &EventLogConfig) -> (KafkaLog, EventLog) {
    // IMSHARD_TEST_LOG=imshard=debug shows librdkafka's log and the log's warnings.
    if let Ok(filter) = std::env::var("IMSHARD_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let bell = Arc::new(Bell::new().expect("eventfd"));
    let (kafka, mut links) = KafkaLog::start(cfg, vec![bell.clone()]).expect("producer");
    let log = EventLog::new(links.remove(0));
    let l = log.clone();
    monoio::spawn(async move {
        bell.listen(|| l.wake_local()).await;
    });
    (kafka, log)
}

/// Waits (bounded by [`PATIENCE`]) until the cursor reaches `pos`.
async fn delivered(log: &EventLog, pos: u64) -> bool {
    monoio::select! {
        _ = log.wait_delivered(pos) => true,
        _ = monoio::time::sleep(PATIENCE) => false,
    }
}

/// One consumed record.
#[derive(Debug, Clone)]
struct Got {
    partition: i32,
    key: Vec<u8>,
    event: Event,
}

/// Reads `topic` from the beginning of every partition until `want` records came
/// (panics after [`PATIENCE`]); returns them in partition order, each partition in
/// offset order.
fn consume(brokers: &str, topic: &str, want: usize) -> Vec<Got> {
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

fn origin() -> Origin {
    Origin {
        node: "test".into(),
        shard: 0,
    }
}

fn msg(conv: &str, seq: i64) -> MsgItem {
    MsgItem {
        msg_id: format!("{conv}-m{seq}"),
        client_msg_id: format!("c{seq}"),
        conv_id: conv.into(),
        seq,
        from_uuid: "alice".into(),
        content: format!(r#"{{"text":"message {seq} of {conv}"}}"#),
        send_time: 1_700_000_000_000 + seq,
        ..MsgItem::default()
    }
}

/// Checks that the events of each conversation are its messages 1..=n, in seq order,
/// all on one partition, with the content as stored.
fn assert_in_order(got: &[Got], convs: &[&str], n: i64) {
    for conv in convs {
        let mine: Vec<&Got> = got.iter().filter(|g| g.key == conv.as_bytes()).collect();
        let seqs: Vec<i64> = mine.iter().map(|g| g.event.seq).collect();
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "seqs of {conv}");
        let partition = mine[0].partition;
        assert!(
            mine.iter().all(|g| g.partition == partition),
            "{conv} on one partition"
        );
        for g in mine {
            assert_eq!(g.event.conv_id, *conv);
            let Some(Body::Stored(s)) = &g.event.body else {
                panic!("not a MessageStored: {:?}", g.event.body);
            };
            assert_eq!(s.msg.as_ref(), Some(&msg(conv, g.event.seq)));
        }
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn events_of_two_conversations_arrive_in_seq_order_with_their_content() {
    let Some(tansu) = Tansu::start(&["t.events", "t.offline"]) else {
        return;
    };
    let brokers = tansu.brokers();
    runtime().block_on(async move {
        let (_kafka, log) = start_log(&config(&brokers, "t.events", "t.offline"));
        let convs = ["p2p:alice:bob", "grp:g1"];
        let n = 200;
        for seq in 1..=n {
            for conv in convs {
                let r = record::message_stored(&origin(), &msg(conv, seq));
                log.append(r.topic, &r.key, r.value).expect("append");
            }
            if seq % 50 == 0 {
                // Several loop turns, several batches.
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let push = record::offline_push(&origin(), "bob", &msg("p2p:alice:bob", 1));
        let last = log
            .append(push.topic, &push.key, push.value)
            .expect("append");
        assert!(
            delivered(&log, last).await,
            "not delivered: {:?}",
            log.stats()
        );
        let s = log.stats();
        assert_eq!(
            (s.appended, s.produced, s.backlog),
            (2 * n as u64 + 1, 2 * n as u64 + 1, 0)
        );
        assert_eq!(s.failed, 0);

        let got = consume(&brokers, "t.events", 2 * n as usize);
        assert_in_order(&got, &convs, n);
        let offline = consume(&brokers, "t.offline", 1);
        assert_eq!(offline[0].key, b"bob");
        let Some(Body::OfflinePush(p)) = &offline[0].event.body else {
            panic!("not an OfflinePush");
        };
        assert_eq!(
            (p.user.as_str(), p.seq, p.sender.as_str()),
            ("bob", 1, "alice")
        );
        assert_eq!(p.preview, "message 1 of p2p:alice:bob");
    });
}

#[test]
fn broker_down_backlog_is_reported_capped_and_produced_after_it_returns() {
    let Some(mut tansu) = Tansu::start(&["d.events", "d.offline"]) else {
        return;
    };
    let brokers = tansu.brokers();
    let mut rt = runtime();
    rt.block_on(async {
        let mut cfg = config(&brokers, "d.events", "d.offline");
        cfg.max_records = 100;
        let (_kafka, log) = start_log(&cfg);
        let conv = "p2p:carol:dave";
        let mut last = 0;
        for seq in 1..=10 {
            let r = record::message_stored(&origin(), &msg(conv, seq));
            last = log.append(r.topic, &r.key, r.value).expect("append");
        }
        assert!(delivered(&log, last).await, "first 10: {:?}", log.stats());

        tansu.stop();
        for seq in 11..=60 {
            let r = record::message_stored(&origin(), &msg(conv, seq));
            log.append(r.topic, &r.key, r.value).expect("append");
        }
        // Give librdkafka time to try: nothing may be reported delivered.
        monoio::time::sleep(Duration::from_millis(500)).await;
        let s = log.stats();
        assert_eq!(s.delivered_pos, 10, "{s:?}");
        assert_eq!(s.backlog, 50, "{s:?}");
        // The cap: 100 records not yet in Kafka; the 101st is refused, not dropped.
        for seq in 61..=110 {
            let r = record::message_stored(&origin(), &msg(conv, seq));
            last = log.append(r.topic, &r.key, r.value).expect("append");
        }
        let r = record::message_stored(&origin(), &msg(conv, 111));
        assert_eq!(
            log.append(r.topic, &r.key, r.value),
            Err(AppendError::Backlog {
                records: 100,
                bytes: log.stats().backlog_bytes as usize
            })
        );
        assert_eq!(log.stats().refused, 1);
        assert_eq!(log.room(), 0);

        // A new broker (memory storage: empty) on the same port; the topic again.
        tansu.restart();
        assert!(
            delivered(&log, last).await,
            "after restart: {:?}",
            log.stats()
        );
        let s = log.stats();
        assert_eq!((s.backlog, s.delivered_pos), (0, 110), "{s:?}");
        // What was pending arrives, in order (the first 10 went with the old broker).
        let got = consume(&brokers, "d.events", 100);
        let seqs: Vec<i64> = got.iter().map(|g| g.event.seq).collect();
        let mut dedup = seqs.clone();
        dedup.dedup();
        assert_eq!(dedup, (11..=110).collect::<Vec<_>>(), "{seqs:?}");
    });
}

/// The outbox written in the store's atomic round, drained by the pump; a crash
/// (producer and pump dropped while Kafka is down) loses nothing: the next pump
/// produces what is left, then the outbox is empty.
#[test]
fn outbox_entries_survive_a_crash_while_kafka_is_down_and_are_produced_after() {
    let Some(mut tansu) = Tansu::start(&["o.events", "o.offline"]) else {
        return;
    };
    let Some(redis) = redis_server::RedisServer::start() else {
        return;
    };
    let brokers = tansu.brokers();
    runtime().block_on(async {
        let cfg = config(&brokers, "o.events", "o.offline");
        let conn = RedisConn::connect(RedisConfig::new(redis.url()), PATIENCE)
            .await
            .expect("redis");
        let key = outbox_key("test", 0);
        let conv = "grp:outbox";
        // What the store does: each event in the same MULTI/EXEC as its data.
        let store_round = |seqs: std::ops::RangeInclusive<i64>| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for seq in seqs {
                let m = msg(conv, seq);
                pipe.add_command(
                    redis::cmd("HSET")
                        .arg(format!("im:{{{conv}}}:m"))
                        .arg(seq)
                        .arg(m.encode_to_vec())
                        .clone(),
                );
                let r = record::message_stored(&origin(), &m);
                pipe.add_command(xadd(&key, r.topic, &r.key, &r.value));
            }
            pipe
        };

        // Run 1: 20 events produced and trimmed.
        {
            let (_kafka, log) = start_log(&cfg);
            let outbox = RedisOutbox::new(conn.clone(), key.clone());
            let pump = OutboxPump::start(outbox.clone(), log.clone(), fast_pump());
            conn.pipeline(&store_round(1..=20)).await.expect("round");
            pump.notify();
            wait_until(|| pump.stats().trimmed == 20).await;
            assert_eq!(outbox.stored().await, Ok(0));
            pump.stop();
        }

        // Run 2: Kafka down; 30 more events stored; the process holds at most 10 in
        // memory (its cap), the rest wait in the outbox; then it "crashes" (producer
        // and pump dropped) before any of them is in Kafka.
        tansu.stop();
        {
            let mut capped = cfg.clone();
            capped.max_records = 10;
            let (_kafka, log) = start_log(&capped);
            let outbox = RedisOutbox::new(conn.clone(), key.clone());
            let pump = OutboxPump::start(outbox.clone(), log.clone(), fast_pump());
            conn.pipeline(&store_round(21..=50)).await.expect("round");
            pump.notify();
            wait_until(|| pump.stats().read == 10 && pump.stats().held_back > 0).await;
            monoio::time::sleep(Duration::from_millis(300)).await;
            let (s, p) = (log.stats(), pump.stats());
            assert_eq!((s.backlog, s.delivered_pos), (10, 0), "{s:?}");
            assert_eq!((p.read, p.trimmed, p.in_flight), (10, 0, 10), "{p:?}");
            assert_eq!(outbox.stored().await, Ok(30));
            pump.stop();
        }

        // Run 3: Kafka is back; a new process's pump produces the 30 from the outbox.
        tansu.restart();
        let (_kafka, log) = start_log(&cfg);
        let outbox = RedisOutbox::new(conn.clone(), key.clone());
        let pump = OutboxPump::start(outbox.clone(), log.clone(), fast_pump());
        wait_until(|| pump.stats().trimmed == 30).await;
        assert_eq!(outbox.stored().await, Ok(0));
        let got = consume(&brokers, "o.events", 30);
        let seqs: Vec<i64> = got.iter().map(|g| g.event.seq).collect();
        assert_eq!(seqs, (21..=50).collect::<Vec<_>>());
        pump.stop();
    });
}

/// A record Kafka cannot take (over `message.max.bytes`) is counted as failed, kept
/// and retried; the cursor stops before it while later records are delivered.
#[test]
fn a_record_that_fails_is_retried_and_holds_the_cursor() {
    let Some(tansu) = Tansu::start(&["f.events", "f.offline"]) else {
        return;
    };
    let brokers = tansu.brokers();
    runtime().block_on(async move {
        let mut cfg = config(&brokers, "f.events", "f.offline");
        cfg.kafka_properties
            .push(("message.max.bytes".into(), "2000".into()));
        let (_kafka, log) = start_log(&cfg);
        let small = |seq| record::message_stored(&origin(), &msg("p2p:x:y", seq));
        let r = small(1);
        let first = log.append(r.topic, &r.key, r.value).expect("append");
        let big = log
            .append(Topic::Events, b"p2p:x:y", Bytes::from(vec![b'x'; 5000]))
            .expect("append");
        let r = small(2);
        let after = log.append(r.topic, &r.key, r.value).expect("append");
        assert!(delivered(&log, first).await);
        wait_until(|| {
            let s = log.stats();
            s.retried >= 2 && s.produced == 2
        })
        .await;
        let s = log.stats();
        assert_eq!(s.delivered_pos, first, "{s:?}");
        assert_eq!(s.backlog, after - first, "{s:?}");
        assert!(s.failed >= 2, "{s:?}");
        assert_eq!(big, first + 1);
    });
}

/// The backlog kept at a tiny cap, refilled as soon as anything is confirmed: every
/// append must still go out (a record confirmed while the producer thread had not yet
/// taken it off the ring once let the shard overfill the ring and lose an append).
#[test]
fn a_backlog_kept_at_its_cap_loses_no_append() {
    let Some(tansu) = Tansu::start(&["c.events", "c.offline"]) else {
        return;
    };
    let brokers = tansu.brokers();
    runtime().block_on(async move {
        let mut cfg = config(&brokers, "c.events", "c.offline");
        cfg.max_records = 4;
        let (_kafka, log) = start_log(&cfg);
        let total = 5_000u64;
        let mut seq = 0u64;
        let mut progress = (0, Instant::now());
        while seq < total {
            let d = log.delivered();
            if d != progress.0 {
                progress = (d, Instant::now());
            }
            assert!(progress.1.elapsed() < PATIENCE, "stuck: {:?}", log.stats());
            for _ in 0..log.room() {
                seq += 1;
                let r = record::message_stored(&origin(), &msg("grp:cap", seq as i64));
                log.append(r.topic, &r.key, r.value)
                    .expect("room was there");
            }
            imshard::rt::yield_now().await;
        }
        assert!(delivered(&log, total).await, "{:?}", log.stats());
        let s = log.stats();
        assert_eq!((s.appended, s.produced, s.backlog), (total, total, 0));
        let got = consume(&brokers, "c.events", total as usize);
        let seqs: Vec<i64> = got.iter().map(|g| g.event.seq).collect();
        assert_eq!(seqs, (1..=total as i64).collect::<Vec<_>>());
    });
}

fn fast_pump() -> PumpConfig {
    PumpConfig {
        poll_interval: Duration::from_millis(50),
        error_backoff: Duration::from_millis(50),
        ..PumpConfig::default()
    }
}

async fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "condition not reached");
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Records/s to tansu and append->confirmation latency; prints, asserts only that
/// everything arrived. `cargo test --release --test eventlog_kafka -- --ignored
/// --nocapture measure`.
#[test]
#[ignore]
fn measure_throughput_and_confirmation_latency() {
    let Some(tansu) = Tansu::start_direct(&["m.events", "m.offline"]) else {
        return;
    };
    let brokers = tansu.brokers();
    runtime().block_on(async move {
        let mut cfg = config(&brokers, "m.events", "m.offline");
        if let Some(ms) = std::env::var("IMSHARD_BENCH_LINGER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            cfg.linger_ms = ms;
        }
        let linger = cfg.linger_ms;
        let (kafka, log) = start_log(&cfg);
        let convs: Vec<String> = (0..64).map(|i| format!("grp:bench{i}")).collect();
        let value = record::message_stored(&origin(), &msg("grp:bench0", 1)).value;
        let bytes = value.len();

        // Throughput: 200k records, appended as fast as the cap allows.
        let total = 200_000u64;
        let start = Instant::now();
        let mut seq = 0u64;
        let mut progress = (0, Instant::now());
        while seq < total {
            let d = log.delivered();
            if d != progress.0 {
                progress = (d, Instant::now());
            }
            assert!(
                progress.1.elapsed() < PATIENCE,
                "stuck: {:?}, librdkafka holds {}",
                log.stats(),
                kafka.in_flight()
            );
            let room = log.room() as u64;
            let n = room.min(total - seq).min(4096);
            for _ in 0..n {
                seq += 1;
                let conv = &convs[(seq % 64) as usize];
                log.append(Topic::Events, conv.as_bytes(), value.clone())
                    .expect("append");
            }
            monoio::time::sleep(Duration::from_micros(200)).await;
        }
        assert!(delivered(&log, total).await, "{:?}", log.stats());
        let secs = start.elapsed().as_secs_f64();
        println!(
            "throughput: {total} records of {bytes} B in {secs:.2} s = {:.0} records/s",
            total as f64 / secs
        );

        // Latency: one loop turn of `batch` records at a time, paced, each batch's
        // append->confirmation time.
        for batch in [1u64, 100] {
            let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            for _ in 0..500 {
                let t = Instant::now();
                let mut last = 0;
                for i in 0..batch {
                    last = log
                        .append(Topic::Events, convs[(i % 64) as usize].as_bytes(), value.clone())
                        .expect("append");
                }
                assert!(delivered(&log, last).await);
                hist.record(t.elapsed().as_micros() as u64).expect("record");
                monoio::time::sleep(Duration::from_millis(2)).await;
            }
            println!(
                "latency append->confirmed, {batch} records per turn (linger.ms={linger}): p50 {} us, p99 {} us, max {} us",
                hist.value_at_quantile(0.5),
                hist.value_at_quantile(0.99),
                hist.max()
            );
        }
        // Everything acknowledged is in the topic (read back; tansu's high watermarks
        // lag behind what it serves, so they are not used).
        let produced = log.stats().produced as usize;
        let got = consume(&brokers, "m.events", produced);
        assert_eq!(got.len(), produced);
        println!("records read back from the topic: {}", got.len());
    });
}

/// The durable path: events written with their round (`MULTI`/`EXEC` with `XADD`),
/// produced by the pump and trimmed. Prints entries/s through it and the time from a
/// round being durable to its entries being trimmed (= in Kafka). `cargo test
/// --release --test eventlog_kafka -- --ignored --nocapture measure_outbox`.
#[test]
#[ignore]
fn measure_outbox_path() {
    let Some(tansu) = Tansu::start_direct(&["mo.events", "mo.offline"]) else {
        return;
    };
    let Some(redis) = redis_server::RedisServer::start() else {
        return;
    };
    let brokers = tansu.brokers();
    runtime().block_on(async move {
        let conn = RedisConn::connect(RedisConfig::new(redis.url()), PATIENCE)
            .await
            .expect("redis");
        let key = outbox_key("bench", 0);
        let (_kafka, log) = start_log(&config(&brokers, "mo.events", "mo.offline"));
        let outbox = RedisOutbox::new(conn.clone(), key.clone());
        let pump = OutboxPump::start(outbox.clone(), log.clone(), PumpConfig::default());
        let value = record::message_stored(&origin(), &msg("grp:bench0", 1)).value;
        let round = |n: usize, first: usize| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for i in first..first + n {
                let conv = format!("grp:bench{}", i % 64);
                pipe.add_command(xadd(&key, Topic::Events, conv.as_bytes(), &value));
            }
            pipe
        };

        // Throughput: 100,000 entries in rounds of 100, as fast as Redis takes them.
        let total = 100_000usize;
        let start = Instant::now();
        for r in 0..total / 100 {
            conn.pipeline(&round(100, r * 100)).await.expect("round");
            pump.notify();
        }
        wait_until(|| pump.stats().trimmed == total as u64).await;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "outbox path: {total} entries written, produced and trimmed in {secs:.2} s = {:.0} entries/s",
            total as f64 / secs
        );

        // Latency: a round of 10 durable -> its entries in Kafka.
        let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
        let mut done = total as u64;
        for r in 0..300 {
            conn.pipeline(&round(10, r * 10)).await.expect("round");
            let t = Instant::now();
            pump.notify();
            done += 10;
            // Spins on the loop (a timer would round to its 1 ms tick).
            while pump.stats().read < done {
                imshard::rt::yield_now().await;
            }
            assert!(delivered(&log, log.last_appended()).await);
            hist.record(t.elapsed().as_micros() as u64).expect("record");
            monoio::time::sleep(Duration::from_millis(2)).await;
        }
        println!(
            "outbox path latency, round of 10 durable -> in Kafka: p50 {} us, p99 {} us, max {} us",
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.99),
            hist.max()
        );
        wait_until(|| pump.stats().trimmed == done).await;
        assert_eq!(outbox.stored().await, Ok(0));
        pump.stop();
    });
}
