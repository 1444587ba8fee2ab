//! The HTTP side of the port: `/healthz`, `/metrics`, the JSON API of docs/PROTOCOL.md
//! and (with `demo` on) the chat page ([`crate::web`]).
//! API calls run the same operations as the WebSocket ([`crate::chat::execute`]) on the
//! caller's user shard, so both transports give identical results.

use std::rc::Rc;

use serde_json::Value;

use crate::chat::Shard;
use crate::chat::{self, Caller};
use crate::codes::ApiError;
use crate::proto::http::{self, Head};
use crate::proto::pb::{self, client_frame::Body};

/// Answers one HTTP request with a complete response.
pub async fn handle(shard: &Rc<Shard>, head: &Head, body: &[u8]) -> Vec<u8> {
    let ka = head.keep_alive;
    match (head.method.as_str(), head.path.as_str()) {
        ("GET", "/healthz") => healthz(shard, ka).await,
        ("GET", "/metrics") => metrics(shard, ka).await,
        ("GET", r) if r.starts_with("/demo") && shard.cfg.demo => crate::web::serve(r, ka),
        (_, p) if p.starts_with("/api/v1/") => match api(shard, head, body).await {
            Ok(data) => http::json_ok(data, ka),
            Err(e) => http::json_err(&e, ka),
        },
        _ => http::json_err(&ApiError::NotFound("no such path"), ka),
    }
}

/// The operators' paths: served only on `admin_listen` when that is set.
pub fn is_admin_path(path: &str) -> bool {
    path == "/metrics" || path == "/healthz" || path.starts_with("/api/v1/admin/")
}

async fn healthz(shard: &Rc<Shard>, ka: bool) -> Vec<u8> {
    let mut pending = Vec::with_capacity(shard.n);
    for target in 0..shard.n {
        pending.push(shard.call(target, |shard, reply| shard.reply(reply, ())));
    }
    for p in pending {
        let answered = monoio::time::timeout(std::time::Duration::from_secs(2), p).await;
        if !matches!(answered, Ok(Ok(_))) {
            return http::response(503, "text/plain", b"a shard did not answer\n", ka);
        }
    }
    http::response(200, "text/plain", b"ok\n", ka)
}

/// Every metric: name, Prometheus type, help. One value per shard each, in this order
/// (see [`metric_values`]).
pub const METRICS: [(&str, &str, &str); 30] = [
    ("imshard_connections", "gauge", "open WebSocket connections"),
    (
        "imshard_connections_total",
        "counter",
        "WebSocket connections accepted",
    ),
    (
        "imshard_handovers_total",
        "counter",
        "connections handed over from another shard",
    ),
    (
        "imshard_messages_stored_total",
        "counter",
        "messages made durable",
    ),
    (
        "imshard_pushes_total",
        "counter",
        "MSG_PUSH frames queued to devices",
    ),
    (
        "imshard_slow_reader_cuts_total",
        "counter",
        "connections cut as slow readers",
    ),
    (
        "imshard_heartbeat_timeouts_total",
        "counter",
        "connections closed for silence",
    ),
    (
        "imshard_store_sync_rounds_total",
        "counter",
        "store rounds: commits, each with its fsync unless it held lazy writes only",
    ),
    (
        "imshard_store_fsyncs_total",
        "counter",
        "embedded store: fsyncs (a round of lazy writes, such as a sender's own read mark, rides on the next fsync, at most 50 ms later; 0 on --store redis, where Redis fsyncs)",
    ),
    (
        "imshard_store_sync_slow_rounds_total",
        "counter",
        "store rounds that took 10 ms or more",
    ),
    (
        "imshard_store_sync_seconds_total",
        "counter",
        "time spent in store rounds",
    ),
    (
        "imshard_cache_bytes",
        "gauge",
        "bytes charged for cached rows and conversation states (budget: cache_bytes / shards)",
    ),
    (
        "imshard_cached_users",
        "gauge",
        "users held in memory (online, or with cached rows)",
    ),
    (
        "imshard_cached_conversations",
        "gauge",
        "conversation states held in memory",
    ),
    (
        "imshard_cache_evictions_total",
        "counter",
        "cached rows and conversation states evicted",
    ),
    (
        "imshard_cluster_nodes",
        "gauge",
        "cluster mode: live nodes in this shard's slot map (0 on a single node)",
    ),
    (
        "imshard_cluster_active",
        "gauge",
        "cluster mode: 1 while this node holds its lease and may own conversations",
    ),
    (
        "imshard_node_requests_forwarded_total",
        "counter",
        "cluster mode: operations sent to their owner node",
    ),
    (
        "imshard_node_requests_served_total",
        "counter",
        "cluster mode: operations served for other nodes",
    ),
    (
        "imshard_publishes_total",
        "counter",
        "cluster mode: pushes and notices published on the channels",
    ),
    (
        "imshard_channel_messages_total",
        "counter",
        "cluster mode: pushes and notices the node read from its subscription (once per node; on shard 0, which hands each to the shards that want it)",
    ),
    (
        "imshard_channels",
        "gauge",
        "cluster mode: channels the node subscribes to (on shard 0: the channels of every shard's users and their groups)",
    ),
    (
        "imshard_resyncs_total",
        "counter",
        "cluster mode: RESYNC notices after a subscription came back",
    ),
    crate::eventlog::METRICS[0],
    crate::eventlog::METRICS[1],
    crate::eventlog::METRICS[2],
    crate::eventlog::METRICS[3],
    crate::eventlog::METRICS[4],
    crate::eventlog::METRICS[5],
    crate::eventlog::METRICS[6],
];

