//! What a newcomer meets first, over the real binary: `--help`, start-up refusals
//! (address in use, data dir in use or not a directory, bad address), what a start
//! writes and prints, and `token`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Server, SECRET};
use imshard::config::KEYS;
use imshard::proto::pb::{self, client_frame::Body};

fn heartbeat(c: &mut common::Client) -> i32 {
    c.request(Body::Heartbeat(pb::Heartbeat { client_ts: 1 }))
        .code
}

fn imshard() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imshard"));
    // The settings come from the test's flags only.
    for k in KEYS {
        c.env_remove(k.env);
    }
    c.env_remove("IMSHARD_CONFIG").env_remove("NO_COLOR");
    c
}

/// Runs a command that must exit by itself (a start that is refused); fails the test
/// if it keeps running.
fn run_to_exit(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start imshard");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "imshard kept running; stdout: {} stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A refused `serve`: exit status, stdout and stderr.
fn refused(args: &[&str]) -> (i32, String, String) {
    let out = run_to_exit(imshard().arg("serve").args(args));
    let status = out.status.code().expect("exited");
    assert_ne!(status, 0, "the start must fail");
    (
        status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The error is said once, on stderr, and the log does not repeat it.
fn said_once(stdout: &str, stderr: &str, what: &str) {
    let all = format!("{stdout}{stderr}");
    assert_eq!(
        all.matches(what).count(),
        1,
        "{what:?} once; stdout: {stdout} stderr: {stderr}"
    );
    assert!(stderr.contains(what), "{stderr}");
}

/// A server started by the test with its stdout in a file.
struct Started {
    child: Child,
    log: std::path::PathBuf,
}

impl Started {
    fn spawn(args: &[&str], health: SocketAddr, log: &Path) -> Started {
        let file = std::fs::File::create(log).expect("log file");
        let child = imshard()
            .arg("serve")
            .args(args)
            .env("IMSHARD_LOG", "info")
            .stdout(file)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start imshard");
        let mut s = Started {
            child,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = common::http_raw(health, "GET", "/healthz", None, "", &[]) {
                return s;
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("imshard exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "imshard did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).expect("read log")
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_help_explains_every_flag_with_default_and_unit() {
    let out = run_to_exit(imshard().args(["serve", "--help"]));
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for k in KEYS {
        let flag = k.flag();
        let at = help
            .find(&format!("{flag} <"))
            .unwrap_or_else(|| panic!("{flag} in --help:\n{help}"));
        let entry = &help[at..];
        let entry = &entry[..entry.find("\n\n  ").unwrap_or(entry.len())];
        assert!(entry.contains(k.meaning), "{flag}: {entry}");
        assert!(
            entry.contains(&format!("[default: {}; {}]", k.default, k.unit)),
            "{flag}: {entry}"
        );
        assert!(entry.contains(k.env), "{flag}: {entry}");
    }
    let at = help.find("--config <FILE>").expect("--config");
    let config_help = &help[at..help[at..].find("[env: IMSHARD_CONFIG").expect("env") + at];
    for k in KEYS {
        assert!(config_help.contains(k.name), "--config lists {}", k.name);
    }
    let short = run_to_exit(imshard().args(["serve", "-h"]));
    let short = String::from_utf8_lossy(&short.stdout);
    assert!(short.contains("[default: 90s; duration]"), "{short}");
}

#[test]
fn second_server_on_the_same_port_is_refused_and_writes_nothing() {
    let first = Server::start(2, &[]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("second");
    let addr = first.addr.to_string();
    let (_, out, err) = refused(&[
        "--listen",
        &addr,
        "--shards",
        "2",
        "--data-dir",
        dir.to_str().expect("path"),
    ]);
    said_once(&out, &err, "address in use");
    assert!(err.contains(&addr), "{err}");
    assert!(!dir.exists(), "a refused start created its data dir");
    // On all interfaces too (the first holds 127.0.0.1 of that port).
    let port = first.addr.port().to_string();
    let (_, out, err) = refused(&["--listen", &port, "--data-dir", dir.to_str().expect("p")]);
    said_once(&out, &err, "address in use");
    assert!(!dir.exists());
    // The first still serves.
    let mut c = first.connect("alice", "d");
    assert_eq!(heartbeat(&mut c), 0);
}

#[test]
fn admin_address_in_use_is_refused() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let held = holder.local_addr().expect("addr").to_string();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    let listen = format!("127.0.0.1:{}", free_port());
    let (_, out, err) = refused(&[
        "--listen",
        &listen,
        "--admin-listen",
        &held,
        "--data-dir",
        dir.to_str().expect("path"),
        "--jwt-secret",
        SECRET,
    ]);
    said_once(&out, &err, "address in use");
    assert!(err.contains("admin_listen"), "{err}");
    assert!(!dir.exists());
}

#[test]
fn data_dir_held_by_another_server_is_refused_clearly() {
    let first = Server::start(2, &[]);
    let before = list(&first.dir);
    let listen = format!("127.0.0.1:{}", free_port());
    let (_, out, err) = refused(&[
        "--listen",
        &listen,
        "--shards",
        "2",
        "--data-dir",
        first.dir.to_str().expect("path"),
    ]);
    said_once(&out, &err, "in use by another imshard");
    assert!(!err.contains("Locked"), "{err}");
    assert_eq!(
        list(&first.dir),
        before,
        "the refused start wrote in the data dir"
    );
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn data_dir_that_is_a_file_is_refused_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("data");
    std::fs::write(&file, "not a dir").expect("write");
    let listen = format!("127.0.0.1:{}", free_port());
    let (_, out, err) = refused(&["--listen", &listen, "--data-dir", file.to_str().expect("p")]);
    said_once(&out, &err, "is not a directory");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "not a dir");
}

#[test]
fn listen_takes_a_port_or_a_host_name_and_explains_a_bad_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    let dir = dir.to_str().expect("path");
    let port = free_port();
    let s = Started::spawn(
        &[
            "--listen",
            &port.to_string(),
            "--shards",
            "2",
            "--data-dir",
            dir,
        ],
        SocketAddr::from(([127, 0, 0, 1], port)),
        &tmp.path().join("a.log"),
    );
    drop(s);
    let port = free_port();
    let s = Started::spawn(
        &[
            "--listen",
            &format!("localhost:{port}"),
            "--shards",
            "2",
            "--data-dir",
            dir,
        ],
        SocketAddr::from(([127, 0, 0, 1], port)),
        &tmp.path().join("b.log"),
    );
    drop(s);
    let fresh = tmp.path().join("fresh");
    for bad in ["http://localhost:8080", "8080x", "99999"] {
        let (status, out, err) =
            refused(&["--listen", bad, "--data-dir", fresh.to_str().expect("p")]);
        assert_eq!(status, 2, "{err}");
        said_once(&out, &err, "expected HOST:PORT or PORT");
        assert!(!fresh.exists());
    }
}

#[test]
fn a_default_start_has_no_warning_no_colour_and_a_hint_that_works() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let port = free_port();
    let s = Started::spawn(
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shards",
            "2",
            "--data-dir",
            dir.to_str().expect("p"),
        ],
        SocketAddr::from(([127, 0, 0, 1], port)),
        &tmp.path().join("serve.log"),
    );
    let log = s.log();
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log that is not a terminal:\n{log}"
    );
    assert!(!log.contains("WARN"), "a default start warns:\n{log}");
    assert!(
        log.contains("cargo run --release -- token --data-dir"),
        "{log}"
    );
    // The hint's command (the binary as started) mints a token the server takes.
    let hint = log
        .lines()
        .find(|l| l.contains("mint a token with: "))
        .expect("hint");
    let cmd = hint.split("mint a token with: ").nth(1).expect("command");
    let cmd = &cmd[..cmd.find(" (from the source tree").expect("end")];
    let words: Vec<&str> = cmd.split(' ').collect();
    assert_eq!(words[0], env!("CARGO_BIN_EXE_imshard"));
    let out = run_to_exit(imshard().args(&words[1..]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut c = common::Client::connect(addr, &token);
    assert_eq!(heartbeat(&mut c), 0);
}

#[test]
fn a_bad_setting_is_said_once_and_writes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    let (status, out, err) = refused(&[
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--data-dir",
        dir.to_str().expect("p"),
        "--heartbeat-timeout",
        "soon",
    ]);
    assert_eq!(status, 2);
    said_once(&out, &err, "bad heartbeat_timeout");
    assert!(!dir.exists());
}

#[test]
fn token_with_zero_ttl_is_refused() {
    let out = run_to_exit(imshard().args([
        "token",
        "--jwt-secret",
        SECRET,
        "--user",
        "a",
        "--device",
        "d",
        "--ttl",
        "0",
    ]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ttl must be at least 1s"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn open_files_warning_only_when_more_connections_are_asked_for() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let port = free_port();
    let s = Started::spawn(
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shards",
            "2",
            "--data-dir",
            dir.to_str().expect("p"),
            "--jwt-secret",
            SECRET,
            "--max-connections",
            "1000000000",
        ],
        SocketAddr::from(([127, 0, 0, 1], port)),
        &tmp.path().join("serve.log"),
    );
    let log = s.log();
    assert!(
        log.contains("WARN") && log.contains("the open-files limit cannot hold --max-connections"),
        "{log}"
    );
}
