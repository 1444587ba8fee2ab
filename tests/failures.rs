//! Failures are loud, never a zombie: a panic on any thread (a shard's included) takes
//! the whole process down with SIGABRT, so a supervisor restarts it, instead of one
//! shard thread unwinding while the others queue to it forever.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD: &str = "IMSHARD_TEST_PANIC_CHILD";

#[test]
fn a_panic_on_any_thread_aborts_the_process() {
    if std::env::var_os(CHILD).is_some() {
        // The child: the server's panic policy, then a panic on a thread that is not
        // the main one (as a shard thread is).
        imshard::server::abort_on_panic();
        let _ = std::thread::Builder::new()
            .name("imshard-shard-1".into())
            .spawn(|| panic!("a bug on a shard thread"))
            .map(|t| t.join());
        // Not reached when the policy holds: the main thread would live on.
        std::process::exit(0);
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([
            "--exact",
            "a_panic_on_any_thread_aborts_the_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "the process must abort: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("a bug on a shard thread"), "{stderr}");
}
