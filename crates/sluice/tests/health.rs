//! Backend health through the real binary: active checks take a dead backend out and bring it
//! back (while retries and passive ejection hide the gap from clients), every backend down
//! (reset at once, or `on_all_down: use_all`), backups, Redis roles with real redis-servers,
//! and flap damping, where no established connection is closed by a health change.
//!
//! Backends greet each connection with `backend-<i>\n`, so every client knows who served it.
//! Health checks run on short intervals (50-200 ms) to keep the suite fast; every wait has a
//! deadline.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_health::FlapDamping;
use sluice_testkit::{
    Behavior, EchoServer, RedisServer, Reply, Sluice, StreamEnd, free_addr, metric, read_to_end,
    redis_command, refusing_addr, require_installed, run_id, scrape_metrics, series, wait_metric,
};

with_workers_1_and_2!(
    a_killed_backend_is_hidden_then_taken_out_then_brought_back,
    all_backends_down_resets_every_connection_at_once,
    all_backends_down_use_all_serves_and_reject_resets,
    a_backup_serves_only_while_the_primary_is_down,
    redis_role_master_follows_a_failover,
    a_flapping_backend_is_damped_and_established_connections_survive,
    slow_start_ramps_a_returning_backend,
);

/// The greeting's length: `backend-<i>\n` with a one-digit `i`.
const GREETING_LEN: usize = "backend-0\n".len();
/// How long one client connection may take, connect to last byte.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a health change may take to show in `/metrics`, far above `fall x interval`.
const STATE_TIMEOUT: Duration = Duration::from_secs(5);
/// The manager publishes a snapshot, wakes the workers, then updates what `/metrics` shows; a
/// worker adopts the snapshot at its next loop turn, after the completions of that turn. A
/// test that saw a change in `/metrics` waits this long before it counts on every worker
/// having adopted it (a loaded CI machine may not schedule a worker at once).
const ADOPT: Duration = Duration::from_millis(200);

/// A backend greeting with `backend-<index>\n` on a loopback address of its own, so that
/// nothing else takes its port while it is down and it can restart there.
fn greeting_backend(index: usize) -> EchoServer {
    greeting_backend_on(free_addr(), index)
}

/// Starts (or restarts) the backend `index` on `addr`; retries a few times in case the port is
/// still held for a moment by the previous server's sockets.
fn greeting_backend_on(addr: SocketAddr, index: usize) -> EchoServer {
    let greeting = format!("backend-{index}\n").into_bytes();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match EchoServer::start_on(addr, Behavior::GreetThenEcho(greeting.clone())) {
            Ok(server) => return server,
            Err(e) if Instant::now() < deadline => {
                eprintln!("restart of backend {index} on {addr}: {e}; retrying");
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("start backend {index} on {addr}: {e}"),
        }
    }
}