/// This shard's values for [`METRICS`] (the last one in microseconds).
pub fn metric_values(shard: &Shard) -> [u64; 30] {
    let c = &shard.counters;
    let (rounds, fsyncs, slow, micros) = shard.store.sync_stats();
    let node = shard.node.get();
    let routes = node.and_then(|n| n.routes.get());
    let ev = shard.events.get().map_or([0; 7], |e| {
        e.log.stats().metric_values(Some(&e.outbox.stats()))
    });
    [
        c.connections.get(),
        c.connections_total.get(),
        c.handovers.get(),
        shard.stats.messages_stored.get(),
        shard.stats.pushes.get(),
        c.slow_reader_cuts.get(),
        c.heartbeat_timeouts.get(),
        rounds,
        fsyncs,
        slow,
        micros,
        shard.cache_bytes.get() as u64,
        shard.users.borrow().len() as u64,
        shard.convs.borrow().len() as u64,
        shard.stats.cache_evictions.get(),
        node.map_or(0, |n| n.map.borrow().nodes().len() as u64),
        node.map_or(0, |n| n.active.get() as u64),
        node.map_or(0, |n| n.forwarded.get()),
        node.map_or(0, |n| n.served.get()),
        routes.map_or(0, |r| r.published.sent.get()),
        routes.map_or(0, |r| r.read()),
        routes.map_or(0, |r| r.held() as u64),
        routes.map_or(0, |r| r.resyncs.get()),
        ev[0],
        ev[1],
        ev[2],
        ev[3],
        ev[4],
        ev[5],
        ev[6],
    ]
}

/// Prometheus text of every shard (asked over the rings), one series per shard; a
/// shard that does not answer within 2 s shows as `imshard_shard_up 0`.
async fn metrics(shard: &Rc<Shard>, ka: bool) -> Vec<u8> {
    let mut pending = Vec::with_capacity(shard.n);
    for target in 0..shard.n {
        pending.push(shard.call(target, |shard, reply| {
            shard.reply(reply, crate::metrics::snapshot(shard))
        }));
    }
    let mut per_shard = Vec::with_capacity(shard.n);
    for p in pending {
        let answered = monoio::time::timeout(std::time::Duration::from_secs(2), p).await;
        per_shard.push(match answered {
            Ok(Ok(m)) => Some(m),
            _ => None,
        });
    }
    let out = crate::metrics::render(&METRICS, &per_shard);
    http::response(200, "text/plain; version=0.0.4", out.as_bytes(), ka)
}

