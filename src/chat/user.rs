//! The user side, on the user's shard: online devices, conversation rows, the
//! per-user request budget and quotas, and delivery of pushes to devices.

use std::collections::HashMap;
use std::rc::Rc;

use super::cache;
use super::fanout::Delivery;
use super::Shard;
use crate::codes::ApiError;
use crate::ids::ConvRef;
use crate::proto::envelope::now_ms;
use crate::proto::store_pb::ConvRow;
use crate::shard::conn::Conn;
use crate::store::WriteSet;

/// A user this shard owns. Kept small: an online user with one device costs this
/// struct, its map key and one `Rc` per device.
#[derive(Default)]
pub struct UserState {
    /// Online connections, at most one per device.
    pub conns: Vec<Rc<Conn>>,
    /// Conversation rows by conv_id, loaded from the store on first use. Boxed on
    /// purpose: 8 bytes for the many online users never loaded.
    rows: Option<Box<RowsSlot>>,
    /// Request tokens left (token bucket, refilled at `rate_limit` per second; may go
    /// below zero after a costly request, see [`take_tokens`]).
    tokens: f32,
    /// When the bucket was last refilled, ms since the epoch (0 = never).
    refilled_at: i64,
    /// Member ids named this hour (boxed: most users never create or change groups).
    quota: Option<Box<MemberQuota>>,
}

/// A user's conversation rows by conv_id. Keys and rows are boxed so that an entry is
/// 24 bytes: most users (every member of a big group) hold a table of a few entries,
/// and the table's empty buckets then cost little.
pub type Rows = HashMap<Box<str>, Box<ConvRow>>;

/// A user's rows, or their load in progress.
enum RowsSlot {
    /// Being read on the reader thread: tasks waiting for them, and the deliveries'
    /// row updates that arrived meanwhile (applied in order once loaded).
    Loading {
        waiters: Vec<std::task::Waker>,
        updates: Vec<RowUpdate<String>>,
    },
    Loaded(CachedRows),
}

/// Loaded rows with what the cache needs to know about them.
struct CachedRows {
    rows: Rows,
    /// Bytes charged to the shard's cache.
    charged: usize,
    /// Used since the eviction hand last passed.
    used: bool,
    /// The store batch of the last row write: the rows may be evicted once it is
    /// settled (a reload then reads it back).
    pending_batch: u64,
}

/// The user's entry, created on first use without allocating when it exists.
fn user_entry<'a>(users: &'a mut HashMap<String, UserState>, user: &str) -> &'a mut UserState {
    if !users.contains_key(user) {
        users.insert(user.to_string(), UserState::default());
    }
    match users.get_mut(user) {
        Some(u) => u,
        None => unreachable!("inserted above"),
    }
}

/// Member ids a user named in creates and adds during one clock hour.
#[derive(Default)]
struct MemberQuota {
    /// Hours since the epoch of the window counted in `used`.
    hour: i64,
    used: u64,
}

/// Adds a connection; returns the one it replaces (same device), if any.
pub fn register(shard: &Shard, conn: &Rc<Conn>) -> Option<Rc<Conn>> {
    let mut users = shard.users.borrow_mut();
    let u = users.entry(conn.user.to_string()).or_default();
    let old = u
        .conns
        .iter()
        .position(|c| c.device == conn.device)
        .map(|i| u.conns.swap_remove(i));
    if u.conns.capacity() == 0 {
        // Most users have one device: 8 bytes, not the 32 a first push reserves.
        u.conns.reserve_exact(1);
    }
    u.conns.push(conn.clone());
    old
}

/// The device of `conn` was seen now (connect, heartbeat, ping): on the Redis store its
/// presence score is refreshed (batched per loop turn).
pub fn seen(shard: &Shard, conn: &Conn) {
    shard.store.set_online(&conn.user, &conn.device, now_ms());
}

