//! Issue 9 item 11: what an operator sees in /metrics, and the admin listener.
//! Against the real binary.

mod common;

use common::{users_on_shards, Server};
use imshard::ids::p2p_conv_id;
use imshard::proto::pb::PullDirection;

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
    // Every operation spends the request budget (2 tokens at --rate-limit 1): the pull
    // goes first so that it is served.
    let conv = p2p_conv_id(&a, &b);
    c.pull(&conv, 0, 10, PullDirection::Forward).expect("pull");
    let codes: Vec<i32> = (0..6)
        .map(|i| {
            c.send_p2p(&b, &format!("m{i}"), "{}")
                .map_or_else(|e| e, |_| 0)
        })
        .collect();
    assert!(codes.contains(&0) && codes.contains(&42901), "{codes:?}");

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
    c.assert_not_kicked();

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
