//! A backend in its own process, so that a test can kill it with SIGKILL the way a crashed or
//! OOM-killed server dies: the kernel closes its sockets (a reset where unread bytes were
//! waiting, a FIN otherwise), with no chance to say goodbye.
//!
//! The test binary runs itself again: [`ChildEcho::spawn`] starts the current executable with
//! only the named test selected and an environment variable naming the address to serve; that
//! test calls [`serve_if_child`] first, which serves echo there until the parent kills it (or
//! the parent's end of its stdin closes, so a child never outlives its test).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::addr::free_addr;
use crate::echo::{Behavior, EchoServer};

/// Names the address the child serves; set only in the child.
const ADDRESS_VAR: &str = "SLUICE_TESTKIT_CHILD_ECHO";
/// The line the child prints once it listens.
const READY_LINE: &str = "sluice-testkit child echo ready";
/// How long the child may take to start.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// An echo backend in a child process.
#[derive(Debug)]
pub struct ChildEcho {
    child: Child,
    addr: SocketAddr,
}

impl ChildEcho {
    /// Runs the test `test` (its full libtest name, e.g. `killed::workers_1`) of the current
    /// test binary as an echo backend on a fresh loopback address, and waits until it listens.
    pub fn spawn(test: &str) -> Self {
        let addr = free_addr();
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new(exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(ADDRESS_VAR, addr.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the child echo backend");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut this = Self { child, addr };
        assert!(
            wait_ready(stdout),
            "child echo backend for {test} did not get ready within {READY_TIMEOUT:?}"
        );
        this.child.stdout = None;
        this
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it with SIGKILL and reaps it; returns when the process is gone.
    pub fn kill(&mut self) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits in i32"));
        let _ = kill(pid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for ChildEcho {
    fn drop(&mut self) {
        self.kill();
    }
}

/// In a child started by [`ChildEcho::spawn`], serves echo and never returns; anywhere else
/// returns at once. Call it first thing in the test that [`ChildEcho::spawn`] names.
pub fn serve_if_child() {
    let Ok(addr) = std::env::var(ADDRESS_VAR) else {
        return;
    };
    let addr: SocketAddr = addr.parse().expect("child echo address");
    let _server = EchoServer::start_on(addr, Behavior::Echo).expect("child echo: bind");
    println!("{READY_LINE}");
    // The parent holds our stdin open; when it goes away, so do we.
    let mut stdin = std::io::stdin();
    let mut byte = [0u8; 1];
    while matches!(stdin.read(&mut byte), Ok(n) if n > 0) {}
    std::process::exit(0);
}

fn wait_ready(stdout: ChildStdout) -> bool {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.contains(READY_LINE) {
                let _ = tx.send(());
                // Keep draining so the child never blocks on a full pipe.
            }
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_ok()
}
