//! Issue 9 item 4: replies stay within a byte budget, so no legitimate request gets its
//! own client cut as a slow reader. Against the real binary.

mod common;

use common::{users_on_shards, Client, Server};
use imshard::ids::p2p_conv_id;
use imshard::proto::pb::{self, client_frame::Body, ClientFrame, PullDirection};
use prost::Message as _;

fn ok<T: prost::Message + Default>(r: common::Resp) -> T {
    assert_eq!(r.code, 0, "{}", r.message);
    T::decode(&*r.body).expect("decode")
}

/// Sends `n` p2p messages of `size` bytes each, pipelined, and waits for every answer.
fn send_big(c: &mut Client, target: &str, n: usize, size: usize) {
    let first = 1_000_000;
    for i in 0..n {
        let content = format!("{{\"t\":\"{}\"}}", "x".repeat(size - 8));
        c.send_frame(&ClientFrame {
            req_id: first + i as u64,
            body: Some(Body::Send(pb::SendMessageRequest {
                conv_type: pb::ConvType::P2p as i32,
                target: target.into(),
                client_msg_id: format!("big{i}"),
                content,
                ..Default::default()
            })),
        });
    }
    for i in 0..n {
        let r = c.wait_response(first + i as u64);
        assert_eq!(r.code, 0, "{}", r.message);
    }
}

const BIG: usize = 60 * 1024;

