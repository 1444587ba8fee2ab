//! The message API of docs/PROTOCOL.md over WebSocket and HTTP, against the real binary.

mod common;

use std::time::Duration;

use common::{users_on_shards, Client, Server};
use imshard::ids::p2p_conv_id;
use imshard::proto::pb::{self, client_frame::Body, PullDirection};
use prost::Message as _;
use serde_json::{json, Value};

fn ok<T: prost::Message + Default>(r: common::Resp) -> T {
    assert_eq!(r.code, 0, "{}", r.message);
    T::decode(&*r.body).expect("decode")
}

fn convs(c: &mut Client, page_size: i32, cursor: i64, since: i64) -> pb::GetConversationsResponse {
    ok(
        c.request(Body::GetConversations(pb::GetConversationsRequest {
            updated_since: since,
            page_size,
            cursor,
        })),
    )
}

fn http_json(server: &Server, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    let (status, text) = server.http(method, path, Some(token), body).expect("http");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(
        v.get("code").is_some() && v.get("message").is_some() && v.get("timestamp").is_some(),
        "{v}"
    );
    if status != 200 {
        let code = v["code"].as_i64().expect("code");
        assert_eq!(
            status as i64,
            code / 100,
            "HTTP status is the code's first three digits"
        );
    }
    (status, v)
}

#[test]
fn backward_paging_through_500_messages_reaches_seq_1_once() {
    let server = Server::start(2, &["--rate-limit", "0"]);
    let (a, b) = users_on_shards(2, "bp", false);
    let mut c = server.connect(&a, "d");
    for i in 0..500 {
        c.send_p2p(&b, &format!("m{i}"), "{}").expect("send");
    }
    let conv = p2p_conv_id(&a, &b);
    let mut seen = Vec::new();
    let mut anchor = 0;
    loop {
        let page = c
            .pull(&conv, anchor, 200, PullDirection::Backward)
            .expect("pull");
        assert!(
            page.messages.windows(2).all(|w| w[0].seq + 1 == w[1].seq),
            "ascending within a page"
        );
        seen.extend(page.messages.iter().rev().map(|m| m.seq));
        anchor = page.messages.first().map_or(0, |m| m.seq);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seen, (1..=500).rev().collect::<Vec<i64>>());
    // Over-large limits are clamped to 200.
    let page = c
        .pull(&conv, 0, 10_000, PullDirection::Forward)
        .expect("pull");
    assert_eq!(page.messages.len(), 200);
}

#[test]
fn messages_by_ids_in_request_order_unknown_skipped() {
    let server = Server::start(2, &[]);
    let (a, b) = users_on_shards(2, "bi", false);
    let mut c = server.connect(&a, "d");
    let ids: Vec<String> = (0..3)
        .map(|i| c.send_p2p(&b, &format!("x{i}"), "{}").expect("send").msg_id)
        .collect();
    let conv = p2p_conv_id(&a, &b);
    let unknown = ulid::Ulid::new().to_string();
    let r: pb::GetMessagesByIdsResponse =
        ok(c.request(Body::GetByIds(pb::GetMessagesByIdsRequest {
            conv_id: conv.clone(),
            msg_ids: vec![ids[2].clone(), unknown, ids[0].clone()],
        })));
    assert_eq!(
        r.messages
            .iter()
            .map(|m| m.msg_id.clone())
            .collect::<Vec<_>>(),
        vec![ids[2].clone(), ids[0].clone()]
    );
    for n in [0usize, 51] {
        let r = c.request(Body::GetByIds(pb::GetMessagesByIdsRequest {
            conv_id: conv.clone(),
            msg_ids: vec![ids[0].clone(); n],
        }));
        assert_eq!(r.code, 40001, "{n} ids");
    }
}