/// Removes a connection that ended; drops the user's entry when nothing else is kept.
pub fn unregister(shard: &Shard, conn: &Rc<Conn>) {
    if shard.store.keeps_presence() {
        // Another connection of the same device may have replaced this one.
        let replaced = devices(shard, &conn.user)
            .iter()
            .any(|c| c.id != conn.id && c.device == conn.device);
        if !replaced {
            shard.store.set_offline(&conn.user, &conn.device);
        }
    }
    let mut users = shard.users.borrow_mut();
    if let Some(u) = users.get_mut(&*conn.user) {
        u.conns.retain(|c| c.id != conn.id);
        if u.conns.is_empty() && u.rows.is_none() {
            users.remove(&*conn.user);
        }
    }
}

/// Takes `cost` tokens of the user's request budget, or answers 42901.
///
/// The bucket refills at `rate_limit` tokens per second up to twice that. A request is
/// let through when the bucket holds `cost` tokens (or is full, for a request that costs
/// more than the bucket can hold) and then takes its whole cost, so the bucket may go
/// below zero: a 100,000-member create is allowed, and the user waits for the debt to
/// refill before the next request.
pub fn take_tokens(shard: &Shard, user: &str, cost: u32) -> Result<(), ApiError> {
    let rate = shard.cfg.rate_limit as f32;
    if rate == 0.0 || cost == 0 {
        return Ok(());
    }
    let burst = rate * 2.0;
    let cost = cost as f32;
    let now = now_ms();
    let mut users = shard.users.borrow_mut();
    let u = user_entry(&mut users, user);
    let elapsed = if u.refilled_at == 0 {
        f32::MAX
    } else {
        (now - u.refilled_at).max(0) as f32 / 1000.0
    };
    u.tokens = (u.tokens + elapsed * rate).min(burst);
    u.refilled_at = now;
    if u.tokens >= cost.min(burst) {
        u.tokens -= cost;
        Ok(())
    } else {
        Err(ApiError::RateLimited)
    }
}

/// Counts `n` member ids against the user's `members_added_per_hour`, or answers
/// 42901 (and counts nothing).
pub fn take_member_quota(shard: &Shard, user: &str, n: usize) -> Result<(), ApiError> {
    let limit = shard.cfg.members_added_per_hour as u64;
    if limit == 0 || n == 0 {
        return Ok(());
    }
    let hour = now_ms() / 3_600_000;
    let mut users = shard.users.borrow_mut();
    let u = user_entry(&mut users, user);
    let q = u.quota.get_or_insert_with(Box::default);
    if q.hour != hour {
        q.hour = hour;
        q.used = 0;
    }
    if q.used + n as u64 > limit {
        return Err(ApiError::QuotaExceeded(format!(
            "members_added_per_hour: {} of {limit} used this hour, {n} more asked",
            q.used
        )));
    }
    q.used += n as u64;
    Ok(())
}

/// Groups the user created (counted from its conversation rows, which mark the
/// creator), against `max_groups_owned` (40301 past it).
pub async fn check_groups_owned(shard: &Rc<Shard>, user: &str) -> Result<(), ApiError> {
    let max = shard.cfg.max_groups_owned as usize;
    if max == 0 {
        return Ok(());
    }
    let owned = with_rows(shard, user, |rows| {
        rows.values().filter(|r| r.owner).count()
    })
    .await?;
    if owned >= max {
        return Err(ApiError::Forbidden(
            "max_groups_owned reached: this user may create no more groups",
        ));
    }
    Ok(())
}

/// Makes sure the user's rows are loaded (on the reader thread); tasks asking
/// meanwhile wait for the same load.
pub async fn load_rows(shard: &Rc<Shard>, user: &str) -> Result<(), ApiError> {
    loop {
        let must_load = {
            let mut users = shard.users.borrow_mut();
            let u = user_entry(&mut users, user);
            match u.rows.as_deref() {
                Some(RowsSlot::Loaded(_)) => return Ok(()),
                Some(RowsSlot::Loading { .. }) => false,
                None => {
                    u.rows = Some(Box::new(RowsSlot::Loading {
                        waiters: Vec::new(),
                        updates: Vec::new(),
                    }));
                    true
                }
            }
        };
        if must_load {
            return run_rows_load(shard, user).await;
        }
        std::future::poll_fn(|cx| {
            let mut users = shard.users.borrow_mut();
            match users.get_mut(user).and_then(|u| u.rows.as_deref_mut()) {
                Some(RowsSlot::Loading { waiters, .. }) => {
                    waiters.push(cx.waker().clone());
                    std::task::Poll::Pending
                }
                _ => std::task::Poll::Ready(()),
            }
        })
        .await;
    }
}

