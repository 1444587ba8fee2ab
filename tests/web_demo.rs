//! The chat page at `/demo` in a real browser: Debian's chromium, headless, driven by
//! chromedriver over WebDriver (a small client below, plain HTTP). Three browsers
//! (separate profiles): alice, bob, and bob's second tab (another device). They chat,
//! alice recalls, bob's read mark reaches his other tab, alice creates a group, and the
//! server restarts under them without a message lost or shown twice.
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium
//! chromium-driver`; `.ci/run` installs them). Without them the test fails when
//! `CI=true` and is skipped with a message otherwise. Screenshots go to
//! `target/tmp/web-demo/` (the path is printed).
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{free_port, users_on_shards, Server};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Upper bound for anything the page has to show (not a performance check).
const PATIENCE: Duration = Duration::from_secs(30);

fn find_chromedriver() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("chromedriver"))
        .find(|p| p.is_file())
}

/// One WebDriver call; the reply's `value`, or the WebDriver error as text.
fn wd(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let payload = read_reply(&mut s)?;
    let v: Value = serde_json::from_str(&payload).map_err(|e| format!("{e}: {payload}"))?;
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    match value.get("error") {
        Some(err) => Err(format!("{err}: {}", value["message"])),
        None => Ok(value),
    }
}

/// Reads one HTTP reply's body: chromedriver keeps the connection open despite
/// `Connection: close`, so the body ends by its Content-Length (or last chunk).
fn read_reply(s: &mut TcpStream) -> Result<String, String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let head = head.to_ascii_lowercase();
            let length = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            match length {
                Some(n) if body.len() >= n => return Ok(body[..n].to_string()),
                None if head.contains("transfer-encoding: chunked")
                    && body.ends_with("0\r\n\r\n") =>
                {
                    return Ok(dechunk(body))
                }
                _ => {}
            }
        }
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("WebDriver closed the connection: {text}"));
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// chromedriver, stopped on drop.
struct Driver {
    child: Child,
    addr: SocketAddr,
}

impl Driver {
    fn start(binary: &Path) -> Driver {
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        // Built first, so a failed start still stops the process.
        let driver = Driver { child, addr };
        let deadline = Instant::now() + PATIENCE;
        while !matches!(wd(addr, "GET", "/status", None), Ok(v) if v["ready"] == true) {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One headless chromium with a fresh profile.
struct Browser {
    addr: SocketAddr,
    session: String,
    name: &'static str,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(driver: &Driver, name: &'static str, url: &str) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1000,620",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let v = wd(driver.addr, "POST", "/session", Some(caps)).expect("new session");
        let session = v["sessionId"].as_str().expect("sessionId").to_string();
        let b = Browser {
            addr: driver.addr,
            session,
            name,
            _profile: profile,
        };
        b.call("POST", "url", json!({ "url": url }));
        b
    }

    fn call(&self, method: &str, cmd: &str, body: Value) -> Value {
        let path = format!("/session/{}/{cmd}", self.session);
        let body = (method == "POST").then_some(body);
        wd(self.addr, method, &path, body)
            .unwrap_or_else(|e| panic!("{}: {method} {cmd}: {e}", self.name))
    }

    /// Runs `script` (a function body; `arguments` as given) in the page.
    fn js(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "execute/sync",
            json!({"script": script, "args": args}),
        )
    }

