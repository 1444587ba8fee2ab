//! Conversation rows of the caller, on the caller's user shard: the conversation list,
//! mark read, delete, settings and unread. Max seq and last message come from each
//! conversation's shard (one `ConvInfo` call per shard), so they are never stale.
//!
//! - `updated_at` of an item is the later of its last message's send_time and the last
//!   change of the row itself (created, read, deleted, settings), so `updated_since`
//!   finds every conversation that changed for this user.
//! - Order: updated_at descending, then conv_id ascending. A page never ends inside a run
//!   of rows sharing one updated_at: it is extended to the end of the run, so the next
//!   page (`updated_at < cursor`) neither repeats nor skips a row.
//! - A deleted row is hidden while the conversation's max_seq <= its clear_seq.

use std::collections::HashMap;
use std::rc::Rc;

use prost::Message as _;

use super::Shard;
use super::{check_party, user, Caller, PullCmd, Response};
use crate::codes::ApiError;
use crate::limits;
use crate::proto::envelope::{kind, notice_frame, now_ms};
use crate::proto::pb::{
    ConvType, ConversationItem, DeleteConversationRequest, DeleteConversationResponse,
    GetConversationsRequest, GetConversationsResponse, GetUnreadRequest, GetUnreadResponse,
    MarkReadNotice, MarkReadRequest, MarkReadResponse, UnreadConversation,
    UpdateConvSettingsRequest, UpdateConvSettingsResponse,
};
use crate::proto::store_pb::{ConvRow, ConvSummary};
use crate::store::WriteSet;

/// Asks the conversations' shards for their summaries.
async fn summaries(
    shard: &Rc<Shard>,
    conv_ids: Vec<String>,
) -> Result<HashMap<String, ConvSummary>, ApiError> {
    let items = super::node::conv_info(shard, conv_ids).await?;
    let mut out = HashMap::with_capacity(items.len());
    out.extend(items.into_iter().map(|i| (i.conv_id.clone(), i)));
    Ok(out)
}

async fn summary(shard: &Rc<Shard>, conv_id: &str) -> Result<ConvSummary, ApiError> {
    summaries(shard, vec![conv_id.to_string()])
        .await?
        .remove(conv_id)
        .ok_or_else(|| ApiError::Internal("no summary".into()))
}

fn item(conv_id: String, row: &ConvRow, s: Option<ConvSummary>) -> ConversationItem {
    let (mut max_seq, mut last_msg) = s.map_or((0, None), |s| (s.max_seq, s.last_msg));
    // A removed group member sees the conversation as it was when they left.
    if row.left_seq > 0 && max_seq > row.left_seq {
        max_seq = row.left_seq;
        last_msg = None;
    }
    let last_time = last_msg.as_ref().map_or(0, |m| m.send_time);
    ConversationItem {
        conv_id,
        conv_type: row.conv_type,
        target_uuid: row.target.clone(),
        last_msg,
        unread_count: (max_seq - row.read_seq).clamp(0, i32::MAX as i64) as i32,
        mute: row.mute,
        pin: row.pin,
        updated_at: row.updated_at.max(last_time).max(row.created_at),
        max_seq,
        read_seq: row.read_seq,
        clear_seq: row.clear_seq,
    }
}

/// Every visible conversation of the user, newest first.
async fn visible_items(shard: &Rc<Shard>, user: &str) -> Result<Vec<ConversationItem>, ApiError> {
    let rows: Vec<(String, ConvRow)> = user::with_rows(shard, user, |rows| {
        rows.iter()
            .map(|(k, v)| (k.to_string(), (**v).clone()))
            .collect()
    })
    .await?;
    let mut sums = summaries(shard, rows.iter().map(|(c, _)| c.clone()).collect()).await?;
    let mut items: Vec<ConversationItem> = rows
        .into_iter()
        .filter_map(|(conv_id, row)| {
            let s = sums.remove(&conv_id);
            let it = item(conv_id, &row, s);
            let hidden = row.deleted && it.max_seq <= row.clear_seq;
            (!hidden).then_some(it)
        })
        .collect();
    items.sort_by(|a, b| {
        b.updated_at
            .cmp(&a.updated_at)
            .then_with(|| a.conv_id.cmp(&b.conv_id))
    });
    Ok(items)
}

