//! Connections against the real binary: authentication, bad input of every layer,
//! heartbeat timeout, replacement of a device, hand-over between shards, start-up checks.

mod common;

use std::time::Duration;

use common::{http_raw, users_on_shards, Client, Server, SECRET};
use imshard::proto::pb::{self, client_frame::Body, ClientFrame};
use prost::Message as _;
use tungstenite::protocol::frame::coding::CloseCode;

/// Sends an upgrade request; returns the status and, for errors, the body.
fn upgrade_status(server: &Server, query: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = format!(
        "GET /ws{query} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).expect("read head") == 0 {
            break;
        }
        out.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let mut body = String::new();
    if status != 101 {
        let _ = s.read_to_string(&mut body);
    }
    (status, body)
}

fn token_with(sub: &str, exp_offset: i64, secret: &str) -> String {
    let claims = serde_json::json!({
        "sub": sub, "did": "phone", "dty": "mobile",
        "exp": (jsonwebtoken::get_current_timestamp() as i64 + exp_offset),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

#[test]
fn bad_tokens_get_401_and_bad_ids_400() {
    let server = Server::start(2, &[]);
    let (status, body) = upgrade_status(&server, "", &[]);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("40101"), "{body}");
    let wrong = token_with("alice", 3600, "another-secret-123456");
    assert_eq!(
        upgrade_status(&server, &format!("?token={wrong}"), &[]).0,
        401
    );
    let expired = token_with("alice", -60, SECRET);
    assert_eq!(
        upgrade_status(&server, &format!("?token={expired}"), &[]).0,
        401
    );
    assert_eq!(upgrade_status(&server, "?token=not.a.jwt", &[]).0, 401);
    let bearer = format!("Bearer {}", server.token("alice", "phone"));
    assert_eq!(
        upgrade_status(&server, "", &[("Authorization", &bearer)]).0,
        101
    );
    for bad in ["al-ice", &"a".repeat(65)] {
        let t = token_with(bad, 3600, SECRET);
        let (status, body) = upgrade_status(&server, &format!("?token={t}"), &[]);
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("40001"), "{body}");
    }
    // A GET /ws that is not an upgrade.
    let t = server.token("alice", "phone");
    let (status, _) =
        http_raw(server.addr, "GET", &format!("/ws?token={t}"), None, "", &[]).expect("http");
    assert_eq!(status, 400);
    // Garbage instead of HTTP.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(server.addr).expect("connect");
    s.write_all(b"\x16\x03\x01\x00\x00garbage\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
}

#[test]
fn bad_frames_get_protocol_errors_and_others_keep_being_served() {
    let server = Server::start(
        2,
        &["--max-frame-bytes", "100000", "--max-content-bytes", "8192"],
    );
    let (alice, bob) = users_on_shards(2, "bad", false);
    let mut healthy_a = server.connect(&alice, "phone");
    let mut healthy_b = server.connect(&bob, "phone");
    healthy_a
        .send_p2p(&bob, "before", "{}")
        .expect("send before");
    assert_eq!(healthy_b.next_push().map(|m| m.seq), Some(1));

    // Undecodable binary frame: close 1007.
    let mut c = server.connect("mallory", "d1");
    c.ws.send(tungstenite::Message::binary(vec![0xff, 0xff, 0xff, 0xff]))
        .expect("send");
    assert_eq!(c.close_code(), Some(1007));

    // Decodable req_id, broken body: RESPONSE 40001, connection stays.
    let mut c = server.connect("mallory", "d2");
    c.ws.send(tungstenite::Message::binary(vec![
        0x08, 42, 0x1a, 2, 0x0a, 5,
    ]))
    .expect("send");
    let r = c.wait_response(42);
    assert_eq!(r.code, 40001);
    // A frame with no body.
    c.send_frame(&ClientFrame {
        req_id: 43,
        body: None,
    });
    assert_eq!(c.wait_response(43).code, 40001);
    // Bad ids and bad fields in a send.
    assert_eq!(c.send_p2p("bo-b", "x", "{}").unwrap_err(), 40001);
    assert_eq!(c.send_p2p(&"b".repeat(65), "x", "{}").unwrap_err(), 40001);
    assert_eq!(
        c.send_p2p("mallory", "x", "{}").unwrap_err(),
        40001,
        "no p2p with oneself"
    );
    assert_eq!(c.send_p2p(&bob, "x", &"x".repeat(9000)).unwrap_err(), 41301);
    let r = c.request(Body::Send(pb::SendMessageRequest {
        conv_type: pb::ConvType::P2p as i32,
        target: bob.clone(),
        msg_type: 100,
        ..Default::default()
    }));
    assert_eq!(r.code, 40001, "system msg_type from a client");
    let r = c.request(Body::Pull(pb::PullMessagesRequest {
        conv_id: "p2p-b-a".into(),
        ..Default::default()
    }));
    assert_eq!(r.code, 40001, "conv_id with a > b");
    // Heartbeat still answered on this connection.
    let r = c.request(Body::Heartbeat(pb::Heartbeat { client_ts: 1 }));
    assert_eq!(r.code, 0);
    assert!(
        pb::HeartbeatResponse::decode(&*r.body)
            .expect("hb")
            .server_ts
            > 0
    );

    // Text frame: close 1003.
    let mut c = server.connect("mallory", "d3");
    c.ws.send(tungstenite::Message::text("hello"))
        .expect("send");
    assert_eq!(c.close_code(), Some(1003));

    // Oversized message: close 1009.
    let mut c = server.connect("mallory", "d4");
    c.ws.send(tungstenite::Message::binary(vec![0u8; 200_000]))
        .expect("send");
    assert_eq!(c.close_code(), Some(1009));

    // Nothing bad was stored, and the healthy pair still works.
    healthy_a.send_p2p(&bob, "after", "{}").expect("send after");
    assert_eq!(healthy_b.next_push().map(|m| m.seq), Some(2));
    let pulled = healthy_b
        .pull(
            &imshard::ids::p2p_conv_id(&alice, &bob),
            0,
            50,
            pb::PullDirection::Forward,
        )
        .expect("pull");
    assert_eq!(pulled.messages.len(), 2);
}

#[test]
fn ping_gets_pong_and_close_is_answered() {
    let server = Server::start(2, &[]);
    let mut c = server.connect("pinger", "d");
    c.ws.send(tungstenite::Message::Ping(b"abc".to_vec().into()))
        .expect("ping");
    loop {
        match c.ws.read().expect("read") {
            tungstenite::Message::Pong(p) => {
                assert_eq!(&p[..], b"abc");
                break;
            }
            _ => continue,
        }
    }
    c.ws.close(None).expect("close");
    loop {
        match c.ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close handshake not completed: {e}"),
        }
    }
}

#[test]
fn silent_connections_are_closed_and_heartbeats_keep_them() {
    let server = Server::start(2, &["--heartbeat-timeout", "2s"]);
    let mut silent = server.connect("quiet", "d");
    let mut chatty = server.connect("chatty", "d");
    let started = std::time::Instant::now();
    let mut req = 1;
    while started.elapsed() < Duration::from_secs(4) {
        chatty.send_frame(&ClientFrame {
            req_id: req,
            body: Some(Body::Heartbeat(pb::Heartbeat { client_ts: 0 })),
        });
        assert_eq!(chatty.wait_response(req).code, 0);
        req += 1;
        std::thread::sleep(Duration::from_millis(400));
    }
    silent.set_timeout(Duration::from_secs(10));
    assert_eq!(
        silent.close_code(),
        Some(1001),
        "a silent connection is closed (going away)"
    );
    chatty.send_frame(&ClientFrame {
        req_id: 999,
        body: Some(Body::Heartbeat(pb::Heartbeat { client_ts: 0 })),
    });
    assert_eq!(
        chatty.wait_response(999).code,
        0,
        "a connection that sends heartbeats stays"
    );
}

#[test]
fn same_device_twice_replaces_the_first_with_kickout() {
    let server = Server::start(2, &[]);
    let mut first = server.connect("dup", "phone");
    let mut other_device = server.connect("dup", "laptop");
    let mut second = server.connect("dup", "phone");
    let kick = first.next_of("KICKOUT").expect("KICKOUT before close");
    let notice = pb::KickoutNotice::decode(&*kick.data).expect("kickout decodes");
    assert_eq!(notice.reason, "replaced");
    assert_eq!(
        first.close_code(),
        Some(u16::from(CloseCode::Library(4000)))
    );
    // The new connection and the other device both work.
    second.send_p2p("friend", "x1", "{}").expect("send");
    assert_eq!(other_device.next_push().map(|m| m.seq), Some(1));
}

#[test]
fn connections_landing_on_any_shard_are_handed_to_the_owner() {
    let server = Server::start(2, &[]);
    let (a, b) = users_on_shards(2, "ho", false);
    let mut clients: Vec<Client> = (0..16)
        .map(|i| server.connect(if i % 2 == 0 { &a } else { &b }, &format!("d{i}")))
        .collect();
    let sent = clients[0].send_p2p(&b, "h1", "{}").expect("send");
    for (i, c) in clients.iter_mut().enumerate().skip(1) {
        assert_eq!(
            c.next_push().map(|m| m.msg_id),
            Some(sent.msg_id.clone()),
            "device {i}"
        );
    }
    let (status, metrics) = server.http("GET", "/metrics", None, "").expect("metrics");
    assert_eq!(status, 200);
    let handovers: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("imshard_handovers_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        handovers > 0,
        "some of 16 connections were accepted by the other shard:\n{metrics}"
    );
    // One series per shard, whichever shard answered the scrape.
    let series = |name: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{shard=")))
            .count()
    };
    assert_eq!(series("imshard_connections"), 2, "{metrics}");
    assert_eq!(series("imshard_store_sync_rounds_total"), 2, "{metrics}");
    let open: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("imshard_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(open, 16, "{metrics}");
}

#[test]
fn data_dir_refuses_another_shard_count() {
    let mut server = Server::start(2, &[]);
    server.kill9();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imshard"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "3",
            "--jwt-secret",
            SECRET,
            "--data-dir",
        ])
        .arg(&server.dir)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("created with 2 shards") && err.contains("--shards 2"),
        "{err}"
    );
}

