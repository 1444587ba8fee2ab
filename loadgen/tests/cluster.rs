//! The loadgen against a real cluster: a `redis-server` of its own (free loopback port,
//! temp dir, stopped by pid) and two `imshard` nodes with one shard each. The loadgen
//! spreads users over both nodes (`--target a,b`), so every pair and every group spans
//! the two; it must deliver everything and report the nodes' channel counters.
//! Correctness only, never timing. Skipped (with a line on stderr) when redis-server
//! is not installed, unless `CI=true`.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{free_port, server_binary};

const SECRET: &str = "loadgen-cluster-secret-0123456789";

/// A child process killed by pid on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

fn metric(addr: &str, name: &str) -> u64 {
    let Some(text) = http_get(addr, "/metrics") else {
        return 0;
    };
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn start_redis(dir: &std::path::Path) -> Option<(Proc, u16)> {
    let installed = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("redis-server is not installed (CI=true)");
        }
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: redis-server is not installed (apt-get install -y redis-server)"
        );
        return None;
    }
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((proc, port))
}

fn start_node(redis_port: u16, id: &str, dir: &std::path::Path) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let link = format!("127.0.0.1:{}", free_port());
    let child = Command::new(server_binary())
        .args([
            "serve",
            "--listen",
            &addr,
            "--shards",
            "1",
            "--rate-limit",
            "0",
        ])
        .args(["--store", "redis", "--redis-url"])
        .arg(format!("redis://127.0.0.1:{redis_port}/0"))
        .args([
            "--node-id",
            id,
            "--node-listen",
            &link,
            "--cluster-lease",
            "2s",
        ])
        .arg("--data-dir")
        .arg(dir)
        .args(["--jwt-secret", SECRET])
        .env("IMSHARD_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start imshard");
    (Proc(child), addr)
}

fn n(v: &Value, path: &str) -> u64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

fn loadgen(targets: &str, pids: &str, dir: &std::path::Path, args: &[&str]) -> Value {
    let json = dir.join(format!("{}.json", args[0]));
    let out = Command::new(env!("CARGO_BIN_EXE_imshard-loadgen"))
        .args(args)
        .args(["--target", targets, "--jwt-secret", SECRET])
        .args([
            "--server-shards",
            "1",
            "--threads",
            "2",
            "--server-pid",
            pids,
        ])
        .args(["--drain-timeout", "10s"])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run imshard-loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}");
    serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parses")
}

#[test]
fn pairs_and_groups_spread_over_two_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((_redis, redis_port)) = start_redis(dir.path()) else {
        return;
    };
    let d1 = dir.path().join("n1");
    let d2 = dir.path().join("n2");
    let (n1, a1) = start_node(redis_port, "n1", &d1);
    let (n2, a2) = start_node(redis_port, "n2", &d2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ![&a1, &a2].iter().all(|a| {
        metric(a, "imshard_cluster_nodes") == 2 && metric(a, "imshard_cluster_active") == 1
    }) {
        assert!(Instant::now() < deadline, "the cluster did not form");
        std::thread::sleep(Duration::from_millis(100));
    }
    let targets = format!("{a1},{a2}");
    let pids = format!("{},{}", n1.0.id(), n2.0.id());

    let v = loadgen(
        &targets,
        &pids,
        dir.path(),
        &["p2p", "--pairs", "6", "--rate", "200", "--duration", "2s"],
    );
    assert_eq!(v["passed"], true, "{v:#}");
    assert_eq!(v["targets"].as_array().map(Vec::len), Some(2), "{v:#}");
    assert_eq!(v["server"]["pids"].as_array().map(Vec::len), Some(2));
    assert!(n(&v, "check.delivered") > 0);
    assert_eq!(n(&v, "check.delivered"), n(&v, "check.expected"));
    // Every pair spans both nodes: its sends were forwarded to an owner node.
    assert_eq!(n(&v, "cluster.nodes_read"), 2, "{v:#}");
    assert!(n(&v, "cluster.requests_forwarded") > 0, "{v:#}");
    assert!(n(&v, "cluster.publishes") > 0, "{v:#}");

    // 10-member groups, 4 online: 2 on each node. Each group message is published
    // once and received once per node (one shard each).
    let v = loadgen(
        &targets,
        &pids,
        dir.path(),
        &[
            "group",
            "--groups",
            "2",
            "--members",
            "10",
            "--online",
            "4",
            "--rate",
            "100",
            "--duration",
            "2s",
        ],
    );
    assert_eq!(v["passed"], true, "{v:#}");
    assert_eq!(n(&v, "params.online"), 4);
    assert_eq!(n(&v, "check.expected"), 3 * n(&v, "sends.acked"));
    assert_eq!(n(&v, "check.delivered"), n(&v, "check.expected"));
    let per = v["cluster"]["channel_messages_per_publish"]
        .as_f64()
        .expect("per publish");
    assert!((per - 2.0).abs() < 0.05, "{v:#}");
}
