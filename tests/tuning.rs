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

/// A small netdev_max_backlog is flagged with the exact fix, whatever N; a large one
/// passes. Which of the two this host shows depends on its setting, read here too.
#[test]
fn small_netdev_max_backlog_is_flagged_with_its_fix() {
    let (_, text) = check(&["--connections", "10"]);
    let line = text
        .lines()
        .find(|l| l.contains("net.core.netdev_max_backlog"))
        .unwrap_or_else(|| panic!("no netdev_max_backlog line in:\n{text}"));
    let Ok(value) = std::fs::read_to_string("/proc/sys/net/core/netdev_max_backlog") else {
        assert!(line.starts_with("skip"), "{line}");
        return;
    };
    let value: u64 = value.trim().parse().expect("a number");
    if value < 16384 {
        assert_eq!(
            line,
            format!(
                "MISSING net.core.netdev_max_backlog = {value} (need >= 16384): \
                 fix: sysctl -w net.core.netdev_max_backlog=16384"
            )
        );
    } else {
        assert_eq!(
            line,
            format!("ok      net.core.netdev_max_backlog = {value}")
        );
    }
}
