//! A real `redis-server` for tests: its own free loopback port and temp dir, no
//! persistence unless asked, stopped by PID when dropped. Never a system service.
//!
//! When `redis-server` is not installed, [`RedisServer::start`] panics under CI
//! (`CI=true`; `.ci/run` installs it) and returns `None` elsewhere, after saying so.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// A server with no persistence (`--save '' --appendonly no`).
    pub fn start() -> Option<RedisServer> {
        RedisServer::start_with(&["--appendonly", "no"])
    }

    /// A server with `extra` arguments (e.g. `--appendonly yes --appendfsync always`,
    /// `--requirepass pw`).
    pub fn start_with(extra: &[&str]) -> Option<RedisServer> {
        if !installed() {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("redis-server is not installed (CI=true): .ci/run installs it");
            }
            // Straight to stderr: libtest would swallow eprintln! of a passing test.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: redis-server is not installed (apt-get install -y redis-server)"
            );
            return None;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let port = listener.local_addr().expect("local addr").port();
        drop(listener);
        let mut server = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A client config for this server with short timeouts and backoff, so that
    /// tests of outages and reconnects run in well under a second.
    #[allow(dead_code)] // only the tests that drive the Redis client themselves use it
    pub fn quick_config(&self) -> imshard::store::redis::RedisConfig {
        let mut c = imshard::store::redis::RedisConfig::new(self.url());
        c.timeout = std::time::Duration::from_millis(500);
        c.connect_timeout = std::time::Duration::from_millis(500);
        c.backoff_min = std::time::Duration::from_millis(20);
        c.backoff_max = std::time::Duration::from_millis(200);
        c
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the server answers PING (or `-NOAUTH`, when it wants a password).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; 64];
                if s.write_all(b"PING\r\n").is_ok() {
                    if let Ok(n) = s.read(&mut buf) {
                        if buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH") {
                            return;
                        }
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not come up",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `PUBLISH channel payload` on a connection of its own (RESP written by hand, so
    /// the tests publish as any other client would); the number of receivers.
    pub fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut cmd = Vec::new();
        cmd.extend_from_slice(b"*3\r\n$7\r\nPUBLISH\r\n");
        cmd.extend_from_slice(format!("${}\r\n{channel}\r\n", channel.len()).as_bytes());
        cmd.extend_from_slice(format!("${}\r\n", payload.len()).as_bytes());
        cmd.extend_from_slice(payload);
        cmd.extend_from_slice(b"\r\n");
        s.write_all(&cmd).expect("write PUBLISH");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).expect("read PUBLISH reply");
        let text = String::from_utf8_lossy(&buf[..n]);
        text.trim_start_matches(':')
            .trim()
            .parse()
            .expect("an integer reply")
    }

    /// `kill -9` and wait for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same dir and arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the server: connections stay open but
    /// nothing is answered.
    pub fn pause(&self, paused: bool) {
        if let Some(pid) = self.pid() {
            let sig = if paused { "-STOP" } else { "-CONT" };
            let ok = Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} {pid}");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.pause(false);
        self.kill();
    }
}

fn installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