/// Reads the rows of a user marked `Loading`, applies the updates that arrived
/// meanwhile (in order) and stages the rows they changed.
async fn run_rows_load(shard: &Rc<Shard>, user: &str) -> Result<(), ApiError> {
    let loaded = shard.store.rows(user).await;
    finish_rows_load(shard, user, loaded)
}

/// Users whose rows a delivery needs load in batches: one reader job (or Redis
/// pipeline) per batch and one batch in flight per shard, so a 100,000-member fan-out
/// costs a queue entry per member, not a task and a job each.
const ROWS_LOAD_BATCH: usize = 512;

/// Queues `user` (marked `Loading`) for the shard's batched row loader.
fn queue_rows_load(shard: &Rc<Shard>, user: &str) {
    shard.rows_to_load.borrow_mut().push_back(user.to_string());
    if !shard.rows_loader_running.replace(true) {
        monoio::spawn(load_queued_rows(shard.clone()));
    }
}

async fn load_queued_rows(shard: Rc<Shard>) {
    loop {
        let batch: Vec<String> = {
            let mut q = shard.rows_to_load.borrow_mut();
            let n = q.len().min(ROWS_LOAD_BATCH);
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            shard.rows_loader_running.set(false);
            return;
        }
        match shard.store.rows_many(batch.clone()).await {
            Ok(all) => {
                for (user, rows) in batch.iter().zip(all) {
                    let _ = finish_rows_load(&shard, user, Ok(rows));
                }
            }
            Err(e) => {
                for user in &batch {
                    let _ = finish_rows_load(&shard, user, Err(e.clone()));
                }
            }
        }
    }
}

/// Installs the rows read for a user marked `Loading`: applies the updates that arrived
/// meanwhile (in order), stages the rows they changed and charges the cache.
fn finish_rows_load(
    shard: &Rc<Shard>,
    user: &str,
    loaded: Result<Vec<(String, ConvRow)>, crate::store::StoreError>,
) -> Result<(), ApiError> {
    let mut users = shard.users.borrow_mut();
    let u = user_entry(&mut users, user);
    let (waiters, updates) = match u.rows.take().map(|b| *b) {
        Some(RowsSlot::Loading { waiters, updates }) => (waiters, updates),
        other => {
            // Not ours any more (cannot happen: only a load replaces `Loading`).
            u.rows = other.map(Box::new);
            return Ok(());
        }
    };
    for w in waiters {
        w.wake();
    }
    let rows = match loaded {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, user, dropped = updates.len(),
                "conversation rows not loaded; their updates are lost (messages are stored)");
            return Err(e.into());
        }
    };
    let mut rows: Rows = rows
        .into_iter()
        .map(|(conv, row)| (conv.into_boxed_str(), Box::new(row)))
        .collect();
    let mut write = WriteSet::new();
    for upd in &updates {
        if let Some((row, _)) = upd.apply(user, &mut rows) {
            write.row(user, &upd.conv_id, &row);
        }
    }
    let charged = cache::USER_BYTES + rows.len() * cache::ROW_BYTES;
    let pending_batch = if write.is_empty() {
        0
    } else {
        shard.store.staging_batch()
    };
    u.rows = Some(Box::new(RowsSlot::Loaded(CachedRows {
        rows,
        charged,
        used: true,
        pending_batch,
    })));
    drop(users);
    if !write.is_empty() {
        shard.store.stage_detached(write);
    }
    cache::admit(shard, cache::CacheKey::Rows(user.into()), charged);
    Ok(())
}

