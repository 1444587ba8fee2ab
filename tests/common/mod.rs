//! Test harness: starts the real `imshard` binary on a loopback port with its own data
//! dir, and speaks real WebSocket (tungstenite's client) and HTTP to it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imshard::proto::pb::{self, client_frame::Body, ClientFrame, MessageEnvelope, MsgItem};

pub mod redis_server;
pub mod tansu;
use prost::Message as _;
use tungstenite::protocol::WebSocket;

pub const SECRET: &str = "test-secret-0123456789";

pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    /// With `IMSHARD_TEST_STORE=redis`: this server's own redis-server (kept across
    /// restarts of imshard, stopped when the server is dropped).
    pub redis: Option<redis_server::RedisServer>,
    pub shards: usize,
    args: Vec<String>,
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

impl Server {
    /// Starts a server with `shards` shards and extra flags, in a fresh data dir.
    pub fn start(shards: usize, extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut s = Server::start_in(&dir, shards, extra);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on an existing data dir.
    pub fn start_in(dir: &Path, shards: usize, extra: &[&str]) -> Server {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--shards".into(),
            shards.to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--jwt-secret".into(),
            SECRET.into(),
        ];
        // One parameter runs the whole suite on either store (a test that names its
        // store itself, like the cluster tests, keeps it).
        let chosen = extra.contains(&"--store");
        let redis = match std::env::var("IMSHARD_TEST_STORE").as_deref() {
            _ if chosen => None,
            Ok("redis") => {
                let r = redis_server::RedisServer::start_with(&[
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .expect(
                    "IMSHARD_TEST_STORE=redis needs redis-server (apt-get install -y redis-server)",
                );
                args.extend([
                    "--store".into(),
                    "redis".into(),
                    "--redis-url".into(),
                    r.url(),
                ]);
                Some(r)
            }
            Ok("embedded") | Err(_) => None,
            Ok(other) => panic!("IMSHARD_TEST_STORE must be embedded or redis, not {other}"),
        };
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = Server {
            child: None,
            addr,
            dir: dir.to_path_buf(),
            _tmp: None,
            redis,
            shards,
            args,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_imshard"))
            .args(&self.args)
            .env("IMSHARD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start imshard");
        self.child = Some(child);
        // With --admin-listen, /healthz is served there only.
        let health = self
            .args
            .iter()
            .position(|a| a == "--admin-listen")
            .and_then(|i| self.args.get(i + 1))
            .map_or(self.addr, |a| a.parse().expect("admin address"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = http_raw(health, "GET", "/healthz", None, "", &[]) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("imshard exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "imshard did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The sum over shards of one metric in /metrics (0 when absent).
    pub fn metric(&self, name: &str) -> u64 {
        let (status, body) = self.http("GET", "/metrics", None, "").expect("metrics");
        assert_eq!(status, 200);
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// The server's resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Sends a signal (SIGTERM, SIGINT) to the server process.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("server running").id();
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(pid as i32, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// Waits (at most `limit`) for the server to exit; its exit status, if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills and starts again on the same data dir and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn token(&self, user: &str, device: &str) -> String {
        imshard::auth::mint(SECRET.as_bytes(), user, device, "mobile", false, 3600).expect("mint")
    }

    pub fn admin_token(&self) -> String {
        imshard::auth::mint(SECRET.as_bytes(), "admin", "console", "web", true, 3600).expect("mint")
    }

    /// Connects a WebSocket client for (user, device).
    pub fn connect(&self, user: &str, device: &str) -> Client {
        Client::connect(self.addr, &self.token(user, device))
    }

    /// One HTTP request on a fresh connection; returns (status, body).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> std::io::Result<(u16, String)> {
        http_raw(self.addr, method, path, token, body, &[])
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends one HTTP/1.1 request with `Connection: close` and reads the whole reply.
pub fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad reply: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A WebSocket client that keeps pushes aside while it waits for responses.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    next_req: u64,
    pub pushes: VecDeque<MessageEnvelope>,
}

/// A RESPONSE: code, message and body.
#[derive(Debug)]
pub struct Resp {
    pub code: i32,
    pub message: String,
    pub body: bytes::Bytes,
}

impl Client {
    pub fn connect(addr: SocketAddr, token: &str) -> Client {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let url = format!("ws://{addr}/ws?token={token}");
        let (ws, resp) = tungstenite::client::client(url, stream).expect("ws handshake");
        assert_eq!(resp.status(), 101);
        Client {
            ws,
            next_req: 1,
            pushes: VecDeque::new(),
        }
    }

    pub fn set_timeout(&mut self, d: Duration) {
        self.ws
            .get_mut()
            .set_read_timeout(Some(d))
            .expect("timeout");
    }

    pub fn send_frame(&mut self, f: &ClientFrame) {
        self.ws
            .send(tungstenite::Message::binary(f.encode_to_vec()))
            .expect("ws send");
    }

    /// Reads the next envelope (any type); None on close, EOF or timeout.
    pub fn read_envelope(&mut self) -> Option<MessageEnvelope> {
        loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Binary(b)) => {
                    return Some(MessageEnvelope::decode(&*b).expect("envelope decodes"))
                }
                Ok(tungstenite::Message::Ping(_)) | Ok(tungstenite::Message::Pong(_)) => continue,
                Ok(_) => return None,
                Err(_) => return None,
            }
        }
    }

    /// Sends a request and waits for its RESPONSE, keeping other envelopes.
    pub fn request(&mut self, body: Body) -> Resp {
        let req_id = self.next_req;
        self.next_req += 1;
        self.send_frame(&ClientFrame {
            req_id,
            body: Some(body),
        });
        self.wait_response(req_id)
    }

    /// Waits for the RESPONSE to `req_id`; others (responses to other requests, which
    /// may come in any order, and pushes) are kept aside.
    pub fn wait_response(&mut self, req_id: u64) -> Resp {
        loop {
            let kept = self
                .pushes
                .iter()
                .position(|e| e.r#type == "RESPONSE" && e.req_id == req_id);
            let env = match kept.and_then(|i| self.pushes.remove(i)) {
                Some(env) => env,
                None => self
                    .read_envelope()
                    .expect("connection ended while waiting for a response"),
            };
            if env.r#type == "RESPONSE" && env.req_id == req_id {
                let r = pb::Response::decode(&*env.data).expect("response decodes");
                return Resp {
                    code: r.code,
                    message: r.message,
                    body: r.body,
                };
            }
            self.pushes.push_back(env);
        }
    }

    /// The connection is still served and was never told to go.
    pub fn assert_not_kicked(&mut self) {
        let r = self.request(Body::Heartbeat(pb::Heartbeat::default()));
        assert_eq!(r.code, 0);
        assert!(
            self.pushes.iter().all(|e| e.r#type != "KICKOUT"),
            "the client was kicked"
        );
    }

    /// Reads until a close frame arrives; its code (None when the stream ended without).
    pub fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Sends a p2p message; Ok(response) or Err(code).
    pub fn send_p2p(
        &mut self,
        target: &str,
        client_msg_id: &str,
        content: &str,
    ) -> Result<pb::SendMessageResponse, i32> {
        let r = self.request(Body::Send(pb::SendMessageRequest {
            conv_type: pb::ConvType::P2p as i32,
            target: target.into(),
            client_msg_id: client_msg_id.into(),
            content: content.into(),
            ..Default::default()
        }));
        if r.code == 0 {
            Ok(pb::SendMessageResponse::decode(&*r.body).expect("send response decodes"))
        } else {
            Err(r.code)
        }
    }

    pub fn pull(
        &mut self,
        conv_id: &str,
        anchor: i64,
        limit: i32,
        direction: pb::PullDirection,
    ) -> Result<pb::PullMessagesResponse, i32> {
        let r = self.request(Body::Pull(pb::PullMessagesRequest {
            conv_id: conv_id.into(),
            anchor_seq: anchor,
            limit,
            direction: direction as i32,
        }));
        if r.code == 0 {
            Ok(pb::PullMessagesResponse::decode(&*r.body).expect("pull response decodes"))
        } else {
            Err(r.code)
        }
    }

    /// The next envelope of `kind`, from the kept ones or the socket.
    pub fn next_of(&mut self, kind: &str) -> Option<MessageEnvelope> {
        if let Some(i) = self.pushes.iter().position(|e| e.r#type == kind) {
            return self.pushes.remove(i);
        }
        loop {
            let env = self.read_envelope()?;
            if env.r#type == kind {
                return Some(env);
            }
            self.pushes.push_back(env);
        }
    }

    /// The next MSG_PUSH as a MsgItem.
    pub fn next_push(&mut self) -> Option<MsgItem> {
        let env = self.next_of("MSG_PUSH")?;
        assert!(env.ack_required, "MSG_PUSH must ask for an ack");
        let m = MsgItem::decode(&*env.data).expect("push decodes");
        assert_eq!(env.seq, m.seq);
        Some(m)
    }
}

/// Two user ids that hash to different shards (or the same, with `same = true`).
pub fn users_on_shards(shards: usize, prefix: &str, same: bool) -> (String, String) {
    let a = format!("{prefix}_a");
    let sa = imshard::shard::shard_of_user(&a, shards);
    for i in 0..1000 {
        let b = format!("{prefix}_b{i}");
        if (imshard::shard::shard_of_user(&b, shards) == sa) == same {
            return (a, b);
        }
    }
    panic!("no user found")
}