#[test]
fn big_pulls_page_by_budget_instead_of_cutting_the_client() {
    let server = Server::start(2, &["--rate-limit", "0"]);
    let (a, b) = users_on_shards(2, "bigpull", false);
    let mut c = server.connect(&a, "d");
    send_big(&mut c, &b, 200, BIG);
    let conv = p2p_conv_id(&a, &b);

    // FORWARD with limit 200: 12 MB would pass the 4 MiB outbound queue.
    let mut seen = Vec::new();
    let mut msg_ids = Vec::new();
    let mut anchor = 0;
    let mut pages = 0;
    loop {
        let page = c
            .pull(&conv, anchor, 200, PullDirection::Forward)
            .expect("pull");
        assert!(!page.messages.is_empty(), "a page always makes progress");
        let bytes: usize = page.messages.iter().map(|m| m.encoded_len()).sum();
        assert!(bytes <= 1 << 20, "a page holds at most the budget: {bytes}");
        pages += 1;
        seen.extend(page.messages.iter().map(|m| m.seq));
        msg_ids.extend(page.messages.iter().map(|m| m.msg_id.clone()));
        anchor = page.messages.last().map_or(anchor, |m| m.seq);
        if !page.has_more {
            break;
        }
    }
    assert!(pages > 1, "200 messages of 60 KiB do not fit one reply");
    assert_eq!(seen, (1..=200).collect::<Vec<i64>>(), "no gaps, no repeats");
    c.assert_not_kicked();

    // BACKWARD from the newest pages down to seq 1 the same way.
    let mut seen = Vec::new();
    let mut anchor = 0;
    loop {
        let page = c
            .pull(&conv, anchor, 200, PullDirection::Backward)
            .expect("pull");
        assert!(!page.messages.is_empty());
        assert!(page.messages.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        seen.extend(page.messages.iter().rev().map(|m| m.seq));
        anchor = page.messages[0].seq;
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seen, (1..=200).rev().collect::<Vec<i64>>());
    c.assert_not_kicked();

    // By ids: 50 ids of 60 KiB (3 MB): what fits, in request order, from the first id.
    let ids: Vec<String> = msg_ids[..50].iter().rev().cloned().collect();
    let got: pb::GetMessagesByIdsResponse =
        ok(c.request(Body::GetByIds(pb::GetMessagesByIdsRequest {
            conv_id: conv.clone(),
            msg_ids: ids.clone(),
        })));
    assert!(!got.messages.is_empty() && got.messages.len() < 50);
    let got_ids: Vec<String> = got.messages.iter().map(|m| m.msg_id.clone()).collect();
    assert_eq!(got_ids, ids[..got_ids.len()], "a prefix of the request");
    c.assert_not_kicked();

    // A message bigger than the budget still comes, alone (progress is always possible).
    let mut big = Server::start(
        2,
        &[
            "--rate-limit",
            "0",
            "--max-content-bytes",
            "1100000",
            "--max-frame-bytes",
            "2000000",
            "--outbound-queue-bytes",
            "8000000",
        ],
    );
    let mut c = big.connect(&a, "d");
    send_big(&mut c, &b, 3, 2_100_000 / 2);
    let page = c.pull(&conv, 0, 200, PullDirection::Forward).expect("pull");
    assert_eq!(page.messages.len(), 1);
    assert!(page.has_more);
    big.kill9();
}

#[test]
fn get_unread_stays_within_the_budget_and_says_has_more() {
    let server = Server::start(2, &["--rate-limit", "0"]);
    let (a, b) = users_on_shards(2, "bigunread", false);
    let mut ca = server.connect(&a, "d");
    send_big(&mut ca, &b, 120, BIG);
    let (other, _) = users_on_shards(2, "smallunread", true);
    let mut co = server.connect(&other, "d");
    co.send_p2p(&b, "s1", "{\"t\":\"hi\"}").expect("send");

    let mut cb = server.connect(&b, "d");
    let unread: pb::GetUnreadResponse = ok(cb.request(Body::GetUnread(pb::GetUnreadRequest {
        per_conv_limit: 200,
    })));
    assert_eq!(unread.total_unread, 121, "the total counts everything");
    assert!(
        unread.has_more,
        "7 MB of unread messages do not fit one reply"
    );
    let bytes: usize = unread.conversations.iter().map(|c| c.encoded_len()).sum();
    assert!(
        bytes <= (1 << 20) + BIG + 1024,
        "within the budget: {bytes}"
    );
    let big_conv = p2p_conv_id(&a, &b);
    let listed = unread
        .conversations
        .iter()
        .find(|u| u.conversation.as_ref().map(|c| c.conv_id.as_str()) == Some(&big_conv))
        .expect("the big conversation is listed");
    let got: Vec<i64> = listed.messages.iter().map(|m| m.seq).collect();
    assert!(!got.is_empty() && got.len() < 120);
    assert_eq!(
        *got.last().expect("newest"),
        120,
        "the newest unread come first"
    );
    assert!(got.windows(2).all(|w| w[0] + 1 == w[1]));
    cb.assert_not_kicked();

    // The rest comes by pulling below the first one listed.
    let mut seen = got.clone();
    let mut anchor = got[0];
    loop {
        let page = cb
            .pull(&big_conv, anchor, 200, PullDirection::Backward)
            .expect("pull");
        seen.extend(page.messages.iter().map(|m| m.seq));
        anchor = page.messages[0].seq;
        if !page.has_more {
            break;
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=120).collect::<Vec<i64>>());

    // Small unread fits at once: has_more is false.
    let (x, y) = users_on_shards(2, "fewunread", false);
    server
        .connect(&x, "d")
        .send_p2p(&y, "c1", "{}")
        .expect("send");
    let mut cy = server.connect(&y, "d");
    let unread: pb::GetUnreadResponse =
        ok(cy.request(Body::GetUnread(pb::GetUnreadRequest { per_conv_limit: 0 })));
    assert_eq!(unread.total_unread, 1);
    assert!(!unread.has_more);
    assert_eq!(unread.conversations.len(), 1);
}

#[test]
fn conversation_pages_end_at_the_budget() {
    let server = Server::start(2, &["--rate-limit", "0"]);
    let mut c = server.connect("convbudget", "d");
    let targets: Vec<String> = (0..40).map(|i| format!("peer{i}")).collect();
    for t in &targets {
        send_big(&mut c, t, 1, BIG);
    }
    let mut seen = Vec::new();
    let mut cursor = 0;
    let mut pages = 0;
    loop {
        let page: pb::GetConversationsResponse = ok(c.request(Body::GetConversations(
            pb::GetConversationsRequest {
                updated_since: 0,
                page_size: 200,
                cursor,
            },
        )));
        assert!(!page.conversations.is_empty());
        pages += 1;
        seen.extend(page.conversations.iter().map(|i| i.conv_id.clone()));
        cursor = page.next_cursor;
        if !page.has_more {
            break;
        }
    }
    assert!(pages > 1, "40 last messages of 60 KiB do not fit one reply");
    seen.sort();
    let mut want: Vec<String> = targets
        .iter()
        .map(|t| p2p_conv_id("convbudget", t))
        .collect();
    want.sort();
    assert_eq!(seen, want, "every conversation once");
    c.assert_not_kicked();
}
