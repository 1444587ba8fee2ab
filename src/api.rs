//! The HTTP side of the port: `/healthz`, `/metrics` and the JSON API of PROTOCOL.md.
//! API calls run the same operations as the WebSocket ([`crate::chat::execute`]) on the
//! caller's user shard, so both transports give identical results.

use std::rc::Rc;

use serde_json::Value;

use crate::chat::{self, Caller};
use crate::codes::ApiError;
use crate::proto::http::{self, Head};
use crate::proto::pb::{self, client_frame::Body};
use crate::shard::msg::ShardMsg;
use crate::shard::Shard;

/// Answers one HTTP request with a complete response.
pub async fn handle(shard: &Rc<Shard>, head: &Head, body: &[u8]) -> Vec<u8> {
    let ka = head.keep_alive;
    match (head.method.as_str(), head.path.as_str()) {
        ("GET", "/healthz") => healthz(shard, ka).await,
        ("GET", "/metrics") => metrics(shard, ka),
        (_, p) if p.starts_with("/api/v1/") => match api(shard, head, body).await {
            Ok(data) => http::json_ok(data, ka),
            Err(e) => http::json_err(&e, ka),
        },
        _ => http::json_err(&ApiError::NotFound("no such path"), ka),
    }
}

async fn healthz(shard: &Rc<Shard>, ka: bool) -> Vec<u8> {
    let mut pending = Vec::with_capacity(shard.n);
    for target in 0..shard.n {
        pending.push(shard.call(target, |reply| ShardMsg::Ping { reply }));
    }
    for p in pending {
        let answered = monoio::time::timeout(std::time::Duration::from_secs(2), p).await;
        if !matches!(answered, Ok(Ok(_))) {
            return http::response(503, "text/plain", b"a shard did not answer\n", ka);
        }
    }
    http::response(200, "text/plain", b"ok\n", ka)
}

fn metrics(shard: &Rc<Shard>, ka: bool) -> Vec<u8> {
    let c = &shard.counters;
    let s = shard.id;
    let mut out = String::new();
    for (name, help, v) in [
        (
            "imshard_connections",
            "open WebSocket connections",
            c.connections.get(),
        ),
        (
            "imshard_connections_total",
            "WebSocket connections accepted",
            c.connections_total.get(),
        ),
        (
            "imshard_handovers_total",
            "connections handed over from another shard",
            c.handovers.get(),
        ),
        (
            "imshard_messages_stored_total",
            "messages made durable",
            c.messages_stored.get(),
        ),
        (
            "imshard_pushes_total",
            "MSG_PUSH frames queued to devices",
            c.pushes.get(),
        ),
        (
            "imshard_slow_reader_cuts_total",
            "connections cut as slow readers",
            c.slow_reader_cuts.get(),
        ),
        (
            "imshard_heartbeat_timeouts_total",
            "connections closed for silence",
            c.heartbeat_timeouts.get(),
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help} (this shard)\n# TYPE {name} gauge\n{name}{{shard=\"{s}\"}} {v}\n"
        ));
    }
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
    let (op, to_json): (Body, ToJson) = match (head.method.as_str(), head.path.as_str()) {
        ("POST", "/api/v1/auth/msg/send") => (
            Body::Send(json_body(body)?),
            to_json::<pb::SendMessageResponse>,
        ),
        ("GET", "/api/v1/auth/msg/pull") => (
            Body::Pull(pb::PullMessagesRequest {
                conv_id: head.query_param("conv_id").unwrap_or_default(),
                anchor_seq: query_num(head, "anchor_seq")?,
                limit: query_num(head, "limit")?,
                direction: query_num(head, "direction")?,
            }),
            to_json::<pb::PullMessagesResponse>,
        ),
        _ => return Err(ApiError::NotFound("no such API route")),
    };
    let bytes = chat::execute(shard, &caller, op).await?;
    to_json(&bytes)
}

/// Decodes an encoded XxxResponse into the JSON `data` of the reply.
type ToJson = fn(&[u8]) -> Result<Value, ApiError>;

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

fn query_num<T: std::str::FromStr + Default>(head: &Head, key: &str) -> Result<T, ApiError> {
    match head.query_param(key) {
        None => Ok(T::default()),
        Some(v) if v.is_empty() => Ok(T::default()),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::invalid(format!("{key} must be a number"))),
    }
}
