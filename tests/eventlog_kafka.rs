//! The Kafka event log against a real Kafka-compatible broker: tansu
//! (`cargo install tansu --locked --features dynostore`; `.ci/run` installs it), one per
//! test on a free loopback port with in-memory storage, stopped by PID.
//!
//! When tansu is missing these tests fail, saying so, unless `IMSHARD_SKIP_KAFKA=1`
//! is set (then they print SKIPPED and pass).
//!
//! The measurement (records/s, append-to-confirmation p50/p99) is an ignored test:
//! `cargo test --release --test eventlog_kafka -- --ignored --nocapture measure`.

#[path = "common/redis_server.rs"]
mod redis_server;

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

/// How long a test waits for something that should happen within milliseconds; only a
/// bound against hanging, never a measurement.
const PATIENCE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------- the broker

/// A tansu broker on its own port, in memory. Stopped (by PID) when dropped.
struct Tansu {
    bin: String,
    port: u16,
    child: Option<Child>,
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

impl Tansu {
    /// A broker, or `None` (after saying SKIPPED) when tansu is missing and
    /// `IMSHARD_SKIP_KAFKA=1`. Panics when tansu is missing otherwise.
    fn start() -> Option<Tansu> {
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
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut t = Tansu {
            bin,
            port,
            child: None,
        };
        t.spawn();
        Some(t)
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
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
    }

    /// Kills the broker (SIGKILL by PID) and waits for it.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new broker on the same port (memory storage: it starts empty).
    fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- helpers

fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>> {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("io_uring runtime")
}

const PARTITIONS: i32 = 4;

/// Creates `topics` with [`PARTITIONS`] partitions (tansu with memory storage does not
/// keep them across a restart, so tests call this again after one).
async fn create_topics(brokers: &str, topics: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        match admin.create_topics(new.iter(), &opts).await {
            Ok(results) => {
                for r in results {
                    if let Err((name, code)) = r {
                        assert!(
                            code == rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                            "create topic {name}: {code:?}"
                        );
                    }
                }
                return;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "create topics: {e}");
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn config(brokers: &str, topic: &str, offline: &str) -> EventLogConfig {
    EventLogConfig {
        brokers: EventLogConfig::parse_brokers(brokers).expect("brokers"),
        topic: topic.into(),
        offline_topic: offline.into(),
        node: "test".into(),
        linger_ms: 1,
        retry_backoff: Duration::from_millis(200),
        ..EventLogConfig::default()
    }
}

/// Starts the producer for one shard and its [`EventLog`] on the current runtime, with
/// the bell listener a shard runs.
fn start_log(cfg: &EventLogConfig) -> (KafkaLog, EventLog) {
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
    let Some(tansu) = Tansu::start() else { return };
    let brokers = tansu.brokers();
    runtime().block_on(async move {
        create_topics(&brokers, &["t.events", "t.offline"]).await;
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
    let Some(mut tansu) = Tansu::start() else {
        return;
    };
    let brokers = tansu.brokers();
    let mut rt = runtime();
    rt.block_on(async {
        create_topics(&brokers, &["d.events", "d.offline"]).await;
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
        create_topics(&brokers, &["d.events", "d.offline"]).await;
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
    let Some(mut tansu) = Tansu::start() else {
        return;
    };
    let Some(redis) = redis_server::RedisServer::start() else {
        return;
    };
    let brokers = tansu.brokers();
    runtime().block_on(async {
        create_topics(&brokers, &["o.events", "o.offline"]).await;
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

        // Run 2: Kafka down; 30 more events stored; the process "crashes" (producer
        // and pump dropped) before any of them is in Kafka.
        tansu.stop();
        {
            let (_kafka, log) = start_log(&cfg);
            let outbox = RedisOutbox::new(conn.clone(), key.clone());
            let pump = OutboxPump::start(outbox.clone(), log.clone(), fast_pump());
            conn.pipeline(&store_round(21..=50)).await.expect("round");
            pump.notify();
            wait_until(|| pump.stats().read == 30).await;
            monoio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(log.stats().backlog, 30);
            assert_eq!(pump.stats().trimmed, 0);
            assert_eq!(outbox.stored().await, Ok(30));
            pump.stop();
        }

        // Run 3: Kafka is back; a new process's pump produces the 30 from the outbox.
        tansu.restart();
        create_topics(&brokers, &["o.events", "o.offline"]).await;
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
    let Some(tansu) = Tansu::start() else { return };
    let brokers = tansu.brokers();
    runtime().block_on(async move {
        create_topics(&brokers, &["m.events", "m.offline"]).await;
        let (_kafka, log) = start_log(&config(&brokers, "m.events", "m.offline"));
        let convs: Vec<String> = (0..64).map(|i| format!("grp:bench{i}")).collect();
        let value = record::message_stored(&origin(), &msg("grp:bench0", 1)).value;
        let bytes = value.len();

        // Throughput: 200k records, appended as fast as the cap allows.
        let total = 200_000u64;
        let start = Instant::now();
        let mut seq = 0u64;
        while seq < total {
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
                "latency append->confirmed, {batch} records per turn (linger.ms=1): p50 {} us, p99 {} us, max {} us",
                hist.value_at_quantile(0.5),
                hist.value_at_quantile(0.99),
                hist.max()
            );
        }
    });
}