async fn api(shard: &Rc<Shard>, head: &Head, body: &[u8]) -> Result<Value, ApiError> {
    let token = head
        .token()
        .ok_or(ApiError::Unauthenticated("missing token"))?;
    let claims = shard.verifier.verify(&token).map_err(ApiError::from)?;
    let caller = Caller {
        user: claims.sub,
        device: claims.did,
        admin: claims.adm,
    };
    let method = head.method.as_str();
    let path = head.path.as_str();
    if let Some(admin_path) = path.strip_prefix("/api/v1/admin/") {
        if !caller.admin {
            return Err(ApiError::Forbidden("admin token required"));
        }
        return admin_api(shard, method, admin_path, head, body).await;
    }
    let Some(route) = path.strip_prefix("/api/v1/auth/") else {
        return Err(ApiError::NotFound("no such API route"));
    };
    let (op, to_json) = auth_request(method, route, &head.query, body)?;
    let response = chat::execute(shard, &caller, op).await?;
    to_json(&response.encode())
}

/// The pure part of an `/api/v1/auth/` call: (method, route after the prefix, query,
/// body) to the operation and the decoder of its answer. Bad JSON, numbers or path
/// segments are 40001, an unknown route 40401; nothing here panics on any input.
pub fn auth_request(
    method: &str,
    route: &str,
    query: &str,
    body: &[u8],
) -> Result<(Body, ToJson), ApiError> {
    let op: (Body, ToJson) = match (method, route) {
        ("POST", "msg/send") => (
            Body::Send(json_body(body)?),
            to_json::<pb::SendMessageResponse>,
        ),
        ("GET", "msg/pull") => (
            Body::Pull(pb::PullMessagesRequest {
                conv_id: http::query_param(query, "conv_id").unwrap_or_default(),
                anchor_seq: query_num(query, "anchor_seq")?,
                limit: query_num(query, "limit")?,
                direction: query_num(query, "direction")?,
            }),
            to_json::<pb::PullMessagesResponse>,
        ),
        ("POST", "msg/by_ids") => (
            Body::GetByIds(json_body(body)?),
            to_json::<pb::GetMessagesByIdsResponse>,
        ),
        ("POST", "msg/recall") => (
            Body::Recall(json_body(body)?),
            to_json::<pb::RecallMessageResponse>,
        ),
        ("GET", "conversations") => (
            Body::GetConversations(pb::GetConversationsRequest {
                updated_since: query_num(query, "updated_since")?,
                page_size: query_num(query, "page_size")?,
                cursor: query_num(query, "cursor")?,
            }),
            to_json::<pb::GetConversationsResponse>,
        ),
        ("POST", "conversations/mark_read") => (
            Body::MarkRead(json_body(body)?),
            to_json::<pb::MarkReadResponse>,
        ),
        ("DELETE", r) if r.starts_with("conversations/") => (
            Body::DeleteConversation(pb::DeleteConversationRequest {
                conv_id: path_param(r, "conversations/")?,
            }),
            to_json::<pb::DeleteConversationResponse>,
        ),
        ("PATCH", r) if r.starts_with("conversations/") => {
            let settings: Settings = json_body(body)?;
            (
                Body::UpdateSettings(pb::UpdateConvSettingsRequest {
                    conv_id: path_param(r, "conversations/")?,
                    mute: settings.mute,
                    pin: settings.pin,
                }),
                to_json::<pb::UpdateConvSettingsResponse>,
            )
        }
        ("GET", "unread") => (
            Body::GetUnread(pb::GetUnreadRequest {
                per_conv_limit: query_num(query, "per_conv_limit")?,
            }),
            to_json::<pb::GetUnreadResponse>,
        ),
        ("POST", "groups") => (
            Body::CreateGroup(json_body(body)?),
            to_json::<pb::CreateGroupResponse>,
        ),
        ("POST", r) if r.starts_with("groups/") && r.ends_with("/members") => {
            let group_id = path_param(r.trim_end_matches("/members"), "groups/")?;
            let mut req: pb::UpdateGroupMembersRequest = json_body(body)?;
            if !req.group_id.is_empty() && req.group_id != group_id {
                return Err(ApiError::invalid(
                    "group_id in the body differs from the path",
                ));
            }
            req.group_id = group_id;
            (
                Body::UpdateMembers(req),
                to_json::<pb::UpdateGroupMembersResponse>,
            )
        }
        _ => return Err(ApiError::NotFound("no such API route")),
    };
    Ok(op)
}

