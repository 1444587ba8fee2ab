//! The process's one Kafka producer: librdkafka (through `rdkafka`'s
//! [`ThreadedProducer`]) fed by one dedicated thread that drains a ring per shard.
//!
//! - Shards never call into librdkafka: [`super::EventLog::append`] pushes to its
//!   shard's SPSC ring and, once per loop turn, unparks the feeder (a futex wake only
//!   when the feeder sleeps).
//! - The feeder hands each record to librdkafka (`rd_kafka_producev`, which copies it
//!   and never blocks); librdkafka batches per partition (`linger.ms`) and sends.
//! - Delivery reports run on rdkafka's polling thread: each is pushed onto its shard's
//!   confirmation ring, and the shard's [`Bell`] is rung once per drain cycle of the
//!   shard (an `armed` flag), so the shard sees confirmations on its next loop turn.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::{EventLogConfig, EventLogError, Topic};
use crate::rt::bell::Bell;

/// A record on its way from a shard to the feeder.
pub(crate) struct Outgoing {
    pub topic: Topic,
    pub key: Bytes,
    pub value: Bytes,
    /// The shard's position of the record (its delivery report carries it back).
    pub pos: u64,
}

/// A delivery report on its way back to a shard.
pub(crate) struct Confirm {
    pub pos: u64,
    /// `Err(reason)` when librdkafka gave the record up (or refused it).
    pub result: Result<(), String>,
}

/// What the producer's threads share with one shard.
pub(crate) struct ShardReturn {
    /// Written by rdkafka's polling thread (reports) and by the feeder (records
    /// librdkafka refused at once); read by the shard. Its capacity is the shard's
    /// record cap, so it never fills: every record in flight has one slot.
    pub confirms: Mutex<rtrb::Producer<Confirm>>,
    /// Set by the shard after it drained its confirmations: the next report rings.
    pub armed: AtomicBool,
    pub bell: Arc<Bell>,
}

impl ShardReturn {
    fn report(&self, c: Confirm) {
        {
            let mut ring = match self.confirms.lock() {
                Ok(r) => r,
                Err(poisoned) => poisoned.into_inner(),
            };
            // Cannot be full (see `confirms`); if it ever were, the record stays
            // pending on the shard and the outbox re-produces it after a restart.
            let _ = ring.push(c);
        }
        if self.armed.swap(false, Ordering::AcqRel) {
            self.bell.ring();
        }
    }
}

/// The rdkafka context: routes delivery reports to shards.
pub(crate) struct Ctx {
    shards: Vec<Arc<ShardReturn>>,
    /// librdkafka's own error events (broker down, ...), counted for `/metrics`.
    client_errors: AtomicU64,
}

/// The delivery opaque: shard index in the low 12 bits, position above.
const SHARD_BITS: u32 = 12;

fn opaque(shard: usize, pos: u64) -> usize {
    ((pos << SHARD_BITS) | shard as u64) as usize
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "imshard::eventlog", "librdkafka {fac}: {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "imshard::eventlog", "librdkafka {fac}: {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "imshard::eventlog", "librdkafka {fac}: {message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "imshard::eventlog", "librdkafka {fac}: {message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.client_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "imshard::eventlog", "kafka: {error}: {reason}");
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let shard = opaque & ((1 << SHARD_BITS) - 1);
        let pos = (opaque as u64) >> SHARD_BITS;
        let result = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.to_string()),
        };
        if let Some(s) = self.shards.get(shard) {
            s.report(Confirm { pos, result });
        }
    }
}

/// What a shard needs to build its [`super::EventLog`]; `Send`, moved to the shard's
/// thread.
pub struct ShardLink {
    pub(crate) shard: usize,
    pub(crate) ring: rtrb::Producer<Outgoing>,
    pub(crate) confirms: rtrb::Consumer<Confirm>,
    pub(crate) ret: Arc<ShardReturn>,
    pub(crate) feeder: Thread,
    pub(crate) cfg: EventLogConfig,
}

/// The running producer: the feeder thread and librdkafka. Dropping it stops both
/// (records not yet delivered stay pending; the outbox has them).
pub struct KafkaLog {
    stop: Arc<AtomicBool>,
    feeder: Option<JoinHandle<()>>,
    producer: ThreadedProducer<Ctx>,
}

