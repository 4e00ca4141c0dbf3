//! Probe hygiene over a long run: ten minutes of probing on tokio's paused clock against a
//! backend that accepts and never answers, in the control plane's loop (sleep `interval`, probe
//! with `timeout`, repeat), with `timeout` above `interval` so each probe waits for the one
//! before. Sampled every simulated second, the process holds no descriptor beyond one per probe
//! in flight (and the fake backend's side of each connection, which it counts), and at the end
//! exactly the descriptors it held before. In its own binary, because it counts the process's
//! descriptors and no other test may open any meanwhile.
//!
//! How the paused clock meets real sockets: the runtime advances the clock to the next timer
//! only when it is idle, after polling the I/O driver without blocking. On loopback, a connect,
//! a write and a close take effect inside the system call, so their readiness events are
//! already there when the runtime next polls; a backend that never answers leaves the runtime
//! idle, and each probe's timeout fires after exactly one simulated second.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sluice_health::{Check, Expect, PostgresRole, RedisRole};
use sluice_probe::{Outcome, Prober};
use support::fake::{Behavior, FakeServer};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The control plane's settings under test: a sub-second interval and a longer timeout.
const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_secs(1);
/// Simulated time the loops run.
const RUN: Duration = Duration::from_secs(600);
/// How often the descriptors are counted, in simulated time.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Probes one loop against the silent backend makes: one per `INTERVAL + TIMEOUT`.
const TIMED_OUT_PER_LOOP: usize =
    (RUN.as_millis() / (INTERVAL.as_millis() + TIMEOUT.as_millis())) as usize;
/// Real time the run may take: it takes a few seconds; this catches a clock that does not
/// advance by itself (the run would then take ten real minutes).
const WALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One control-plane loop's results.
#[derive(Debug, Default)]
struct Tally {
    probes: usize,
    passed: usize,
    timed_out: usize,
}

#[tokio::test(start_paused = true)]
async fn ten_simulated_minutes_leave_no_descriptor_beyond_the_probes_in_flight() {
    let wall = std::time::Instant::now();
    let backend = FakeServer::start(Behavior::Silent).await;
    let probers = probers();
    // Warm up: whatever a first probe of each kind sets up exists before the baseline.
    for prober in &probers {
        prober.probe(backend.addr, TIMEOUT).await;
    }
    settle(&backend).await;
    let baseline = open_fds();

    let in_flight = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut loops = JoinSet::new();
    for (index, prober) in probers.iter().enumerate() {
        let (prober, in_flight) = (Arc::clone(prober), Arc::clone(&in_flight));
        let addr = backend.addr;
        loops.spawn(async move {
            let mut tally = Tally::default();
            while started.elapsed() < RUN {
                tokio::time::sleep(INTERVAL).await;
                in_flight.fetch_add(1, Ordering::SeqCst);
                let outcome = prober.probe(addr, TIMEOUT).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                tally.add(&outcome);
            }
            (index, tally)
        });
    }

    // The runtime has one thread, so each sample sees every task between two of its polls: a
    // probe's socket exists only while it counts as in flight, and the backend's side of a
    // connection only while it counts as open.
    let (mut samples, mut most_in_flight, mut most_above_baseline) = (0, 0, 0);
    let mut tallies = Vec::new();
    while !loops.is_empty() && started.elapsed() < RUN + TIMEOUT * 2 {
        tokio::time::sleep(SAMPLE_EVERY).await;
        let (fds, probes, accepted) =
            (open_fds(), in_flight.load(Ordering::SeqCst), backend.open());
        assert!(
            fds <= baseline + probes + accepted,
            "at {:?}: {fds} descriptors open, {baseline} before, {probes} probes in flight, \
             {accepted} connections held by the backend",
            started.elapsed()
        );
        assert!(
            wall.elapsed() < WALL_TIMEOUT,
            "{:?} simulated in {:?}",
            started.elapsed(),
            wall.elapsed()
        );
        samples += 1;
        most_in_flight = most_in_flight.max(probes);
        most_above_baseline = most_above_baseline.max(fds.saturating_sub(baseline + accepted));
        while let Some(done) = loops.try_join_next() {
            tallies.push(done.expect("probe loop"));
        }
    }
    tallies.extend(loops.join_all().await);
    tallies.sort_by_key(|(index, _)| *index);
    let tallies: Vec<Tally> = tallies.into_iter().map(|(_, tally)| tally).collect();
    let simulated = started.elapsed();
    let after = settle(&backend).await;
    eprintln!(
        "{simulated:?} simulated in {:?}: {samples} samples, at most {most_in_flight} probes \
         in flight and {most_above_baseline} descriptors above the baseline; {tallies:?}",
        wall.elapsed()
    );

    assert!(
        after <= baseline,
        "{after} descriptors open after the run, {baseline} before"
    );
    // The run happened as intended: ten simulated minutes, quickly, and the samples saw
    // probes in flight (otherwise the bound above says nothing).
    assert!(simulated >= RUN, "{simulated:?}");
    assert!(samples >= RUN.as_secs() as usize, "{samples} samples");
    assert!(most_in_flight >= 2, "{most_in_flight}");
    assert!(most_above_baseline >= 1, "{most_above_baseline}");
    // The tcp check passes at once, so its loop makes more probes than the others. (A connect
    // whose completion the kernel had not yet reported when the runtime went idle would time
    // out instead; on loopback that is rare, hence the loose bound on passes.)
    let (tcp, silent) = tallies.split_first().expect("a tcp loop");
    assert!(tcp.probes >= TIMED_OUT_PER_LOOP, "{tcp:?}");
    assert!(tcp.passed >= tcp.probes / 2, "{tcp:?}");
    // Every other check waits for an answer that never comes: each probe times out, after one
    // simulated second, so each loop makes one probe per `INTERVAL + TIMEOUT`.
    for tally in silent {
        assert_eq!(tally.timed_out, tally.probes, "{tally:?}");
        assert!(
            tally.probes >= TIMED_OUT_PER_LOOP - 5 && tally.probes <= TIMED_OUT_PER_LOOP + 5,
            "{tally:?}, expected about {TIMED_OUT_PER_LOOP}"
        );
    }
}

impl Tally {
    fn add(&mut self, outcome: &Outcome) {
        self.probes += 1;
        match outcome.failure() {
            None => self.passed += 1,
            Some(failure) if failure.to_string().starts_with("timed out") => self.timed_out += 1,
            Some(_) => {}
        }
    }
}

/// One prober per check, the `tcp` one first.
fn probers() -> Vec<Arc<Prober>> {
    let checks = [
        Check::Tcp,
        Check::SendExpect {
            send: b"PING\r\n".to_vec(),
            expect: Expect::Prefix(b"+PONG".to_vec()),
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

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// Lets the backend see every closed probe's EOF and drop its side (at most 1000 turns of 10
/// simulated ms); returns the descriptors then open.
async fn settle(backend: &FakeServer) -> usize {
    for _ in 0..1000 {
        if backend.open() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(backend.open(), 0, "the backend still holds connections");
    open_fds()
}
