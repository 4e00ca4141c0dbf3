//! `Type=notify`: Sluice tells the service manager on `$NOTIFY_SOCKET` when it is ready, when
//! a reload starts and ends, and when it stops. The tests play systemd: they bind the datagram
//! socket and read what arrives. (Without `NOTIFY_SOCKET` nothing is sent; every other test
//! runs that way.)

mod common;

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{ConfigFile, EchoServer, Signal, Sluice, assert_echo};

/// Generous for a debug build on a busy machine; a missing message shows as this wait.
const WITHIN: Duration = Duration::from_secs(10);

/// A directory in the temp dir for the notify socket, removed on drop.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluice-notify-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `sluice run -c FILE` with `NOTIFY_SOCKET=notify_socket`, returned as soon as it logs
/// "starting" (before its first probes and before any listener accepts).
fn spawn(file: &ConfigFile, notify_socket: &str) -> Sluice {
    let mut command = Command::new(binary());
    command
        .args([
            "run",
            "-c",
            file.path().to_str().unwrap(),
            "--log-level",
            "info",
        ])
        .env_remove("RUST_LOG")
        .env("NOTIFY_SOCKET", notify_socket);
    Sluice::start_stand_in(command, "starting")
}

/// The next datagram, as text; panics (with Sluice's stderr) when none comes within [`WITHIN`].
fn next_message(socket: &UnixDatagram, sluice: &Sluice) -> String {
    let deadline = Instant::now() + WITHIN;
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no notification within {WITHIN:?}\n--- sluice stderr ---\n{}",
            sluice.stderr_text()
        );
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.recv(&mut buffer) {
            Ok(n) => return String::from_utf8(buffer[..n].to_vec()).expect("UTF-8 message"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }
}

/// The value of `KEY=` in a message, if the message has that line.
fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
}

/// Reads messages until one has `KEY=`; returns it and the messages before it.
fn until(socket: &UnixDatagram, sluice: &Sluice, key: &str) -> (String, Vec<String>) {
    let mut before = Vec::new();
    loop {
        let message = next_message(socket, sluice);
        if field(&message, key).is_some() {
            return (message, before);
        }
        before.push(message);
    }
}

/// The whole sequence systemd relies on, on a socket in the file system: READY=1 once the
/// listener accepts; RELOADING=1 (with MONOTONIC_USEC) then READY=1 around a good reload and
/// around a refused one, whose STATUS says so with the error's position; STOPPING=1 on SIGTERM;
/// exit 0.
#[test]
fn ready_reloading_and_stopping_reach_the_notify_socket() {
    let dir = SocketDir::new();
    let path = dir.0.join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    let backend = EchoServer::echo();
    let other = EchoServer::echo();
    let listener = Listener::new("notify", &[backend.addr()])
        .with("health: { check: tcp, interval: 200ms, timeout: 1s, rise: 1, fall: 1 }");
    let file = ConfigFile::new(&config(
        1,
        None,
        &["shutdown_timeout: 2s"],
        std::slice::from_ref(&listener),
    ));
    let mut sluice = spawn(&file, path.to_str().unwrap());

    let (ready, before) = until(&socket, &sluice, "READY");
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    assert!(
        before.iter().all(|m| field(m, "STATUS").is_some()),
        "only STATUS lines come before READY: {before:?}"
    );
    // Right after READY=1 the listener accepts and forwards.
    assert_echo(listener.bind, 1024, 1, Duration::from_secs(5));

    // A good file: RELOADING=1 with the monotonic clock, then READY=1 once applied.
    let mut changed = listener.clone();
    changed.backends.push(other.addr());
    std::fs::write(
        file.path(),
        config(1, None, &["shutdown_timeout: 2s"], &[changed]),
    )
    .unwrap();
    sluice.signal(Signal::SIGHUP);
    let (reloading, _) = until(&socket, &sluice, "RELOADING");
    assert_eq!(field(&reloading, "RELOADING"), Some("1"));
    let first_usec: u64 = field(&reloading, "MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("MONOTONIC_USEC does not parse ({e}): {reloading:?}"));
    assert!(first_usec > 0, "{reloading:?}");
    let (applied, _) = until(&socket, &sluice, "READY");
    let status = field(&applied, "STATUS").unwrap_or_default();
    assert!(status.contains("reload applied"), "{applied:?}");

    // A bad file: RELOADING=1, then READY=1 with a STATUS naming the refusal and where.
    std::fs::write(
        file.path(),
        "workers: 1\nlisteners:\n  - name: notify\n    colour: red\n",
    )
    .unwrap();
    sluice.signal(Signal::SIGHUP);
    let (reloading, _) = until(&socket, &sluice, "RELOADING");
    let second_usec: u64 = field(&reloading, "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC that parses: {reloading:?}"));
    assert!(second_usec > first_usec, "{first_usec} then {second_usec}");
    let (refused, _) = until(&socket, &sluice, "READY");
    let status = field(&refused, "STATUS").unwrap_or_default();
    let position = format!("{}:", file.path().display());
    assert!(
        status.contains("reload refused") && status.contains(&position),
        "STATUS should say the reload was refused and where: {refused:?}"
    );
    // The running config still serves.
    assert_echo(listener.bind, 1024, 2, Duration::from_secs(5));

    sluice.signal(Signal::SIGTERM);
    let (stopping, _) = until(&socket, &sluice, "STOPPING");
    assert_eq!(field(&stopping, "STOPPING"), Some("1"));
    assert_exits_zero(&mut sluice);
}

/// `NOTIFY_SOCKET` may name an abstract socket (`@name`), as sd_notify(3) allows.
#[test]
fn an_abstract_notify_socket_is_used() {
    let name = format!("sluice-notify-test-{}", std::process::id());
    let socket = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(&name).unwrap()).unwrap();
    let backend = EchoServer::echo();
    let listener = Listener::new("notify", &[backend.addr()]);
    let file = ConfigFile::new(&config(1, None, &[], std::slice::from_ref(&listener)));
    let mut sluice = spawn(&file, &format!("@{name}"));
    let (ready, _) = until(&socket, &sluice, "READY");
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    assert_echo(listener.bind, 1024, 1, Duration::from_secs(5));
    sluice.signal(Signal::SIGTERM);
    until(&socket, &sluice, "STOPPING");
    assert_exits_zero(&mut sluice);
}

/// Sluice exits with status 0 within 5 s (after SIGTERM).
fn assert_exits_zero(sluice: &mut Sluice) {
    let status = sluice.wait_exit(Duration::from_secs(5));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        sluice.stderr_text()
    );
}
