//! Probe hygiene: whatever the backend does, a probe leaves no socket or file descriptor
//! behind. One test in its own binary, so that no other test opens descriptors meanwhile.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_health::{Check, Expect, PostgresRole, RedisRole};
use sluice_probe::Prober;
use support::fake::{Behavior, FakeServer};
use tokio::task::JoinSet;
use tokio::time::Instant;

const PROBES_PER_BACKEND: usize = 200;
const TIMEOUT: Duration = Duration::from_millis(50);

/// Descriptors the test itself may open meanwhile (none expected).
const SLACK: usize = 2;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

fn probers() -> Vec<Arc<Prober>> {
    let checks = [
        Check::Tcp,
        Check::SendExpect {
            send: b"PING\r\n".to_vec(),
            expect: Expect::Regex("^\\+PONG".to_owned()),
        },
        Check::Http {
            path: "/readyz".to_owned(),
            host: "example.com".to_owned(),
            status: 200..=399,
            port: None,
        },
        Check::Redis {
            role: Some(RedisRole::Master),
            password_file: None,
        },
        Check::Postgres {
            role: Some(PostgresRole::Primary),
            user: "sluice".to_owned(),
            database: "postgres".to_owned(),
            password_file: None::<PathBuf>,
        },
    ];
    checks
        .iter()
        .map(|check| Arc::new(Prober::new(check).unwrap()))
        .collect()
}

#[tokio::test]
async fn probes_leave_no_descriptor_behind() {
    let backends = [
        FakeServer::start(Behavior::Silent).await,
        FakeServer::start(Behavior::Endless(b"garbage ".repeat(512))).await,
        FakeServer::start(Behavior::Reply(b"\x00\xff garbage\r\n".to_vec())).await,
        FakeServer::start(Behavior::CloseAtOnce).await,
    ];
    let probers = probers();
    // Warm up: the runtime's timer and I/O driver exist before the baseline is taken.
    probers[0].probe(backends[0].addr, TIMEOUT).await;
    settle(open_fds()).await;
    let baseline = open_fds();

    let started = Instant::now();
    let mut probes = JoinSet::new();
    let mut timed_out = 0;
    for (n, prober) in probers.iter().cycle().take(PROBES_PER_BACKEND).enumerate() {
        for backend in &backends {
            let prober = Arc::clone(prober);
            let addr = backend.addr;
            probes.spawn(async move { prober.probe(addr, TIMEOUT).await });
        }
        // Probes dropped while in flight (a control plane shutting down) must close too.
        if n % 10 == 0 {
            let prober = Arc::clone(prober);
            let addr = backends[0].addr;
            let handle =
                tokio::spawn(async move { prober.probe(addr, Duration::from_secs(60)).await });
            tokio::time::sleep(Duration::from_millis(1)).await;
            handle.abort();
        }
    }
    while let Some(outcome) = probes.join_next().await {
        let outcome = outcome.expect("probe task");
        if outcome
            .failure()
            .is_some_and(|f| f.to_string().starts_with("timed out"))
        {
            timed_out += 1;
        }
        assert!(outcome.latency() < TIMEOUT * 20, "{:?}", outcome.latency());
    }
    // The silent backend alone makes at least every non-tcp probe time out.
    assert!(
        timed_out >= PROBES_PER_BACKEND * 4 / 5,
        "{timed_out} timed out"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    let after = settle(baseline).await;
    assert!(
        after <= baseline + SLACK,
        "{after} descriptors open after the probes, {baseline} before"
    );
}

/// Waits (at most 5 s) until the fake servers have seen every probe's close and dropped their
/// side, i.e. until the count is back at `baseline`; returns the last count.
async fn settle(baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = open_fds();
        if now <= baseline || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