/// One connection through `proxy`: reads the greeting, checks the echo of a few bytes, closes;
/// the index of the backend that served it, or what went wrong.
fn served_by(proxy: SocketAddr) -> Result<usize, String> {
    let mut stream = TcpStream::connect_timeout(&proxy, CONNECTION_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(CONNECTION_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut greeting = [0u8; GREETING_LEN];
    stream
        .read_exact(&mut greeting)
        .map_err(|e| format!("read the greeting: {e}"))?;
    let text = String::from_utf8_lossy(&greeting);
    let index = text
        .strip_prefix("backend-")
        .and_then(|rest| rest.trim_end().parse().ok())
        .ok_or_else(|| format!("unexpected greeting {text:?}"))?;
    stream
        .write_all(b"ping")
        .map_err(|e| format!("write: {e}"))?;
    let mut echo = [0u8; 4];
    stream
        .read_exact(&mut echo)
        .map_err(|e| format!("read the echo: {e}"))?;
    if &echo != b"ping" {
        return Err(format!("echo {echo:?} instead of \"ping\""));
    }
    let _ = stream.shutdown(Shutdown::Write);
    Ok(index)
}

/// `connections` sequential connections; panics at the first that fails.
fn serve_all(sluice: &Sluice, proxy: SocketAddr, connections: usize, when: &str) -> Vec<usize> {
    (0..connections)
        .map(|n| {
            served_by(proxy).unwrap_or_else(|e| {
                panic!(
                    "{when}: connection {n} failed: {e}\n--- sluice stderr ---\n{}",
                    sluice.stderr_text()
                )
            })
        })
        .collect()
}

/// How many entries of `served` are `index`.
fn count(served: &[usize], index: usize) -> usize {
    served.iter().filter(|&&i| i == index).count()
}

/// Sluice from a YAML config.
fn start_yaml(yaml: &str) -> Sluice {
    Sluice::start(binary(), yaml)
}

/// Sluice with `listeners` and an admin endpoint; returns it and the admin's address.
fn start_with_admin(workers: usize, listeners: &[Listener]) -> (Sluice, SocketAddr) {
    let admin = free_addr();
    let sluice = start_yaml(&config(workers, Some(admin), &[], listeners));
    (sluice, admin)
}

/// The key of a per-backend series.
fn backend_series(name: &str, listener: &str, backend: SocketAddr) -> String {
    series(
        name,
        &[("listener", listener), ("backend", &backend.to_string())],
    )
}

/// The key of `sluice_backend_state` for one state.
fn state_series(listener: &str, backend: SocketAddr, state: &str) -> String {
    series(
        "sluice_backend_state",
        &[
            ("listener", listener),
            ("backend", &backend.to_string()),
            ("state", state),
        ],
    )
}

/// Waits (bounded) until `backend` reports `state`; panics with the log otherwise.
fn wait_state(
    sluice: &Sluice,
    admin: SocketAddr,
    listener: &str,
    backend: SocketAddr,
    state: &str,
) {
    let key = state_series(listener, backend, state);
    let seen = wait_metric(admin, &key, 1.0, STATE_TIMEOUT);
    assert_eq!(
        seen,
        Some(1.0),
        "{key} did not become 1 within {STATE_TIMEOUT:?}\n--- sluice stderr ---\n{}",
        sluice.stderr_text()
    );
}

/// `sluice_backend_up` of `backend`, which must be exported.
fn backend_up(admin: SocketAddr, listener: &str, backend: SocketAddr) -> f64 {
    let key = backend_series("sluice_backend_up", listener, backend);
    scrape_metrics(admin)
        .expect("scrape /metrics")
        .get(&key)
        .copied()
        .unwrap_or_else(|| panic!("{key} is not exported"))
}

/// The `backend state` log lines about `backend`.
fn transitions(sluice: &Sluice, backend: SocketAddr) -> Vec<String> {
    let field = format!("backend={backend} ");
    sluice
        .stderr_text()
        .lines()
        .filter(|line| line.contains("backend state") && line.contains(&field))
        .map(str::to_owned)
        .collect()
}

/// Three backends, `rise: 2, fall: 2` every 200 ms. Killed, the backend is hidden at once: no
/// client sees a failure (a refused connect is retried elsewhere, and passive ejection soon
/// stops trying it). After `fall x interval` the check marks it down, and connections stop
/// trying it at all. Restarted on the same address, it is up after `rise x interval` and gets
/// its share again.
fn a_killed_backend_is_hidden_then_taken_out_then_brought_back(workers: usize) {
    let mut servers: Vec<Option<EchoServer>> = (0..3).map(|i| Some(greeting_backend(i))).collect();
    let addrs: Vec<SocketAddr> = servers.iter().flatten().map(EchoServer::addr).collect();
    let listener = Listener::new("kill", &addrs)
        .with("health: { check: tcp, interval: 200ms, timeout: 200ms, rise: 2, fall: 2 }");
    let proxy = listener.bind;
    let (sluice, admin) = start_with_admin(workers, &[listener]);
    let victim = 1;
    let dead = addrs[victim];
    let failures_key = backend_series("sluice_backend_connect_failures_total", "kill", dead);

    let served = serve_all(&sluice, proxy, 30, "all three up");
    for index in 0..3 {
        assert!(count(&served, index) >= 5, "backend {index}: {served:?}");
    }

    drop(servers[victim].take());
    let killed_at = Instant::now();
    let served = serve_all(&sluice, proxy, 30, "right after the kill");
    let hidden_for = killed_at.elapsed();
    assert_eq!(count(&served, victim), 0, "{served:?}");
    let failures_hidden = metric(admin, &failures_key);
    assert!(
        failures_hidden >= 1.0,
        "no connect to the dead backend failed within {hidden_for:?}: the test did not \
         exercise the retry\n--- sluice stderr ---\n{}",
        sluice.stderr_text()
    );
    eprintln!(
        "workers {workers}: {failures_hidden} refused connects hidden by retries in {hidden_for:?}; \
         ejections {}",
        metric(
            admin,
            &backend_series("sluice_backend_ejections_total", "kill", dead)
        )
    );

    // fall x interval = 400 ms, plus jitter and margin.
    wait_state(&sluice, admin, "kill", dead, "down");
    assert_eq!(backend_up(admin, "kill", dead), 0.0);
    thread::sleep(ADOPT);
    let failures_down = metric(admin, &failures_key);
    let served = serve_all(&sluice, proxy, 30, "after the check marked it down");
    assert_eq!(count(&served, victim), 0, "{served:?}");
    assert!(
        count(&served, 0) >= 5 && count(&served, 2) >= 5,
        "{served:?}"
    );
    assert_eq!(
        metric(admin, &failures_key),
        failures_down,
        "connects to the down backend were still tried\n--- sluice stderr ---\n{}",
        sluice.stderr_text()
    );

    servers[victim] = Some(greeting_backend_on(dead, victim));
    // rise x interval = 400 ms, plus jitter and margin.
    wait_state(&sluice, admin, "kill", dead, "up");
    assert_eq!(backend_up(admin, "kill", dead), 1.0);
    thread::sleep(ADOPT);
    let served = serve_all(&sluice, proxy, 30, "after the restart");
    assert!(
        count(&served, victim) >= 5,
        "the restarted backend got {served:?}\n--- sluice stderr ---\n{}",
        sluice.stderr_text()
    );
    let log = transitions(&sluice, dead);
    assert!(
        log.iter().any(|l| l.contains("to=down")) && log.iter().any(|l| l.contains("to=up")),
        "the transitions of {dead} are not logged: {log:#?}"
    );
}

/// Both backends refuse: the first probe marks them down before the listener accepts, and each
/// of 1000 connections is then reset at once, without a connect to any backend.
fn all_backends_down_resets_every_connection_at_once(workers: usize) {
    let addrs = [refusing_addr(), refusing_addr()];
    let listener = Listener::new("down", &addrs)
        .with("health: { check: tcp, interval: 200ms, timeout: 200ms }");
    let proxy = listener.bind;
    let (sluice, admin) = start_with_admin(workers, &[listener]);
    // Probed once before accepting: no wait needed.
    for &backend in &addrs {
        assert_eq!(backend_up(admin, "down", backend), 0.0, "{backend}");
        assert_eq!(metric(admin, &state_series("down", backend, "down")), 1.0);
    }

    const ATTEMPTS: usize = 1000;
    const EACH: Duration = Duration::from_secs(1);
    const ALL: Duration = Duration::from_secs(30);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut resets = 0;
    for n in 0..ATTEMPTS {
        assert!(
            started.elapsed() < ALL,
            "{n} attempts took over {ALL:?}\n--- sluice stderr ---\n{}",
            sluice.stderr_text()
        );
        let attempt = Instant::now();
        let end = refused_at_once(proxy, EACH).unwrap_or_else(|e| panic!("attempt {n}: {e}"));
        let took = attempt.elapsed();
        assert!(took < EACH, "attempt {n} took {took:?}");
        slowest = slowest.max(took);
        resets += usize::from(end == StreamEnd::Reset);
    }
    eprintln!(
        "workers {workers}: {ATTEMPTS} attempts in {:?}, slowest {slowest:?}, {resets} reset",
        started.elapsed()
    );

    let no_backend = series(
        "sluice_connections_closed_total",
        &[("listener", "down"), ("reason", "no_backend")],
    );
    let counted = wait_metric(admin, &no_backend, ATTEMPTS as f64, STATE_TIMEOUT);
    assert_eq!(counted, Some(ATTEMPTS as f64), "{no_backend}");
    let connect_failed = series(
        "sluice_connections_closed_total",
        &[("listener", "down"), ("reason", "connect_failed")],
    );
    assert_eq!(metric(admin, &connect_failed), 0.0);
    for &backend in &addrs {
        let key = backend_series("sluice_backend_connect_failures_total", "down", backend);
        assert_eq!(metric(admin, &key), 0.0, "a down backend was tried: {key}");
    }
}

/// One connection to a listener that must reset it at once: how it ended (a reset may already
/// fail the connect, on loopback), with nothing received, within `timeout`.
fn refused_at_once(proxy: SocketAddr, timeout: Duration) -> Result<StreamEnd, String> {
    let attempt = Instant::now();
    let stream = match TcpStream::connect_timeout(&proxy, timeout) {
        Ok(stream) => stream,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(StreamEnd::Reset),
        Err(e) => return Err(format!("connect: {e}")),
    };
    let outcome = read_to_end(&stream, attempt + timeout);
    if !matches!(outcome.end, StreamEnd::Eof | StreamEnd::Reset) {
        return Err(format!("{:?} after {:?}", outcome.end, attempt.elapsed()));
    }
    if outcome.received.bytes > 0 {
        return Err(format!("received {} bytes", outcome.received.bytes));
    }
    Ok(outcome.end)
}

/// Backends that accept but fail a `send_expect` check that never matches are all down; with
/// `on_all_down: use_all` connections still reach both of them, greeting and all, while the
/// same backends behind a `reject` listener reset every connection.
fn all_backends_down_use_all_serves_and_reject_resets(workers: usize) {
    let servers = [greeting_backend(0), greeting_backend(1)];
    let addrs: Vec<SocketAddr> = servers.iter().map(EchoServer::addr).collect();
    let health = r#"health: { check: send_expect, send: "PING\r\n", expect: NEVER, interval: 100ms, timeout: 200ms }"#;
    let use_all = Listener::new("use_all", &addrs)
        .with(health)
        .with("on_all_down: use_all");
    let reject = Listener::new("reject", &addrs)
        .with(health)
        .with("on_all_down: reject");
    let (proxy_use_all, proxy_reject) = (use_all.bind, reject.bind);
    let (sluice, admin) = start_with_admin(workers, &[use_all, reject]);
    for listener in ["use_all", "reject"] {
        for &backend in &addrs {
            assert_eq!(
                backend_up(admin, listener, backend),
                0.0,
                "{listener} {backend}"
            );
        }
    }

    let served = serve_all(
        &sluice,
        proxy_use_all,
        20,
        "use_all with every backend down",
    );
    assert!(
        count(&served, 0) >= 5 && count(&served, 1) >= 5,
        "use_all did not balance over both backends: {served:?}"
    );

    for n in 0..20 {
        if let Err(e) = refused_at_once(proxy_reject, CONNECTION_TIMEOUT) {
            panic!("reject attempt {n}: {e}");
        }
    }
    let no_backend = series(
        "sluice_connections_closed_total",
        &[("listener", "reject"), ("reason", "no_backend")],
    );
    assert_eq!(
        wait_metric(admin, &no_backend, 20.0, STATE_TIMEOUT),
        Some(20.0)
    );
    let use_all_no_backend = series(
        "sluice_connections_closed_total",
        &[("listener", "use_all"), ("reason", "no_backend")],
    );
    assert_eq!(metric(admin, &use_all_no_backend), 0.0);
}

/// A primary and a `backup: true` backend: the backup gets nothing while the primary is up,
/// everything while it is down, and nothing again once it is back.
fn a_backup_serves_only_while_the_primary_is_down(workers: usize) {
    let mut primary = Some(greeting_backend(0));
    let backup = greeting_backend(1);
    let addrs = [primary.as_ref().unwrap().addr(), backup.addr()];
    let listener = Listener::new("backup", &addrs)
        .with("health: { check: tcp, interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }");
    let proxy = listener.bind;
    let admin = free_addr();
    let yaml = config(workers, Some(admin), &[], &[listener]);
    let short = format!("      - \"{}\"\n", addrs[1]);
    let long = format!("      - {{ address: \"{}\", backup: true }}\n", addrs[1]);
    assert!(yaml.contains(&short), "{yaml}");
    let sluice = start_yaml(&yaml.replace(&short, &long));

    let served = serve_all(&sluice, proxy, 20, "primary up");
    assert_eq!(
        count(&served, 0),
        20,
        "the backup served while the primary was up"
    );

    drop(primary.take());
    // Before any check notices, a connection the primary refuses is retried on the backup.
    let served = serve_all(&sluice, proxy, 20, "right after the primary died");
    assert_eq!(count(&served, 1), 20, "{served:?}");
    wait_state(&sluice, admin, "backup", addrs[0], "down");
    thread::sleep(ADOPT);
    let served = serve_all(&sluice, proxy, 20, "primary down");
    assert_eq!(count(&served, 1), 20, "{served:?}");

    primary = Some(greeting_backend_on(addrs[0], 0));
    wait_state(&sluice, admin, "backup", addrs[0], "up");
    thread::sleep(ADOPT);
    let served = serve_all(&sluice, proxy, 20, "primary back");
    assert_eq!(count(&served, 0), 20, "{served:?}");
    drop(primary);
}

/// What the server behind a fresh connection through `proxy` says: its role (the first
/// element of `ROLE`) and its `run_id` (from `INFO server`), or why it could not say.
fn role_and_run_id(proxy: SocketAddr) -> Result<(String, String), String> {
    let stream = TcpStream::connect_timeout(&proxy, CONNECTION_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(CONNECTION_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let role = redis_command(&stream, &["ROLE"]).map_err(|e| format!("ROLE: {e}"))?;
    let role = role
        .items()
        .first()
        .and_then(Reply::text)
        .ok_or_else(|| format!("ROLE answered {role:?}"))?;
    let info = redis_command(&stream, &["INFO", "server"]).map_err(|e| format!("INFO: {e}"))?;
    Ok((role, run_id(&info)?))
}

/// Two redis-servers, the second a replica of the first, behind `role: master`: every
/// connection reaches the master. Promote the replica and demote the master: within a few
/// intervals every new connection reaches the new master, which holds what was written
/// through Sluice before.
fn redis_role_master_follows_a_failover(workers: usize) {
    require_installed(&["redis-server"]);
    let first = RedisServer::start();
    let second = RedisServer::start_replica_of(first.addr());
    let (first_id, second_id) = (first.run_id(), second.run_id());
    let listener = Listener::new("redis", &[first.addr(), second.addr()]).with(
        "health: { check: redis, role: master, interval: 200ms, timeout: 500ms, rise: 1, fall: 1 }",
    );
    let proxy = listener.bind;
    let (sluice, _admin) = start_with_admin(workers, &[listener]);
    let failure = |what: String| -> String {
        format!(
            "{what}\n--- sluice stderr ---\n{}\n--- first redis ---\n{}\n--- second redis ---\n{}",
            sluice.stderr_text(),
            first.log(),
            second.log()
        )
    };
    let master = ("master".to_owned(), first_id.clone());
    for n in 0..20 {
        let seen = role_and_run_id(proxy).unwrap_or_else(|e| panic!("{}", failure(e)));
        assert_eq!(seen, master, "{}", failure(format!("connection {n}")));
    }

    // A key written through Sluice, replicated before the failover.
    let value = format!("written through sluice with {workers} worker(s)");
    let front = TcpStream::connect_timeout(&proxy, CONNECTION_TIMEOUT).unwrap();
    let set = redis_command(&front, &["SET", "failover:key", &value]).unwrap();
    assert_eq!(set, Reply::Status("OK".into()));
    drop(front);
    let deadline = Instant::now() + Duration::from_secs(10);
    while second
        .command(&["GET", "failover:key"])
        .ok()
        .and_then(|r| r.text())
        != Some(value.clone())
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            failure("the replica did not get the key within 10 s".into())
        );
        thread::sleep(Duration::from_millis(50));
    }

    let promoted = second.command(&["REPLICAOF", "NO", "ONE"]).unwrap();
    assert_eq!(promoted, Reply::Status("OK".into()));
    let (ip, port) = (
        second.addr().ip().to_string(),
        second.addr().port().to_string(),
    );
    let demoted = first.command(&["REPLICAOF", &ip, &port]).unwrap();
    assert!(matches!(demoted, Reply::Status(_)), "{demoted:?}");
    let switched = Instant::now();

    // A few intervals: wait for ten new connections in a row on the new master.
    let new_master = ("master".to_owned(), second_id);
    let deadline = switched + Duration::from_secs(10);
    let mut streak = 0;
    let mut last = Err(String::new());
    while streak < 10 {
        assert!(
            Instant::now() < deadline,
            "{}",
            failure(format!(
                "no ten connections in a row reached the new master within 10 s; last {last:?}"
            ))
        );
        last = role_and_run_id(proxy);
        if last.as_ref() == Ok(&new_master) {
            streak += 1;
        } else {
            streak = 0;
            thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!(
        "workers {workers}: every connection on the new master {:?} after the switch",
        switched.elapsed()
    );
    for n in 0..20 {
        let seen = role_and_run_id(proxy).unwrap_or_else(|e| panic!("{}", failure(e)));
        assert_eq!(
            seen,
            new_master,
            "{}",
            failure(format!("connection {n} after the failover"))
        );
    }
    let front = TcpStream::connect_timeout(&proxy, CONNECTION_TIMEOUT).unwrap();
    let got = redis_command(&front, &["GET", "failover:key"]).unwrap();
    assert_eq!(got.text(), Some(value));
    assert_ne!(first_id, new_master.1);
}

/// Echoes everything read on `stream` until EOF or an error (bounded by its read timeout).
fn echo_until_eof(mut stream: TcpStream) -> io::Result<u64> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut echoed = 0;
    let mut buffer = [0u8; 4096];
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            stream.shutdown(Shutdown::Write)?;
            return Ok(echoed);
        }
        stream.write_all(&buffer[..n])?;
        echoed += n as u64;
    }
}

/// Accepts connections on `listener` until one starts with `first` (the probes' connections
/// close without a byte), echoes `first` on it and returns it; all within `timeout`.
fn accept_client(listener: &TcpListener, first: &[u8], timeout: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        assert!(
            Instant::now() < deadline,
            "no connection sent {first:?} within {timeout:?}"
        );
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => panic!("accept: {e}"),
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut head = vec![0u8; first.len()];
        if stream.read_exact(&mut head).is_ok() && head == first {
            stream.write_all(first).unwrap();
            return stream;
        }
    }
}