/// Runs `f` on the user's rows, loading them from the store first if needed.
pub async fn with_rows<R>(
    shard: &Rc<Shard>,
    user: &str,
    f: impl FnOnce(&mut Rows) -> R,
) -> Result<R, ApiError> {
    load_rows(shard, user).await?;
    let mut users = shard.users.borrow_mut();
    match users.get_mut(user).and_then(|u| u.rows.as_deref_mut()) {
        Some(RowsSlot::Loaded(c)) => {
            c.used = true;
            Ok(f(&mut c.rows))
        }
        _ => Err(ApiError::StoreUnavailable(
            "conversation rows could not be loaded; retry".into(),
        )),
    }
}

/// The caller's row of a conversation, if it has one.
pub async fn row_of(
    shard: &Rc<Shard>,
    user: &str,
    conv_id: &str,
) -> Result<Option<ConvRow>, ApiError> {
    with_rows(shard, user, |rows| rows.get(conv_id).map(|r| (**r).clone())).await
}

/// Records that a row write of `user` was staged just now (its rows stay cached until
/// the write is settled).
pub fn note_row_write(shard: &Shard, user: &str) {
    let batch = shard.store.staging_batch();
    if let Some(RowsSlot::Loaded(c)) = shard
        .users
        .borrow_mut()
        .get_mut(user)
        .and_then(|u| u.rows.as_deref_mut())
    {
        c.pending_batch = batch;
    }
}

/// The eviction hand at a user's rows (see [`cache`]).
pub(crate) fn visit_for_eviction(shard: &Shard, user: &str) -> cache::Visit {
    let mut users = shard.users.borrow_mut();
    let Some(u) = users.get_mut(user) else {
        return cache::Visit::Gone;
    };
    let Some(RowsSlot::Loaded(c)) = u.rows.as_deref_mut() else {
        return cache::Visit::Gone;
    };
    if std::mem::replace(&mut c.used, false) || shard.store.settled_upto() < c.pending_batch {
        return cache::Visit::Keep;
    }
    let charged = c.charged;
    u.rows = None;
    if u.conns.is_empty() && u.quota.is_none() {
        users.remove(user);
    }
    cache::release(shard, charged);
    cache::Visit::Evicted
}

/// What one delivered message changes in one recipient's row. A delivery borrows the
/// conversation id (`RowUpdate<&str>`, no allocation per member); an update kept
/// until the member's rows are loaded owns it.
struct RowUpdate<C> {
    conv_id: C,
    seq: i64,
    send_time: i64,
    /// The recipient sent the message (it has read the conversation up to it).
    sender: bool,
    /// The message removes the recipient from the group.
    left: bool,
}

impl RowUpdate<&str> {
    fn to_owned(&self) -> RowUpdate<String> {
        RowUpdate {
            conv_id: self.conv_id.to_string(),
            seq: self.seq,
            send_time: self.send_time,
            sender: self.sender,
            left: self.left,
        }
    }
}

impl<C: AsRef<str>> RowUpdate<C> {
    /// Applies the update (creating the row on the first message); the row when it
    /// changed, and whether the change is only the sender's own read mark (which may
    /// be stored lazily: [`crate::store::ShardStore::stage_lazy`]).
    fn apply(&self, user: &str, rows: &mut Rows) -> Option<(ConvRow, bool)> {
        let conv = ConvRef::parse(self.conv_id.as_ref()).ok()?;
        let mut changed = false;
        if !rows.contains_key(self.conv_id.as_ref()) {
            changed = true;
            let row = ConvRow {
                conv_type: conv.conv_type() as i32,
                target: match &conv {
                    ConvRef::P2p { .. } => conv.p2p_peer(user).unwrap_or_default().to_string(),
                    ConvRef::Group { group } => group.to_string(),
                },
                created_at: self.send_time,
                ..ConvRow::default()
            };
            rows.insert(self.conv_id.as_ref().into(), Box::new(row));
        }
        let row = rows.get_mut(self.conv_id.as_ref())?;
        if row.deleted && self.seq > row.clear_seq {
            row.deleted = false;
            changed = true;
        }
        // Sending a message means having read the conversation up to it.
        let mut read_mark = false;
        if self.sender && row.read_seq < self.seq {
            row.read_seq = self.seq;
            read_mark = true;
        }
        // A group's first message is its creation, sent by its owner.
        if self.seq == 1 && self.sender && !row.owner {
            if let ConvRef::Group { .. } = conv {
                row.owner = true;
                changed = true;
            }
        }
        if self.left {
            row.left_seq = self.seq;
            changed = true;
        } else if row.left_seq > 0 && self.seq > row.left_seq {
            row.left_seq = 0;
            changed = true;
        }
        row.max_seq = row.max_seq.max(self.seq);
        row.updated_at = row.updated_at.max(self.send_time);
        (changed || read_mark).then(|| ((**row).clone(), !changed))
    }
}

