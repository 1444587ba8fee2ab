//! Accepting: every shard listens on the same port (SO_REUSEPORT), reads the HTTP
//! request, and either upgrades it to a WebSocket (after checking the JWT; handing the
//! socket to the user's shard when that is another one) or serves the HTTP API.
//! With `admin_listen` set, every shard also listens there (SO_REUSEPORT too), and
//! each listener serves only its own paths ([`Port::serves`]).

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};

use super::conn::{self, Upgrade};
use super::msg::{HandOver, ShardMsg};
use super::{Service, Shard};
use crate::codes::ApiError;
use crate::proto::http::{self, Head, HttpError};
use crate::proto::json;

/// How long a client may take to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP request body (JSON API).
const MAX_BODY: usize = 2 << 20;

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// `listen`: clients (WebSocket, JSON API).
    Public,
    /// `admin_listen`: operators (`/metrics`, `/healthz`, `/api/v1/admin/*`).
    Admin,
}

impl Port {
    /// Whether a request for `path` is served on this listener. Without an admin
    /// listener the public one serves everything.
    pub fn serves<S: Service>(self, shard: &Shard<S>, path: &str) -> bool {
        match self {
            Port::Public => shard.cfg.admin_listen.is_none() || !S::is_admin_path(path),
            Port::Admin => S::is_admin_path(path),
        }
    }
}

/// Binds this shard's listener on a shared address (`listen` or `admin_listen`).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let opts = ListenerOpts::new()
        .reuse_port(true)
        .reuse_addr(true)
        .backlog(65535);
    TcpListener::bind_with_config(addr, &opts)
}

/// Accepts until the shard starts draining; then the listener closes.
pub async fn accept_loop<S: Service>(shard: Rc<Shard<S>>, listener: TcpListener, port: Port) {
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = shard.until_draining() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                monoio::spawn(serve_http(shard.clone(), stream, port));
            }
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE): back off instead of spinning.
                tracing::warn!(error = %e, shard = shard.id, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one request head (and body) from `stream`, within the head timeout.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<(Head, Vec<u8>)>, HttpError> {
    let read_all = async {
        loop {
            if let Some((head, n)) = http::parse_head(buf, MAX_BODY)? {
                let need = n + head.content_length;
                while buf.len() < need {
                    if !read_more(stream, buf).await {
                        return Ok(None);
                    }
                }
                let body = buf[n..need].to_vec();
                buf.drain(..need);
                return Ok(Some((head, body)));
            }
            if !read_more(stream, buf).await {
                return Ok(None);
            }
        }
    };
    match monoio::time::timeout(HEAD_TIMEOUT, read_all).await {
        Ok(r) => r,
        Err(_) => Ok(None),
    }
}

/// Appends what the socket has to `buf`; false at EOF or error.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let chunk = Vec::with_capacity(4096);
    let (res, chunk) = stream.read(chunk).await;
    match res {
        Ok(n) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

async fn serve_http<S: Service>(shard: Rc<Shard<S>>, mut stream: TcpStream, port: Port) {
    let mut buf = Vec::new();
    loop {
        let (head, body) = match read_request(&mut stream, &mut buf).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let reply = http::response(
                    e.status(),
                    "application/json",
                    error_json(&e.api_error()).as_bytes(),
                    false,
                );
                let _ = stream.write_all(reply).await;
                return;
            }
        };
        if !port.serves(&shard, &head.path) {
            let reply = http::json_err(&ApiError::NotFound("no such path"), head.keep_alive);
            if stream.write_all(reply).await.0.is_err() || !head.keep_alive {
                return;
            }
            continue;
        }
        if head.path == "/ws" {
            let leftover = std::mem::take(&mut buf);
            upgrade(shard, stream, head, leftover).await;
            return;
        }
        // The same brake as WebSocket readers: no new work while the shard is behind.
        // Operators' requests on the admin port skip it: they must see a shard that is
        // behind.
        if port == Port::Public {
            shard.input_allowed().await;
        }
        let keep_alive = head.keep_alive && !shard.draining.get();
        shard.request_started();
        let reply = S::http(&shard, &head, &body).await;
        shard.request_finished();
        if stream.write_all(reply).await.0.is_err() || !keep_alive || shard.draining.get() {
            return;
        }
    }
}

fn error_json(e: &ApiError) -> String {
    serde_json::json!({"code": e.code(), "message": e.to_string(), "data": null,
        "timestamp": crate::proto::envelope::now_ms()})
    .to_string()
}

/// Checks an upgrade request and its token; hands it to the user's shard.
async fn upgrade<S: Service>(
    shard: Rc<Shard<S>>,
    mut stream: TcpStream,
    head: Head,
    leftover: Vec<u8>,
) {
    let checked = check_upgrade(&shard, &head);
    let (claims, key) = match checked {
        Ok(v) => v,
        Err(e) => {
            let _ = stream.write_all(http::json_err(&e, false)).await;
            return;
        }
    };
    let up = Upgrade {
        user: claims.sub,
        device: claims.did,
        device_type: claims.dty,
        ws_key: key,
        subprotocol: json::negotiate(head.header("sec-websocket-protocol")),
        leftover,
    };
    let owner = shard.user_shard(&up.user);
    if owner == shard.id {
        // A task of its own: the connection must not keep this request's state (the
        // parsed head, the HTTP handler's future) alive for its lifetime.
        monoio::spawn(conn::upgrade(shard, stream, up));
        return;
    }
    let raw = stream.into_raw_fd();
    // SAFETY: `into_raw_fd` gave up the stream's ownership of this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    shard.ring.send(
        owner,
        ShardMsg::HandOver(Box::new(HandOver {
            fd,
            user: up.user,
            device: up.device,
            device_type: up.device_type,
            ws_key: up.ws_key,
            subprotocol: up.subprotocol,
            leftover: up.leftover,
        })),
    );
}

fn check_upgrade<S: Service>(
    shard: &Shard<S>,
    head: &Head,
) -> Result<(crate::auth::Claims, String), ApiError> {
    if head.method != "GET" {
        return Err(ApiError::invalid("WebSocket upgrade must be GET"));
    }
    if shard.draining.get() {
        return Err(ApiError::Unavailable("the server is shutting down"));
    }
    let open = shard
        .global
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    if open >= shard.cfg.max_connections {
        return Err(ApiError::Unavailable(
            "the server is at max_connections; retry later",
        ));
    }
    let token = head
        .token()
        .ok_or(ApiError::Unauthenticated("missing token"))?;
    let claims = shard.verifier.verify(&token).map_err(ApiError::from)?;
    if !head
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        || !head.header_has_token("connection", "upgrade")
    {
        return Err(ApiError::invalid("expected a WebSocket upgrade request"));
    }
    if head.header("sec-websocket-version") != Some("13") {
        return Err(ApiError::invalid("Sec-WebSocket-Version must be 13"));
    }
    let key = head
        .header("sec-websocket-key")
        .filter(|k| !k.is_empty())
        .ok_or(ApiError::invalid("missing Sec-WebSocket-Key"))?;
    Ok((claims, key.to_string()))
}