    /// Waits until `script` returns something truthy; returns it.
    fn wait(&self, what: &str, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = self.js(script, args.clone());
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            if Instant::now() > deadline {
                let status = self.js(
                    "return document.getElementById('status').textContent",
                    json!([]),
                );
                panic!(
                    "{}: gave up waiting for {what} (status: {status})",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "element",
            json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("element {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let id = self.element(css);
        self.call("POST", &format!("element/{id}/click"), json!({}));
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.call(
            "POST",
            &format!("element/{id}/value"),
            json!({ "text": text }),
        );
    }

    fn connected(&self) {
        self.wait(
            "connected",
            "return document.getElementById('status').dataset.state === 'connected'",
            json!([]),
        );
    }

    /// Sends `text` in the open conversation (typed and clicked, as a person would).
    fn say(&self, text: &str) {
        self.type_into("#text", text);
        self.click("#send");
    }

    /// Waits for the message with `seq` in the open conversation to read `text`.
    fn sees(&self, seq: i64, text: &str) {
        self.wait(
            &format!("message #{seq} {text:?}"),
            "const m = document.querySelector(`#msg-list .msg[data-seq=\"${arguments[0]}\"] .body`);
             return m && m.textContent === arguments[1];",
            json!([seq, text]),
        );
    }

    /// The unread badge of `conv` in the list ("" when none), once the row exists.
    fn badge(&self, conv: &str) -> String {
        self.wait(
            &format!("{conv} in the list"),
            "const b = document.querySelector(`#conv-list li[data-conv=\"${arguments[0]}\"] .badge`);
             return b ? [b.textContent] : null;",
            json!([conv]),
        )[0]
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    fn wait_badge(&self, conv: &str, want: &str) {
        self.wait(
            &format!("badge {want:?} on {conv}"),
            "const b = document.querySelector(`#conv-list li[data-conv=\"${arguments[0]}\"] .badge`);
             return b && b.textContent === arguments[1];",
            json!([conv, want]),
        );
    }

    fn open_conv(&self, conv: &str) {
        self.click(&format!("#conv-list li[data-conv=\"{conv}\"]"));
        self.wait(
            &format!("{conv} open"),
            "const li = document.querySelector(`#conv-list li[data-conv=\"${arguments[0]}\"]`);
             return li && li.classList.contains('open');",
            json!([conv]),
        );
    }

    /// Texts of every message shown, in order.
    fn texts(&self) -> Vec<String> {
        let v = self.js(
            "return [...document.querySelectorAll('#msg-list .msg .body')].map(e => e.textContent)",
            json!([]),
        );
        serde_json::from_value(v).expect("texts")
    }

    fn screenshot(&self, dir: &Path) -> PathBuf {
        let b64 = self.call("GET", "screenshot", Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64"))
            .expect("png");
        let path = dir.join(format!("{}.png", self.name));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = wd(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

#[test]
fn the_page_is_served_only_with_demo_on() {
    let server = Server::start(1, &[]);
    let (status, body) = server.http("GET", "/demo", None, "").expect("GET /demo");
    assert_eq!(status, 200);
    assert!(body.contains("/demo/app.js"), "{body}");
    let (status, body) = server
        .http("GET", "/demo/app.js", None, "")
        .expect("GET app.js");
    assert_eq!(status, 200);
    assert!(body.contains("imshard.v1.json"));
    assert_eq!(
        server.http("GET", "/demo/nope", None, "").expect("GET").0,
        404
    );
    let off = Server::start(1, &["--demo=false"]);
    assert_eq!(off.http("GET", "/demo", None, "").expect("GET").0, 404);
    assert_eq!(
        off.http("GET", "/demo/app.js", None, "").expect("GET").0,
        404
    );
}

#[test]
fn token_prints_a_demo_link() {
    let token = |extra: &[&str], listen: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imshard"));
        cmd.args(["token", "--user", "alice", "--jwt-secret", common::SECRET])
            .args(extra)
            .env_remove("IMSHARD_LISTEN");
        if let Some(l) = listen {
            cmd.env("IMSHARD_LISTEN", l);
        }
        let out = cmd.output().expect("imshard token");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string()
    };
    let link = token(&["--demo-url"], None);
    let jwt = link
        .strip_prefix("http://127.0.0.1:8080/demo#token=")
        .unwrap_or_else(|| panic!("{link}"));
    let claims = imshard::auth::Verifier::new(common::SECRET.as_bytes())
        .verify(jwt)
        .expect("a valid token");
    assert_eq!((claims.sub.as_str(), claims.did.as_str()), ("alice", "web"));
    let link = token(&["--demo-url"], Some("0.0.0.0:9000"));
    assert!(
        link.starts_with("http://127.0.0.1:9000/demo#token="),
        "{link}"
    );
    let link = token(&["--demo-url=https://chat.example/"], None);
    assert!(
        link.starts_with("https://chat.example/demo#token="),
        "{link}"
    );
    assert!(!token(&[], None).contains("demo"));
}

#[test]
fn two_users_chat_in_a_real_browser() {
    let chromedriver = find_chromedriver();
    if chromedriver.is_none() || !Path::new(CHROMIUM).is_file() {
        let why = "web_demo needs chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run installs them)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    }
    let driver = Driver::start(&chromedriver.expect("checked above"));
    let mut server = Server::start(2, &[]);
    let (alice, bob) = users_on_shards(2, "web", false);
    let addr = server.addr;
    let link = |user: &str, device: &str| {
        let token =
            imshard::auth::mint(common::SECRET.as_bytes(), user, device, "web", false, 3600)
                .expect("mint");
        format!("http://{addr}/demo#token={token}")
    };
    let a = Browser::open(&driver, "alice", &link(&alice, "web"));
    let b = Browser::open(&driver, "bob", &link(&bob, "web"));
    let b2 = Browser::open(&driver, "bob-tab2", &link(&bob, "tab2"));
    for w in [&a, &b, &b2] {
        w.connected();
    }
    let p2p = if alice < bob {
        format!("p2p-{alice}-{bob}")
    } else {
        format!("p2p-{bob}-{alice}")
    };

    // alice starts a chat with bob; both of bob's tabs list it as unread.
    a.type_into("#new-peer", &bob);
    a.click("#new-chat-btn");
    a.say("hello bob");
    a.sees(1, "hello bob");
    b.wait_badge(&p2p, "1");
    b2.wait_badge(&p2p, "1");

    // bob reads it in one tab: the other tab's badge clears and shows the read mark.
    b.open_conv(&p2p);
    b.sees(1, "hello bob");
    b2.wait_badge(&p2p, "");
    b2.open_conv(&p2p);
    b2.wait(
        "the read mark",
        "return document.getElementById('read-mark').textContent === 'read up to #1'",
        json!([]),
    );

    // bob answers in real time; alice recalls her message and bob sees it recalled.
    b.say("hi alice");
    a.sees(2, "hi alice");
    b2.sees(2, "hi alice");
    a.click("#msg-list .msg[data-seq=\"1\"] .recall");
    b.sees(1, "message recalled");
    b2.sees(1, "message recalled");
    a.sees(1, "message recalled");
    assert_eq!(a.badge(&p2p), "");

    // A group: created by alice, the system message and her text reach bob.
    a.type_into("#group-name", "team");
    a.type_into("#group-members", &bob);
    a.click("#new-group-btn");
    let group = a.wait(
        "the group open",
        "const li = document.querySelector('#conv-list li.open');
         return li && li.dataset.conv.startsWith('grp-') && li.dataset.conv;",
        json!([]),
    );
    let group = group.as_str().expect("conv id").to_string();
    a.say("hello team");
    a.sees(2, "hello team");
    b.wait_badge(&group, "2");
    b.open_conv(&group);
    b.sees(2, "hello team");
    b.open_conv(&p2p);

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-demo");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let shots: Vec<_> = [&a, &b].iter().map(|w| w.screenshot(&dir)).collect();
    // Straight to stderr: libtest captures only the print macros, and the paths should
    // show in a passing run too.
    let _ = writeln!(
        std::io::stderr(),
        "web_demo: screenshots written to {}",
        shots
            .iter()
            .map(|s| s.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The server restarts; bob's phone sends before the pages are back: every page
    // pulls it by seq after reconnecting, once.
    server.restart();
    let mut phone = server.connect(&bob, "phone");
    let sent = phone
        .send_p2p(&alice, "after-restart", r#"{"text":"after restart"}"#)
        .expect("send after restart");
    assert_eq!(sent.seq, 3);
    for w in [&a, &b, &b2] {
        w.connected();
    }
    a.open_conv(&p2p);
    for w in [&a, &b, &b2] {
        w.sees(3, "after restart");
        assert_eq!(
            w.texts(),
            ["message recalled", "hi alice", "after restart"],
            "{}",
            w.name
        );
    }
    // alice has read it (the conversation is open): no badge on her side.
    a.wait_badge(&p2p, "");

    // Scroll-back: after 30 more messages a reloaded page shows the newest 30 and
    // pulls the older ones BACKWARD on "load older".
    for i in 4..=33 {
        let content = format!(r#"{{"text":"m{i}"}}"#);
        let r = phone.send_p2p(&alice, &format!("bulk{i}"), &content);
        assert_eq!(r.expect("bulk send").seq, i);
    }
    a.sees(33, "m33");
    a.call("POST", "refresh", json!({}));
    a.connected();
    a.open_conv(&p2p);
    a.sees(33, "m33");
    assert_eq!(a.texts().len(), 30);
    a.click("#older");
    a.sees(1, "message recalled");
    let texts = a.texts();
    assert_eq!(texts.len(), 33);
    assert_eq!(
        texts[..4],
        ["message recalled", "hi alice", "after restart", "m4"]
    );
}
