//! The admin endpoint: `/healthz`, and `/metrics` counting exactly what a test did.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Listener, TIMEOUT, binary, config};
use sluice_testkit::{
    EchoServer, Sluice, assert_echo, free_addr, http_get, refusing_addr, scrape_metrics, series,
    wait_metric,
};

with_workers_1_and_2!(
    healthz_answers_ok,
    metrics_count_connections_and_bytes_exactly,
    metrics_count_connect_failures,
);

/// How long counters may lag behind what the client saw (a close is counted after the client's EOF).
const SETTLE: Duration = Duration::from_secs(5);

fn start_with_admin(workers: usize, listener: &Listener) -> (Sluice, SocketAddr) {
    let admin = free_addr();
    let sluice = Sluice::start(
        binary(),
        &config(workers, Some(admin), &[], std::slice::from_ref(listener)),
    );
    (sluice, admin)
}

/// Sum of every series of `name` whose labels include `listener="NAME"`.
fn sum_for_listener(metrics: &HashMap<String, f64>, name: &str, listener: &str) -> f64 {
    let prefix = format!("{name}{{");
    let label = format!("listener=\"{listener}\"");
    metrics
        .iter()
        .filter(|(key, _)| key.starts_with(&prefix) && key.contains(&label))
        .map(|(_, value)| value)
        .sum()
}

fn healthz_answers_ok(workers: usize) {
    let backend = EchoServer::echo();
    let (_sluice, admin) = start_with_admin(workers, &Listener::new("health", &[backend.addr()]));
    let response = http_get(admin, "/healthz").unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body.trim(), "ok");
}

/// N connections over two backends, each echoing a different, known number of bytes: accepted,
/// closed, per-backend connections and bytes both ways equal what the test did, per backend.
fn metrics_count_connections_and_bytes_exactly(workers: usize) {
    let backends = [EchoServer::echo(), EchoServer::echo()];
    let listener = Listener::new("counted", &[backends[0].addr(), backends[1].addr()]);
    let (sluice, admin) = start_with_admin(workers, &listener);
    let connections: u64 = 10;
    let mut total = 0;
    for i in 0..connections {
        let bytes = 50_000 + i * 7_777;
        assert_echo(listener.bind, bytes, 500 + i, TIMEOUT);
        total += bytes;
    }
    let closed_key = series(
        "sluice_connections_closed_total",
        &[("listener", "counted")],
    );
    // The closed counter carries a `reason` label: wait on the sum over reasons.
    let deadline = std::time::Instant::now() + SETTLE;
    let metrics = loop {
        let metrics = scrape_metrics(admin).unwrap();
        let closed = sum_for_listener(&metrics, "sluice_connections_closed_total", "counted");
        if closed == connections as f64 || std::time::Instant::now() >= deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let listener_key = |name: &str| series(name, &[("listener", "counted")]);
    let get = |key: &str| metrics.get(key).copied();
    let dump = || {
        let mut lines: Vec<String> = metrics.iter().map(|(k, v)| format!("{k} {v}")).collect();
        lines.sort();
        lines.join("\n")
    };
    assert_eq!(
        get(&listener_key("sluice_connections_accepted_total")),
        Some(connections as f64),
        "{}",
        dump()
    );
    // Each worker reports its own accepts (a missing worker reads NaN and fails the sum).
    let worker_key = |w: usize| {
        series(
            "sluice_worker_connections_accepted_total",
            &[("worker", &w.to_string())],
        )
    };
    let per_worker: Vec<f64> = (0..workers)
        .map(|w| get(&worker_key(w)).unwrap_or(f64::NAN))
        .collect();
    assert_eq!(
        per_worker.iter().sum::<f64>(),
        connections as f64,
        "per worker {per_worker:?}\n{}",
        dump()
    );
    assert_eq!(get(&worker_key(workers)), None, "{}", dump());
    assert_eq!(
        sum_for_listener(&metrics, "sluice_connections_closed_total", "counted"),
        connections as f64,
        "closed over all reasons ({closed_key} without reason); all series:\n{}",
        dump()
    );
    assert_eq!(
        get(&listener_key("sluice_connections_active")),
        Some(0.0),
        "{}",
        dump()
    );
    assert_eq!(
        get(&listener_key("sluice_connections_rejected_total")).unwrap_or(0.0),
        0.0,
        "{}",
        dump()
    );
    assert_eq!(
        sum_for_listener(&metrics, "sluice_bytes_to_backend_total", "counted"),
        total as f64,
        "{}",
        dump()
    );
    assert_eq!(
        sum_for_listener(&metrics, "sluice_bytes_to_client_total", "counted"),
        total as f64,
        "{}",
        dump()
    );
    for backend in &backends {
        let address = backend.addr().to_string();
        let labels = [("listener", "counted"), ("backend", address.as_str())];
        let records = backend.records();
        let received: u64 = records.iter().map(|record| record.received.bytes).sum();
        let sent: u64 = records.iter().map(|record| record.sent).sum();
        assert_eq!(records.len() as u64, backend.accepted());
        assert_eq!(
            get(&series("sluice_backend_connections_total", &labels)).unwrap_or(0.0),
            backend.accepted() as f64,
            "{address}\n{}",
            dump()
        );
        assert_eq!(
            get(&series("sluice_bytes_to_backend_total", &labels)).unwrap_or(0.0),
            received as f64,
            "{address}\n{}",
            dump()
        );
        assert_eq!(
            get(&series("sluice_bytes_to_client_total", &labels)).unwrap_or(0.0),
            sent as f64,
            "{address}\n{}",
            dump()
        );
    }
    drop(sluice);
}

/// A refusing first backend: its connect failures are counted, and the connections that were
/// retried onto the working backend are counted there as successful connects.
fn metrics_count_connect_failures(workers: usize) {
    let refusing = refusing_addr();
    let backend = EchoServer::echo();
    let listener = Listener::new("failing", &[refusing, backend.addr()]).with("retries: 1");
    let (_sluice, admin) = start_with_admin(workers, &listener);
    for seed in 0..4 {
        assert_echo(listener.bind, 1000, seed, TIMEOUT);
    }
    let working = backend.addr().to_string();
    let refusing = refusing.to_string();
    let key = series(
        "sluice_backend_connections_total",
        &[("listener", "failing"), ("backend", &working)],
    );
    assert_eq!(wait_metric(admin, &key, 4.0, SETTLE), Some(4.0));
    let metrics = scrape_metrics(admin).unwrap();
    let failures_key = series(
        "sluice_backend_connect_failures_total",
        &[("listener", "failing"), ("backend", &refusing)],
    );
    let failures = metrics.get(&failures_key).copied().unwrap_or(0.0);
    // Round robin per worker picks the refusing backend first for every other connection.
    assert!(
        (1.0..=4.0).contains(&failures),
        "{failures_key} = {failures}"
    );
    let ok_on_refusing = series(
        "sluice_backend_connections_total",
        &[("listener", "failing"), ("backend", &refusing)],
    );
    assert_eq!(metrics.get(&ok_on_refusing).copied().unwrap_or(0.0), 0.0);
}
