//! Fuzz targets for every decoder a client reaches (STYLE.md habit 9), on stable Rust.
//!
//! Each target takes `&[u8]` (as a libFuzzer target would) and checks properties, not
//! just "no panic": the documented error for bad input, round trips, and agreement
//! with a small reference model where one is cheap. A deterministic runner feeds each
//! target the valid seeds, then random inputs and mutations of the seeds from a fixed
//! RNG seed, for a bounded number of cases. A failing case is printed in hex and written
//! to `target/tmp/fuzz-failures/`; fix the parser and add the case to `regressions`.
//!
//! Budget (README "Fuzzing"): by default all targets together take about a minute in
//! debug on 2 cores. `IMSHARD_FUZZ_CASES=n` runs n cases per target,
//! `IMSHARD_FUZZ_SECONDS=s` runs each target for s seconds instead, and
//! `IMSHARD_FUZZ_SEED=x` explores other inputs than the fixed default.
//!
//! `fuzz_execute` runs decoded (or built) ClientFrames through `chat::execute` on a real
//! one-shard runtime with its store, no sockets. The last test is black-box: random and
//! mutated frames and requests sent to the real binary, which must still answer
//! `/healthz` and serve another client afterwards.

mod common;

use std::io::Write as _;
use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use imshard::api;
use imshard::auth::{self, AuthError, Verifier, CLOCK_SKEW_LEEWAY_SECS};
use imshard::chat::filter::Filter;
use imshard::config::FilterMode;
use imshard::ids;
use imshard::limits::{MAX_CONTROL_PAYLOAD, MAX_HTTP_HEAD};
use imshard::proto::envelope::{decode_client_frame, FrameError};
use imshard::proto::http::{self, HttpError};
use imshard::proto::pb::{self, client_frame::Body, ClientFrame};
use imshard::proto::ws::{self, Assembler, Message, WsError};
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::OpCode;

// ---------------------------------------------------------------- runner

/// The fixed default seed: every run without `IMSHARD_FUZZ_SEED` sees the same inputs.
const DEFAULT_SEED: u64 = 0x1a5d_0009_f022_2026;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    v.strip_prefix("0x")
        .map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
}

/// How long one target runs: a case count, or a time budget (`IMSHARD_FUZZ_SECONDS`).
struct Budget {
    cases: u64,
    until: Option<Instant>,
}

impl Budget {
    fn for_target(default_cases: u64) -> Budget {
        match env_u64("IMSHARD_FUZZ_SECONDS") {
            Some(s) => Budget {
                cases: env_u64("IMSHARD_FUZZ_CASES").unwrap_or(u64::MAX),
                until: Some(Instant::now() + Duration::from_secs(s)),
            },
            None => Budget {
                cases: env_u64("IMSHARD_FUZZ_CASES").unwrap_or(default_cases),
                until: None,
            },
        }
    }

    fn more(&self, done: u64) -> bool {
        done < self.cases && self.until.is_none_or(|t| Instant::now() < t)
    }
}

fn rng_for(name: &str) -> (u64, StdRng) {
    let seed = env_u64("IMSHARD_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    // FNV-1a of the name, so targets do not share a stream.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    (seed, StdRng::seed_from_u64(seed ^ h))
}

/// Bytes that make parsers take unusual branches (length escapes, sign bits, ...).
const INTERESTING: [u8; 14] = [
    0, 1, 0x7e, 0x7f, 0x80, 0x81, 0xff, b'%', b'\r', b'\n', b'-', b'"', b'&', b'/',
];

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let len = match rng.random_range(0..4) {
        0 => rng.random_range(0..16),
        1 | 2 => rng.random_range(0..256),
        _ => rng.random_range(0..max.max(1)),
    };
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// One to eight random edits of `input`, sometimes spliced with `other`.
fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..=8) {
        let len = v.len();
        match rng.random_range(0..10) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = rng.random();
            }
            2 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
            }
            3 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(32));
                v.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                let chunk = v[i..i + n].to_vec();
                let at = rng.random_range(0..=len);
                v.splice(at..at, chunk);
            }
            6 if len > 0 => v.truncate(rng.random_range(0..len)),
            7 if !other.is_empty() => {
                let cut = rng.random_range(0..=len);
                let from = rng.random_range(0..other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            8 if len >= 2 => {
                let i = rng.random_range(0..len - 1);
                let x: u16 = [0, 125, 126, 127, 0x7fff, 0xffff][rng.random_range(0..6)];
                v[i..i + 2].copy_from_slice(&x.to_be_bytes());
            }
            _ => {
                let i = rng.random_range(0..=len);
                v.insert(i, INTERESTING[rng.random_range(0..INTERESTING.len())]);
            }
        }
    }
    v
}

/// The inputs of one target: every seed, then random and mutated inputs until the
/// budget is spent.
struct Cases<'a> {
    name: &'static str,
    seed: u64,
    rng: StdRng,
    seeds: &'a [Vec<u8>],
    budget: Budget,
    done: u64,
}

impl<'a> Cases<'a> {
    fn new(name: &'static str, default_cases: u64, seeds: &'a [Vec<u8>]) -> Cases<'a> {
        let (seed, rng) = rng_for(name);
        Cases {
            name,
            seed,
            rng,
            seeds,
            budget: Budget::for_target(default_cases),
            done: 0,
        }
    }

    /// The next input, with a guard that reports it if the target panics on it.
    fn next_case(&mut self) -> Option<Case> {
        if !self.budget.more(self.done) {
            eprintln!("fuzz target {}: {} cases", self.name, self.done);
            return None;
        }
        let (seeds, rng) = (self.seeds, &mut self.rng);
        let input = if (self.done as usize) < seeds.len() {
            seeds[self.done as usize].clone()
        } else if seeds.is_empty() || rng.random_ratio(1, 4) {
            random_bytes(rng, 4096)
        } else {
            let a = &seeds[rng.random_range(0..seeds.len())];
            let b = &seeds[rng.random_range(0..seeds.len())];
            mutate(rng, a, b)
        };
        self.done += 1;
        Some(Case {
            name: self.name,
            seed: self.seed,
            index: self.done - 1,
            input,
        })
    }
}

