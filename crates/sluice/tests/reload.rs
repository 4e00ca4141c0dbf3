//! SIGHUP reloads through the real binary: backends added, removed and set to weight 0, their
//! established connections drained until `drain_timeout`, and bad files that change nothing.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{EchoServer, Signal, Sluice, free_addr, scrape_metrics, series};

/// The drain time of every test here: long enough to check that drained connections still
/// work right after the reload, short enough to keep the tests quick.
const DRAIN: Duration = Duration::from_secs(2);

with_workers_1_and_2!(
    removed_backend_drains_then_closes,
    weight_zero_drains_like_removal,
    added_backend_takes_traffic,
    bad_file_changes_nothing,
);

/// Backends that greet every connection with their index, then echo.
fn greeting_backends(count: usize) -> Vec<EchoServer> {
    (0..count)
        .map(|i| EchoServer::greeting(format!("backend-{i}\n").as_bytes()))
        .collect()
}

/// A connection through Sluice and the index of the backend that greeted it.
fn connect(proxy: SocketAddr) -> (TcpStream, usize) {
    let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(10)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 10];
    stream
        .read_exact(&mut greeting)
        .expect("a backend's greeting");
    let text = std::str::from_utf8(&greeting).unwrap();
    let index = text
        .strip_prefix("backend-")
        .and_then(|rest| rest.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("unexpected greeting {text:?}"));
    (stream, index)
}

/// Whether `stream` still carries bytes both ways.
fn echoes(stream: &mut TcpStream) -> bool {
    if stream.write_all(b"ping").is_err() {
        return false;
    }
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).is_ok() && &echo == b"ping"
}

/// Waits (bounded) until the peer closes `stream`: EOF or a reset on read.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

struct Setup {
    sluice: Sluice,
    proxy: SocketAddr,
    admin: SocketAddr,
    servers: Vec<EchoServer>,
    workers: usize,
}

impl Setup {
    /// Sluice in front of `count` greeting backends, all listed.
    fn start(workers: usize, count: usize) -> Self {
        let servers = greeting_backends(count);
        let admin = free_addr();
        let listener = Self::listener(&servers, &[], free_addr());
        let proxy = listener.bind;
        let yaml = config(workers, Some(admin), &[], &[listener]);
        let sluice = Sluice::start(binary(), &yaml);
        Setup {
            sluice,
            proxy,
            admin,
            servers,
            workers,
        }
    }

    fn listener(servers: &[EchoServer], weights: &[u16], bind: SocketAddr) -> Listener {
        let addrs: Vec<SocketAddr> = servers.iter().map(EchoServer::addr).collect();
        let mut listener = Listener::new("reload", &addrs)
            .bind(bind)
            .with(&format!("drain_timeout: {}ms", DRAIN.as_millis()));
        if !weights.is_empty() {
            listener = listener.weights(weights);
        }
        listener
    }

    /// Rewrites the config with `servers` (a subset or superset, with `weights`), sends
    /// SIGHUP and waits for the reload to be applied.
    fn reload_with(&self, servers: &[&EchoServer], weights: &[u16]) {
        let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
        let mut listener = Listener::new("reload", &addrs)
            .bind(self.proxy)
            .with(&format!("drain_timeout: {}ms", DRAIN.as_millis()));
        if !weights.is_empty() {
            listener = listener.weights(weights);
        }
        let yaml = config(self.workers, Some(self.admin), &[], &[listener]);
        self.reload_text(&yaml, "reloaded");
    }

