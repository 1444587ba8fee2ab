//! tuning/check reads this host and says what is missing for N connections, with a fix.

use std::process::Command;

fn check(args: &[&str]) -> (i32, String) {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/check"))
        .args(args)
        .output()
        .expect("run tuning/check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn every_missing_setting_names_its_fix() {
    // No host holds a billion connections: something must be missing.
    let (code, text) = check(&["--connections", "1000000000"]);
    assert_eq!(code, 1, "{text}");
    let missing: Vec<&str> = text.lines().filter(|l| l.starts_with("MISSING")).collect();
    assert!(!missing.is_empty(), "{text}");
    for line in missing {
        assert!(line.contains("fix: "), "no fix in: {line}");
    }
    assert!(text.contains("nofile"), "{text}");
}

#[test]
fn bad_usage_is_refused() {
    let (code, _) = check(&["--connections"]);
    assert_eq!(code, 2);
    let (code, _) = check(&["--bogus"]);
    assert_eq!(code, 2);
}