/// One input; dropped during a panic, it prints the input in hex and saves it.
struct Case {
    name: &'static str,
    seed: u64,
    index: u64,
    input: Vec<u8>,
}

impl Drop for Case {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let (name, seed, index) = (self.name, self.seed, self.index);
        let hex: String = self.input.iter().map(|b| format!("{b:02x}")).collect();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{name}-{seed:x}-{index}.bin"));
        let _ = std::fs::write(&path, &self.input);
        eprintln!(
            "fuzz target {name}: case {index} (IMSHARD_FUZZ_SEED={seed:#x}) failed; \
             input ({} bytes, saved to {}): {hex}",
            self.input.len(),
            path.display()
        );
    }
}

/// Runs `target` on every case of [`Cases`].
fn run(name: &'static str, default_cases: u64, seeds: &[Vec<u8>], target: impl Fn(&[u8])) {
    let mut cases = Cases::new(name, default_cases, seeds);
    while let Some(case) = cases.next_case() {
        target(&case.input);
    }
}

// ---------------------------------------------------------------- WebSocket frames

/// Everything `conn::process` does with a client byte stream, minus the socket.
#[derive(Debug, PartialEq, Eq)]
enum StreamEnd {
    /// All complete frames handled; `left` bytes wait for more.
    NeedMore { left: usize },
    /// The connection is closed with this code.
    Closed(u16),
}

fn process_stream(stream: &[u8], max: usize) -> (Vec<Message>, StreamEnd) {
    let mut asm = Assembler::default();
    let mut out = Vec::new();
    let mut used = 0;
    loop {
        match ws::parse_client_frame(&stream[used..], max) {
            Ok(None) => {
                return (
                    out,
                    StreamEnd::NeedMore {
                        left: stream.len() - used,
                    },
                )
            }
            Ok(Some((frame, n))) => {
                assert!(n > 0 && n <= stream.len() - used, "frame length {n}");
                assert!(frame.payload.len() <= max, "payload over the limit");
                if matches!(frame.opcode, OpCode::Control(_)) {
                    assert!(frame.fin && frame.payload.len() <= MAX_CONTROL_PAYLOAD);
                }
                used += n;
                match asm.push(frame, max) {
                    Ok(None) => {}
                    Ok(Some(m)) => {
                        if let Message::Binary(b) | Message::Text(b) = &m {
                            assert!(b.len() <= max, "message over the limit");
                        }
                        out.push(m);
                    }
                    Err(e) => return (out, StreamEnd::Closed(check_ws_error(&e))),
                }
            }
            Err(e) => return (out, StreamEnd::Closed(check_ws_error(&e))),
        }
    }
}

fn check_ws_error(e: &WsError) -> u16 {
    let code = e.close_code();
    assert!(code == 1002 || code == 1009, "{e:?} closes with {code}");
    code
}

/// The same stream fed in chunks, as reads deliver it (kept and drained like
/// `conn::process`): must give the same messages and the same end.
fn process_in_chunks(stream: &[u8], max: usize, chunks: &[u8]) -> (Vec<Message>, StreamEnd) {
    let mut asm = Assembler::default();
    let mut out = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut at = 0;
    let mut sizes = chunks.iter().cycle();
    while at < stream.len() {
        let n = (*sizes.next().unwrap_or(&0) as usize % 29 + 1).min(stream.len() - at);
        buf.extend_from_slice(&stream[at..at + n]);
        at += n;
        let mut used = 0;
        loop {
            match ws::parse_client_frame(&buf[used..], max) {
                Ok(None) => break,
                Ok(Some((frame, n))) => {
                    used += n;
                    match asm.push(frame, max) {
                        Ok(None) => {}
                        Ok(Some(m)) => out.push(m),
                        Err(e) => return (out, StreamEnd::Closed(e.close_code())),
                    }
                }
                Err(e) => return (out, StreamEnd::Closed(e.close_code())),
            }
        }
        buf.drain(..used);
    }
    (out, StreamEnd::NeedMore { left: buf.len() })
}

/// Raw bytes as a client stream, whole and in chunks.
fn ws_stream_target(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let max = *u
        .choose(&[0usize, 1, 8, 125, 126, 1000, 65_536, 1 << 20])
        .unwrap_or(&125);
    let chunks = u.bytes(4).unwrap_or(&[7][..]).to_vec();
    let stream = u.take_rest();
    let whole = process_stream(stream, max);
    let chunked = process_in_chunks(stream, max, &chunks);
    assert_eq!(whole, chunked, "chunked reads must not change the result");
}

/// One frame as a client might send it, right or wrong.
#[derive(Debug)]
struct FrameSpec {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: Vec<u8>,
}

