//! What the loadgen's integration tests share: finding the server binary and a free
//! loopback port.

use std::net::TcpListener;
use std::path::PathBuf;

/// The server binary next to the test's own deps dir: target/debug/deps/<test> ->
/// target/debug/imshard (the workspace test run builds it).
pub fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join("imshard");
    assert!(
        bin.exists(),
        "{} not found: build the server first (cargo build -p imshard, or cargo test --workspace)",
        bin.display()
    );
    bin
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .expect("local addr")
        .port()
}