/// Updates the recipients' rows (creating them on the first message) and writes the
/// pushed frame to every online device but the sending one. Pushes go out at once;
/// the row of a user whose rows are not loaded yet is updated when they are (in the
/// order its messages arrived), so delivery never waits for the store.
pub fn deliver(shard: &Rc<Shard>, d: &Delivery) {
    let mut write = WriteSet::new();
    let mut lazy = WriteSet::new();
    for user in d.users.iter() {
        let user: &str = user;
        let upd = RowUpdate {
            conv_id: d.conv_id.as_str(),
            seq: d.seq,
            send_time: d.send_time,
            sender: user == d.except_user,
            left: d.left.iter().any(|u| u == user),
        };
        let start_load = {
            let mut users = shard.users.borrow_mut();
            let u = user_entry(&mut users, user);
            match u.rows.as_deref_mut() {
                Some(RowsSlot::Loaded(c)) => {
                    c.used = true;
                    let before = c.rows.len();
                    if let Some((row, only_read_mark)) = upd.apply(user, &mut c.rows) {
                        let w = if only_read_mark {
                            &mut lazy
                        } else {
                            &mut write
                        };
                        w.row(user, &d.conv_id, &row);
                        c.pending_batch = shard.store.staging_batch();
                    }
                    if c.rows.len() > before {
                        c.charged += cache::ROW_BYTES;
                        cache::grow(shard, cache::ROW_BYTES);
                    }
                    false
                }
                Some(RowsSlot::Loading { updates, .. }) => {
                    updates.push(upd.to_owned());
                    false
                }
                None => {
                    u.rows = Some(Box::new(RowsSlot::Loading {
                        waiters: Vec::new(),
                        updates: vec![upd.to_owned()],
                    }));
                    true
                }
            }
        };
        if start_load {
            queue_rows_load(shard, user);
        }
        if !d.push {
            continue;
        }
        for c in devices(shard, user) {
            if *c.user == *d.except_user && *c.device == *d.except_device {
                continue;
            }
            shard.stats.pushes.set(shard.stats.pushes.get() + 1);
            c.send(shard, d.frame.clone());
        }
    }
    if !write.is_empty() {
        shard.store.stage_detached(write);
    }
    if !lazy.is_empty() {
        shard.store.stage_lazy(lazy);
    }
}

/// Writes a notice frame to every online device of these users.
pub fn notify(shard: &Rc<Shard>, frame: &bytes::Bytes, users: &[super::fanout::UserId]) {
    for user in users {
        for c in devices(shard, user) {
            c.send(shard, frame.clone());
        }
    }
}

/// The user's online connections (cloned handles; on the stack for up to two devices,
/// so a delivery does not allocate per member).
pub fn devices(shard: &Shard, user: &str) -> Devices {
    shard
        .users
        .borrow()
        .get(user)
        .map(|u| u.conns.iter().cloned().collect())
        .unwrap_or_default()
}

/// A user's online connections, as [`devices`] hands them out.
pub type Devices = smallvec::SmallVec<[Rc<Conn>; 2]>;