impl FrameSpec {
    fn arbitrary(u: &mut Unstructured) -> arbitrary::Result<FrameSpec> {
        let rare = |u: &mut Unstructured| u.ratio(1u8, 16);
        Ok(FrameSpec {
            fin: u.ratio(3u8, 4)?,
            rsv: if rare(u)? { u.int_in_range(1..=7)? } else { 0 },
            opcode: if rare(u)? {
                u.int_in_range(0..=15)?
            } else {
                *u.choose(&[0u8, 1, 2, 2, 2, 8, 9, 10])?
            },
            mask: if rare(u)? { None } else { Some(u.arbitrary()?) },
            payload: {
                let len = if rare(u)? {
                    u.int_in_range(0..=300)?
                } else {
                    u.int_in_range(0..=40)?
                };
                let mut p = vec![0u8; len];
                u.fill_buffer(&mut p)?;
                p
            },
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = vec![(u8::from(self.fin) << 7) | (self.rsv << 4) | self.opcode];
        let masked = if self.mask.is_some() { 0x80 } else { 0 };
        let len = self.payload.len();
        if len < 126 {
            v.push(masked | len as u8);
        } else if len < 65_536 {
            v.push(masked | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(masked | 127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mut p = self.payload.clone();
        if let Some(m) = self.mask {
            v.extend_from_slice(&m);
            ws::unmask(&mut p, m);
        }
        v.extend_from_slice(&p);
        v
    }

    /// RFC 6455 as the server applies it, in the parser's order of checks.
    fn expected_error(&self, max: usize) -> Option<WsError> {
        let control = self.opcode >= 8;
        if self.rsv != 0 || self.mask.is_none() || matches!(self.opcode, 3..=7 | 11..=15) {
            return Some(WsError::Protocol(""));
        }
        if control && (!self.fin || self.payload.len() > MAX_CONTROL_PAYLOAD) {
            return Some(WsError::Protocol(""));
        }
        (self.payload.len() > max).then_some(WsError::TooBig)
    }
}

/// A reference model of message reassembly (RFC 6455 section 5.4).
fn model_messages(specs: &[FrameSpec], max: usize) -> (Vec<Message>, Option<u16>) {
    let mut out = Vec::new();
    let mut partial: Option<(bool, Vec<u8>)> = None;
    for s in specs {
        if let Some(e) = s.expected_error(max) {
            return (out, Some(e.close_code()));
        }
        let p = s.payload.clone();
        match s.opcode {
            8 if p.len() == 1 => return (out, Some(1002)),
            8 => out.push(Message::Close(
                (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])),
            )),
            9 => out.push(Message::Ping(p)),
            10 => out.push(Message::Pong),
            0 => {
                let Some((text, mut buf)) = partial.take() else {
                    return (out, Some(1002));
                };
                if buf.len() + p.len() > max {
                    return (out, Some(1009));
                }
                buf.extend_from_slice(&p);
                if s.fin {
                    out.push(if text {
                        Message::Text(buf)
                    } else {
                        Message::Binary(buf)
                    });
                } else {
                    partial = Some((text, buf));
                }
            }
            op => {
                if partial.is_some() {
                    return (out, Some(1002));
                }
                let text = op == 1;
                if s.fin {
                    out.push(if text {
                        Message::Text(p)
                    } else {
                        Message::Binary(p)
                    });
                } else {
                    partial = Some((text, p));
                }
            }
        }
    }
    (out, None)
}

/// Structured frames (mostly valid, some breaking one rule): the parser and assembler
/// must agree with the model, frame by frame.
fn ws_frames_target(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let max = *u.choose(&[0usize, 10, 125, 200, 1 << 20]).unwrap_or(&200);
    let mut specs = Vec::new();
    while specs.len() < 12 {
        match FrameSpec::arbitrary(&mut u) {
            Ok(s) => specs.push(s),
            Err(_) => break,
        }
        if u.is_empty() {
            break;
        }
    }
    for s in &specs {
        let bytes = s.encode();
        match (ws::parse_client_frame(&bytes, max), s.expected_error(max)) {
            (Ok(Some((f, n))), None) => {
                assert_eq!(
                    (n, f.fin, &f.payload),
                    (bytes.len(), s.fin, &s.payload),
                    "{s:?}"
                );
            }
            (Err(e), Some(want)) => assert_eq!(e.close_code(), want.close_code(), "{s:?}"),
            (got, want) => panic!("{s:?}: parsed {got:?}, expected error {want:?}"),
        }
    }
    let stream: Vec<u8> = specs.iter().flat_map(FrameSpec::encode).collect();
    let (got, end) = process_stream(&stream, max);
    let (want, closed) = model_messages(&specs, max);
    assert_eq!(got, want, "messages of {specs:?}");
    match (end, closed) {
        (StreamEnd::Closed(code), Some(want)) => assert_eq!(code, want, "{specs:?}"),
        (StreamEnd::NeedMore { left: 0 }, None) => {}
        (end, want) => panic!("{specs:?}: ended {end:?}, model closes with {want:?}"),
    }
}

fn ws_seeds() -> Vec<Vec<u8>> {
    let frame = |fin: bool, op: u8, payload: &[u8]| {
        FrameSpec {
            fin,
            rsv: 0,
            opcode: op,
            mask: Some([1, 2, 3, 4]),
            payload: payload.to_vec(),
        }
        .encode()
    };
    let hb = ClientFrame {
        req_id: 1,
        body: Some(Body::Heartbeat(pb::Heartbeat { client_ts: 5 })),
    }
    .encode_to_vec();
    let mut seeds = vec![
        [vec![5, 0, 0, 0, 0], frame(true, 2, &hb)].concat(),
        [
            vec![2, 3, 1, 1],
            frame(false, 2, b"ab"),
            frame(true, 9, b"p"),
            frame(true, 0, b"c"),
        ]
        .concat(),
        [vec![6, 1, 1, 1, 1], frame(true, 8, &1000u16.to_be_bytes())].concat(),
        [vec![3, 9, 9, 9, 9], frame(true, 2, &[7u8; 200])].concat(),
        [vec![7, 2, 2, 2, 2], frame(true, 2, &[7u8; 70_000])].concat(),
    ];
    // Structured seeds are read by ws_frames_target through Unstructured; any bytes do.
    seeds.push(vec![0x55; 64]);
    seeds
}

// ---------------------------------------------------------------- HTTP

/// `%XY` decodes only when X and Y are hex digits; `+` is a space.
fn model_percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            out.push(hex(b[i + 1]) * 16 + hex(b[i + 2]));
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn http_target(data: &[u8]) {
    let max_body = 2 << 20;
    match http::parse_head(data, max_body) {
        Ok(Some((head, n))) => {
            assert!(n <= data.len() && n <= MAX_HTTP_HEAD);
            assert!(head.content_length <= max_body);
            assert!(head.header("transfer-encoding").is_none());
            for (name, _) in &head.headers {
                assert_eq!(name, &name.to_ascii_lowercase());
            }
            let _ = head.token();
            let _ = head.header_has_token("connection", "upgrade");
            let pairs: Vec<(&str, &str)> = head
                .query
                .split('&')
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .collect();
            for (k, _) in &pairs {
                // The first pair with this key wins.
                let want = pairs
                    .iter()
                    .find(|(k2, _)| k2 == k)
                    .map(|(_, v)| model_percent_decode(v));
                assert_eq!(
                    http::query_param(&head.query, k),
                    want,
                    "query {:?}",
                    head.query
                );
            }
            let body = &data[n..(n + head.content_length).min(data.len())];
            if let Some(route) = head.path.strip_prefix("/api/v1/auth/") {
                check_api_request(&head.method, route, &head.query, body);
            }
        }
        Ok(None) => assert!(data.len() < MAX_HTTP_HEAD),
        Err(e) => {
            assert!([400, 411, 413, 431].contains(&e.status()), "{e:?}");
            assert_eq!(
                e.api_error().http_status(),
                if e == HttpError::BodyTooLarge {
                    413
                } else {
                    400
                }
            );
        }
    }
}

fn http_seeds() -> Vec<Vec<u8>> {
    [
        "GET /ws?token=a%2Eb&x=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        "POST /api/v1/auth/msg/send HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer x.y.z\r\nContent-Length: 62\r\n\r\n{\"conv_type\":1,\"target\":\"bob\",\"client_msg_id\":\"c\",\"content\":\"x\"}",
        "GET /api/v1/auth/msg/pull?conv_id=p2p-a-b&anchor_seq=3&direction=2&limit=%35 HTTP/1.1\r\n\r\n",
        "GET /api/v1/auth/conversations?updated_since=1&page_size=+1&cursor=%+1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "DELETE /api/v1/auth/conversations/p2p-a-b HTTP/1.1\r\nConnection: close\r\n\r\n",
        "PATCH /api/v1/auth/conversations/grp-g1 HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"mute\":true}",
        "POST /api/v1/auth/groups/g1/members HTTP/1.1\r\nContent-Length: 30\r\n\r\n{\"add\":[\"a\",\"b\"],\"remove\":[]}",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

// ---------------------------------------------------------------- JSON API

const ROUTES: [(&str, &str); 14] = [
    ("POST", "msg/send"),
    ("GET", "msg/pull"),
    ("POST", "msg/by_ids"),
    ("POST", "msg/recall"),
    ("GET", "conversations"),
    ("POST", "conversations/mark_read"),
    ("DELETE", "conversations/p2p-a-b"),
    ("PATCH", "conversations/grp-g%31"),
    ("GET", "unread"),
    ("POST", "groups"),
    ("POST", "groups/g1/members"),
    ("POST", "groups//members"),
    ("PUT", "msg/send"),
    ("GET", "conversations/a/b"),
];

const FIELDS: [&str; 24] = [
    "conv_type",
    "target",
    "client_msg_id",
    "msg_type",
    "content",
    "reply_to_msg_id",
    "at_users",
    "conv_id",
    "msg_ids",
    "msg_id",
    "read_seq",
    "mute",
    "pin",
    "group_id",
    "name",
    "members",
    "add",
    "remove",
    "add_admins",
    "user_uuid",
    "device_id",
    "reason",
    "user_uuids",
    "message",
];

fn arb_json(u: &mut Unstructured, depth: u32) -> arbitrary::Result<Value> {
    Ok(match u.int_in_range(0..=if depth == 0 { 5 } else { 7 })? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => json!(u.arbitrary::<i64>()?),
        3 => json!(*u.choose(&[0i64, 1, 2, -1, 99, 100, i32::MAX as i64 + 1])?),
        4 => json!(u
            .arbitrary::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .unwrap_or(0.5)),
        5 => json!(*u.choose(&[
            "",
            "bob",
            "g1",
            "p2p-a-b",
            "grp-g1",
            "ALL",
            "01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "a-b",
            "坏词",
            "aGVsbG8=",
            "%%%",
            "x\u{0}y",
        ])?),
        6 => Value::Array(
            (0..u.int_in_range(0..=4)?)
                .map(|_| arb_json(u, depth - 1))
                .collect::<arbitrary::Result<_>>()?,
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..u.int_in_range(0..=6)? {
                let key = if u.ratio(1u8, 10)? {
                    u.arbitrary::<String>()?
                } else {
                    u.choose(&FIELDS)?.to_string()
                };
                m.insert(key, arb_json(u, depth - 1)?);
            }
            Value::Object(m)
        }
    })
}

/// A route's request must map to an operation, or to 40001 / 40401, never a panic.
fn check_api_request(method: &str, route: &str, query: &str, body: &[u8]) {
    match api::auth_request(method, route, query, body) {
        Ok((op, to_json)) => {
            // The answer decoder takes any bytes without panicking too.
            let _ = to_json(body);
            check_operation(&op);
            // A path parameter is the whole segment, percent-decoded.
            if let Some(segment) = route.strip_prefix("conversations/") {
                if let Body::DeleteConversation(pb::DeleteConversationRequest { conv_id })
                | Body::UpdateSettings(pb::UpdateConvSettingsRequest { conv_id, .. }) = &op
                {
                    assert_eq!(conv_id, &model_percent_decode(segment), "{route:?}");
                }
            }
        }
        Err(e) => assert!([40001, 40401].contains(&e.code()), "{route}: {e:?}"),
    }
}

fn api_target(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let (method, route) = *u.choose(&ROUTES).unwrap_or(&ROUTES[0]);
    let mut route = route.to_string();
    if u.ratio(1u8, 4).unwrap_or(false) {
        route.push_str(&u.arbitrary::<String>().unwrap_or_default());
    }
    let query: String = u.arbitrary().unwrap_or_default();
    let body = if u.ratio(2u8, 3).unwrap_or(true) {
        arb_json(&mut u, 3)
            .unwrap_or(Value::Null)
            .to_string()
            .into_bytes()
    } else {
        u.take_rest().to_vec()
    };
    check_api_request(method, &route, &query, &body);
    match api::kick_body(&body) {
        Ok(ev) => {
            assert!(ids::is_valid_id(&ev.user_uuid));
            assert!(ev.device_id == "ALL" || ids::is_valid_id(&ev.device_id));
            assert!(!ev.reason.is_empty() && ev.reason.len() <= 64);
            assert!(!ev.reason.chars().any(char::is_control));
        }
        Err(e) => assert_eq!(e.code(), 40001, "{e:?}"),
    }
    match api::broadcast_body(&body) {
        Ok((users, env)) => {
            assert!(users.iter().all(|u| ids::is_valid_id(u)));
            assert!(!env.r#type.is_empty());
        }
        Err(e) => assert_eq!(e.code(), 40001, "{e:?}"),
    }
}

fn api_seeds() -> Vec<Vec<u8>> {
    let bodies = [
        json!({"conv_type": 1, "target": "bob", "client_msg_id": "c1", "content": "{\"t\":1}"}),
        json!({"conv_id": "p2p-a-b", "msg_ids": ["01ARZ3NDEKTSV4RRFFQ69G5FAV"]}),
        json!({"conv_id": "grp-g1", "read_seq": 3}),
        json!({"mute": true, "pin": false}),
        json!({"group_id": "g1", "name": "n", "members": ["a", "b"]}),
        json!({"add": ["c"], "remove": ["a"], "add_admins": ["c"]}),
        json!({"user_uuid": "u", "device_id": "ALL", "reason": "banned"}),
        json!({"user_uuids": ["a"], "message": {"type": "X", "data": "aGVsbG8="}}),
    ];
    bodies.iter().map(|b| b.to_string().into_bytes()).collect()
}

// ---------------------------------------------------------------- ClientFrame

/// The checks of `chat::execute` that need no server: ids, conversation ids, and the
/// content filter. Each gives an answer or the documented error.
fn check_operation(op: &Body) {
    let conv_check = |conv_id: &str| match imshard::chat::check_party(conv_id, "fuzz_user") {
        Ok(()) => assert!(ids::ConvRef::parse(conv_id).is_ok()),
        Err(e) => assert!([40001, 40301].contains(&e.code()), "{e:?}"),
    };
    match op {
        Body::Send(req) => {
            let _ = ids::check_id("target", &req.target);
            check_filter(&req.content);
        }
        Body::Pull(req) => conv_check(&req.conv_id),
        Body::GetByIds(req) => conv_check(&req.conv_id),
        Body::Recall(req) => conv_check(&req.conv_id),
        Body::MarkRead(req) => conv_check(&req.conv_id),
        Body::DeleteConversation(req) => conv_check(&req.conv_id),
        Body::UpdateSettings(req) => conv_check(&req.conv_id),
        Body::CreateGroup(req) => {
            let _ = ids::check_id("group_id", &req.group_id);
        }
        Body::UpdateMembers(req) => {
            let _ = ids::check_id("group_id", &req.group_id);
        }
        Body::Heartbeat(_) | Body::PushAck(_) | Body::GetConversations(_) | Body::GetUnread(_) => {}
    }
}

const BLOCKED: [&str; 4] = ["bad", "坏词", "ab", "abc"];

/// Masking keeps the char count and leaves no blocked word; reject refuses exactly
/// the contents that mask would change.
fn check_filter(content: &str) {
    thread_local! {
        static FILTERS: (Filter, Filter) = {
            let words: Vec<String> = BLOCKED.iter().map(|w| w.to_string()).collect();
            (
                Filter::new(&words, FilterMode::Mask).expect("filter"),
                Filter::new(&words, FilterMode::Reject).expect("filter"),
            )
        };
    }
    FILTERS.with(|(mask, reject)| {
        let masked = mask.apply(content.to_string()).expect("mask never refuses");
        assert_eq!(masked.chars().count(), content.chars().count());
        let lower = masked.to_ascii_lowercase();
        assert!(!BLOCKED.iter().any(|w| lower.contains(w)), "{masked:?}");
        let rejected = reject.apply(content.to_string());
        assert_eq!(rejected.is_err(), masked != content, "{content:?}");
    });
}

fn client_frame_target(data: &[u8]) {
    match decode_client_frame(data) {
        Ok(f) => {
            let again = ClientFrame::decode(&*f.encode_to_vec()).expect("re-encoded frame decodes");
            assert_eq!(again, f);
            if let Some(body) = &f.body {
                check_operation(body);
            }
        }
        Err(FrameError::Invalid { req_id }) => assert_ne!(req_id, 0),
        Err(FrameError::Undecodable) => {}
    }
    // Content straight from the input, as a send would carry it.
    check_filter(&String::from_utf8_lossy(data));
}

fn client_frame_seeds() -> Vec<Vec<u8>> {
    let bodies = vec![
        Body::Heartbeat(pb::Heartbeat { client_ts: 1 }),
        Body::Send(pb::SendMessageRequest {
            conv_type: 1,
            target: "bob".into(),
            client_msg_id: "c1".into(),
            content: "bad 坏词 abcab".into(),
            at_users: vec!["x".into()],
            ..Default::default()
        }),
        Body::Pull(pb::PullMessagesRequest {
            conv_id: "p2p-a-fuzz_user".into(),
            anchor_seq: 5,
            limit: 300,
            direction: 2,
        }),
        Body::GetByIds(pb::GetMessagesByIdsRequest {
            conv_id: "grp-g1".into(),
            msg_ids: vec!["01ARZ3NDEKTSV4RRFFQ69G5FAV".into()],
        }),
        Body::UpdateSettings(pb::UpdateConvSettingsRequest {
            conv_id: "p2p-a-b".into(),
            mute: Some(true),
            pin: None,
        }),
        Body::CreateGroup(pb::CreateGroupRequest {
            group_id: "g1".into(),
            name: "n".into(),
            members: vec!["a".into(), "b".into()],
        }),
        Body::UpdateMembers(pb::UpdateGroupMembersRequest {
            group_id: "g1".into(),
            add: vec!["c".into()],
            ..Default::default()
        }),
        Body::GetUnread(pb::GetUnreadRequest { per_conv_limit: 7 }),
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            ClientFrame {
                req_id: i as u64 + 1,
                body: Some(b),
            }
            .encode_to_vec()
        })
        .collect()
}

/// Seeds for the in-process `execute` target: a conversation and a group to act on.
fn execute_seeds() -> Vec<Vec<u8>> {
    let conv = "p2p-fz_a-fz_b".to_string();
    let bodies = vec![
        Body::Send(pb::SendMessageRequest {
            conv_type: 1,
            target: "fz_b".into(),
            client_msg_id: "c1".into(),
            content: "bad news".into(),
            ..Default::default()
        }),
        Body::CreateGroup(pb::CreateGroupRequest {
            group_id: "g1".into(),
            name: "n".into(),
            members: vec!["fz_b".into(), "fz_c".into()],
        }),
        Body::Send(pb::SendMessageRequest {
            conv_type: 2,
            target: "g1".into(),
            client_msg_id: "c2".into(),
            content: "{}".into(),
            at_users: vec!["fz_b".into()],
            ..Default::default()
        }),
        Body::Pull(pb::PullMessagesRequest {
            conv_id: conv.clone(),
            anchor_seq: 0,
            limit: 10,
            direction: 2,
        }),
        Body::GetByIds(pb::GetMessagesByIdsRequest {
            conv_id: "grp-g1".into(),
            msg_ids: vec!["01ARZ3NDEKTSV4RRFFQ69G5FAV".into()],
        }),
        Body::Recall(pb::RecallMessageRequest {
            conv_id: conv.clone(),
            msg_id: "01ARZ3NDEKTSV4RRFFQ69G5FAV".into(),
        }),
        Body::GetConversations(pb::GetConversationsRequest {
            updated_since: 0,
            page_size: 5,
            cursor: 0,
        }),
        Body::MarkRead(pb::MarkReadRequest {
            conv_id: conv.clone(),
            read_seq: 1,
        }),
        Body::UpdateSettings(pb::UpdateConvSettingsRequest {
            conv_id: "grp-g1".into(),
            mute: Some(true),
            pin: Some(false),
        }),
        Body::GetUnread(pb::GetUnreadRequest { per_conv_limit: 3 }),
        Body::UpdateMembers(pb::UpdateGroupMembersRequest {
            group_id: "g1".into(),
            add: vec!["fz_d".into()],
            remove: vec!["fz_c".into()],
            add_admins: vec!["fz_d".into()],
        }),
        Body::DeleteConversation(pb::DeleteConversationRequest { conv_id: conv }),
    ];
    bodies
        .into_iter()
        .map(|b| {
            ClientFrame {
                req_id: 1,
                body: Some(b),
            }
            .encode_to_vec()
        })
        .collect()
}

const FZ_USERS: [&str; 7] = ["fz_a", "fz_b", "fz_c", "fz_d", "fz_a", "", "fz-x"];
const FZ_CONVS: [&str; 8] = [
    "p2p-fz_a-fz_b",
    "p2p-fz_a-fz_c",
    "p2p-fz_b-fz_a",
    "grp-g1",
    "grp-g2",
    "grp-",
    "p2p-fz_a-fz_a",
    "x",
];

fn arb_pick(u: &mut Unstructured, dict: &[&str]) -> arbitrary::Result<String> {
    if u.ratio(1u8, 10)? {
        Ok(u.arbitrary().unwrap_or_default())
    } else {
        Ok(u.choose(dict)?.to_string())
    }
}

fn arb_list(u: &mut Unstructured, dict: &[&str]) -> arbitrary::Result<Vec<String>> {
    (0..u.int_in_range(0..=4)?)
        .map(|_| arb_pick(u, dict))
        .collect()
}

/// A ClientFrame body aimed at the users, conversations and messages that exist, so
/// most requests get past decoding and the id checks into the operations themselves.
fn arb_body(u: &mut Unstructured, msg_ids: &[String]) -> arbitrary::Result<Body> {
    let ids: Vec<&str> = msg_ids
        .iter()
        .map(String::as_str)
        .chain(["01ARZ3NDEKTSV4RRFFQ69G5FAV", "", "not-a-ulid"])
        .collect();
    let num = |u: &mut Unstructured| -> arbitrary::Result<i64> {
        Ok(match u.int_in_range(0..=3)? {
            0 => u.arbitrary()?,
            1 => -1,
            _ => u.int_in_range(0..=20)?,
        })
    };
    Ok(match u.int_in_range(0..=12)? {
        0 => Body::Heartbeat(pb::Heartbeat {
            client_ts: u.arbitrary()?,
        }),
        1..=3 => Body::Send(pb::SendMessageRequest {
            conv_type: u.int_in_range(0..=3)?,
            target: arb_pick(u, &["fz_b", "fz_c", "fz_a", "g1", "g2", ""])?,
            client_msg_id: arb_pick(u, &["c1", "c2", "", "c3"])?,
            msg_type: *u.choose(&[0, 1, 99, 100, -1])?,
            content: arb_pick(u, &["{}", "bad", "坏词 BAD bad", ""])?,
            reply_to_msg_id: arb_pick(u, &ids)?,
            at_users: arb_list(u, &FZ_USERS)?,
        }),
        4 => Body::Pull(pb::PullMessagesRequest {
            conv_id: arb_pick(u, &FZ_CONVS)?,
            anchor_seq: num(u)?,
            limit: num(u)? as i32,
            direction: u.int_in_range(0..=3)?,
        }),
        5 => Body::GetByIds(pb::GetMessagesByIdsRequest {
            conv_id: arb_pick(u, &FZ_CONVS)?,
            msg_ids: arb_list(u, &ids)?,
        }),
        6 => Body::Recall(pb::RecallMessageRequest {
            conv_id: arb_pick(u, &FZ_CONVS)?,
            msg_id: arb_pick(u, &ids)?,
        }),
        7 => Body::GetConversations(pb::GetConversationsRequest {
            updated_since: num(u)?,
            page_size: num(u)? as i32,
            cursor: num(u)?,
        }),
        8 => Body::MarkRead(pb::MarkReadRequest {
            conv_id: arb_pick(u, &FZ_CONVS)?,
            read_seq: num(u)?,
        }),
        9 => Body::UpdateSettings(pb::UpdateConvSettingsRequest {
            conv_id: arb_pick(u, &FZ_CONVS)?,
            mute: u.arbitrary()?,
            pin: u.arbitrary()?,
        }),
        10 => Body::GetUnread(pb::GetUnreadRequest {
            per_conv_limit: num(u)? as i32,
        }),
        11 => Body::CreateGroup(pb::CreateGroupRequest {
            group_id: arb_pick(u, &["g1", "g2", "", "g-x"])?,
            name: arb_pick(u, &["n", ""])?,
            members: arb_list(u, &FZ_USERS)?,
        }),
        _ => Body::UpdateMembers(pb::UpdateGroupMembersRequest {
            group_id: arb_pick(u, &["g1", "g2", ""])?,
            add: arb_list(u, &FZ_USERS)?,
            remove: arb_list(u, &FZ_USERS)?,
            add_admins: arb_list(u, &FZ_USERS)?,
        }),
    })
}

/// Decoded frames run through `chat::execute` on a real one-shard runtime with its
/// store (no sockets): every answer is a response or a documented error, never an
/// internal one, and comes within 10 s.
#[test]
fn fuzz_execute() {
    use imshard::chat::{self, Caller};
    use imshard::chat::{Chat, Shard};
    use imshard::shard::ring;
    use std::sync::Arc;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("io_uring runtime");
    let seeds = execute_seeds();
    rt.block_on(async {
        let parts = ring::mesh(1).expect("mesh").pop().expect("parts");
        let bell = parts.bell();
        let store = imshard::store::ShardStore::open(dir.path(), 0, bell.clone()).expect("store");
        let cfg = Arc::new(imshard::config::Config {
            data_dir: dir.path().to_path_buf(),
            shards: 1,
            blocked_words: vec!["bad".into()],
            filter_mode: FilterMode::Mask,
            rate_limit: 0,
            ..imshard::config::Config::default()
        });
        let filter = Filter::new(&cfg.blocked_words, cfg.filter_mode).expect("filter");
        let shard = Shard::new(
            0,
            cfg,
            b"secret-secret-secret",
            parts.into_endpoint(),
            Arc::default(),
            Chat::new(store, Arc::new(filter)),
        );
        {
            // As in server::shard_main: durable writes are heard of through the bell.
            let shard = shard.clone();
            monoio::spawn(async move {
                let _ = bell
                    .listen(|| {
                        shard.ring.wake_local();
                        shard.store.wake_local();
                    })
                    .await;
            });
        }
        let callers: Vec<Caller> = ["fz_a", "fz_b", "fz_d"]
            .iter()
            .map(|u| Caller {
                user: u.to_string(),
                device: "d1".into(),
                admin: false,
            })
            .collect();
        let mut answers: std::collections::BTreeMap<i32, u64> = Default::default();
        let mut msg_ids: Vec<String> = Vec::new();
        let mut cases = Cases::new("execute", 30_000, &seeds);
        while let Some(case) = cases.next_case() {
            // An input that decodes is run as it is; any other builds a request.
            let body = match decode_client_frame(&case.input) {
                Ok(ClientFrame {
                    body: Some(body), ..
                }) => body,
                _ => match arb_body(&mut Unstructured::new(&case.input), &msg_ids) {
                    Ok(body) => body,
                    Err(_) => continue,
                },
            };
            let is_send = matches!(body, Body::Send(_));
            check_operation(&body);
            let caller = &callers[case.input.len() % callers.len()];
            let answer =
                monoio::time::timeout(Duration::from_secs(10), chat::execute(&shard, caller, body))
                    .await;
            let code = match answer {
                Ok(Ok(response)) => {
                    if is_send {
                        let chat::Response::Send(r) = response else {
                            panic!("a send answered {response:?}");
                        };
                        msg_ids.push(r.msg_id);
                    }
                    0
                }
                Ok(Err(e)) => {
                    let code = e.code();
                    assert!(
                        [40001, 40301, 40401, 41301, 42201, 42202, 42901].contains(&code),
                        "{e:?}"
                    );
                    code
                }
                Err(_) => panic!("execute did not answer within 10 s"),
            };
            *answers.entry(code).or_default() += 1;
        }
        eprintln!("fuzz target execute: answers by code {answers:?}");
    });
}

// ---------------------------------------------------------------- JWT

const SECRET: &[u8] = b"fuzz-secret";

/// Any string as a token: refused with a documented error, or claims that are valid.
fn jwt_raw_target(data: &[u8]) {
    let token = String::from_utf8_lossy(data);
    match Verifier::new(SECRET).verify(&token) {
        Ok(c) => assert!(ids::is_valid_id(&c.sub) && ids::is_valid_id(&c.did)),
        Err(e) => {
            let code = imshard::codes::ApiError::from(e.clone()).code();
            assert!(
                code == 40101 || (code == 40001 && e == AuthError::BadIds),
                "{e:?}"
            );
        }
    }
}

/// Signed claims with times around now: the verdict must be exactly the model's.
fn jwt_claims_target(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let leeway = CLOCK_SKEW_LEEWAY_SECS as i64;
    // Offsets at least 3 s away from a boundary, so a second ticking by cannot matter.
    let offset = |u: &mut Unstructured| -> arbitrary::Result<i64> {
        let o: i64 = u.int_in_range(-100_000..=100_000)?;
        Ok(if (o.abs() - leeway).abs() < 3 || o.abs() < 3 {
            o + 7
        } else {
            o
        })
    };
    let exp = offset(&mut u).unwrap_or(100);
    let nbf = u
        .ratio(1u8, 2)
        .unwrap_or(false)
        .then(|| offset(&mut u).unwrap_or(0));
    let iat = u
        .ratio(1u8, 2)
        .unwrap_or(false)
        .then(|| offset(&mut u).unwrap_or(0));
    let pick = |u: &mut Unstructured| -> String {
        if u.ratio(1u8, 5).unwrap_or(false) {
            u.arbitrary::<String>().unwrap_or_default()
        } else {
            u.choose(&["alice", "b.o_b@x", "", "a-b", "x y"])
                .map_or("a", |s| s)
                .to_string()
        }
    };
    let sub = pick(&mut u);
    let did = pick(&mut u);
    let dty = *u
        .choose(&["mobile", "web", "pad", "desktop", "watch"])
        .unwrap_or(&"web");
    let mut claims = json!({"sub": sub, "did": did, "dty": dty, "exp": now + exp});
    if let Some(n) = nbf {
        claims["nbf"] = json!(now + n);
    }
    if let Some(i) = iat {
        claims["iat"] = json!(now + i);
    }
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .expect("sign");
    let want = if exp < -leeway {
        Err(AuthError::Expired)
    } else if nbf.is_some_and(|n| n > leeway) || iat.is_some_and(|i| i > leeway) {
        Err(AuthError::NotYetValid)
    } else if !ids::is_valid_id(&sub) || !ids::is_valid_id(&did) || dty == "watch" {
        Err(AuthError::BadIds)
    } else {
        Ok(())
    };
    let got = Verifier::new(SECRET).verify(&token).map(|_| ());
    assert_eq!(got, want, "{claims}");
    let wrong = Verifier::new(b"another-secret").verify(&token);
    assert_eq!(wrong, Err(AuthError::BadSignature));
}

fn jwt_seeds() -> Vec<Vec<u8>> {
    let minted = auth::mint(SECRET, "alice", "phone", "mobile", true, 3600).expect("mint");
    vec![
        minted.clone().into_bytes(),
        minted.replacen('.', "..", 1).into_bytes(),
        format!("{minted}x").into_bytes(),
        b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.".to_vec(),
        b"a.b.c".to_vec(),
    ]
}

// ---------------------------------------------------------------- tests

#[test]
fn fuzz_ws_stream() {
    run("ws_stream", 30_000, &ws_seeds(), ws_stream_target);
}

#[test]
fn fuzz_ws_frames() {
    run("ws_frames", 400_000, &ws_seeds(), ws_frames_target);
}

#[test]
fn fuzz_http_head() {
    run("http_head", 700_000, &http_seeds(), http_target);
}

#[test]
fn fuzz_api_json() {
    run("api_json", 500_000, &api_seeds(), api_target);
}

#[test]
fn fuzz_client_frame() {
    run(
        "client_frame",
        350_000,
        &client_frame_seeds(),
        client_frame_target,
    );
}

#[test]
fn fuzz_jwt() {
    run("jwt_raw", 300_000, &jwt_seeds(), jwt_raw_target);
    run("jwt_claims", 60_000, &[], jwt_claims_target);
}

/// Inputs the fuzzer once failed on, kept so they never come back.
#[test]
fn regressions() {
    // `%+1` was decoded as byte 1: `u8::from_str_radix` accepts a leading sign.
    http_target(
        b"GET /api/v1/auth/conversations?updated_since=1&page_size=+1&cursor=%+1 HTTP/1.0\r\n\r\n",
    );
    // A path parameter was decoded as a query, so `&` ended it: DELETE
    // conversations/p2p-a-b&x deleted p2p-a-b.
    http_target(b"DELETE /api/v1/auth/conversations/p2p-a-b&x=1 HTTP/1.1\r\n\r\n");
    check_api_request("PATCH", "conversations/grp-g1&E", "", b"{}");
}

/// Reads whatever the server sends until it goes quiet or closes; every binary frame
/// must be a MessageEnvelope.
fn drain(c: &mut common::Client) {
    while let Ok(m) = c.ws.read() {
        if let tungstenite::Message::Binary(b) = m {
            pb::MessageEnvelope::decode(&*b).expect("the server sends envelopes");
        }
    }
}

/// One HTTP request on a fresh connection; the status, if the server answered within
/// `wait` (a safety net for requests that must be answered, short for mutated ones).
fn raw_http(server: &common::Server, request: &[u8], wait: Duration) -> Option<u16> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(wait)).expect("timeout");
    let _ = s.write_all(request);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Black-box: mutated ClientFrames (they reach `chat::execute` on the real shards),
/// random bytes after the upgrade (the frame parser) and random HTTP requests (head,
/// JSON API) against the real binary; then it must still be healthy and serving.
#[test]
fn fuzz_blackbox_server_keeps_serving() {
    let server = common::Server::start(
        2,
        &[
            "--filter-mode",
            "mask",
            "--blocked-words",
            "bad,坏词",
            "--rate-limit",
            "0",
        ],
    );
    let budget = Budget::for_target(90);
    let (_, mut rng) = rng_for("blackbox");
    let frames = client_frame_seeds();
    let raw_frames: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            FrameSpec {
                fin: true,
                rsv: 0,
                opcode: 2,
                mask: Some(rng.random()),
                payload: f.clone(),
            }
            .encode()
        })
        .collect();
    let token = server.token("fz_http", "d");
    let api_bodies = api_seeds();
    let mut round = 0u64;
    while budget.more(round) {
        let user = format!("fz{}", round % 4);
        match round % 3 {
            0 => {
                let mut c = server.connect(&user, &format!("d{}", round % 5));
                c.set_timeout(Duration::from_millis(100));
                for _ in 0..rng.random_range(1..20) {
                    let a = &frames[rng.random_range(0..frames.len())];
                    let b = &frames[rng.random_range(0..frames.len())];
                    let f = if rng.random_ratio(1, 4) {
                        a.clone()
                    } else {
                        mutate(&mut rng, a, b)
                    };
                    if c.ws.send(tungstenite::Message::binary(f)).is_err() {
                        break;
                    }
                }
                drain(&mut c);
            }
            1 => {
                let mut c = server.connect(&user, "raw");
                c.set_timeout(Duration::from_millis(100));
                let a = &raw_frames[rng.random_range(0..raw_frames.len())];
                let b = &raw_frames[rng.random_range(0..raw_frames.len())];
                let bytes = if rng.random_ratio(1, 3) {
                    random_bytes(&mut rng, 2048)
                } else {
                    [a.clone(), mutate(&mut rng, a, b)].concat()
                };
                let _ = c.ws.get_mut().write_all(&bytes);
                drain(&mut c);
            }
            _ => {
                let (method, route) = ROUTES[rng.random_range(0..ROUTES.len())];
                let a = &api_bodies[rng.random_range(0..api_bodies.len())];
                let b = &api_bodies[rng.random_range(0..api_bodies.len())];
                let body = mutate(&mut rng, a, b);
                let mut req = format!(
                    "{method} /api/v1/auth/{route} HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\
                     Content-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                req.extend_from_slice(&body);
                let status = raw_http(&server, &req, Duration::from_secs(10));
                assert!(
                    status.is_some_and(|s| (200..500).contains(&s)),
                    "{status:?} for {}",
                    String::from_utf8_lossy(&req)
                );
                let seeds = http_seeds();
                let seed = &seeds[rng.random_range(0..seeds.len())];
                let _ = raw_http(
                    &server,
                    &mutate(&mut rng, seed, &req),
                    Duration::from_millis(300),
                );
            }
        }
        round += 1;
    }
    eprintln!("fuzz target blackbox: {round} rounds");
    let (s, text) = server.http("GET", "/healthz", None, "").expect("healthz");
    assert_eq!((s, text.trim()), (200, "ok"));
    let mut a = server.connect("fz0", "after");
    let mut b = server.connect("fz_fresh", "phone");
    let sent = a
        .send_p2p("fz_fresh", "after", "{\"t\":\"bad\"}")
        .expect("send");
    let push = b.next_push().expect("push");
    assert_eq!(
        (push.msg_id, push.content),
        (sent.msg_id, "{\"t\":\"***\"}".to_string())
    );
}
