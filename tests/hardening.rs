//! Issue 9 (hardening): replies stay within a byte budget so no legitimate request gets
//! its own client cut as a slow reader. Against the real binary.

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

/// The connection is still served and was never told to go.
fn assert_not_kicked(c: &mut Client) {
    let r = c.request(Body::Heartbeat(pb::Heartbeat::default()));
    assert_eq!(r.code, 0);
    assert!(
        c.pushes.iter().all(|e| e.r#type != "KICKOUT"),
        "the client was kicked"
    );
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
    assert_not_kicked(&mut c);

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
    assert_not_kicked(&mut c);

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
    assert_not_kicked(&mut c);

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
    assert_not_kicked(&mut cb);

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

/// Sum of the series of `/metrics` whose line starts with `prefix`.
fn series_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("bad line {l}"))
        })
        .sum()
}

#[test]
fn metrics_show_latency_refusals_cuts_and_shards() {
    let server = Server::start(2, &["--rate-limit", "1"]);
    let (a, b) = users_on_shards(2, "metrics", false);
    let mut c = server.connect(&a, "d");
    let codes: Vec<i32> = (0..6)
        .map(|i| {
            c.send_p2p(&b, &format!("m{i}"), "{}")
                .map_or_else(|e| e, |_| 0)
        })
        .collect();
    assert!(codes.contains(&0) && codes.contains(&42901), "{codes:?}");
    let conv = p2p_conv_id(&a, &b);
    c.pull(&conv, 0, 10, PullDirection::Forward).expect("pull");

    // Cuts: the same device again replaces the first; a text frame is refused.
    let mut again = server.connect(&a, "d");
    assert!(c.next_of("KICKOUT").is_some());
    again
        .ws
        .send(tungstenite::Message::text("hello"))
        .expect("send text");
    while again.read_envelope().is_some() {}

    let (status, m) = server.http("GET", "/metrics", None, "").expect("metrics");
    assert_eq!(status, 200);
    for s in 0..2 {
        assert!(
            m.lines()
                .any(|l| l == format!("imshard_shard_up{{shard=\"{s}\"}} 1")),
            "{m}"
        );
    }
    assert!(m.contains("# TYPE imshard_request_duration_seconds histogram"));
    let sends = series_sum(&m, "imshard_request_duration_seconds_count{shard=\"");
    assert!(sends >= 7.0, "6 sends and a pull were measured: {m}");
    let send_inf: f64 = (0..2)
        .map(|s| {
            series_sum(
                &m,
                &format!(
                    "imshard_request_duration_seconds_bucket{{shard=\"{s}\",op=\"send\",le=\"+Inf\"}}"
                ),
            )
        })
        .sum();
    assert_eq!(send_inf, 6.0, "{m}");
    let refused = series_sum(&m, "imshard_refusals_total{shard=\"0\",code=\"42901\"}")
        + series_sum(&m, "imshard_refusals_total{shard=\"1\",code=\"42901\"}");
    let refused_sends = codes.iter().filter(|&&c| c == 42901).count();
    assert_eq!(refused, refused_sends as f64, "{m}");
    let cut = |reason: &str| -> f64 {
        (0..2)
            .map(|s| {
                series_sum(
                    &m,
                    &format!("imshard_connection_cuts_total{{shard=\"{s}\",reason=\"{reason}\"}}"),
                )
            })
            .sum()
    };
    assert_eq!(cut("replaced"), 1.0, "{m}");
    assert_eq!(cut("text_frame"), 1.0, "{m}");
    assert_eq!(cut("slow_reader"), 0.0, "{m}");
    assert!(series_sum(&m, "imshard_store_round_seconds_count{") >= 1.0);
    for gauge in [
        "imshard_ring_outbox_backlog{shard=\"1\"}",
        "imshard_ring_queued{shard=\"0\"}",
        "imshard_store_waiting_writes{shard=\"1\"}",
    ] {
        assert!(m.lines().any(|l| l.starts_with(gauge)), "{gauge}: {m}");
    }
}

#[test]
fn admin_listen_takes_metrics_health_and_admin_api_off_the_public_port() {
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .expect("addr");
    let admin_flag = admin_addr.to_string();
    let server = Server::start(2, &["--admin-listen", &admin_flag]);
    let admin_token = server.admin_token();
    let user_token = server.token("alice", "d");
    let get = |addr, path: &str, token: Option<&str>| {
        common::http_raw(addr, "GET", path, token, "", &[]).expect("http")
    };

    // The public port no longer serves the operators' paths.
    for path in ["/metrics", "/healthz", "/api/v1/admin/presence?uuids=alice"] {
        let (status, body) = get(server.addr, path, Some(&admin_token));
        assert_eq!(status, 404, "{path} on the public port: {body}");
    }
    // It still serves clients: the JSON API and WebSocket.
    let (status, body) = get(server.addr, "/api/v1/auth/conversations", Some(&user_token));
    assert_eq!(status, 200, "{body}");
    let mut c = server.connect("alice", "d");
    assert_not_kicked(&mut c);

    // The admin port serves exactly those paths.
    let (status, body) = get(admin_addr, "/healthz", None);
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = get(admin_addr, "/metrics", None);
    assert_eq!(status, 200);
    assert!(body.contains("imshard_shard_up{shard=\"1\"} 1"), "{body}");
    let (status, body) = get(
        admin_addr,
        "/api/v1/admin/presence?uuids=alice",
        Some(&admin_token),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("alice"), "{body}");
    let (status, _) = get(admin_addr, "/api/v1/auth/conversations", Some(&user_token));
    assert_eq!(status, 404);
    let (status, _) = get(
        admin_addr,
        &format!("/ws?token={user_token}"),
        Some(&user_token),
    );
    assert_eq!(status, 404, "no WebSocket on the admin port");
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
    assert_not_kicked(&mut c);
}