    /// Writes `yaml` as the config file, sends SIGHUP, and waits for one more `marker` line.
    fn reload_text(&self, yaml: &str, marker: &str) {
        let path = self.sluice.config_path().expect("a config file");
        let before = self.sluice.stderr_text().matches(marker).count();
        std::fs::write(path, yaml).unwrap();
        self.sluice.signal(Signal::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.sluice.stderr_text().matches(marker).count() == before {
            assert!(
                Instant::now() < deadline,
                "no {marker:?} after SIGHUP:\n{}",
                self.sluice.stderr_text()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Connections until `wanted` of them reached backend `index` (bounded); all are kept.
    fn hold_on(&self, index: usize, wanted: usize) -> Vec<(TcpStream, usize)> {
        let mut held = Vec::new();
        for _ in 0..50 {
            held.push(connect(self.proxy));
            if held.iter().filter(|(_, i)| *i == index).count() >= wanted {
                return held;
            }
        }
        panic!("50 connections reached backend {index} fewer than {wanted} times");
    }

    fn closed_drained(&self) -> f64 {
        let metrics = scrape_metrics(self.admin).unwrap();
        let key = series(
            "sluice_connections_closed_total",
            &[("listener", "reload"), ("reason", "drained")],
        );
        metrics.get(&key).copied().unwrap_or(0.0)
    }
}

/// Removed by a reload: no new connection reaches the backend, its established ones keep
/// working until `drain_timeout`, then they are closed; the other backend's stay open.
fn removed_backend_drains_then_closes(workers: usize) {
    let setup = Setup::start(workers, 2);
    let held = setup.hold_on(1, 2);
    setup.reload_with(&[&setup.servers[0]], &[]);
    drain_and_check(&setup, held, 1);
}

/// Weight 0 by a reload: the same as removal, but the backend stays listed.
fn weight_zero_drains_like_removal(workers: usize) {
    let setup = Setup::start(workers, 2);
    let held = setup.hold_on(1, 2);
    setup.reload_with(&[&setup.servers[0], &setup.servers[1]], &[1, 0]);
    drain_and_check(&setup, held, 1);
}

fn drain_and_check(setup: &Setup, mut held: Vec<(TcpStream, usize)>, drained: usize) {
    let reloaded = Instant::now();
    for _ in 0..20 {
        let (_, index) = connect(setup.proxy);
        assert_ne!(
            index, drained,
            "a new connection reached the draining backend"
        );
    }
    for (stream, index) in &mut held {
        assert!(
            echoes(stream),
            "backend {index}'s connection broke before drain_timeout"
        );
    }
    assert!(
        reloaded.elapsed() < DRAIN,
        "the checks above took the whole drain time"
    );
    let on_drained = held.iter().filter(|(_, i)| *i == drained).count();
    for (stream, index) in &mut held {
        if *index == drained {
            let limit = DRAIN + Duration::from_secs(5);
            assert!(closed_within(stream, limit), "not closed at drain_timeout");
        }
    }
    assert!(
        reloaded.elapsed() >= DRAIN - Duration::from_millis(100),
        "closed before drain_timeout ({:?})",
        reloaded.elapsed()
    );
    for (stream, index) in &mut held {
        if *index != drained {
            assert!(
                echoes(stream),
                "backend {index}'s connection was closed too"
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while setup.closed_drained() < on_drained as f64 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(setup.closed_drained(), on_drained as f64);
}

/// Added by a reload: new connections reach it.
fn added_backend_takes_traffic(workers: usize) {
    let setup = Setup::start(workers, 1);
    let extra = EchoServer::greeting(b"backend-1\n");
    setup.reload_with(&[&setup.servers[0], &extra], &[]);
    let reached = (0..20).filter(|_| connect(setup.proxy).1 == 1).count();
    assert!(
        reached >= 5,
        "the added backend got {reached} of 20 connections"
    );
    let metrics = scrape_metrics(setup.admin).unwrap();
    let up = series(
        "sluice_backend_up",
        &[
            ("listener", "reload"),
            ("backend", &extra.addr().to_string()),
        ],
    );
    assert_eq!(metrics.get(&up), Some(&1.0));
}

/// A file that does not load: errors logged with file:line, nothing changes, and a good
/// reload afterwards still works.
fn bad_file_changes_nothing(workers: usize) {
    let setup = Setup::start(workers, 2);
    let yaml = "listeners:\n  - name: reload\n    bind: 1\n";
    setup.reload_text(yaml, "reload rejected");
    let stderr = setup.sluice.stderr_text();
    let path = setup.sluice.config_path().unwrap().display().to_string();
    assert!(
        stderr.contains(&format!("{path}:3:11: listeners[0].bind")),
        "{stderr}"
    );
    let reached: std::collections::HashSet<usize> =
        (0..20).map(|_| connect(setup.proxy).1).collect();
    assert_eq!(reached.len(), 2, "both backends still serve: {reached:?}");
    setup.reload_with(&[&setup.servers[1]], &[]);
    for _ in 0..10 {
        assert_eq!(connect(setup.proxy).1, 1);
    }
}
