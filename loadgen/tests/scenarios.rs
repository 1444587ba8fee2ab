//! Runs each loadgen scenario for a few seconds against the real `imshard` binary (2
//! shards on a free loopback port, a temp data dir) and checks correctness only: no
//! failures, nothing lost, duplicated or out of order, and some traffic. Never timing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{free_port, server_binary};

const SECRET: &str = "loadgen-test-secret-0123456789";

/// A running server; killed by pid on drop.
struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(server_binary())
            .args([
                "serve",
                "--listen",
                &addr,
                "--shards",
                "2",
                "--rate-limit",
                "0",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--jwt-secret", SECRET])
            .env("IMSHARD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start imshard");
        let mut s = Server {
            child,
            addr,
            _dir: dir,
        };
        s.wait_healthy();
        s
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if healthz(&self.addr) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("imshard exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "imshard did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the loadgen with `args` and returns its JSON results (and the exit status).
    fn loadgen(&self, args: &[&str]) -> (Value, std::process::ExitStatus) {
        let json = self._dir.path().join(format!("{}.json", args[0]));
        let pid = self.child.id().to_string();
        let out = Command::new(env!("CARGO_BIN_EXE_imshard-loadgen"))
            .args(args)
            .args([
                "--target",
                &self.addr,
                "--jwt-secret",
                SECRET,
                "--server-shards",
                "2",
            ])
            .args([
                "--threads",
                "2",
                "--drain-timeout",
                "10s",
                "--server-pid",
                &pid,
            ])
            .arg("--json")
            .arg(&json)
            .output()
            .expect("run imshard-loadgen");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{stdout}{stderr}");
        let text = std::fs::read_to_string(&json)
            .unwrap_or_else(|e| panic!("no JSON from the loadgen ({e}): {stdout}{stderr}"));
        (
            serde_json::from_str(&text).expect("JSON parses"),
            out.status,
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn healthz(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out.starts_with(b"HTTP/1.1 200")
}

fn n(v: &Value, path: &str) -> u64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("{path} missing in {v}"))
}

/// The correctness every scenario must show.
fn assert_clean(v: &Value) {
    for key in [
        "failures.total",
        "check.lost",
        "check.duplicated",
        "check.out_of_order",
        "check.seq_gaps",
        "check.seq_reused",
        "check.unexpected",
    ] {
        assert_eq!(n(v, key), 0, "{key} in {v:#}");
    }
    assert_eq!(v["passed"], true, "{v:#}");
    assert!(v["host"]["cpu_model"].is_string());
    assert!(v["server"]["flags"]
        .as_str()
        .is_some_and(|f| f.contains("--shards 2")));
}

#[test]
fn connect_scenario() {
    let server = Server::start();
    let (v, status) = server.loadgen(&[
        "connect",
        "--connections",
        "200",
        "--rate",
        "400",
        "--duration",
        "2s",
        "--heartbeat-interval",
        "500ms",
        "--source-addrs",
        "3",
    ]);
    assert_clean(&v);
    assert!(status.success());
    assert_eq!(n(&v, "connections.ok"), 200);
    assert!(n(&v, "heartbeats.answered") > 0, "{v:#}");
    assert!(v["server"]["rss_after"].is_u64());
}

#[test]
fn p2p_scenario() {
    let server = Server::start();
    let (v, status) = server.loadgen(&[
        "p2p",
        "--pairs",
        "10",
        "--rate",
        "0",
        "--window",
        "4",
        "--duration",
        "2s",
    ]);
    assert_clean(&v);
    assert!(status.success());
    assert_eq!(n(&v, "connections.ok"), 20);
    assert!(n(&v, "sends.acked") > 0);
    assert_eq!(n(&v, "check.delivered"), n(&v, "check.expected"));
    assert!(n(&v, "check.delivered") > 0);
    assert!(n(&v, "deliveries.push_latency.count") > 0);
}

#[test]
fn p2p_at_a_fixed_rate() {
    let server = Server::start();
    let (v, status) = server.loadgen(&["p2p", "--pairs", "4", "--rate", "200", "--duration", "2s"]);
    assert_clean(&v);
    assert!(status.success());
    assert!(n(&v, "check.delivered") > 0);
}

#[test]
fn group_scenario() {
    let server = Server::start();
    let (v, status) = server.loadgen(&[
        "group",
        "--groups",
        "3",
        "--members",
        "20",
        "--senders",
        "2",
        "--rate",
        "300",
        "--duration",
        "2s",
    ]);
    assert_clean(&v);
    assert!(status.success());
    assert_eq!(n(&v, "groups.created"), 3);
    assert_eq!(n(&v, "connections.ok"), 60);
    // Each acknowledged send is pushed to the 19 other members.
    assert_eq!(n(&v, "check.expected"), 19 * n(&v, "sends.acked"));
    assert_eq!(n(&v, "check.delivered"), n(&v, "check.expected"));
    assert!(n(&v, "check.delivered") > 0);
}

/// A wrong secret: every upgrade is refused, the run fails and says so.
#[test]
fn refused_connections_fail_the_run() {
    let server = Server::start();
    let json = server._dir.path().join("bad.json");
    let out = Command::new(env!("CARGO_BIN_EXE_imshard-loadgen"))
        .args([
            "p2p",
            "--pairs",
            "2",
            "--duration",
            "1s",
            "--target",
            &server.addr,
        ])
        .args(["--jwt-secret", "not-the-server-secret-at-all"])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run imshard-loadgen");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parses");
    assert_eq!(n(&v, "failures.connect"), 4);
    assert_eq!(v["passed"], false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("HTTP 401"), "{stdout}");
}

/// The connect rate is taken over the connect phase, so it can never exceed what the
/// slowest single connect allows; a second run against the same (no longer fresh)
/// server reports no bytes per connection and says why, instead of a number made of
/// the first run's leftovers.
#[test]
fn connect_rate_is_over_the_phase_and_a_used_server_gets_no_rss_figure() {
    let server = Server::start();
    let args = [
        "connect",
        "--connections",
        "50",
        "--rate",
        "0",
        "--duration",
        "1s",
        "--source-addrs",
        "1",
    ];
    let (first, status) = server.loadgen(&args);
    assert!(status.success());
    assert_clean(&first);
    let ok = n(&first, "connections.ok") as f64;
    let per_sec = first["connections"]["per_sec"].as_f64().expect("per_sec");
    let slowest_s = n(&first, "connections.latency.max_us") as f64 / 1e6;
    assert!(per_sec > 0.0, "{first:#}");
    // The phase lasts at least as long as its slowest connect.
    assert!(per_sec * slowest_s <= ok * 1.01, "{first:#}");
    assert_eq!(first["server"]["connections_before"], 0, "{first:#}");

    let (second, status) = server.loadgen(&args);
    assert!(status.success());
    assert!(n(&second, "server.connections_before") >= 50, "{second:#}");
    assert!(
        second["server"]["bytes_per_connection"].is_null(),
        "{second:#}"
    );
    let note = second["server"]["bytes_per_connection_note"]
        .as_str()
        .expect("a note saying why");
    assert!(note.contains("not fresh"), "{note}");
}

/// The fan-out workload of issue 12 at a small size: one sender per group at a fixed
/// rate, latency from the scheduled send time, cumulative PushAcks sent in batches
/// (far fewer than pushes), server CPU per delivery from /proc, host facts with
/// netdev_max_backlog.
#[test]
fn group_fanout_with_batched_acks_and_cpu_per_delivery() {
    let server = Server::start();
    let (v, status) = server.loadgen(&[
        "group",
        "--groups",
        "4",
        "--members",
        "30",
        "--senders-per-group",
        "1",
        "--rate",
        "200",
        "--duration",
        "2s",
        "--cpu-per-delivery",
    ]);
    assert_clean(&v);
    assert!(status.success());
    assert_eq!(n(&v, "groups.created"), 4);
    assert_eq!(n(&v, "check.expected"), 29 * n(&v, "sends.acked"));
    assert_eq!(n(&v, "check.delivered"), n(&v, "check.expected"));
    let pushes = n(&v, "deliveries.pushes");
    let acks = n(&v, "deliveries.push_acks_sent");
    assert!(pushes > 0 && acks > 0, "{v:#}");
    // Every push is acknowledged, but cumulatively: at most one ack per conversation
    // and connection every 100 ms, so far fewer acks than pushes.
    assert!(acks * 2 < pushes, "acks {acks} for {pushes} pushes");
    assert_eq!(
        n(&v, "deliveries.push_latency.count"),
        n(&v, "deliveries.push_latency_from_write.count")
    );
    assert!(v["server"]["cpu_secs"].is_f64(), "{v:#}");
    assert!(v["server"]["cpu_us_per_delivery"].is_f64(), "{v:#}");
    if std::path::Path::new("/proc/sys/net/core/netdev_max_backlog").exists() {
        assert!(v["host"]["netdev_max_backlog"].is_u64(), "{v:#}");
    }
    assert!(v["host"]["softnet_dropped_during_run"].is_u64(), "{v:#}");
}

/// `--ack-batch 1` acknowledges every push on its own, as clients did before
/// cumulative acks; the checker's counts are the same either way.
#[test]
fn one_ack_per_push_still_works() {
    let server = Server::start();
    let (v, status) = server.loadgen(&[
        "group",
        "--groups",
        "2",
        "--members",
        "10",
        "--rate",
        "100",
        "--duration",
        "1s",
        "--ack-batch",
        "1",
    ]);
    assert_clean(&v);
    assert!(status.success());
    // System pushes (group creation) are acknowledged too.
    assert!(
        n(&v, "deliveries.push_acks_sent") >= n(&v, "deliveries.pushes"),
        "{v:#}"
    );
}