/// The PATCH body of a conversation: only the fields present change.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    mute: Option<bool>,
    pin: Option<bool>,
}

/// The last path segment after `prefix`, percent-decoded; it must be one segment.
fn path_param(route: &str, prefix: &str) -> Result<String, ApiError> {
    let raw = route.strip_prefix(prefix).unwrap_or_default();
    if raw.is_empty() || raw.contains('/') {
        return Err(ApiError::NotFound("no such API route"));
    }
    Ok(http::percent_decode(raw))
}

/// Decodes an encoded XxxResponse into the JSON `data` of the reply.
pub type ToJson = fn(&[u8]) -> Result<Value, ApiError>;

fn to_json<T: prost::Message + Default + serde::Serialize>(
    bytes: &[u8],
) -> Result<Value, ApiError> {
    let msg = T::decode(bytes).map_err(|e| ApiError::Internal(format!("response: {e}")))?;
    serde_json::to_value(msg).map_err(|e| ApiError::Internal(e.to_string()))
}

/// Parses a JSON request body; malformed JSON or a wrong type is 40001.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("bad JSON body: {e}")))
}

fn query_num<T: std::str::FromStr + Default>(query: &str, key: &str) -> Result<T, ApiError> {
    match http::query_param(query, key) {
        None => Ok(T::default()),
        Some(v) if v.is_empty() => Ok(T::default()),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::invalid(format!("{key} must be a number"))),
    }
}

/// Admin routes (the caller's token has `adm: true`).
async fn admin_api(
    shard: &Rc<Shard>,
    method: &str,
    route: &str,
    head: &Head,
    body: &[u8],
) -> Result<Value, ApiError> {
    match (method, route) {
        ("POST", "kick") => {
            let ev = kick_body(body)?;
            // Cluster mode: every other node kicks on the channel.
            let published = publish_event(shard, crate::cluster::events::KICK_CHANNEL, &ev).await?;
            let target = shard.user_shard(&ev.user_uuid);
            let n = shard
                .call(target, move |shard, reply| {
                    let n =
                        chat::admin::kick_local(shard, &ev.user_uuid, &ev.device_id, &ev.reason);
                    shard.reply(reply, n)
                })
                .await?;
            Ok(match published {
                Some(nodes) => serde_json::json!({ "kicked": n, "published_to": nodes }),
                None => serde_json::json!({ "kicked": n }),
            })
        }
        ("POST", "broadcast") => {
            let (users, envelope) = broadcast_body(body)?;
            let frame = crate::proto::envelope::envelope_frame(&envelope);
            let event = pb::BroadcastEvent {
                user_uuids: users.clone(),
                message: Some(envelope),
            };
            if chat::node::clustered(shard) {
                chat::admin::note_own_broadcast(shard, &prost::Message::encode_to_vec(&event));
            }
            let published =
                publish_event(shard, crate::cluster::events::BROADCAST_CHANNEL, &event).await?;
            let calls: Vec<_> = if users.is_empty() {
                (0..shard.n)
                    .map(|t| {
                        let frame = frame.clone();
                        shard.call(t, move |shard, reply| {
                            let n = chat::admin::broadcast_local(shard, &frame, None);
                            shard.reply(reply, n)
                        })
                    })
                    .collect()
            } else {
                group_by_user_shard(shard, users)
                    .into_iter()
                    .map(|(t, users)| {
                        let frame = frame.clone();
                        shard.call(t, move |shard, reply| {
                            let n = chat::admin::broadcast_local(shard, &frame, Some(&users));
                            shard.reply(reply, n)
                        })
                    })
                    .collect()
            };
            let mut delivered = 0;
            for c in calls {
                delivered += c.await?;
            }
            Ok(match published {
                Some(nodes) => serde_json::json!({ "delivered": delivered, "published_to": nodes }),
                None => serde_json::json!({ "delivered": delivered }),
            })
        }
        ("GET", "presence") => {
            let list = head.query_param("uuids").unwrap_or_default();
            let users: Vec<String> = list
                .split(',')
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect();
            if users.is_empty() || users.len() > 1000 {
                return Err(ApiError::invalid("uuids must list 1-1000 user uuids"));
            }
            for u in &users {
                crate::ids::check_id("uuids", u)?;
            }
            if chat::node::clustered(shard) {
                // Devices on every node: the presence ZSETs (a single node answers
                // from its own connections, exactly).
                let window = shard.cfg.heartbeat_timeout.as_millis() as i64;
                if let Some(found) = shard.store.online_devices(&users, window).await? {
                    let mut online = serde_json::Map::new();
                    for (user, devices) in users.into_iter().zip(found) {
                        online.insert(user, serde_json::json!(devices));
                    }
                    return Ok(serde_json::json!({ "online": online }));
                }
            }
            let calls: Vec<_> = group_by_user_shard(shard, users)
                .into_iter()
                .map(|(t, users)| {
                    shard.call(t, move |shard, reply| {
                        shard.reply(reply, chat::admin::presence_local(shard, &users))
                    })
                })
                .collect();
            let mut online = serde_json::Map::new();
            for c in calls {
                for (user, devices) in c.await? {
                    online.insert(user, serde_json::json!(devices));
                }
            }
            Ok(serde_json::json!({ "online": online }))
        }
        _ => Err(ApiError::NotFound("no such admin route")),
    }
}