/// Closes and reopens the listening socket on `addr` every `phase` until `stop`, at most for
/// `span`; while open, accepts the probes' connections and closes them. Returns the closes.
fn toggle(addr: SocketAddr, phase: Duration, span: Duration, stop: &AtomicBool) -> u32 {
    let end = Instant::now() + span;
    let mut closes = 0;
    while Instant::now() < end && !stop.load(Ordering::SeqCst) {
        thread::sleep(phase);
        let listener = match TcpListener::bind(addr) {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("toggle: bind {addr}: {e}");
                continue;
            }
        };
        listener.set_nonblocking(true).unwrap();
        let open_until = Instant::now() + phase;
        while Instant::now() < open_until {
            while let Ok((probe, _)) = listener.accept() {
                drop(probe);
            }
            thread::sleep(Duration::from_millis(5));
        }
        drop(listener);
        closes += 1;
    }
    closes
}

/// Writes `message` on `stream` and reads exactly its echo.
fn round_trip(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    stream.write_all(message)?;
    let mut echo = vec![0u8; message.len()];
    stream.read_exact(&mut echo)?;
    if echo != message {
        return Err(io::Error::other(format!(
            "echo {:?} instead of {:?}",
            String::from_utf8_lossy(&echo),
            String::from_utf8_lossy(message)
        )));
    }
    Ok(())
}

