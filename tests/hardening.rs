//! Hardening against the real binary: what one careless or hostile client must not be
//! able to do to the server and everyone else on it (issue 9), and the graceful
//! shutdown.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{users_on_shards, Client, Server, SECRET};
use imshard::proto::pb::{self, client_frame::Body, ClientFrame, ConvType};
use prost::Message as _;
use serde_json::{json, Value};

/// The header of a masked binary frame announcing `len` payload bytes.
fn frame_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x82, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    h
}

/// Sends the start of a 1 MiB message, then one more byte every 300 ms from another
/// thread (until the socket fails or 30 s pass): bytes, but never a whole message.
fn trickle(c: &mut Client, first: usize) {
    let stream: &mut TcpStream = c.ws.get_mut();
    stream.write_all(&frame_header(1 << 20)).expect("header");
    stream.write_all(&vec![7u8; first]).expect("payload start");
    let mut w = stream.try_clone().expect("clone");
    std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if w.write_all(&[7]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
}

/// Polls `cond` every 100 ms for at most 20 s (a safety net, not a timing check).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn heartbeat(c: &mut Client) -> i32 {
    c.request(Body::Heartbeat(pb::Heartbeat { client_ts: 1 }))
        .code
}

#[test]
fn bytes_without_a_whole_message_do_not_keep_a_connection_alive() {
    let server = Server::start(2, &["--heartbeat-timeout", "3s", "--frame-timeout", "60s"]);
    let mut c = server.connect("slowloris", "d");
    c.set_timeout(Duration::from_secs(25));
    trickle(&mut c, 1000);
    assert_eq!(
        c.close_code(),
        Some(1001),
        "closed by the heartbeat although bytes kept coming"
    );
    let mut ok = server.connect("fine", "d");
    assert_eq!(heartbeat(&mut ok), 0);
}

#[test]
fn a_started_message_must_complete_within_frame_timeout() {
    let server = Server::start(2, &["--heartbeat-timeout", "90s", "--frame-timeout", "2s"]);
    let mut c = server.connect("slowloris", "d");
    c.set_timeout(Duration::from_secs(25));
    trickle(&mut c, 10_000);
    assert_eq!(c.close_code(), Some(1008));
    let mut ok = server.connect("fine", "d");
    assert_eq!(heartbeat(&mut ok), 0);
}

#[test]
fn unfinished_messages_share_a_capped_memory_per_shard() {
    // One shard, so every connection draws on the same 4 MiB.
    let server = Server::start(1, &["--frame-memory-bytes", "4194304"]);
    let mut clients: Vec<Client> = (0..10)
        .map(|i| server.connect(&format!("hog{i}"), "d"))
        .collect();
    for c in &mut clients {
        let s: &mut TcpStream = c.ws.get_mut();
        s.write_all(&frame_header(1 << 20)).expect("header");
        // Some connections may already be closed: ignore write errors.
        let _ = s.write_all(&vec![7u8; 700_000]);
    }
    let mut refused = 0;
    for c in &mut clients {
        c.set_timeout(Duration::from_secs(2));
        if let Some(1013) = c.close_code() {
            refused += 1;
        }
    }
    assert!(refused >= 4, "only {refused} of 10 were refused past 4 MiB");
    let mut ok = server.connect("fine", "d");
    assert_eq!(heartbeat(&mut ok), 0);
}