pub async fn get_conversations(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: GetConversationsRequest,
) -> Result<Response, ApiError> {
    if req.updated_since < 0 || req.cursor < 0 {
        return Err(ApiError::invalid("updated_since and cursor must be >= 0"));
    }
    let page_size = match req.page_size {
        p if p < 0 => return Err(ApiError::invalid("page_size must be >= 0")),
        0 => limits::CONV_PAGE_DEFAULT,
        p => p.min(limits::CONV_PAGE_MAX),
    } as usize;
    let items: Vec<ConversationItem> = visible_items(shard, &caller.user)
        .await?
        .into_iter()
        .filter(|i| i.updated_at > req.updated_since)
        .filter(|i| req.cursor == 0 || i.updated_at < req.cursor)
        .collect();
    // Items carry their last message (up to max_content_bytes each): the page also
    // ends at the reply budget, so 200 of them never cut the caller as a slow reader.
    let budget = limits::reply_budget(shard.cfg.outbound_queue_bytes);
    let mut end = 0;
    let mut bytes = 0;
    while end < items.len().min(page_size) {
        bytes += items[end].encoded_len();
        if end > 0 && bytes > budget {
            break;
        }
        end += 1;
    }
    while end > 0 && end < items.len() && items[end].updated_at == items[end - 1].updated_at {
        end += 1;
    }
    let has_more = end < items.len();
    let mut page = items;
    page.truncate(end);
    let next_cursor = page.last().map_or(0, |i| i.updated_at);
    Ok(GetConversationsResponse {
        conversations: page,
        has_more,
        next_cursor,
    }
    .into())
}

/// Changes the caller's row with `f` and waits until the change is durable.
async fn update_row(
    shard: &Rc<Shard>,
    user: &str,
    conv_id: &str,
    f: impl FnOnce(&mut ConvRow),
) -> Result<ConvRow, ApiError> {
    update_row_and(shard, user, conv_id, f, |_, _| {}).await
}

/// [`update_row`], with `extra` adding to the same atomic write (an event).
async fn update_row_and(
    shard: &Rc<Shard>,
    user: &str,
    conv_id: &str,
    f: impl FnOnce(&mut ConvRow),
    extra: impl FnOnce(&ConvRow, &mut WriteSet),
) -> Result<ConvRow, ApiError> {
    let row = user::with_rows(shard, user, |rows| {
        rows.get_mut(conv_id).map(|row| {
            f(row);
            row.updated_at = row.updated_at.max(now_ms());
            (**row).clone()
        })
    })
    .await?
    .ok_or(ApiError::NotFound("no such conversation"))?;
    let mut write = WriteSet::new();
    write.row(user, conv_id, &row);
    extra(&row, &mut write);
    let durable = shard.store.stage(write);
    user::note_row_write(shard, user);
    match durable.await {
        Ok(Ok(())) => Ok(row),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ApiError::StoreUnavailable("store closed".into())),
    }
}

/// The caller must have a row for the conversation. Without one, a p2p party (already
/// checked) just has no messages yet (40401); for a group it was never a member (40301).
async fn has_row(shard: &Rc<Shard>, user: &str, conv_id: &str) -> Result<(), ApiError> {
    match user::row_of(shard, user, conv_id).await? {
        Some(_) => Ok(()),
        None if conv_id.starts_with(crate::ids::GROUP_CONV_PREFIX) => {
            Err(ApiError::Forbidden("not a member of this conversation"))
        }
        None => Err(ApiError::NotFound("no such conversation")),
    }
}

pub async fn mark_read(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: MarkReadRequest,
) -> Result<Response, ApiError> {
    check_party(&req.conv_id, &caller.user)?;
    if req.read_seq < 1 {
        return Err(ApiError::invalid("read_seq must be >= 1"));
    }
    has_row(shard, &caller.user, &req.conv_id).await?;
    let left_seq = user::row_of(shard, &caller.user, &req.conv_id)
        .await?
        .map_or(0, |r| r.left_seq);
    let mut max_seq = summary(shard, &req.conv_id).await?.max_seq;
    if left_seq > 0 {
        max_seq = max_seq.min(left_seq);
    }
    let wanted = req.read_seq.min(max_seq);
    let before = user::row_of(shard, &caller.user, &req.conv_id)
        .await?
        .map_or(0, |r| r.read_seq);
    let row = if wanted > before {
        let row = update_row_and(
            shard,
            &caller.user,
            &req.conv_id,
            |r| r.read_seq = r.read_seq.max(wanted),
            |row, write| {
                super::events::stage(shard, write, |o| {
                    crate::eventlog::record::read_mark(
                        o,
                        &caller.user,
                        &caller.device,
                        &req.conv_id,
                        row.read_seq,
                    )
                })
            },
        )
        .await?;
        super::events::notify(shard);
        let frame = notice_frame(
            kind::MSG_MARK_READ,
            &MarkReadNotice {
                conv_id: req.conv_id.clone(),
                read_seq: row.read_seq,
            },
        );
        if super::node::clustered(shard) {
            // The user's other devices may be on other nodes.
            let me = [super::fanout::UserId::from(caller.user.as_str())];
            let except = Some((caller.user.as_str(), caller.device.as_str()));
            super::routes::publish_notice(shard, &frame, None, &me, except);
        } else {
            for c in user::devices(shard, &caller.user) {
                if *c.device != *caller.device {
                    c.send(shard, frame.clone());
                }
            }
        }
        row
    } else {
        user::row_of(shard, &caller.user, &req.conv_id)
            .await?
            .ok_or(ApiError::NotFound("no such conversation"))?
    };
    let unread_count = (max_seq - row.read_seq).clamp(0, i32::MAX as i64) as i32;
    Ok(MarkReadResponse { unread_count }.into())
}

