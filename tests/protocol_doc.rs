//! docs/PROTOCOL.md stays true to the code: every error code (one row per meaning),
//! close code, KICKOUT reason, envelope type, HTTP route and line of `imshard.proto`
//! the server has appears there.

use std::path::Path;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn doc() -> String {
    read("docs/PROTOCOL.md")
}

/// The `/// NNNNN: meaning` doc lines of `ApiError`'s variants: one per meaning.
#[test]
fn every_error_code_meaning_has_a_row() {
    let codes = read("src/codes.rs");
    let doc = doc();
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for line in codes.lines() {
        let Some(rest) = line.trim().strip_prefix("/// ") else {
            continue;
        };
        let Some((code, _)) = rest.split_once(':') else {
            continue;
        };
        if code.len() == 5 && code.bytes().all(|b| b.is_ascii_digit()) {
            *seen.entry(code).or_default() += 1;
        }
    }
    assert!(seen.len() >= 10, "codes found in codes.rs: {seen:?}");
    for (code, meanings) in seen {
        let rows = doc
            .lines()
            .filter(|l| l.starts_with(&format!("| {code} |")))
            .count();
        assert_eq!(
            rows, meanings,
            "error code {code}: {meanings} meanings in src/codes.rs, {rows} rows in docs/PROTOCOL.md"
        );
    }
}

/// `pub const NAME: TYPE = VALUE;` lines inside `pub mod <module> {` of `text`.
fn consts_in_module(text: &str, module: &str) -> Vec<String> {
    let start = text
        .find(&format!("pub mod {module} {{"))
        .unwrap_or_else(|| panic!("pub mod {module}"));
    let body = &text[start..];
    let body = &body[..body.find("\n}").unwrap_or(body.len())];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split_once(" = "))
        .map(|(_, v)| v.trim_end_matches(';').trim_matches('"').to_string())
        .collect()
}

#[test]
fn every_close_code_and_kick_reason_has_a_row() {
    let codes = read("src/codes.rs");
    let doc = doc();
    let close = consts_in_module(&codes, "close");
    assert!(close.len() >= 9, "{close:?}");
    for code in close {
        assert!(
            doc.contains(&format!("\n| {code} |")),
            "close code {code} is not in docs/PROTOCOL.md"
        );
    }
    let kick = consts_in_module(&codes, "kick");
    assert!(kick.len() >= 3, "{kick:?}");
    for reason in kick {
        assert!(
            doc.contains(&format!("\n| `{reason}` |")),
            "KICKOUT reason {reason} is not in docs/PROTOCOL.md"
        );
    }
}

#[test]
fn every_envelope_type_has_a_row() {
    let envelope = read("src/proto/envelope.rs");
    let doc = doc();
    let kinds = consts_in_module(&envelope, "kind");
    assert!(kinds.len() >= 5, "{kinds:?}");
    for kind in kinds {
        assert!(
            doc.contains(&format!("| `{kind}` |")),
            "envelope type {kind} is not in docs/PROTOCOL.md"
        );
    }
}

/// Routes as `api.rs` matches them: `("METHOD", "path")` or
/// `("METHOD", r) if r.starts_with("prefix")`, with the prefix of the function they are
/// in.
fn routes(api: &str) -> Vec<String> {
    let regions = [
        ("pub async fn handle", ""),
        ("async fn api(", "/api/v1/auth/"),
        ("async fn admin_api(", "/api/v1/admin/"),
    ];
    let mut out = Vec::new();
    for (i, (start, prefix)) in regions.iter().enumerate() {
        let from = api
            .find(start)
            .unwrap_or_else(|| panic!("{start} in api.rs"));
        let to = regions
            .get(i + 1)
            .and_then(|(next, _)| api.find(next))
            .unwrap_or(api.len());
        let region = &api[from..to.max(from)];
        for (at, _) in region.match_indices("(\"") {
            let rest = &region[at + 2..];
            let Some((method, rest)) = rest.split_once('"') else {
                continue;
            };
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                continue;
            }
            let path = if let Some(lit) = rest.strip_prefix(", \"") {
                lit.split('"').next().unwrap_or_default()
            } else if let Some(guard) = rest.strip_prefix(", r) if r.starts_with(\"") {
                guard.split('"').next().unwrap_or_default()
            } else {
                continue;
            };
            if path.starts_with("/api/") {
                continue;
            }
            out.push(format!("{method} {prefix}{path}"));
        }
    }
    out
}

#[test]
fn every_http_route_has_a_row() {
    let doc = doc();
    let found = routes(&read("src/api.rs"));
    assert!(found.len() >= 16, "routes found in api.rs: {found:?}");
    for route in found {
        assert!(
            doc.contains(&format!("| `{route}")),
            "route {route} is not in docs/PROTOCOL.md's HTTP API table"
        );
    }
    assert!(read("src/shard/accept.rs").contains("head.path == \"/ws\""));
    assert!(doc.contains("| `GET /ws` |"));
}

#[test]
fn the_protobuf_is_imshard_proto() {
    let proto = read("src/proto/imshard.proto");
    let doc = doc();
    let from = proto.find("syntax = ").expect("syntax line");
    let doc_lines: std::collections::HashSet<&str> = doc.lines().collect();
    for line in proto[from..].lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            doc_lines.contains(line),
            "line of imshard.proto missing from docs/PROTOCOL.md: {line}"
        );
    }
}