#[test]
fn recall_rules_and_notices() {
    let server = Server::start(2, &["--recall-window", "2s"]);
    let (a, b) = users_on_shards(2, "rc", false);
    let mut a1 = server.connect(&a, "phone");
    let mut a2 = server.connect(&a, "laptop");
    let mut b1 = server.connect(&b, "phone");
    let conv = p2p_conv_id(&a, &b);
    let m = a1.send_p2p(&b, "r1", r#"{"t":"oops"}"#).expect("send");
    b1.next_push().expect("push");
    a2.next_push().expect("push");
    let recall = |c: &mut Client, id: &str| {
        c.request(Body::Recall(pb::RecallMessageRequest {
            conv_id: conv.clone(),
            msg_id: id.to_string(),
        }))
        .code
    };
    assert_eq!(
        recall(&mut b1, &m.msg_id),
        40301,
        "only the sender recalls in 1:1"
    );
    assert_eq!(recall(&mut a1, &m.msg_id), 0);
    for c in [&mut a1, &mut a2, &mut b1] {
        let env = c.next_of("MSG_RECALL").expect("MSG_RECALL to every device");
        let n = pb::RecallNotice::decode(&*env.data).expect("notice");
        assert_eq!(
            (n.msg_id.as_str(), n.seq, n.operator.as_str()),
            (m.msg_id.as_str(), 1, a.as_str())
        );
    }
    let page = b1.pull(&conv, 0, 10, PullDirection::Forward).expect("pull");
    assert_eq!(page.messages[0].status, 1);
    assert!(
        !page.messages[0].content.contains("oops"),
        "content replaced by the recall notice"
    );
    assert_eq!(
        recall(&mut a1, &m.msg_id),
        0,
        "recalling twice is idempotent"
    );
    assert_eq!(recall(&mut a1, &ulid::Ulid::new().to_string()), 40401);
    let late = a1.send_p2p(&b, "r2", "{}").expect("send");
    std::thread::sleep(Duration::from_millis(2300));
    assert_eq!(recall(&mut a1, &late.msg_id), 42201, "after the window");
}

#[test]
fn conversation_list_paging_unread_and_settings() {
    let server = Server::start(2, &["--rate-limit", "0"]);
    let me = "lister";
    let mut mine = server.connect(me, "phone");
    let mut other_dev = server.connect(me, "tablet");
    let peers: Vec<String> = (0..5).map(|i| format!("peer{i}")).collect();
    for (i, p) in peers.iter().enumerate() {
        let mut pc = server.connect(p, "d");
        for j in 0..=i {
            pc.send_p2p(me, &format!("c{j}"), &format!(r#"{{"n":{j}}}"#))
                .expect("send");
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    // Newest first; unread = max_seq - read_seq; last_msg filled.
    let all = convs(&mut mine, 0, 0, 0);
    assert_eq!(all.conversations.len(), 5);
    assert!(!all.has_more);
    assert_eq!(all.conversations[0].target_uuid, "peer4");
    assert_eq!(all.conversations[0].unread_count, 5);
    assert_eq!(
        all.conversations[0].last_msg.as_ref().map(|m| m.seq),
        Some(5)
    );
    assert!(all
        .conversations
        .windows(2)
        .all(|w| w[0].updated_at >= w[1].updated_at));
    // Paging with the cursor: no repeats, nothing skipped.
    let mut got = Vec::new();
    let mut cursor = 0;
    loop {
        let page = convs(&mut mine, 2, cursor, 0);
        got.extend(page.conversations.iter().map(|c| c.conv_id.clone()));
        if !page.has_more {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!(
        got,
        all.conversations
            .iter()
            .map(|c| c.conv_id.clone())
            .collect::<Vec<_>>()
    );
    // updated_since filters.
    let since = all.conversations[1].updated_at;
    assert_eq!(convs(&mut mine, 0, 0, since).conversations.len(), 1);
    // Settings: only the set field changes; every device sees it.
    let conv = all.conversations[2].conv_id.clone();
    let r = mine.request(Body::UpdateSettings(pb::UpdateConvSettingsRequest {
        conv_id: conv.clone(),
        mute: Some(true),
        pin: None,
    }));
    assert_eq!(r.code, 0);
    let r = mine.request(Body::UpdateSettings(pb::UpdateConvSettingsRequest {
        conv_id: conv.clone(),
        mute: None,
        pin: Some(true),
    }));
    assert_eq!(r.code, 0);
    let seen = convs(&mut other_dev, 0, 0, 0);
    let item = seen
        .conversations
        .iter()
        .find(|c| c.conv_id == conv)
        .expect("row");
    assert!(item.mute && item.pin);
    // Unread after reconnect: GetUnread lists every unread conversation with its messages.
    drop(mine);
    let mut again = server.connect(me, "phone");
    let unread: pb::GetUnreadResponse =
        ok(again.request(Body::GetUnread(pb::GetUnreadRequest { per_conv_limit: 2 })));
    assert_eq!(unread.total_unread, 1 + 2 + 3 + 4 + 5);
    assert_eq!(unread.conversations.len(), 5);
    let top = &unread
        .conversations
        .iter()
        .find(|u| u.conversation.as_ref().map(|c| c.target_uuid.as_str()) == Some("peer4"))
        .expect("peer4");
    assert_eq!(
        top.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![4, 5],
        "newest unread, ascending"
    );
}

#[test]
fn mark_read_syncs_other_devices_and_only_moves_forward() {
    let server = Server::start(2, &["--rate-limit", "0"]);
    let (a, b) = users_on_shards(2, "mr", false);
    let mut b1 = server.connect(&b, "phone");
    let mut b2 = server.connect(&b, "laptop");
    let mut a1 = server.connect(&a, "phone");
    for i in 0..5 {
        a1.send_p2p(&b, &format!("m{i}"), "{}").expect("send");
    }
    let conv = p2p_conv_id(&a, &b);
    let mark = |c: &mut Client, seq: i64| -> Result<i32, i32> {
        let r = c.request(Body::MarkRead(pb::MarkReadRequest {
            conv_id: conv.clone(),
            read_seq: seq,
        }));
        if r.code == 0 {
            Ok(pb::MarkReadResponse::decode(&*r.body)
                .expect("decode")
                .unread_count)
        } else {
            Err(r.code)
        }
    };
    assert_eq!(mark(&mut b1, 3), Ok(2));
    let env = b2
        .next_of("MSG_MARK_READ")
        .expect("the other device learns the read mark");
    let n = pb::MarkReadNotice::decode(&*env.data).expect("notice");
    assert_eq!((n.conv_id.as_str(), n.read_seq), (conv.as_str(), 3));
    assert_eq!(mark(&mut b1, 2), Ok(2), "read_seq never moves back");
    assert_eq!(mark(&mut b1, 99), Ok(0), "capped at max_seq");
    assert_eq!(mark(&mut b1, 0), Err(40001));
    b1.set_timeout(Duration::from_millis(400));
    assert!(
        b1.next_of("MSG_MARK_READ").is_none(),
        "the marking device gets no notice"
    );
    let item = convs(&mut b2, 0, 0, 0)
        .conversations
        .into_iter()
        .find(|c| c.conv_id == conv)
        .expect("row");
    assert_eq!((item.read_seq, item.unread_count, item.max_seq), (5, 0, 5));
    // The sender's own row counts its messages as read.
    let item = convs(&mut a1, 0, 0, 0)
        .conversations
        .into_iter()
        .find(|c| c.conv_id == conv)
        .expect("row");
    assert_eq!(item.unread_count, 0);
}

#[test]
fn delete_hides_history_for_the_caller_only() {
    let server = Server::start(2, &["--rate-limit", "0"]);
    let (a, b) = users_on_shards(2, "del", false);
    let mut a1 = server.connect(&a, "phone");
    let mut b1 = server.connect(&b, "phone");
    for i in 0..3 {
        a1.send_p2p(&b, &format!("m{i}"), "{}").expect("send");
    }
    let conv = p2p_conv_id(&a, &b);
    let r = b1.request(Body::DeleteConversation(pb::DeleteConversationRequest {
        conv_id: conv.clone(),
    }));
    assert_eq!(r.code, 0);
    assert!(
        convs(&mut b1, 0, 0, 0)
            .conversations
            .iter()
            .all(|c| c.conv_id != conv),
        "deleted row is hidden"
    );
    let page = b1.pull(&conv, 0, 50, PullDirection::Forward).expect("pull");
    assert!(page.messages.is_empty(), "no ghost history");
    assert_eq!(page.max_seq, 3);
    assert_eq!(
        b1.pull(&conv, 0, 50, PullDirection::Backward)
            .expect("pull")
            .messages
            .len(),
        0
    );
    assert_eq!(
        a1.pull(&conv, 0, 50, PullDirection::Forward)
            .expect("pull")
            .messages
            .len(),
        3,
        "the other party keeps it"
    );
    a1.send_p2p(&b, "m3", "{}").expect("send");
    let item = convs(&mut b1, 0, 0, 0)
        .conversations
        .into_iter()
        .find(|c| c.conv_id == conv)
        .expect("row is back");
    assert_eq!((item.unread_count, item.clear_seq), (1, 3));
    let page = b1.pull(&conv, 0, 50, PullDirection::Forward).expect("pull");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![4]
    );
}

#[test]
fn someone_elses_conversation_is_forbidden_everywhere() {
    let server = Server::start(2, &[]);
    let (a, b) = users_on_shards(2, "priv", false);
    let mut a1 = server.connect(&a, "phone");
    let m = a1.send_p2p(&b, "m", "{}").expect("send");
    let conv = p2p_conv_id(&a, &b);
    let mut eve = server.connect("eve", "phone");
    let ops = vec![
        Body::Pull(pb::PullMessagesRequest {
            conv_id: conv.clone(),
            ..Default::default()
        }),
        Body::GetByIds(pb::GetMessagesByIdsRequest {
            conv_id: conv.clone(),
            msg_ids: vec![m.msg_id.clone()],
        }),
        Body::Recall(pb::RecallMessageRequest {
            conv_id: conv.clone(),
            msg_id: m.msg_id.clone(),
        }),
        Body::MarkRead(pb::MarkReadRequest {
            conv_id: conv.clone(),
            read_seq: 1,
        }),
        Body::DeleteConversation(pb::DeleteConversationRequest {
            conv_id: conv.clone(),
        }),
        Body::UpdateSettings(pb::UpdateConvSettingsRequest {
            conv_id: conv.clone(),
            mute: Some(true),
            pin: None,
        }),
    ];
    for op in ops {
        let name = format!("{op:?}");
        assert_eq!(eve.request(op).code, 40301, "{name}");
    }
    // Nothing changed for the parties.
    let page = a1.pull(&conv, 0, 10, PullDirection::Forward).expect("pull");
    assert_eq!(page.messages[0].status, 0);
}

#[test]
fn http_and_websocket_give_identical_results() {
    let server = Server::start(2, &["--rate-limit", "0"]);
    let (a, b) = users_on_shards(2, "hw", false);
    let token = server.token(&a, "web");
    let (status, sent) = http_json(
        &server,
        "POST",
        "/api/v1/auth/msg/send",
        &token,
        &json!({"conv_type": 1, "target": b, "client_msg_id": "h1", "content": "{\"x\":1}"})
            .to_string(),
    );
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["data"]["seq"], 1);
    let mut ws = server.connect(&a, "phone");
    let again = ws.send_p2p(&b, "h1", "{\"x\":1}").expect("ws send");
    assert_eq!(
        json!(again.msg_id),
        sent["data"]["msg_id"],
        "dedupe spans transports"
    );
    let conv = p2p_conv_id(&a, &b);
    let (_, pulled) = http_json(
        &server,
        "GET",
        &format!("/api/v1/auth/msg/pull?conv_id={conv}&limit=10"),
        &token,
        "",
    );
    let ws_pull = ws
        .pull(&conv, 0, 10, PullDirection::Unspecified)
        .expect("pull");
    assert_eq!(
        pulled["data"],
        serde_json::to_value(&ws_pull).expect("json")
    );
    let (_, list) = http_json(&server, "GET", "/api/v1/auth/conversations", &token, "");
    let ws_list = convs(&mut ws, 0, 0, 0);
    assert_eq!(list["data"], serde_json::to_value(&ws_list).expect("json"));
    let (s, v) = http_json(
        &server,
        "POST",
        "/api/v1/auth/conversations/mark_read",
        &token,
        &json!({"conv_id": conv, "read_seq": 1}).to_string(),
    );
    assert_eq!((s, v["data"]["unread_count"].clone()), (200, json!(0)));
    let (s, _) = http_json(
        &server,
        "PATCH",
        &format!("/api/v1/auth/conversations/{conv}"),
        &token,
        r#"{"pin":true}"#,
    );
    assert_eq!(s, 200);
    let (_, unread) = http_json(
        &server,
        "GET",
        "/api/v1/auth/unread?per_conv_limit=5",
        &token,
        "",
    );
    assert_eq!(unread["data"]["total_unread"], 0);
    let (s, _) = http_json(
        &server,
        "POST",
        "/api/v1/auth/msg/by_ids",
        &token,
        &json!({"conv_id": conv, "msg_ids": [again.msg_id]}).to_string(),
    );
    assert_eq!(s, 200);
    let (s, _) = http_json(
        &server,
        "POST",
        "/api/v1/auth/msg/recall",
        &token,
        &json!({"conv_id": conv, "msg_id": again.msg_id}).to_string(),
    );
    assert_eq!(s, 200);
    let (s, _) = http_json(
        &server,
        "DELETE",
        &format!("/api/v1/auth/conversations/{conv}"),
        &token,
        "",
    );
    assert_eq!(s, 200);
}

#[test]
fn malformed_http_requests_get_40001_and_change_nothing() {
    let server = Server::start(2, &[]);
    let (a, b) = users_on_shards(2, "mj", false);
    let token = server.token(&a, "web");
    for body in [
        "{not json",
        r#"{"conv_type": "one", "target": "x", "content": "{}"}"#,
        r#"{"conv_type": 1, "target": 5, "content": "{}"}"#,
        r#"{"conv_type": 1, "content": "{}"}"#,
        r#"{"conv_type": 1, "target": "peer"}"#,
        r#"[]"#,
    ] {
        let (status, v) = http_json(&server, "POST", "/api/v1/auth/msg/send", &token, body);
        assert_eq!(
            (status, v["code"].clone()),
            (400, json!(40001)),
            "{body}: {v}"
        );
    }
    let conv = p2p_conv_id(&a, &b);
    let (s, _) = http_json(
        &server,
        "POST",
        "/api/v1/auth/conversations/mark_read",
        &token,
        r#"{"read_seq": 1}"#,
    );
    assert_eq!(s, 400);
    let (s, _) = http_json(
        &server,
        "PATCH",
        &format!("/api/v1/auth/conversations/{conv}"),
        &token,
        r#"{"mute":"yes"}"#,
    );
    assert_eq!(s, 400);
    let (s, _) = http_json(
        &server,
        "GET",
        "/api/v1/auth/msg/pull?conv_id=p2p-x-y&limit=abc",
        &token,
        "",
    );
    assert_eq!(s, 400);
    let (s, v) = http_json(
        &server,
        "GET",
        "/api/v1/auth/conversations",
        "bad.token.here",
        "",
    );
    assert_eq!((s, v["code"].clone()), (401, json!(40101)));
    let (s, _) = http_json(&server, "GET", "/api/v1/auth/nope", &token, "");
    assert_eq!(s, 404);
    // Nothing was stored.
    let mut ws = server.connect(&a, "phone");
    assert_eq!(
        ws.pull(&conv, 0, 10, PullDirection::Forward)
            .expect("pull")
            .max_seq,
        0
    );
    assert!(convs(&mut ws, 0, 0, 0).conversations.is_empty());
}

#[test]
fn admin_kick_broadcast_presence_and_health() {
    let server = Server::start(2, &[]);
    let admin = server.admin_token();
    let user_token = server.token("someone", "d");
    let (s, v) = http_json(
        &server,
        "GET",
        "/api/v1/admin/presence?uuids=ka,kb",
        &user_token,
        "",
    );
    assert_eq!(
        (s, v["code"].clone()),
        (403, json!(40301)),
        "admin token required"
    );
    let mut ka1 = server.connect("ka", "phone");
    let mut ka2 = server.connect("ka", "laptop");
    let mut kb = server.connect("kb", "phone");
    let (_, v) = http_json(
        &server,
        "GET",
        "/api/v1/admin/presence?uuids=ka,kb,kc",
        &admin,
        "",
    );
    let mut devices: Vec<String> =
        serde_json::from_value(v["data"]["online"]["ka"].clone()).expect("list");
    devices.sort();
    assert_eq!(devices, vec!["laptop", "phone"]);
    assert_eq!(v["data"]["online"]["kc"], json!([]));
    // Broadcast to a list, then to everyone.
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(b"hello");
    let body = json!({"user_uuids": ["ka"], "message": {"type": "SYSTEM_NOTICE", "data": data}})
        .to_string();
    let (_, v) = http_json(&server, "POST", "/api/v1/admin/broadcast", &admin, &body);
    assert_eq!(v["data"]["delivered"], 2);
    for c in [&mut ka1, &mut ka2] {
        let env = c.next_of("SYSTEM_NOTICE").expect("broadcast");
        assert_eq!(&env.data[..], b"hello");
    }
    let body = json!({"message": {"type": "ALL_NOTICE", "data": data}}).to_string();
    let (_, v) = http_json(&server, "POST", "/api/v1/admin/broadcast", &admin, &body);
    assert_eq!(v["data"]["delivered"], 3);
    assert!(kb.next_of("ALL_NOTICE").is_some());
    let (s, _) = http_json(
        &server,
        "POST",
        "/api/v1/admin/broadcast",
        &admin,
        r#"{"message":{"type":"X","data":"%%%"}}"#,
    );
    assert_eq!(s, 400);
    // Kick one device, then all.
    let (s, _) = http_json(
        &server,
        "POST",
        "/api/v1/admin/kick",
        &admin,
        r#"{"user_uuid":"ka","device_id":"phone"}"#,
    );
    assert_eq!(s, 200);
    let env = ka1.next_of("KICKOUT").expect("kickout");
    assert_eq!(
        pb::KickoutNotice::decode(&*env.data)
            .expect("notice")
            .reason,
        "admin"
    );
    let (_, v) = http_json(
        &server,
        "POST",
        "/api/v1/admin/kick",
        &admin,
        r#"{"user_uuid":"ka","device_id":"ALL"}"#,
    );
    assert_eq!(v["data"]["kicked"], 1);
    assert!(ka2.next_of("KICKOUT").is_some());
    let (_, v) = http_json(
        &server,
        "GET",
        "/api/v1/admin/presence?uuids=ka",
        &admin,
        "",
    );
    assert_eq!(v["data"]["online"]["ka"], json!([]));
    let (s, text) = server.http("GET", "/healthz", None, "").expect("healthz");
    assert_eq!((s, text.trim()), (200, "ok"));
}