pub async fn delete(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: DeleteConversationRequest,
) -> Result<Response, ApiError> {
    check_party(&req.conv_id, &caller.user)?;
    has_row(shard, &caller.user, &req.conv_id).await?;
    let max_seq = summary(shard, &req.conv_id).await?.max_seq;
    update_row(shard, &caller.user, &req.conv_id, |r| {
        r.clear_seq = r.clear_seq.max(max_seq);
        r.read_seq = r.read_seq.max(max_seq);
        r.deleted = true;
    })
    .await?;
    Ok(DeleteConversationResponse {}.into())
}

pub async fn update_settings(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: UpdateConvSettingsRequest,
) -> Result<Response, ApiError> {
    check_party(&req.conv_id, &caller.user)?;
    has_row(shard, &caller.user, &req.conv_id).await?;
    update_row(shard, &caller.user, &req.conv_id, |r| {
        if let Some(m) = req.mute {
            r.mute = m;
        }
        if let Some(p) = req.pin {
            r.pin = p;
        }
    })
    .await?;
    Ok(UpdateConvSettingsResponse {}.into())
}

/// Every conversation with unread messages, with up to `per_conv_limit` of them (the
/// newest, in ascending order), and the total: what an app needs after being offline.
/// Conversations are listed (most recently updated first) until the reply holds
/// [`limits::reply_budget`] bytes; then `has_more` is set and the rest is left to Pull
/// (`total_unread` still counts every conversation).
pub async fn get_unread(
    shard: &Rc<Shard>,
    caller: &Caller,
    req: GetUnreadRequest,
) -> Result<Response, ApiError> {
    let limit = match req.per_conv_limit {
        l if l < 0 => return Err(ApiError::invalid("per_conv_limit must be >= 0")),
        0 => limits::UNREAD_PER_CONV_DEFAULT,
        l => l.min(limits::UNREAD_PER_CONV_MAX),
    } as usize;
    let items: Vec<ConversationItem> = visible_items(shard, &caller.user)
        .await?
        .into_iter()
        .filter(|i| i.unread_count > 0)
        .collect();
    let total_unread: i64 = items.iter().map(|i| i64::from(i.unread_count)).sum();
    // One budget for the whole reply, so it fits the caller's outbound queue. Pulls run
    // one after another, each with what is left: at most one budget of messages is in
    // memory, however many conversations are unread.
    let budget = limits::reply_budget(shard.cfg.outbound_queue_bytes);
    let mut used = 0usize;
    let mut has_more = false;
    let mut conversations = Vec::new();
    for conversation in items {
        if used >= budget {
            has_more = true;
            break;
        }
        let cmd = PullCmd {
            conv_id: conversation.conv_id.clone(),
            user: caller.user.clone(),
            anchor_seq: 0,
            limit: limit as u32,
            backward: true,
            clear_seq: conversation.read_seq.max(conversation.clear_seq),
            max_bytes: (budget - used) as u64,
        };
        let pulled = super::node::pull(shard, cmd).await;
        // A removed group member keeps the unread count of what came before the removal
        // but may no longer read the group: no messages for that row.
        let messages = match pulled {
            Ok(page) => {
                // Fewer than asked for with more below: the budget cut it short.
                if page.has_more && page.messages.len() < limit {
                    has_more = true;
                }
                page.messages
            }
            Err(ApiError::Forbidden(_)) if conversation.conv_type == ConvType::Group as i32 => {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let entry = UnreadConversation {
            conversation: Some(conversation),
            messages,
        };
        used += entry.encoded_len();
        conversations.push(entry);
        if has_more {
            break;
        }
    }
    Ok(GetUnreadResponse {
        total_unread,
        conversations,
        has_more,
    }
    .into())
}