/// A KickEvent in JSON, checked: ids valid (`device_id` may be `ALL`), and `reason`
/// replaced by the KICKOUT reason to send ([`chat::admin::kick_reason`]).
pub fn kick_body(body: &[u8]) -> Result<pb::KickEvent, ApiError> {
    let mut ev: pb::KickEvent = json_body(body)?;
    crate::ids::check_id("user_uuid", &ev.user_uuid)?;
    if ev.device_id != "ALL" {
        crate::ids::check_id("device_id", &ev.device_id)?;
    }
    ev.reason = chat::admin::kick_reason(&ev.reason)?;
    Ok(ev)
}

fn group_by_user_shard(shard: &Shard, users: Vec<String>) -> Vec<(usize, Vec<String>)> {
    let mut by: Vec<Vec<String>> = vec![Vec::new(); shard.n];
    for u in users {
        by[shard.user_shard(&u)].push(u);
    }
    by.into_iter()
        .enumerate()
        .filter(|(_, u)| !u.is_empty())
        .collect()
}

/// A BroadcastEvent in JSON: `message.data` is base64.
pub fn broadcast_body(body: &[u8]) -> Result<(Vec<String>, pb::MessageEnvelope), ApiError> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Event {
        #[serde(default)]
        user_uuids: Vec<String>,
        message: Envelope,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Envelope {
        r#type: String,
        #[serde(default)]
        data: String,
        #[serde(default)]
        seq: i64,
        #[serde(default)]
        server_ts: i64,
        #[serde(default)]
        trace_id: String,
        #[serde(default)]
        ack_required: bool,
    }
    let ev: Event = json_body(body)?;
    if ev.message.r#type.is_empty() {
        return Err(ApiError::invalid("message.type must not be empty"));
    }
    for u in &ev.user_uuids {
        crate::ids::check_id("user_uuids", u)?;
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(ev.message.data.as_bytes())
        .map_err(|_| ApiError::invalid("message.data must be base64"))?;
    let server_ts = if ev.message.server_ts == 0 {
        crate::proto::envelope::now_ms()
    } else {
        ev.message.server_ts
    };
    Ok((
        ev.user_uuids,
        pb::MessageEnvelope {
            r#type: ev.message.r#type,
            data: data.into(),
            seq: ev.message.seq,
            server_ts,
            trace_id: ev.message.trace_id,
            ack_required: ev.message.ack_required,
            req_id: 0,
        },
    ))
}

/// Cluster mode: publishes an admin event on its channel for the other nodes (this
/// node acts on it directly and ignores its own copy's effect: the connections are
/// already gone or written to). How many subscribers got it; `None` on a single node.
async fn publish_event(
    shard: &Rc<Shard>,
    channel: &str,
    event: &impl prost::Message,
) -> Result<Option<u64>, ApiError> {
    if !chat::node::clustered(shard) {
        return Ok(None);
    }
    let n = shard
        .store
        .publish_counted(channel.as_bytes(), &event.encode_to_vec())
        .await?;
    Ok(Some(n))
}
