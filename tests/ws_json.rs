//! The `imshard.v1.json` subprotocol against the real binary: negotiation, every kind
//! of server frame as JSON, both encodings talking to each other, and errors.
mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{users_on_shards, Server};
use imshard::proto::pb::{self, client_frame::Body};
use prost::Message as _;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

/// Opens a WebSocket offering `protocols`; the socket and the echoed subprotocol.
fn open(
    addr: SocketAddr,
    token: &str,
    protocols: Option<&str>,
) -> (WebSocket<TcpStream>, Option<String>) {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = format!("ws://{addr}/ws?token={token}")
        .into_client_request()
        .expect("request");
    if let Some(p) = protocols {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().expect("header"));
    }
    let (ws, resp) = tungstenite::client::client(req, stream).expect("ws handshake");
    let echoed = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().expect("ascii").to_string());
    (ws, echoed)
}

/// A client of the JSON subprotocol.
struct JsonClient {
    ws: WebSocket<TcpStream>,
    next_req: u64,
    kept: Vec<Value>,
}

impl JsonClient {
    fn connect(server: &Server, user: &str, device: &str) -> JsonClient {
        let (ws, echoed) = open(
            server.addr,
            &server.token(user, device),
            Some("imshard.v1.json"),
        );
        assert_eq!(echoed.as_deref(), Some("imshard.v1.json"));
        JsonClient {
            ws,
            next_req: 1,
            kept: Vec::new(),
        }
    }

    fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).expect("ws send");
    }

    /// The next envelope; None on close or timeout. Every server frame must be text.
    fn read(&mut self) -> Option<Value> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).expect("JSON")),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
                Ok(Message::Binary(_)) => panic!("binary frame on a JSON connection"),
                Ok(_) | Err(_) => return None,
            }
        }
    }

    /// Sends `{req_id, <op>: body}` and returns the RESPONSE payload.
    fn request(&mut self, op: &str, body: Value) -> Value {
        let req_id = self.next_req;
        self.next_req += 1;
        self.send_text(&json!({ "req_id": req_id, op: body }).to_string());
        self.response(req_id)
    }

    fn response(&mut self, req_id: u64) -> Value {
        // 64-bit integers are strings in the canonical JSON mapping.
        let answers = |env: &Value| {
            env["type"] == "RESPONSE"
                && env["req_id"].as_str().and_then(|s| s.parse::<u64>().ok()) == Some(req_id)
        };
        let mut early = match self.kept.iter().position(answers) {
            Some(i) => Some(self.kept.remove(i)),
            None => None,
        };
        loop {
            let env = match early.take() {
                Some(env) => env,
                None => self.read().expect("connection ended before the response"),
            };
            if answers(&env) {
                assert!(env.get("data").is_none(), "{env}");
                return env["payload"].clone();
            }
            self.kept.push(env);
        }
    }

    fn next_of(&mut self, kind: &str) -> Value {
        if let Some(i) = self.kept.iter().position(|e| e["type"] == kind) {
            return self.kept.remove(i);
        }
        loop {
            let env = self.read().expect("connection ended before the envelope");
            if env["type"] == kind {
                return env;
            }
            self.kept.push(env);
        }
    }

    /// The close code the server ends the connection with.
    fn close_code(&mut self) -> Option<CloseCode> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return Some(f.code),
                Ok(Message::Close(None)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }
}

/// GetUnread of `user` over a fresh JSON connection.
fn json_unread_of(server: &Server, user: &str) -> Value {
    let mut c = JsonClient::connect(server, user, "json_unread");
    c.request("get_unread", json!({"per_conv_limit": 10}))
}

#[test]
fn negotiation_echoes_the_chosen_subprotocol() {
    let server = Server::start(2, &[]);
    let token = server.token("neg", "d1");
    let (_, echoed) = open(server.addr, &token, Some("imshard.v1.json"));
    assert_eq!(echoed.as_deref(), Some("imshard.v1.json"));
    let (mut ws, echoed) = open(server.addr, &token, Some("imshard.v1.proto"));
    assert_eq!(echoed.as_deref(), Some("imshard.v1.proto"));
    let hb = pb::ClientFrame {
        req_id: 1,
        body: Some(Body::Heartbeat(pb::Heartbeat { client_ts: 1 })),
    };
    ws.send(Message::binary(hb.encode_to_vec())).expect("send");
    assert!(matches!(ws.read(), Ok(Message::Binary(_))));
    let (_, echoed) = open(server.addr, &token, None);
    assert_eq!(echoed, None);
}

