//! Exit statuses at start: 69 when io_uring is blocked (as by Docker's default seccomp
//! profile), 71 when a listener's address is taken, 64 for usage errors.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn sluice() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

fn config(bind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sluice-exit-{}-{}",
        std::process::id(),
        bind.replace([':', '.'], "_")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sluice.yaml");
    std::fs::write(
        &path,
        format!("workers: 2\nlisteners:\n  - name: x\n    bind: \"{bind}\"\n    backends: [\"127.0.0.1:9\"]\n"),
    )
    .unwrap();
    path
}

/// Runs a command that must exit by itself within 10 s.
fn run_bounded(mut cmd: Command) -> Output {
    let start = Instant::now();
    let out = cmd.output().expect("spawn");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    out
}

#[test]
fn io_uring_blocked_by_seccomp_exits_69_naming_the_cause() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/no_io_uring.py");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = listener.local_addr().unwrap().to_string();
    drop(listener);
    let mut cmd = Command::new("python3");
    cmd.args([script, sluice(), "run", "-c"]).arg(config(&bind));
    let out = run_bounded(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "stderr: {stderr}");
    assert!(
        stderr.contains("io_uring") && stderr.contains("seccomp"),
        "stderr: {stderr}"
    );
}

#[test]
fn address_in_use_exits_71_naming_the_listener() {
    // std's listener does not set SO_REUSEPORT, so Sluice's bind fails with EADDRINUSE.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = taken.local_addr().unwrap().to_string();
    let mut cmd = Command::new(sluice());
    cmd.args(["run", "-c"]).arg(config(&bind));
    let out = run_bounded(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(71), "stderr: {stderr}");
    assert!(
        stderr.contains(&bind) && stderr.contains("listener \"x\""),
        "stderr: {stderr}"
    );
}

#[test]
fn usage_errors_exit_64_and_version_exits_0() {
    let out = run_bounded({
        let mut c = Command::new(sluice());
        c.arg("frobnicate");
        c
    });
    assert_eq!(out.status.code(), Some(64));
    let out = run_bounded({
        let mut c = Command::new(sluice());
        c.args(["run", "-c", "/nonexistent/sluice.yaml"]);
        c
    });
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sluice.yaml"));
    let out = run_bounded({
        let mut c = Command::new(sluice());
        c.arg("--version");
        c
    });
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}