impl KafkaLog {
    /// Starts the producer for `bells.len()` shards (shard `i` is rung through
    /// `bells[i]` when it has delivery reports). Fails only on a bad configuration;
    /// brokers that are down are retried in the background.
    pub fn start(
        cfg: &EventLogConfig,
        bells: Vec<Arc<Bell>>,
    ) -> Result<(KafkaLog, Vec<ShardLink>), EventLogError> {
        if cfg.brokers.is_empty() {
            return Err(EventLogError::Config("no Kafka brokers given".into()));
        }
        if bells.len() >= 1 << SHARD_BITS {
            return Err(EventLogError::Config(format!(
                "at most {} shards",
                (1 << SHARD_BITS) - 1
            )));
        }
        let cap = cfg.max_records.max(1);
        let mut rets = Vec::new();
        let mut feeds = Vec::new();
        let mut confirm_rx = Vec::new();
        for bell in bells {
            let (ptx, prx) = rtrb::RingBuffer::new(cap);
            let (ctx_, crx) = rtrb::RingBuffer::new(cap);
            rets.push(Arc::new(ShardReturn {
                confirms: Mutex::new(ctx_),
                armed: AtomicBool::new(true),
                bell,
            }));
            feeds.push((ptx, prx));
            confirm_rx.push(crx);
        }
        let n = rets.len();
        let mut conf = ClientConfig::new();
        conf.set("bootstrap.servers", cfg.brokers.join(","))
            .set("client.id", format!("imshard-{}", cfg.node))
            .set("linger.ms", cfg.linger_ms.to_string())
            // Never give a record up for time: while Kafka is down records wait (the
            // shard's cap bounds them) and go out, in order, once it is back.
            .set("message.timeout.ms", "0")
            // The Java client's partitioner: a key lands where other producers'
            // records with the same key land.
            .set("partitioner", "murmur2_random")
            .set(
                "queue.buffering.max.messages",
                (n * cap + 1024).min(i32::MAX as usize).to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                ((n * cfg.max_bytes) / 1024 + 1024)
                    .min(i32::MAX as usize)
                    .to_string(),
            );
        if cfg.idempotent {
            // Order per partition with up to 5 requests in flight, no duplicates from
            // librdkafka's own retries.
            conf.set("enable.idempotence", "true");
        } else {
            // Order per partition by one request in flight per broker connection.
            conf.set("max.in.flight.requests.per.connection", "1");
        }
        for (k, v) in &cfg.kafka_properties {
            conf.set(k, v);
        }
        let ctx = Ctx {
            shards: rets.clone(),
            client_errors: AtomicU64::new(0),
        };
        let producer: ThreadedProducer<Ctx> = conf
            .create_with_context(ctx)
            .map_err(|e| EventLogError::Config(format!("kafka producer: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let topics = [cfg.topic.clone(), cfg.offline_topic.clone()];
        let mut rings = Vec::new();
        let mut producers = Vec::new();
        for (ptx, prx) in feeds {
            producers.push(ptx);
            rings.push(prx);
        }
        let feeder = {
            let producer = producer.clone();
            let stop = stop.clone();
            let rets = rets.clone();
            std::thread::Builder::new()
                .name("imshard-kafka-feed".into())
                .spawn(move || feed(producer, rings, rets, topics, stop))
                .map_err(|e| EventLogError::Config(format!("feeder thread: {e}")))?
        };
        let thread = feeder.thread().clone();
        let links = producers
            .into_iter()
            .zip(confirm_rx)
            .zip(rets)
            .enumerate()
            .map(|(shard, ((ring, confirms), ret))| ShardLink {
                shard,
                ring,
                confirms,
                ret,
                feeder: thread.clone(),
                cfg: cfg.clone(),
            })
            .collect();
        Ok((
            KafkaLog {
                stop,
                feeder: Some(feeder),
                producer,
            },
            links,
        ))
    }

    /// librdkafka error events so far (each also logged).
    pub fn client_errors(&self) -> u64 {
        self.producer
            .context()
            .client_errors
            .load(Ordering::Relaxed)
    }

    /// Records librdkafka holds (queued or in flight).
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Stops the feeder and waits up to `timeout` for librdkafka to deliver what it
    /// holds. Records not delivered by then are reported as failed (their outbox
    /// entries stay, so the next start produces them).
    pub fn shutdown(mut self, timeout: Duration) -> Result<(), EventLogError> {
        self.stop_feeder();
        self.producer
            .flush(timeout)
            .map_err(|e| EventLogError::Kafka(format!("flush: {e}")))
    }

    fn stop_feeder(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(f) = self.feeder.take() {
            f.thread().unpark();
            let _ = f.join();
        }
    }
}

impl Drop for KafkaLog {
    fn drop(&mut self) {
        self.stop_feeder();
    }
}

/// The feeder thread: drains every shard's ring into librdkafka; parks when there is
/// nothing (shards unpark it once per loop turn that appended).
fn feed(
    producer: ThreadedProducer<Ctx>,
    mut rings: Vec<rtrb::Consumer<Outgoing>>,
    rets: Vec<Arc<ShardReturn>>,
    topics: [String; 2],
    stop: Arc<AtomicBool>,
) {
    // A record librdkafka refused with QueueFull, per shard: offered again first.
    // Records are taken off the ring *before* they are offered: once offered, the
    // record can be delivered, reported and drained by the shard, which then appends
    // more, so a record still on the ring after its send would take a slot the shard
    // counts as free (the ring would overflow by one and lose an append).
    let mut held: Vec<Option<Outgoing>> = rings.iter().map(|_| None).collect();
    while !stop.load(Ordering::Acquire) {
        let mut moved = 0usize;
        let mut full = false;
        for (shard, ring) in rings.iter_mut().enumerate() {
            loop {
                let item = match held[shard].take() {
                    Some(item) => item,
                    None => match ring.pop() {
                        Ok(item) => item,
                        Err(_) => break,
                    },
                };
                let topic = &topics[item.topic as usize];
                let record = BaseRecord::with_opaque_to(topic, opaque(shard, item.pos))
                    .key(&item.key[..])
                    .payload(&item.value[..]);
                match producer.send(record) {
                    Ok(()) => {}
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        // librdkafka holds its maximum: keep the record and come back
                        // after a short sleep.
                        held[shard] = Some(item);
                        full = true;
                        break;
                    }
                    Err((e, _)) => {
                        // Refused at once (too large, bad topic name...): report it.
                        rets[shard].report(Confirm {
                            pos: item.pos,
                            result: Err(e.to_string()),
                        });
                    }
                }
                moved += 1;
            }
        }
        if full {
            std::thread::sleep(Duration::from_millis(1));
        } else if moved == 0 {
            // An unpark between the last look and here makes this return at once.
            std::thread::park_timeout(Duration::from_millis(200));
        }
    }
}
