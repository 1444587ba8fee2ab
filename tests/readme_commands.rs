//! The shell snippets of README.md and loadgen/README.md run as written, in order:
//! every `$VAR` they use is set in an earlier line of the same file, the loadgen binary
//! is built before it is used, and a server the loadgen README starts never uses the
//! main README's `./data`.

use std::path::Path;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The commands of the ```sh blocks, in order: comments dropped, `\` continuations
/// joined.
fn sh_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.starts_with("```") {
            inside = line == "```sh";
            continue;
        }
        if !inside {
            continue;
        }
        let code = line.split(" # ").next().unwrap_or_default().trim();
        if code.starts_with('#') {
            continue;
        }
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(code);
        let command = std::mem::take(&mut pending);
        if !command.trim().is_empty() {
            out.push(command.trim().to_string());
        }
    }
    out
}

/// Names after `$` (`$PID`, `"$S"`, `${X}`), skipping `$(...)` and `$!`.
fn used_vars(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in line.match_indices('$') {
        let rest = &line[i + 1..];
        let rest = rest.strip_prefix('{').unwrap_or(rest);
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit()) {
            out.push(name);
        }
    }
    out
}

/// `NAME=` at the start of the line or after `;`.
fn set_vars(line: &str) -> Vec<String> {
    line.split(';')
        .filter_map(|part| {
            let part = part.trim();
            let (name, _) = part.split_once('=')?;
            (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .then(|| name.to_string())
        })
        .collect()
}

fn check(rel: &str) {
    let lines = sh_lines(&read(rel));
    assert!(!lines.is_empty(), "{rel} has sh blocks");
    let mut set: Vec<String> = vec!["HOME".into(), "PATH".into()];
    let mut loadgen_built = false;
    for line in &lines {
        for var in used_vars(line) {
            assert!(
                set.contains(&var),
                "{rel}: ${var} is used before it is set: {line}"
            );
        }
        set.extend(set_vars(line));
        if line.starts_with("cargo build") && line.contains("imshard-loadgen") {
            loadgen_built = true;
        }
        assert!(
            !line.starts_with("imshard ") && !line.starts_with("imshard-loadgen "),
            "{rel}: no step puts imshard on PATH; use target/release/..: {line}"
        );
        if line.contains("target/release/imshard-loadgen ") {
            assert!(
                loadgen_built,
                "{rel}: the loadgen is used before a command builds it: {line}"
            );
        }
    }
}

#[test]
fn readme_snippets_set_what_they_use() {
    check("README.md");
}

#[test]
fn loadgen_readme_snippets_set_what_they_use_and_use_a_fresh_data_dir() {
    check("loadgen/README.md");
    let text = read("loadgen/README.md");
    for line in sh_lines(&text) {
        if line.contains("imshard serve") {
            assert!(
                line.contains("--data-dir \"$(mktemp -d)\""),
                "a server of the loadgen README must use a fresh data dir: {line}"
            );
        }
        assert!(!line.contains("data/jwt.secret"), "{line}");
    }
}
