//! The embedded backend: one fjall database per shard under `<data_dir>/shard-N/`.
//!
//! The shard's loop only stages writes and reads. A sync thread per shard owns the
//! write path: it takes staged batches, commits them (in order) and calls
//! `persist(SyncData)` once for everything it took, then reports the highest durable
//! batch id and rings the shard's bell (an eventfd the shard reads through io_uring, so
//! a busy shard sees it on its next loop turn). The loop never waits for a disk.
//!
//! Memory: memtables are capped per keyspace (`MEMTABLE_BYTES`, 37 MiB together,
//! plus sealed ones waiting for their flush) and the block cache is 32 MiB per shard,
//! so the store needs well under 100 MiB per shard however many messages flow
//! (fjall's defaults let active memtables alone grow to 384 MiB per shard). fjall 3.1's
//! database-wide write-buffer cap is not implemented yet (deprecated "todo").

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use atomic_waker::AtomicWaker;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use local_sync::oneshot;
use prost::Message;

use super::offloop::OffLoop;
use super::redis::backend::{RedisBackend, RoundError, RoundSink};
use super::redis::{PresenceWriter, RedisConfig, RedisConn};
use super::{keys, StoreError};
use crate::metrics::{AtomicHistogram, HistogramSnapshot};
use crate::proto::pb::MsgItem;
use crate::proto::store_pb::{ConvRow, DedupeRecord, GroupMeta, MemberRecord};
use crate::rt::bell::Bell;

/// Which keyspace a staged write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Ks {
    Msgs = 0,
    MsgIds = 1,
    Dedupe = 2,
    Rows = 3,
    Groups = 4,
    Members = 5,
    /// An event for the Kafka event log's outbox (the Redis backend only: a stream
    /// entry in the same round as the data it reports; the embedded backend, which
    /// runs no event log, skips it). Key: the outbox's tag; value: see
    /// [`WriteSet::event`].
    Outbox = 6,
}

const KEYSPACES: [&str; 6] = ["msgs", "msgids", "dedupe", "rows", "groups", "members"];

/// Memtable size per keyspace (fjall's default is 64 MiB each: 384 MiB per shard).
/// Messages take most writes; the others are small.
const MEMTABLE_BYTES: [u64; 6] = [16 << 20, 4 << 20, 8 << 20, 4 << 20, 1 << 20, 4 << 20];
/// Journal files kept until their memtables are flushed.
const JOURNAL_BYTES: u64 = 128 << 20;
/// Block cache per shard.
const CACHE_BYTES: u64 = 32 << 20;
/// The longest a committed lazy batch ([`ShardStore::stage_lazy`]) waits for its fsync.
pub const LAZY_SYNC: std::time::Duration = std::time::Duration::from_millis(50);

