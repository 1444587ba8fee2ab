//! Issue 9, hardening: no single client can crash, starve or bloat the server. Each
//! test sends what once hurt the real binary and checks it still serves others.

mod common;

use std::time::Duration;

use common::{Client, Server, SECRET};
use imshard::proto::pb;
use prost::Message as _;
use serde_json::{json, Value};

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