/// A backend whose listening socket closes and reopens every 100 ms for 4 s, checked every
/// 50 ms with `rise: 1, fall: 1`: undamped, each toggle would be two transitions. Flap damping
/// holds it down instead, so the transitions logged stay within `FlapDamping`'s documented
/// bound and well below the toggles. A connection established through Sluice before the
/// toggling keeps echoing throughout and after.
fn a_flapping_backend_is_damped_and_established_connections_survive(workers: usize) {
    let addr = free_addr();
    let backend = TcpListener::bind(addr).unwrap();
    let listener = Listener::new("flap", &[addr])
        .with("health: { check: tcp, interval: 50ms, timeout: 100ms, rise: 1, fall: 1 }");
    let proxy = listener.bind;
    let (sluice, admin) = start_with_admin(workers, &[listener]);
    let started = Instant::now();

    let mut client = TcpStream::connect_timeout(&proxy, CONNECTION_TIMEOUT).unwrap();
    client.set_read_timeout(Some(CONNECTION_TIMEOUT)).unwrap();
    let first = b"before the toggling\n";
    client.write_all(first).unwrap();
    let established = accept_client(&backend, first, CONNECTION_TIMEOUT);
    let mut echo = vec![0u8; first.len()];
    client.read_exact(&mut echo).unwrap();
    assert_eq!(echo, first);
    let echo = thread::spawn(move || echo_until_eof(established));
    // The toggler starts closed and reopens the socket on the same address, phase by phase.
    drop(backend);

    const SPAN: Duration = Duration::from_secs(4);
    let stop = Arc::new(AtomicBool::new(false));
    let toggler = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || toggle(addr, Duration::from_millis(100), SPAN, &stop))
    };
    let mut sent = 0;
    let deadline = Instant::now() + SPAN + Duration::from_secs(5);
    while !toggler.is_finished() {
        if Instant::now() >= deadline {
            stop.store(true, Ordering::SeqCst);
            panic!("the toggler ran past its span");
        }
        let message = format!("message {sent} during the toggling\n");
        if let Err(e) = round_trip(&mut client, message.as_bytes()) {
            stop.store(true, Ordering::SeqCst);
            panic!(
                "the established connection broke after {sent} messages: {e}\n\
                 --- sluice stderr ---\n{}",
                sluice.stderr_text()
            );
        }
        sent += 1;
        thread::sleep(Duration::from_millis(50));
    }
    let closes = toggler.join().unwrap();
    let span = started.elapsed();
    let log = transitions(&sluice, addr);

    for n in 0..5 {
        round_trip(&mut client, format!("message {n} after\n").as_bytes())
            .unwrap_or_else(|e| panic!("after the toggling, message {n}: {e}"));
    }
    assert!(sent >= 20, "only {sent} messages during the toggling");

    let bound = FlapDamping::default().transitions_max(span);
    eprintln!(
        "workers {workers}: {} transitions over {span:?} (bound {bound}), {closes} closes, \
         {sent} messages echoed meanwhile",
        log.len()
    );
    assert!(
        log.len() as u64 <= bound,
        "{} transitions over {span:?}, above the documented bound {bound}:\n{log:#?}",
        log.len()
    );
    assert!(
        closes >= 10,
        "the toggler closed the socket only {closes} times"
    );
    assert!(
        (log.len() as u32) < closes,
        "{} transitions for {closes} closes: not damped\n{log:#?}",
        log.len()
    );
    assert!(
        log.iter().any(|l| l.contains("to=flapping")),
        "no transition to flapping:\n{log:#?}"
    );
    assert_eq!(metric(admin, &state_series("flap", addr, "flapping")), 1.0);
    let active = series("sluice_connections_active", &[("listener", "flap")]);
    assert_eq!(metric(admin, &active), 1.0, "{active}");

    client.shutdown(Shutdown::Write).unwrap();
    let rest = read_to_end(&client, Instant::now() + CONNECTION_TIMEOUT);
    assert_eq!(rest.end, StreamEnd::Eof);
    assert_eq!(rest.received.bytes, 0);
    let echoed = echo
        .join()
        .unwrap()
        .expect("the backend side of the connection");
    assert!(echoed > 0);
}