/// One staged write: a value, or a removal when `value` is `None`. Keys are those of
/// [`super::keys`]; the Redis backend maps each keyspace onto its own key layout.
pub struct Put {
    pub ks: Ks,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl Put {
    fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// Work for the sync thread.
enum Job {
    Batch {
        id: u64,
        puts: Vec<Put>,
        /// Only [`ShardStore::stage_lazy`] writes: committed at once, fsynced with the
        /// next batch that needs it or after [`LAZY_SYNC`].
        lazy: bool,
    },
    /// The shard dropped its cached state after a failure: accept batches again.
    Reset,
}

/// What the sync thread reports back.
enum Done {
    Durable { upto: u64 },
    Failed { upto: u64, error: String },
}

/// Resolved when a staged write is durable (or failed).
type DurableTx = oneshot::Sender<Result<(), StoreError>>;

/// What waits for a staged write.
enum Waiter {
    /// A task awaiting the receiver of [`ShardStore::stage`]; it runs whenever the
    /// scheduler gets to it.
    Channel(DurableTx),
    /// A callback of [`ShardStore::stage_then`], run right when the batch is reported,
    /// in staging order: what must happen in seq order (replies, pushes) goes here.
    Then(Box<dyn FnOnce(Result<(), StoreError>)>),
}

/// State shared between the shard loop and its sync thread.
struct SyncShared {
    /// The completion task, woken by the shard's bell listener.
    waker: AtomicWaker,
    /// The shard's bell: the sync thread rings it after each round.
    bell: Arc<Bell>,
    /// Sync rounds done, rounds that took 10 ms or more, and their total time (µs):
    /// read by `/metrics`.
    rounds: AtomicU64,
    slow_rounds: AtomicU64,
    round_micros: AtomicU64,
    /// fsyncs done (a round of lazy writes only commits).
    fsyncs: AtomicU64,
    /// Duration of each round, for /metrics.
    round_histogram: AtomicHistogram,
    /// Highest batch id reported (durable or failed); lets the loop skip empty wakes.
    reported: AtomicU64,
}

impl SyncShared {
    fn new(bell: Arc<Bell>) -> SyncShared {
        SyncShared {
            waker: AtomicWaker::new(),
            bell,
            rounds: AtomicU64::new(0),
            slow_rounds: AtomicU64::new(0),
            round_micros: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            round_histogram: AtomicHistogram::default(),
            reported: AtomicU64::new(0),
        }
    }

    /// Counts one write round that took `took`.
    fn record_round(&self, took: std::time::Duration) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        self.round_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.round_histogram.observe(took.as_micros() as u64);
        if took >= std::time::Duration::from_millis(10) {
            self.slow_rounds.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The fjall parts of a shard's store.
struct Fjall {
    db: Database,
    /// Reads run on this shard's reader thread.
    reader: Rc<OffLoop<Reader>>,
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Done>,
}

/// Where a shard's data lives.
enum Backend {
    /// fjall under the data dir: a sync thread writes, a reader thread reads.
    Embedded(Fjall),
    /// Redis: reads and fenced write rounds (one script call each, several in flight)
    /// on the shard's own connection.
    Redis(Rc<RedisBackend>),
}

/// A shard's store: the one interface the message code uses, whatever the backend.
/// Lives on the shard's thread; only that thread calls it.
pub struct ShardStore {
    backend: Backend,
    /// Writes staged during this loop turn.
    staged: RefCell<Vec<Put>>,
    /// Something staged this turn needs its fsync now (a waiter or a detached write);
    /// otherwise the batch is lazy.
    staged_eager: Cell<bool>,
    /// Id of the batch being staged; batches are numbered from 1.
    staging_id: Cell<u64>,
    /// Callers waiting for a batch, oldest first.
    waiters: RefCell<VecDeque<(u64, Waiter)>>,
    shared: Arc<SyncShared>,
    /// Set by a failure until `reset_after_failure`.
    failed: Cell<bool>,
    /// Batches handed to the sync thread and not yet reported, with their bytes, and
    /// the sum: the shard's readers pause while it is high (the job channel is bounded
    /// by that backpressure, not by a capacity that would block the loop).
    unsynced: RefCell<VecDeque<(u64, usize)>>,
    unsynced_bytes: Cell<usize>,
    /// On Redis: the writer of the `user:online:{uuid}` ZSETs.
    presence: Option<Rc<PresenceWriter>>,
}

impl ShardStore {
    /// Opens (or creates) `<data_dir>/shard-<id>/` and starts its sync thread.
    pub fn open(data_dir: &Path, id: usize, bell: Arc<Bell>) -> Result<Rc<ShardStore>, StoreError> {
        let path = data_dir.join(format!("shard-{id}"));
        let db = Database::builder(&path)
            .manual_journal_persist(true)
            .worker_threads(1)
            .cache_size(CACHE_BYTES)
            .max_journaling_size(JOURNAL_BYTES)
            .open()
            .map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))?;
        let mut handles = Vec::with_capacity(KEYSPACES.len());
        for (name, memtable) in KEYSPACES.into_iter().zip(MEMTABLE_BYTES) {
            handles.push(
                db.keyspace(name, || {
                    KeyspaceCreateOptions::default().max_memtable_size(memtable)
                })
                .map_err(|e| StoreError::Open(format!("keyspace {name}: {e}")))?,
            );
        }
        let ks: [Keyspace; 6] = handles
            .try_into()
            .map_err(|_| StoreError::Open("keyspace count".into()))?;
        let (jobs, job_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let shared = Arc::new(SyncShared::new(bell));
        {
            let db = db.clone();
            let ks = ks.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("imshard-sync-{id}"))
                .spawn(move || sync_thread(db, ks, job_rx, done_tx, shared))
                .map_err(|e| StoreError::Open(format!("sync thread: {e}")))?;
        }
        let reader = OffLoop::start(
            format!("imshard-read-{id}"),
            Reader { ks: ks.clone() },
            shared.bell.clone(),
        )
        .map_err(|e| StoreError::Open(format!("reader thread: {e}")))?;
        let store = Rc::new(ShardStore::with_backend(
            Backend::Embedded(Fjall {
                db,
                reader,
                jobs,
                done,
            }),
            shared,
        ));
        monoio::spawn(completion_loop(store.clone()));
        Ok(store)
    }

    /// A shard's store on Redis (see [`super::redis::backend`]): connects to `url`
    /// (refused when Redis does not answer within 5 s; later outages are survived:
    /// writes fail fast with 50301 and the connection comes back by itself). Each batch
    /// waits for `wait_replicas` replicas (0: none); presence scores count for
    /// `presence_window_ms` (the heartbeat timeout).
    pub async fn open_redis(
        url: &str,
        timeout: std::time::Duration,
        wait_replicas: u32,
        presence_window_ms: i64,
        bell: Arc<Bell>,
    ) -> Result<Rc<ShardStore>, StoreError> {
        let mut rc = RedisConfig::new(url.to_string());
        rc.timeout = timeout;
        let conn = RedisConn::connect(rc, std::time::Duration::from_secs(5))
            .await
            .map_err(|e| StoreError::Open(format!("cannot reach Redis at --redis-url: {e}")))?;
        // A WAIT for replicas must end before the call's own timeout.
        let wait_ms = (timeout.as_millis() as u64 / 2).max(1);
        let mut store = ShardStore::with_backend(
            Backend::Redis(RedisBackend::new(conn.clone(), wait_replicas, wait_ms)),
            Arc::new(SyncShared::new(bell)),
        );
        store.presence = Some(PresenceWriter::with_window(conn, presence_window_ms));
        Ok(Rc::new(store))
    }

    /// The device was seen now (connect, heartbeat): on Redis its presence score is
    /// refreshed, batched per loop turn; nothing on the embedded store.
    pub fn set_online(&self, user: &str, device: &str, at_ms: i64) {
        if let Some(p) = &self.presence {
            p.set_online(user, device, at_ms);
        }
    }

    /// The Redis connection of this shard's store (the Redis backend only), for the
    /// cluster channels of [`super::channels`].
    pub(crate) fn redis_conn(&self) -> Option<&super::redis::RedisConn> {
        match &self.backend {
            Backend::Redis(r) => Some(&r.conn),
            Backend::Embedded(_) => None,
        }
    }

    /// Whether presence is kept (on Redis).
    pub fn keeps_presence(&self) -> bool {
        self.presence.is_some()
    }

    /// The device's connection closed: on Redis it leaves the presence ZSET.
    pub fn set_offline(&self, user: &str, device: &str) {
        if let Some(p) = &self.presence {
            p.set_offline(user, device);
        }
    }

    fn with_backend(backend: Backend, shared: Arc<SyncShared>) -> ShardStore {
        ShardStore {
            backend,
            staged: RefCell::new(Vec::new()),
            staged_eager: Cell::new(false),
            staging_id: Cell::new(1),
            waiters: RefCell::new(VecDeque::new()),
            shared,
            failed: Cell::new(false),
            unsynced: RefCell::new(VecDeque::new()),
            unsynced_bytes: Cell::new(0),
            presence: None,
        }
    }

    /// Stages one atomic write; the receiver resolves once it is durable.
    pub fn stage(self: &Rc<Self>, write: WriteSet) -> oneshot::Receiver<Result<(), StoreError>> {
        let (tx, rx) = oneshot::channel();
        self.stage_waiting(write, Waiter::Channel(tx));
        rx
    }

    /// Stages one atomic write and runs `then` once it is durable (or failed). Callbacks
    /// run on this thread in the order their writes were staged, all of a batch in one
    /// go, so work that must follow seq order (a message's reply and push) keeps it
    /// whatever order the scheduler runs tasks in.
    pub fn stage_then(
        self: &Rc<Self>,
        write: WriteSet,
        then: impl FnOnce(Result<(), StoreError>) + 'static,
    ) {
        self.stage_waiting(write, Waiter::Then(Box::new(then)));
    }

    fn stage_waiting(self: &Rc<Self>, write: WriteSet, waiter: Waiter) {
        self.waiters
            .borrow_mut()
            .push_back((self.staging_id.get(), waiter));
        self.stage_detached(write);
    }

    /// Stages a write nobody waits for (it still keeps batch order); it is fsynced in
    /// its own round like any other.
    pub fn stage_detached(self: &Rc<Self>, write: WriteSet) {
        self.staged_eager.set(true);
        self.stage_puts(write);
    }

    /// Stages a write nobody waits for and whose loss in a crash is harmless: readable
    /// at once (committed in batch order), made durable by the next round that fsyncs
    /// anyway, or after [`LAZY_SYNC`] at the latest. A sender's own read mark is one
    /// (lost, the sender's unread count includes the last messages they sent until
    /// their next send or mark read); without this every message paid a second fsync
    /// round for it. The Redis backend writes it like any other.
    pub fn stage_lazy(self: &Rc<Self>, write: WriteSet) {
        self.stage_puts(write);
    }

    fn stage_puts(self: &Rc<Self>, write: WriteSet) {
        let mut staged = self.staged.borrow_mut();
        let first = staged.is_empty();
        staged.extend(write.puts);
        drop(staged);
        if first {
            monoio::spawn(flush_at_end_of_turn(self.clone()));
        }
    }

    /// (store rounds, fsyncs, rounds of 10 ms or more, total µs in rounds) so far.
    pub fn sync_stats(&self) -> (u64, u64, u64, u64) {
        let s = &self.shared;
        (
            s.rounds.load(Ordering::Relaxed),
            s.fsyncs.load(Ordering::Relaxed),
            s.slow_rounds.load(Ordering::Relaxed),
            s.round_micros.load(Ordering::Relaxed),
        )
    }

    /// The durations of the sync rounds so far.
    pub fn round_histogram(&self) -> HistogramSnapshot {
        self.shared.round_histogram.snapshot()
    }

    /// Callers waiting for staged writes to become durable.
    pub fn waiting_writes(&self) -> usize {
        self.waiters.borrow().len()
    }

    /// Called by the shard's bell listener on the shard's thread: lets the completion
    /// task look at what the sync thread reported.
    pub fn wake_local(&self) {
        if let Backend::Embedded(f) = &self.backend {
            self.shared.waker.wake();
            f.reader.wake_local();
        }
    }

    // ---- reads: on the reader thread (embedded) or the shard's Redis connection ----

    /// The highest stored seq of a conversation (0 when it has none).
    pub async fn max_seq(&self, conv: &str) -> Result<i64, StoreError> {
        let f = match &self.backend {
            Backend::Redis(r) => return r.max_seq(conv).await,
            Backend::Embedded(f) => f,
        };
        let conv = conv.to_string();
        f.reader.run(move |r| r.max_seq(&conv)).await?
    }

    /// Messages with `lo <= seq <= hi`, at most `limit`, ascending; `newest` takes the
    /// highest seqs of the range. Stops at `max_bytes` of stored messages, but always
    /// returns at least one when the range has any.
    pub async fn messages(
        &self,
        conv: &str,
        lo: i64,
        hi: i64,
        limit: usize,
        newest: bool,
        max_bytes: usize,
    ) -> Result<Vec<MsgItem>, StoreError> {
        let f = match &self.backend {
            Backend::Redis(r) => return r.messages(conv, lo, hi, limit, newest, max_bytes).await,
            Backend::Embedded(f) => f,
        };
        let conv = conv.to_string();
        f.reader
            .run(move |r| r.messages(&conv, lo, hi, limit, newest, max_bytes))
            .await?
    }

    /// One message by seq.
    pub async fn message(&self, conv: &str, seq: i64) -> Result<Option<MsgItem>, StoreError> {
        let f = match &self.backend {
            Backend::Redis(r) => return r.message(conv, seq).await,
            Backend::Embedded(f) => f,
        };
        let conv = conv.to_string();
        f.reader.run(move |r| r.message(&conv, seq)).await?
    }

    /// Messages by msg_id, in the order asked, skipping unknown ids and seqs outside
    /// `floor..=ceiling`; stops at `max_bytes` (always at least one message).
    pub async fn messages_by_ids(
        &self,
        conv: &str,
        msg_ids: Vec<String>,
        floor: i64,
        ceiling: i64,
        max_bytes: usize,
    ) -> Result<Vec<MsgItem>, StoreError> {
        let f = match &self.backend {
            Backend::Redis(r) => {
                return r
                    .messages_by_ids(conv, msg_ids, floor, ceiling, max_bytes)
                    .await
            }
            Backend::Embedded(f) => f,
        };
        let conv = conv.to_string();
        f.reader
            .run(move |r| r.messages_by_ids(&conv, &msg_ids, floor, ceiling, max_bytes))
            .await?
    }

    /// The seq of a msg_id in a conversation.
    pub async fn seq_of_msg_id(&self, conv: &str, msg_id: &str) -> Result<Option<i64>, StoreError> {
        let f = match &self.backend {
            Backend::Redis(r) => return r.seq_of_msg_id(conv, msg_id).await,
            Backend::Embedded(f) => f,
        };
        let (conv, msg_id) = (conv.to_string(), msg_id.to_string());
        f.reader
            .run(move |r| r.seq_of_msg_id(&conv, &msg_id))
            .await?
    }

    /// The recorded answers of (sender, client_msg_id) keys of one conversation, in
    /// the order asked (one read for all of them).
    pub async fn dedupe_many(
        &self,
        conv: &str,
        keys: Vec<(String, String)>,
    ) -> Result<Vec<Option<DedupeRecord>>, StoreError> {
        let f = match &self.backend {
            Backend::Redis(r) => return r.dedupe_many(conv, keys).await,
            Backend::Embedded(f) => f,
        };
        let conv = conv.to_string();
        f.reader
            .run(move |r| {
                keys.iter()
                    .map(|(sender, id)| r.dedupe(&conv, sender, id))
                    .collect()
            })
            .await?
    }

    /// Every conversation row of a user.
    pub async fn rows(&self, user: &str) -> Result<Vec<(String, ConvRow)>, StoreError> {
        let f = match &self.backend {
            Backend::Redis(r) => return r.rows(user).await,
            Backend::Embedded(f) => f,
        };
        let user = user.to_string();
        f.reader.run(move |r| r.rows(&user)).await?
    }

    /// Every conversation row of each of `users` (same order), in one read.
    pub async fn rows_many(
        &self,
        users: Vec<String>,
    ) -> Result<Vec<Vec<(String, ConvRow)>>, StoreError> {
        let f = match &self.backend {
            Backend::Redis(r) => return r.rows_many(&users).await,
            Backend::Embedded(f) => f,
        };
        f.reader
            .run(move |r| users.iter().map(|u| r.rows(u)).collect())
            .await?
    }

    /// A group's record and every member with its record (None: no such group).
    pub async fn group_with_members(
        &self,
        conv: &str,
    ) -> Result<Option<(GroupMeta, Vec<(String, MemberRecord)>)>, StoreError> {
        let f = match &self.backend {
            Backend::Redis(r) => return r.group_with_members(conv).await,
            Backend::Embedded(f) => f,
        };
        let conv = conv.to_string();
        f.reader
            .run(move |r| {
                let Some(meta) = r.group(&conv)? else {
                    return Ok(None);
                };
                Ok(Some((meta, r.members(&conv)?)))
            })
            .await?
    }

    /// After a failure: the shard has dropped its cached state; accept writes again.
    pub fn reset_after_failure(&self) {
        if self.failed.replace(false) {
            // Writes staged since the failure used the dropped state: fail them too.
            let staged = std::mem::take(&mut *self.staged.borrow_mut());
            let id = self.staging_id.get();
            self.staging_id.set(id + 1);
            if !staged.is_empty() {
                self.resolve_upto(id, Err(StoreError::Write("an earlier batch failed".into())));
            }
            match &self.backend {
                Backend::Embedded(f) => {
                    let _ = f.jobs.send(Job::Reset);
                }
                Backend::Redis(r) => {
                    // Batches queued behind the failure were built on the dropped state.
                    if let Some(upto) = r.drop_queued() {
                        self.resolve_upto(
                            upto,
                            Err(StoreError::Write("an earlier batch failed".into())),
                        );
                    }
                }
            }
        }
    }

    /// The batch that writes staged now go into.
    pub fn staging_batch(&self) -> u64 {
        self.staging_id.get()
    }

    /// Every batch up to this one is settled (durable, or failed): a read now sees
    /// whatever of them is stored.
    pub fn settled_upto(&self) -> u64 {
        self.shared.reported.load(Ordering::Acquire)
    }

    /// Bytes handed to the sync thread and not yet durable (or failed).
    pub fn unsynced_bytes(&self) -> usize {
        self.unsynced_bytes.get()
    }

    /// Whether a failure is waiting for `reset_after_failure`.
    pub fn has_failed(&self) -> bool {
        self.failed.get()
    }

    fn flush(self: &Rc<Self>) {
        let puts = std::mem::take(&mut *self.staged.borrow_mut());
        let lazy = !self.staged_eager.replace(false);
        if puts.is_empty() {
            return;
        }
        let id = self.staging_id.get();
        self.staging_id.set(id + 1);
        let bytes: usize = puts.iter().map(Put::size).sum();
        self.unsynced.borrow_mut().push_back((id, bytes));
        self.unsynced_bytes.set(self.unsynced_bytes.get() + bytes);
        match &self.backend {
            Backend::Embedded(f) => {
                if f.jobs.send(Job::Batch { id, puts, lazy }).is_err() {
                    self.fail_upto(id, StoreError::Write("sync thread is gone".to_string()));
                }
            }
            Backend::Redis(r) => {
                if r.enqueue(id, puts) {
                    monoio::spawn(r.clone().run_writer(RedisSink(self.clone())));
                }
            }
        }
    }

    fn fail_upto(&self, upto: u64, error: StoreError) {
        self.failed.set(true);
        self.resolve_upto(upto, Err(error));
    }

    fn resolve_upto(&self, upto: u64, result: Result<(), StoreError>) {
        {
            let mut unsynced = self.unsynced.borrow_mut();
            while let Some(&(id, bytes)) = unsynced.front() {
                if id > upto {
                    break;
                }
                unsynced.pop_front();
                self.unsynced_bytes
                    .set(self.unsynced_bytes.get().saturating_sub(bytes));
            }
        }
        // Taken out first: a callback may stage more writes (or reset the store).
        let ready: Vec<Waiter> = {
            let mut waiters = self.waiters.borrow_mut();
            let n = waiters.iter().take_while(|(id, _)| *id <= upto).count();
            waiters.drain(..n).map(|(_, w)| w).collect()
        };
        for w in ready {
            match w {
                Waiter::Channel(tx) => {
                    let _ = tx.send(result.clone());
                }
                Waiter::Then(f) => f(result.clone()),
            }
        }
    }

    /// Disk space used, for /metrics.
    pub fn disk_space(&self) -> u64 {
        match &self.backend {
            Backend::Embedded(f) => f.db.disk_space().unwrap_or(0),
            Backend::Redis(_) => 0,
        }
    }
}

/// Reports the Redis writer's rounds as the sync thread reports its rounds (durable,
/// or failed with every batch after it until the shard resets); the writer itself is
/// [`RedisBackend::run_writer`].
struct RedisSink(Rc<ShardStore>);

impl RoundSink for RedisSink {
    fn failed(&self) -> bool {
        self.0.failed.get()
    }

    fn report(&self, upto: u64, took: std::time::Duration, result: Result<(), RoundError>) {
        let store = &self.0;
        if result != Err(RoundError::AfterFailure) {
            store.shared.record_round(took);
        }
        store.shared.reported.fetch_max(upto, Ordering::AcqRel);
        match result {
            Ok(()) => store.resolve_upto(upto, Ok(())),
            Err(RoundError::AfterFailure) => {
                store.fail_upto(upto, StoreError::Write("an earlier batch failed".into()))
            }
            Err(error) => {
                tracing::error!(%error, upto, "redis batch failed; answering 50301 until the shard resets");
                store.fail_upto(upto, error.into());
            }
        }
    }
}

fn read_err(e: fjall::Error) -> StoreError {
    StoreError::Read(e.to_string())
}

/// The shard's reads, run on its reader thread (see [`super::offloop`]): a read that
/// misses the page cache stalls that thread, never the shard's loop.
pub struct Reader {
    ks: [Keyspace; 6],
}

impl Reader {
    /// The highest stored seq of a conversation (0 when it has none).
    pub fn max_seq(&self, conv: &str) -> Result<i64, StoreError> {
        match self.ks[Ks::Msgs as usize]
            .prefix(keys::prefix(conv))
            .next_back()
        {
            None => Ok(0),
            Some(g) => {
                let key = g.key().map_err(read_err)?;
                keys::seq_of(&key).ok_or_else(|| StoreError::Corrupt("msgs key".into()))
            }
        }
    }

    /// Messages with `lo <= seq <= hi`, at most `limit`, ascending. `newest` takes
    /// the highest seqs of the range instead of the lowest. Reading stops once the
    /// stored bytes taken reach `max_bytes` (the next message would pass it), but at
    /// least one message is always taken, so a caller paging by seq always advances.
    pub fn messages(
        &self,
        conv: &str,
        lo: i64,
        hi: i64,
        limit: usize,
        newest: bool,
        max_bytes: usize,
    ) -> Result<Vec<MsgItem>, StoreError> {
        if lo > hi || limit == 0 {
            return Ok(Vec::new());
        }
        let range = self.ks[Ks::Msgs as usize].range(keys::msg(conv, lo)..=keys::msg(conv, hi));
        let mut out = Vec::with_capacity(limit.min(256));
        let mut bytes = 0usize;
        // Returns false when the message does not fit the budget (and is not taken).
        let mut take = |g: fjall::Guard| -> Result<bool, StoreError> {
            let v = g.value().map_err(read_err)?;
            if !out.is_empty() && bytes + v.len() > max_bytes {
                return Ok(false);
            }
            bytes += v.len();
            out.push(
                MsgItem::decode(&*v).map_err(|e| StoreError::Corrupt(format!("message: {e}")))?,
            );
            Ok(true)
        };
        if newest {
            for g in range.rev().take(limit) {
                if !take(g)? {
                    break;
                }
            }
            out.reverse();
        } else {
            for g in range.take(limit) {
                if !take(g)? {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// One message by seq.
    pub fn message(&self, conv: &str, seq: i64) -> Result<Option<MsgItem>, StoreError> {
        self.get_decoded(Ks::Msgs, &keys::msg(conv, seq))
    }

    /// Messages by msg_id, in the order asked, skipping unknown ids and seqs outside
    /// `floor..=ceiling`; stops before passing `max_bytes` (at least one is taken).
    pub fn messages_by_ids(
        &self,
        conv: &str,
        msg_ids: &[String],
        floor: i64,
        ceiling: i64,
        max_bytes: usize,
    ) -> Result<Vec<MsgItem>, StoreError> {
        let mut out = Vec::with_capacity(msg_ids.len());
        let mut bytes = 0usize;
        for id in msg_ids {
            let Some(seq) = self.seq_of_msg_id(conv, id)? else {
                continue;
            };
            if seq < floor || seq > ceiling {
                continue;
            }
            if let Some(m) = self.message(conv, seq)? {
                bytes += m.encoded_len();
                if !out.is_empty() && bytes > max_bytes {
                    break;
                }
                out.push(m);
            }
        }
        Ok(out)
    }

    /// The seq of a msg_id in a conversation.
    pub fn seq_of_msg_id(&self, conv: &str, msg_id: &str) -> Result<Option<i64>, StoreError> {
        match self.ks[Ks::MsgIds as usize]
            .get(keys::pair(conv, msg_id))
            .map_err(read_err)?
        {
            None => Ok(None),
            Some(v) => keys::seq_of(&v)
                .map(Some)
                .ok_or_else(|| StoreError::Corrupt("msgids value".into())),
        }
    }

    pub fn dedupe(
        &self,
        conv: &str,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<DedupeRecord>, StoreError> {
        self.get_decoded(Ks::Dedupe, &keys::triple(conv, sender, client_msg_id))
    }

    pub fn row(&self, user: &str, conv: &str) -> Result<Option<ConvRow>, StoreError> {
        self.get_decoded(Ks::Rows, &keys::pair(user, conv))
    }

    /// Every conversation row of a user.
    pub fn rows(&self, user: &str) -> Result<Vec<(String, ConvRow)>, StoreError> {
        let prefix = keys::prefix(user);
        let mut out = Vec::new();
        for g in self.ks[Ks::Rows as usize].prefix(&prefix) {
            let (k, v) = g.into_inner().map_err(read_err)?;
            let conv = std::str::from_utf8(&k[prefix.len()..])
                .map_err(|_| StoreError::Corrupt("rows key".into()))?
                .to_string();
            let row = ConvRow::decode(&*v).map_err(|e| StoreError::Corrupt(format!("row: {e}")))?;
            out.push((conv, row));
        }
        Ok(out)
    }

    pub fn group(&self, conv: &str) -> Result<Option<GroupMeta>, StoreError> {
        self.get_decoded(Ks::Groups, conv.as_bytes())
    }

    /// Every member of a group with its record.
    pub fn members(&self, conv: &str) -> Result<Vec<(String, MemberRecord)>, StoreError> {
        let prefix = keys::prefix(conv);
        let mut out = Vec::new();
        for g in self.ks[Ks::Members as usize].prefix(&prefix) {
            let (k, v) = g.into_inner().map_err(read_err)?;
            let user = std::str::from_utf8(&k[prefix.len()..])
                .map_err(|_| StoreError::Corrupt("members key".into()))?
                .to_string();
            let rec = MemberRecord::decode(&*v)
                .map_err(|e| StoreError::Corrupt(format!("member: {e}")))?;
            out.push((user, rec));
        }
        Ok(out)
    }

    fn get_decoded<T: Message + Default>(
        &self,
        ks: Ks,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.ks[ks as usize].get(key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => T::decode(&*v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("{ks:?}: {e}"))),
        }
    }
}

/// The writes of one atomic unit, built on the loop thread (values encoded here).
#[derive(Default)]
pub struct WriteSet {
    puts: Vec<Put>,
}

impl WriteSet {
    pub fn new() -> Self {
        WriteSet::default()
    }

    /// A message and its msg_id index.
    pub fn message(&mut self, msg: &MsgItem) -> &mut Self {
        self.puts.push(Put {
            ks: Ks::Msgs,
            key: keys::msg(&msg.conv_id, msg.seq),
            value: Some(msg.encode_to_vec()),
        });
        self.puts.push(Put {
            ks: Ks::MsgIds,
            key: keys::pair(&msg.conv_id, &msg.msg_id),
            value: Some((msg.seq as u64).to_be_bytes().to_vec()),
        });
        self
    }

    /// Replaces a stored message (recall, status change); the id index is unchanged.
    pub fn message_update(&mut self, msg: &MsgItem) -> &mut Self {
        self.puts.push(Put {
            ks: Ks::Msgs,
            key: keys::msg(&msg.conv_id, msg.seq),
            value: Some(msg.encode_to_vec()),
        });
        self
    }

    pub fn dedupe(
        &mut self,
        conv: &str,
        sender: &str,
        client_msg_id: &str,
        rec: &DedupeRecord,
    ) -> &mut Self {
        self.puts.push(Put {
            ks: Ks::Dedupe,
            key: keys::triple(conv, sender, client_msg_id),
            value: Some(rec.encode_to_vec()),
        });
        self
    }

    /// An event for the Kafka event log, written with the rest of this set (the outbox
    /// stream `outbox`, see `store::redis::outbox`): its topic code, record key and
    /// value, as `topic \0 key \0 value`.
    pub fn event(&mut self, outbox: &str, topic: &str, key: &[u8], value: &[u8]) -> &mut Self {
        let mut v = Vec::with_capacity(topic.len() + key.len() + value.len() + 2);
        v.extend_from_slice(topic.as_bytes());
        v.push(0);
        v.extend_from_slice(key);
        v.push(0);
        v.extend_from_slice(value);
        self.puts.push(Put {
            ks: Ks::Outbox,
            key: outbox.as_bytes().to_vec(),
            value: Some(v),
        });
        self
    }

    pub fn row(&mut self, user: &str, conv: &str, row: &ConvRow) -> &mut Self {
        self.puts.push(Put {
            ks: Ks::Rows,
            key: keys::pair(user, conv),
            value: Some(row.encode_to_vec()),
        });
        self
    }

    pub fn group(&mut self, conv: &str, meta: &GroupMeta) -> &mut Self {
        self.puts.push(Put {
            ks: Ks::Groups,
            key: conv.as_bytes().to_vec(),
            value: Some(meta.encode_to_vec()),
        });
        self
    }

    pub fn member(&mut self, conv: &str, user: &str, rec: &MemberRecord) -> &mut Self {
        self.puts.push(Put {
            ks: Ks::Members,
            key: keys::pair(conv, user),
            value: Some(rec.encode_to_vec()),
        });
        self
    }

    pub fn remove_member(&mut self, conv: &str, user: &str) -> &mut Self {
        self.puts.push(Put {
            ks: Ks::Members,
            key: keys::pair(conv, user),
            value: None,
        });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.puts.is_empty()
    }
}

/// Lets every task that is ready in this loop turn stage its writes, then hands the
/// batch to the sync thread.
async fn flush_at_end_of_turn(store: Rc<ShardStore>) {
    crate::rt::yield_now().await;
    store.flush();
}

/// Resolves waiters as the sync thread reports progress.
async fn completion_loop(store: Rc<ShardStore>) {
    let shared = store.shared.clone();
    let mut seen = 0u64;
    loop {
        std::future::poll_fn(|cx| {
            shared.waker.register(cx.waker());
            if shared.reported.load(Ordering::Acquire) > seen {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        let Backend::Embedded(f) = &store.backend else {
            return;
        };
        while let Ok(done) = f.done.try_recv() {
            match done {
                Done::Durable { upto } => {
                    seen = seen.max(upto);
                    store.resolve_upto(upto, Ok(()));
                }
                Done::Failed { upto, error } => {
                    seen = seen.max(upto);
                    tracing::error!(%error, upto, "store batch failed; answering 50301 until the shard resets");
                    store.fail_upto(upto, StoreError::Write(error));
                }
            }
        }
    }
}

fn sync_thread(
    db: Database,
    ks: [Keyspace; 6],
    jobs: mpsc::Receiver<Job>,
    done: mpsc::Sender<Done>,
    shared: Arc<SyncShared>,
) {
    let mut failed = false;
    // Lazy batches committed but not yet fsynced: the highest id, and when the first
    // of them was committed.
    let mut lazy: Option<(u64, std::time::Instant)> = None;
    loop {
        let first = match lazy {
            None => match jobs.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            },
            Some((_, since)) => {
                let left = (since + LAZY_SYNC).saturating_duration_since(std::time::Instant::now());
                match jobs.recv_timeout(left) {
                    Ok(job) => Some(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        sync_and_report(&db, &done, &shared, lazy.map_or(0, |l| l.0));
                        break;
                    }
                }
            }
        };
        let mut round: Vec<Job> = first.into_iter().collect();
        if !round.is_empty() {
            while let Ok(more) = jobs.try_recv() {
                round.push(more);
            }
        }
        let mut ok_upto = 0;
        let mut eager = false;
        let mut fail: Option<(u64, String)> = None;
        let started = std::time::Instant::now();
        for job in round {
            match job {
                Job::Reset => failed = false,
                Job::Batch { id, puts, lazy } => {
                    eager |= !lazy;
                    if failed {
                        fail = Some((
                            id,
                            fail.map(|f| f.1)
                                .unwrap_or_else(|| "an earlier batch failed".into()),
                        ));
                        continue;
                    }
                    let mut batch = db.batch();
                    for p in puts {
                        if p.ks == Ks::Outbox {
                            continue;
                        }
                        match p.value {
                            Some(v) => batch.insert(&ks[p.ks as usize], p.key, v),
                            None => batch.remove(&ks[p.ks as usize], p.key),
                        }
                    }
                    match batch.commit() {
                        Ok(()) => ok_upto = id,
                        Err(e) => {
                            failed = true;
                            fail = Some((id, e.to_string()));
                        }
                    }
                }
            }
        }
        let lazy_due = lazy.is_some_and(|(_, since)| since.elapsed() >= LAZY_SYNC);
        let mut reported = 0;
        if ok_upto > 0 && !eager && !lazy_due && fail.is_none() {
            // Only lazy writes: committed (readable), fsynced later with others.
            lazy = Some((ok_upto, lazy.map_or(started, |l| l.1)));
        } else if ok_upto > 0 || lazy.is_some() {
            let upto = ok_upto.max(lazy.map_or(0, |l| l.0));
            lazy = None;
            sync_and_report(&db, &done, &shared, upto);
            reported = upto;
        }
        if let Some((upto, error)) = fail {
            reported = reported.max(upto);
            let _ = done.send(Done::Failed { upto, error });
        }
        shared.record_round(started.elapsed());
        if reported > 0 {
            shared.reported.fetch_max(reported, Ordering::AcqRel);
            shared.bell.ring();
        }
    }
}

/// fsyncs everything committed and reports it durable up to `upto` (the caller rings
/// the bell). A failed fsync aborts the process.
fn sync_and_report(db: &Database, done: &mpsc::Sender<Done>, shared: &SyncShared, upto: u64) {
    if upto == 0 {
        return;
    }
    match db.persist(PersistMode::SyncData) {
        Ok(()) => {
            shared.fsyncs.fetch_add(1, Ordering::Relaxed);
            let _ = done.send(Done::Durable { upto });
        }
        Err(e) => {
            // After a failed fsync the kernel may have dropped the dirty pages:
            // a later fsync could "succeed" without the data ("fsyncgate").
            // Retrying on the same files is not safe; stop, and let the
            // supervisor restart us: recovery replays the journal.
            tracing::error!(error = %e, "fsync of the store failed; aborting so that recovery starts from the journal");
            eprintln!("imshard: fsync of the store failed ({e}); aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn msg(seq: i64) -> MsgItem {
        MsgItem {
            msg_id: ulid::Ulid::new().to_string(),
            conv_id: "p2p-a-b".into(),
            seq,
            from_uuid: "a".into(),
            content: "x".into(),
            ..MsgItem::default()
        }
    }

    /// Runs `test` on a monoio loop with an embedded store in a fresh directory, its
    /// completions woken by the store's bell as on a shard.
    fn on_store<F, Fut>(test: F)
    where
        F: FnOnce(Rc<ShardStore>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let bell = Arc::new(Bell::new().expect("eventfd"));
            let store = ShardStore::open(dir.path(), 0, bell.clone()).expect("open");
            let s = store.clone();
            monoio::spawn(async move {
                bell.listen(|| s.wake_local()).await;
            });
            test(store).await;
        });
    }

    /// Callbacks run in staging order even when their writes span several batches
    /// and other tasks are scheduled in between; every write is then readable.
    #[test]
    fn stage_then_runs_in_staging_order_and_writes_are_durable() {
        on_store(|store| async move {
            let order = Rc::new(RefCell::new(Vec::new()));
            for seq in 1..=300 {
                let mut w = WriteSet::new();
                w.message(&msg(seq));
                let order = order.clone();
                store.stage_then(w, move |r| {
                    assert!(r.is_ok());
                    order.borrow_mut().push(seq);
                });
                if seq % 7 == 0 {
                    // Let batches form and complete in between.
                    crate::rt::yield_now().await;
                }
            }
            while order.borrow().len() < 300 {
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert_eq!(*order.borrow(), (1..=300).collect::<Vec<i64>>());
            assert_eq!(store.max_seq("p2p-a-b").await.expect("read"), 300);
            // A byte budget stops the read early, from either end; one message always.
            let (low, high) = (msg(1).encoded_len(), msg(300).encoded_len());
            let read = |lo, newest, max_bytes| {
                let store = store.clone();
                async move {
                    store
                        .messages("p2p-a-b", lo, 300, 200, newest, max_bytes)
                        .await
                        .expect("read")
                        .iter()
                        .map(|m| m.seq)
                        .collect::<Vec<i64>>()
                }
            };
            assert_eq!(read(1, false, 3 * low).await, vec![1, 2, 3]);
            assert_eq!(read(1, true, 4 * high - 1).await, vec![298, 299, 300]);
            assert_eq!(read(5, false, 0).await, vec![5]);
            assert_eq!(read(1, false, usize::MAX).await.len(), 200);
        });
    }

    /// A batch of lazy writes alone is committed (readable) without an fsync; the next
    /// batch that needs one makes it durable with the same fsync, and a lazy batch left
    /// alone is fsynced after `LAZY_SYNC`.
    #[test]
    fn lazy_writes_ride_on_the_next_fsync() {
        on_store(|store| async move {
            let row = |read_seq| ConvRow {
                read_seq,
                ..ConvRow::default()
            };
            let fsyncs = |store: &ShardStore| store.sync_stats().1;
            let rounds = |store: &ShardStore| store.sync_stats().0;

            // A lazy batch alone: committed in its own round, not fsynced.
            let started = std::time::Instant::now();
            let lazy_batch = store.staging_batch();
            let mut w = WriteSet::new();
            w.row("alice", "p2p-alice-bob", &row(3));
            store.stage_lazy(w);
            while rounds(&store) < 1 {
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            if started.elapsed() < LAZY_SYNC {
                assert_eq!(fsyncs(&store), 0, "a lazy round commits without an fsync");
                assert!(
                    store.settled_upto() < lazy_batch,
                    "not reported durable yet"
                );
            }
            let rows = store.rows("alice").await.expect("read");
            assert_eq!(rows.len(), 1, "a committed lazy write is readable");
            assert_eq!(rows[0].1.read_seq, 3);

            // The next eager batch fsyncs both.
            let mut w = WriteSet::new();
            w.message(&msg(1));
            let durable = store.stage(w).await;
            assert!(matches!(durable, Ok(Ok(()))), "{durable:?}");
            assert!(
                store.settled_upto() > lazy_batch,
                "the lazy batch settled too"
            );
            if started.elapsed() < LAZY_SYNC {
                assert_eq!(fsyncs(&store), 1, "one fsync for both");
            }

            // A lazy batch left alone is fsynced after LAZY_SYNC.
            let before = fsyncs(&store);
            let lone = store.staging_batch();
            let mut w = WriteSet::new();
            w.row("alice", "p2p-alice-bob", &row(4));
            store.stage_lazy(w);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while store.settled_upto() < lone {
                assert!(
                    std::time::Instant::now() < deadline,
                    "lazy batch never fsynced"
                );
                monoio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert_eq!(fsyncs(&store), before + 1);
        });
    }
}
