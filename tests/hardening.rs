//! Issue 9, hardening: no single client can crash, starve or bloat the server. Each
//! test sends what once hurt the real binary and checks it still serves others.

mod common;

use common::Server;
use imshard::proto::pb;

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