#[test]
fn json_and_binary_clients_chat() {
    let server = Server::start(2, &[]);
    let (alice, bob) = users_on_shards(2, "js", false);
    let mut a1 = JsonClient::connect(&server, &alice, "web1");
    let mut a2 = JsonClient::connect(&server, &alice, "web2");
    let mut b = server.connect(&bob, "phone");

    let hb = a1.request("heartbeat", json!({"client_ts": "5"}));
    assert!(hb["body"]["server_ts"].as_str().is_some(), "{hb}");

    let sent = a1.request(
        "send",
        json!({"conv_type": "CONV_TYPE_P2P", "target": bob, "client_msg_id": "j1",
               "content": "{\"text\":\"hi from json\"}"}),
    );
    assert!(sent.get("code").is_none(), "{sent}");
    let conv = sent["body"]["conv_id"]
        .as_str()
        .expect("conv_id")
        .to_string();
    assert_eq!(sent["body"]["seq"], "1");
    let push = b.next_push().expect("bob gets the push");
    assert_eq!(push.content, "{\"text\":\"hi from json\"}");
    // alice's other device gets it as JSON
    let p = a2.next_of("MSG_PUSH");
    assert_eq!(p["seq"], "1");
    assert_eq!(p["ack_required"], true);
    assert_eq!(p["payload"]["from_uuid"], alice.as_str());
    assert_eq!(p["payload"]["content"], "{\"text\":\"hi from json\"}");

    let reply = b.send_p2p(&alice, "b1", "{\"text\":\"hi from proto\"}");
    assert_eq!(reply.expect("bob sends").seq, 2);
    let p = a1.next_of("MSG_PUSH");
    assert_eq!(p["payload"]["seq"], "2");
    assert_eq!(p["payload"]["conv_id"], conv.as_str());
    let ack = a1.request("push_ack", json!({"conv_id": conv, "seq": 2}));
    assert!(
        ack.get("code").is_none() && ack.get("body").is_none(),
        "{ack}"
    );

    // lowerCamelCase and numeric enums are accepted too
    let pulled = a1.request(
        "pull",
        json!({"convId": conv, "anchorSeq": 0, "limit": 1, "direction": 2}),
    );
    let msgs = pulled["body"]["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["seq"], "2");
    assert_eq!(pulled["body"]["has_more"], true);

    let list = a1.request("get_conversations", json!({}));
    let item = &list["body"]["conversations"][0];
    assert_eq!(item["conv_id"], conv.as_str());
    assert_eq!(item["conv_type"], "CONV_TYPE_P2P");
    assert_eq!(item["last_msg"]["seq"], "2");

    let marked = a1.request("mark_read", json!({"conv_id": conv, "read_seq": "2"}));
    assert!(marked["body"].get("unread_count").is_none(), "{marked}");
    let n = a2.next_of("MSG_MARK_READ");
    assert_eq!(n["payload"], json!({"conv_id": conv, "read_seq": "2"}));

    let msg_id = sent["body"]["msg_id"].as_str().expect("msg_id");
    let recalled = a1.request("recall", json!({"conv_id": conv, "msg_id": msg_id}));
    assert_eq!(recalled, json!({"body": {}}));
    let n = a2.next_of("MSG_RECALL");
    assert_eq!(n["payload"]["msg_id"], msg_id);
    assert_eq!(n["payload"]["operator"], alice.as_str());
    let n = b.next_of("MSG_RECALL").expect("bob gets the recall");
    let notice = pb::RecallNotice::decode(&*n.data).expect("binary notice");
    assert_eq!(notice.msg_id, msg_id);

    let group = a1.request(
        "create_group",
        json!({"group_id": "jsg", "name": "json group", "members": [bob]}),
    );
    assert_eq!(group["body"]["conv_id"], "grp-jsg");
    let sent = a1.request(
        "send",
        json!({"conv_type": "CONV_TYPE_GROUP", "target": "jsg", "content": "{}"}),
    );
    assert_eq!(sent["body"]["seq"], "2");

    // The remaining operations, each answered with its XxxResponse as JSON.
    let by_ids = a1.request("get_by_ids", json!({"conv_id": conv, "msg_ids": [msg_id]}));
    assert_eq!(by_ids["body"]["messages"][0]["status"], 1, "{by_ids}");
    let unread = json_unread_of(&server, &bob);
    assert_eq!(unread["body"]["total_unread"], "2", "{unread}");
    assert_eq!(
        unread["body"]["conversations"][0]["messages"][1]["seq"],
        "2"
    );
    let set = a1.request("update_settings", json!({"conv_id": conv, "pin": true}));
    assert_eq!(set, json!({"body": {}}));
    let list = a1.request("get_conversations", json!({"page_size": 10}));
    let pinned = list["body"]["conversations"]
        .as_array()
        .expect("conversations")
        .iter()
        .find(|c| c["conv_id"] == conv.as_str())
        .expect("the p2p row");
    assert_eq!(pinned["pin"], true);
    let members = a1.request(
        "update_members",
        json!({"group_id": "jsg", "add": ["carol"]}),
    );
    assert_eq!(members["body"]["members"].as_array().map(Vec::len), Some(3));
    let deleted = a1.request("delete_conversation", json!({"conv_id": conv}));
    assert_eq!(deleted, json!({"body": {}}));

    // Operation errors keep their codes.
    let denied = a1.request("pull", json!({"conv_id": "p2p-x1-x2"}));
    assert_eq!(denied["code"], 40301, "{denied}");
    assert_eq!(
        denied["message"],
        "forbidden: not a member of this conversation"
    );
    assert!(denied.get("body").is_none());

    // An admin broadcast of a type of its own keeps `data` as base64.
    let body =
        json!({"user_uuids": [alice], "message": {"type": "SYSTEM_NOTICE", "data": "aGVsbG8="}});
    let (status, _) = server
        .http(
            "POST",
            "/api/v1/admin/broadcast",
            Some(&server.admin_token()),
            &body.to_string(),
        )
        .expect("broadcast");
    assert_eq!(status, 200);
    let notice = a2.next_of("SYSTEM_NOTICE");
    assert_eq!(notice["data"], "aGVsbG8=");
    assert!(notice.get("payload").is_none());

    // A second connection of the same device replaces the first: KICKOUT as JSON.
    let mut a1b = JsonClient::connect(&server, &alice, "web1");
    let kick = a1.next_of("KICKOUT");
    assert_eq!(kick["payload"]["reason"], "replaced");
    assert_eq!(a1.close_code(), Some(CloseCode::from(4000)));
    let hb = a1b.request("heartbeat", json!({}));
    assert!(hb["body"].is_object());
}

#[test]
fn bad_json_gets_the_same_errors_as_bad_protobuf() {
    let server = Server::start(2, &[]);
    let mut c = JsonClient::connect(&server, "bad", "d1");
    c.send_text(r#"{"req_id": 7, "send": {"no_such_field": 1}}"#);
    let r = c.response(7);
    assert_eq!(r["code"], 40001, "{r}");
    c.send_text(r#"{"req_id": "8", "pull": "not an object"}"#);
    assert_eq!(c.response(8)["code"], 40001);
    c.send_text(r#"{"req_id": 9}"#);
    assert_eq!(c.response(9)["code"], 40001);
    c.send_text("{ this is not json");
    assert_eq!(c.close_code(), Some(CloseCode::Invalid));

    // The other encoding than the negotiated one: 1003, both ways.
    let mut c = JsonClient::connect(&server, "bad", "d2");
    c.ws.send(Message::binary(vec![8, 1])).expect("send");
    assert_eq!(c.close_code(), Some(CloseCode::Unsupported));
    let (mut ws, _) = open(
        server.addr,
        &server.token("bad", "d3"),
        Some("imshard.v1.proto"),
    );
    ws.send(Message::text("{}")).expect("send");
    let code = loop {
        match ws.read() {
            Ok(Message::Close(f)) => break f.map(|f| f.code),
            Ok(_) => continue,
            Err(_) => break None,
        }
    };
    assert_eq!(code, Some(CloseCode::Unsupported));
}