/// `slow_start`: a backend that comes back starts at a tenth of its weight and reaches all of
/// it at the end of the ramp; round-robin follows the effective weight.
fn slow_start_ramps_a_returning_backend(workers: usize) {
    const RAMP: Duration = Duration::from_secs(3);
    let steady = greeting_backend(0);
    let mut returning = Some(greeting_backend(1));
    let addrs = [steady.addr(), returning.as_ref().unwrap().addr()];
    let listener = Listener::new("ramp", &addrs)
        .with("health: { check: tcp, interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }")
        .with(&format!("slow_start: {}ms", RAMP.as_millis()));
    let proxy = listener.bind;
    let (sluice, admin) = start_with_admin(workers, &[listener]);
    let weight = backend_series("sluice_backend_weight_effective", "ramp", addrs[1]);
    // Up since start: no ramp.
    assert_eq!(metric(admin, &weight), 1.0);

    drop(returning.take());
    wait_state(&sluice, admin, "ramp", addrs[1], "down");
    returning = Some(greeting_backend_on(addrs[1], 1));
    wait_state(&sluice, admin, "ramp", addrs[1], "up");
    let back = Instant::now();
    thread::sleep(ADOPT);
    let early = metric(admin, &weight);
    let served = serve_all(&sluice, proxy, 40, "early in the ramp");
    assert!(
        back.elapsed() < RAMP / 2,
        "the early checks took half the ramp"
    );
    assert!(early < 0.5, "effective weight {early} early in the ramp");
    // About 0.1-0.3 : 1 early on; an unramped backend would get 20 of 40.
    assert!(count(&served, 1) <= 12, "{served:?}");

    let deadline = Instant::now() + RAMP + STATE_TIMEOUT;
    while metric(admin, &weight) < 1.0 {
        assert!(Instant::now() < deadline, "the ramp did not end");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(back.elapsed() >= RAMP - Duration::from_millis(300));
    thread::sleep(ADOPT);
    let served = serve_all(&sluice, proxy, 40, "after the ramp");
    assert!(count(&served, 1) >= 14, "{served:?}");
    drop(returning);
}