#[test]
fn token_subcommand_uses_the_generated_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imshard"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shards",
            "2",
            "--data-dir",
        ])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut ok = false;
    for _ in 0..200 {
        if matches!(
            http_raw(addr, "GET", "/healthz", None, "", &[]),
            Ok((200, _))
        ) {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ok, "server with a generated secret started");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imshard"))
        .args([
            "token",
            "--user",
            "alice",
            "--device",
            "phone",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut c = Client::connect(addr, &token);
    let r = c.request(Body::Heartbeat(pb::Heartbeat { client_ts: 0 }));
    assert_eq!(r.code, 0);
    let _ = child.kill();
    let _ = child.wait();
}

/// PushAcks are cumulative and answered only when they carry a req_id: a batch of
/// acks without one (valid, for an unknown conversation, with a garbage conv_id)
/// gets nothing back, so the next envelope is the answer to the heartbeat after them;
/// an ack with a req_id gets an empty RESPONSE with code 0.
#[test]
fn push_acks_are_answered_only_when_asked() {
    let server = Server::start(2, &[]);
    let (a, b) = users_on_shards(2, "ack", false);
    let mut ca = server.connect(&a, "d");
    let mut cb = server.connect(&b, "d");
    for i in 0..3 {
        ca.send_p2p(&b, &format!("m{i}"), "{\"text\":\"hi\"}")
            .expect("send");
    }
    let mut last = None;
    for _ in 0..3 {
        last = cb.next_push();
    }
    let last = last.expect("three pushes");
    let ack = |req_id, conv_id: &str, seq| ClientFrame {
        req_id,
        body: Some(Body::PushAck(pb::PushAck {
            conv_id: conv_id.into(),
            seq,
        })),
    };
    cb.send_frame(&ack(0, &last.conv_id, last.seq));
    cb.send_frame(&ack(0, &last.conv_id, 1));
    cb.send_frame(&ack(0, "grp-nobody", 9));
    cb.send_frame(&ack(0, "not a conversation", 9));
    cb.send_frame(&ClientFrame {
        req_id: 77,
        body: Some(Body::Heartbeat(pb::Heartbeat { client_ts: 1 })),
    });
    let env = cb.read_envelope().expect("an envelope");
    assert_eq!((env.r#type.as_str(), env.req_id), ("RESPONSE", 77));
    let r = cb.request(Body::PushAck(pb::PushAck {
        conv_id: last.conv_id.clone(),
        seq: last.seq,
    }));
    assert_eq!((r.code, r.body.len()), (0, 0), "{r:?}");
}