#[test]
fn a_slow_reader_is_cut_and_its_socket_closed_at_once() {
    let server = Server::start(
        2,
        &["--outbound-queue-bytes", "1048576", "--rate-limit", "0"],
    );
    let (lazy, sender) = users_on_shards(2, "slow", false);
    let mut lazy_c = server.connect(&lazy, "d");
    let mut tx = server.connect(&sender, "d");
    assert_eq!(server.metric("imshard_connections"), 2);
    let content = format!("{{\"t\":\"{}\"}}", "x".repeat(50_000));
    for i in 0..300 {
        let r = tx.send_p2p(&lazy, &format!("m{i}"), &content);
        assert!(r.is_ok(), "send {i}: {r:?}");
    }
    eventually("the slow reader is cut", || {
        server.metric("imshard_slow_reader_cuts_total") == 1
    });
    eventually("its socket is closed, not kept until the heartbeat", || {
        server.metric("imshard_connections") == 1
    });
    // The lazy client finds the end of its stream after what was buffered.
    lazy_c.set_timeout(Duration::from_secs(10));
    loop {
        match lazy_c.ws.read() {
            Ok(tungstenite::Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    assert_eq!(heartbeat(&mut tx), 0, "others are served");
}

#[test]
fn max_connections_is_enforced_with_503() {
    let server = Server::start(2, &["--max-connections", "2"]);
    let a = server.connect("a", "d");
    let _b = server.connect("b", "d");
    let t = server.token("c", "d");
    let (status, body) = common::http_raw(
        server.addr,
        "GET",
        &format!("/ws?token={t}"),
        None,
        "",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    .expect("upgrade");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("50301"), "{body}");
    drop(a);
    eventually("a place frees up", || {
        server.metric("imshard_connections") == 1
    });
    let mut c = server.connect("c", "d");
    assert_eq!(heartbeat(&mut c), 0);
}

#[test]
fn requests_past_the_in_flight_limit_wait_unread_and_all_get_answers() {
    let server = Server::start(2, &["--max-requests-in-flight", "2", "--rate-limit", "0"]);
    let (alice, bob) = users_on_shards(2, "pipe", false);
    let mut a = server.connect(&alice, "d");
    let mut burst = Vec::new();
    for i in 1..=300u64 {
        let f = ClientFrame {
            req_id: i,
            body: Some(Body::Send(pb::SendMessageRequest {
                conv_type: ConvType::P2p as i32,
                target: bob.clone(),
                client_msg_id: format!("c{i}"),
                content: "{}".into(),
                ..Default::default()
            })),
        };
        let payload = f.encode_to_vec();
        // One masked frame per request, all written at once.
        assert!(payload.len() < 126);
        burst.extend_from_slice(&[0x82, 0x80 | payload.len() as u8, 0, 0, 0, 0]);
        burst.extend_from_slice(&payload);
    }
    a.ws.get_mut().write_all(&burst).expect("burst");
    let mut seqs = Vec::new();
    for i in 1..=300u64 {
        let r = a.wait_response(i);
        assert_eq!(r.code, 0, "request {i}: {}", r.message);
        seqs.push(pb::SendMessageResponse::decode(r.body).expect("body").seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=300).collect::<Vec<i64>>());
}

#[test]
fn sigterm_answers_closes_with_1001_and_exits_0() {
    let mut server = Server::start(2, &["--shutdown-grace", "3s"]);
    let (alice, bob) = users_on_shards(2, "bye", false);
    let mut a = server.connect(&alice, "d");
    let mut b = server.connect(&bob, "d");
    a.send_p2p(&bob, "c1", "{\"t\":\"last words\"}")
        .expect("send");
    assert_eq!(b.next_push().map(|m| m.seq), Some(1));
    server.signal(libc::SIGTERM);
    a.set_timeout(Duration::from_secs(15));
    b.set_timeout(Duration::from_secs(15));
    assert_eq!(a.close_code(), Some(1001));
    assert_eq!(b.close_code(), Some(1001));
    let status = server.wait_exit(Duration::from_secs(20)).expect("exited");
    assert_eq!(status.code(), Some(0), "{status}");
    // The listener is gone: nothing accepts on the port any more.
    assert!(TcpStream::connect(server.addr).is_err());
    server.restart();
    let mut a = server.connect(&alice, "d");
    let conv = imshard::ids::p2p_conv_id(&alice, &bob);
    let got = a
        .pull(&conv, 0, 10, pb::PullDirection::Forward)
        .expect("pull");
    assert_eq!(got.messages.len(), 1);
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut server = Server::start(1, &["--shutdown-grace", "60s"]);
    // A client that never answers the close keeps the drain waiting for its linger.
    let mut c = server.connect("stubborn", "d");
    let _ = heartbeat(&mut c);
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    server.signal(libc::SIGINT);
    let status = server.wait_exit(Duration::from_secs(20)).expect("exited");
    assert_eq!(status.code(), Some(130), "{status}");
    let mut buf = [0u8; 1];
    let _ = c.ws.get_mut().read(&mut buf);
}

fn create_group(c: &mut Client, group_id: &str, members: Vec<String>) -> common::Resp {
    c.request(Body::CreateGroup(pb::CreateGroupRequest {
        group_id: group_id.into(),
        name: "g".into(),
        members,
    }))
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[test]
fn member_ids_per_hour_and_groups_owned_are_capped() {
    let server = Server::start(
        2,
        &[
            "--rate-limit",
            "0",
            "--members-added-per-hour",
            "1000",
            "--max-groups-owned",
            "3",
        ],
    );
    let mut owner = server.connect("boss", "d");
    let r = create_group(&mut owner, "toobig", ids("m", 1500));
    assert_eq!(r.code, 42901, "{}", r.message);
    let r = owner.request(Body::Pull(pb::PullMessagesRequest {
        conv_id: "grp-toobig".into(),
        ..Default::default()
    }));
    assert_eq!(r.code, 40401, "a refused create stores nothing");
    assert_eq!(create_group(&mut owner, "g1", ids("a", 600)).code, 0);
    let r = owner.request(Body::UpdateMembers(pb::UpdateGroupMembersRequest {
        group_id: "g1".into(),
        add: ids("b", 401),
        ..Default::default()
    }));
    assert_eq!(r.code, 42901, "600 + 401 is past 1000: {}", r.message);
    assert_eq!(create_group(&mut owner, "g2", ids("c", 400)).code, 0);
    assert_eq!(create_group(&mut owner, "g3", Vec::new()).code, 0);
    let r = create_group(&mut owner, "g4", Vec::new());
    assert_eq!(r.code, 40301, "a fourth group: {}", r.message);
    // Another user has budgets of its own.
    let mut other = server.connect("other", "d");
    assert_eq!(create_group(&mut other, "o1", ids("d", 10)).code, 0);
}

#[test]
fn every_operation_spends_the_request_budget_by_its_cost() {
    let server = Server::start(2, &["--rate-limit", "10", "--members-added-per-hour", "0"]);
    let mut c = server.connect("busy", "d");
    // 5 + 10,000 / 100 = 105 tokens: more than the bucket (20) holds, so it is let
    // through on a full bucket and leaves a debt of 85 (8.5 s at 10 per second).
    assert_eq!(create_group(&mut c, "huge", ids("h", 10_000)).code, 0);
    let r = c.request(Body::Pull(pb::PullMessagesRequest {
        conv_id: "grp-huge".into(),
        ..Default::default()
    }));
    assert_eq!(r.code, 42901, "the create's cost is owed");
    // Heartbeats are free and keep working.
    assert_eq!(heartbeat(&mut c), 0);
    // Reads spend the budget too: 100 pipelined list requests on a bucket of 20.
    let mut fresh = server.connect("fresh", "d");
    for req_id in 1..=100 {
        fresh.send_frame(&ClientFrame {
            req_id,
            body: Some(Body::GetConversations(
                pb::GetConversationsRequest::default(),
            )),
        });
    }
    let codes: Vec<i32> = (1..=100).map(|id| fresh.wait_response(id).code).collect();
    assert!(codes.contains(&0), "reads are served");
    assert!(codes.contains(&42901), "reads spend the budget too");
}

// Inputs that once crashed the server or were let through (filter, kick reason, nbf).

fn http_json(server: &Server, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    let (status, text) = server.http(method, path, Some(token), body).expect("http");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, v)
}

/// The server answers /healthz and a new client can send and receive.
fn still_serves(server: &Server, tag: &str) {
    let (s, text) = server.http("GET", "/healthz", None, "").expect("healthz");
    assert_eq!((s, text.trim()), (200, "ok"));
    let mut a = server.connect(&format!("{tag}_ok_a"), "phone");
    let mut b = server.connect(&format!("{tag}_ok_b"), "phone");
    let sent = a
        .send_p2p(&format!("{tag}_ok_b"), "alive", "{\"t\":\"alive\"}")
        .expect("send after the attack");
    assert_eq!(b.next_push().map(|m| m.msg_id), Some(sent.msg_id));
}

#[test]
fn masking_60_kb_of_multi_byte_blocked_words_does_not_crash() {
    let server = Server::start(2, &["--filter-mode", "mask", "--blocked-words", "坏词"]);
    let mut alice = server.connect("fa", "phone");
    let content = "坏词".repeat(10_000);
    assert_eq!(content.len(), 60_000);
    let sent = alice
        .send_p2p("fb", "big", &content)
        .expect("send is accepted");
    let page = alice
        .pull(&sent.conv_id, 0, 10, pb::PullDirection::Forward)
        .expect("pull");
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].content, "*".repeat(20_000));
    still_serves(&server, "f");
}

fn kick(server: &Server, body: &str) -> (u16, Value) {
    http_json(
        server,
        "POST",
        "/api/v1/admin/kick",
        &server.admin_token(),
        body,
    )
}

fn kickout_reason(c: &mut Client) -> String {
    let env = c.next_of("KICKOUT").expect("KICKOUT before close");
    pb::KickoutNotice::decode(&*env.data)
        .expect("notice decodes")
        .reason
}

#[test]
fn admin_kick_passes_its_reason_through() {
    let server = Server::start(2, &[]);
    let mut phone = server.connect("kr", "phone");
    let mut laptop = server.connect("kr", "laptop");
    let (s, v) = kick(
        &server,
        r#"{"user_uuid":"kr","device_id":"ALL","reason":"banned"}"#,
    );
    assert_eq!((s, v["data"]["kicked"].clone()), (200, json!(2)), "{v}");
    assert_eq!(kickout_reason(&mut phone), "banned");
    assert_eq!(kickout_reason(&mut laptop), "banned");

    let mut phone = server.connect("kr", "phone");
    let (s, _) = kick(
        &server,
        r#"{"user_uuid":"kr","device_id":"phone","reason":""}"#,
    );
    assert_eq!(s, 200);
    assert_eq!(kickout_reason(&mut phone), "admin", "empty reason");

    let long = "x".repeat(65);
    for bad in [long.as_str(), "a\nb", "\u{7}"] {
        let body = json!({"user_uuid": "kr", "device_id": "ALL", "reason": bad}).to_string();
        let (s, v) = kick(&server, &body);
        assert_eq!((s, v["code"].clone()), (400, json!(40001)), "{bad:?}: {v}");
    }
    still_serves(&server, "k");
}

fn future_token(nbf_offset: i64, iat_offset: Option<i64>) -> String {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let mut claims = json!({
        "sub": "early", "did": "phone", "dty": "mobile",
        "exp": now + 7200, "nbf": now + nbf_offset,
    });
    if let Some(iat) = iat_offset {
        claims["iat"] = json!(now + iat);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

/// Status and body of a WebSocket upgrade with `?token=`.
fn upgrade(server: &Server, token: &str) -> (u16, String) {
    common::http_raw(
        server.addr,
        "GET",
        &format!("/ws?token={token}"),
        None,
        "",
        &[
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    .expect("upgrade request")
}

#[test]
fn tokens_not_yet_valid_are_refused() {
    let server = Server::start(2, &[]);
    for token in [future_token(3600, None), future_token(-10, Some(3600))] {
        let (s, v) = http_json(&server, "GET", "/api/v1/auth/conversations", &token, "");
        assert_eq!((s, v["code"].clone()), (401, json!(40101)), "{v}");
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("not yet valid")),
            "{v}"
        );
        let (s, body) = upgrade(&server, &token);
        assert_eq!(s, 401, "{body}");
        assert!(body.contains("not yet valid"), "{body}");
    }
    // Already valid (nbf in the past), it works on both.
    let ok = future_token(-10, Some(-10));
    let (s, v) = http_json(&server, "GET", "/api/v1/auth/conversations", &ok, "");
    assert_eq!(s, 200, "{v}");
    let mut c = Client::connect(server.addr, &ok);
    c.set_timeout(Duration::from_secs(10));
    let r = c.request(pb::client_frame::Body::Heartbeat(pb::Heartbeat {
        client_ts: 1,
    }));
    assert_eq!(r.code, 0);
}
