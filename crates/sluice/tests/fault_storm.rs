//! Issue 6, "connection storm": new connections at a fixed rate, each a short echo of 1 KiB.
//! The highest rate this harness sustains against the echo backend directly is measured first,
//! in the same run; then half that rate goes through Sluice for 10 s: at least 99.9% succeed,
//! the kernel spreads the accepts across the workers within 20% (the per-worker accept counters
//! of `/metrics`), and Sluice's descriptors are back to their baseline soon after the storm.
//!
//! Why half: on loopback every proxied connection is two TCP connections on the same cores
//! (client to Sluice, Sluice to backend), so the kernel's work per connection doubles, and that
//! work is most of the cost (perf: 81% of Sluice's samples are kernel TCP paths, shutdown and
//! io_uring_enter). At the full direct rate the storm only measures whether the machine has a
//! second machine's worth of idle CPU: on two shared cores it saturates and fails (6000/s: 25%
//! to 59% succeeded; 4000/s: 100%). The figure reports both rates.
//!
//! The generator is open loop: connection k is due at `k / rate` seconds after the start,
//! whenever the ones before it finish, and it succeeds only when its echo is back and checked
//! within `DUE_TIMEOUT` of that due time (so queueing counts against it). A fixed pool of
//! threads takes the connections in order.
//!
//! Ephemeral ports: tens of thousands of loopback connections in seconds would leave the
//! client side short of ports (each client close leaves a TIME_WAIT socket for 60 s). Each
//! client socket binds a distinct source address of 127.0.0.0/8 before it connects, so every
//! address uses a handful of ports at most, and closes are ordinary FINs. (Sluice's own
//! connections to the backend, also in TIME_WAIT after the storm, connect without binding and
//! may reuse such ports: Linux's `tcp_tw_reuse` default of 2 allows it on loopback.)

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{EchoServer, Sluice, figure, free_addr, scrape_metrics, series, tiered};
use socket2::{Domain, Protocol, Socket, Type};

/// Bytes each connection echoes.
const PAYLOAD: usize = 1024;
/// A connection succeeds when its echo is back and checked this long after it was due.
const DUE_TIMEOUT: Duration = Duration::from_secs(2);
/// Threads of the generator: each runs one connection at a time.
const THREADS: usize = 16;
/// Rates tried against the backend directly, in connections per second, lowest first; the ramp
/// stops at the first one the harness does not sustain.
const RAMP: [u32; 9] = [250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000];
/// How long each step of the ramp lasts.
const RAMP_STEP: Duration = Duration::from_secs(1);
/// A ramp step is sustained when at least this fraction succeeds...
const SUSTAINED_SUCCESS: f64 = 0.999;
/// ...and no connection of it starts later than this after it was due.
const SUSTAINED_LAG: Duration = Duration::from_millis(250);
/// The storm's rate, as a share of the direct rate (see the top of the file).
const STORM_SHARE_OF_DIRECT: u32 = 2;
/// The storm's pass figures.
const STORM_SUCCESS_MIN: f64 = 0.999;
const SPREAD_MAX: f64 = 0.20;
/// How soon after the storm Sluice's descriptors must be back to their baseline.
const FDS_BACK_WITHIN: Duration = Duration::from_secs(5);

#[test]
fn connection_storm_at_half_the_direct_rate() {
    let backend = EchoServer::echo();
    let (direct, ramp) = direct_rate(backend.addr());
    let rate = direct / STORM_SHARE_OF_DIRECT;
    let duration = Duration::from_secs(tiered(10, 30));
    let two = storm_through_sluice(2, backend.addr(), rate, duration);
    let short = tiered(duration / 2, duration);
    let one = storm_through_sluice(1, backend.addr(), rate, short);
    figure(
        &format!(
            "connection storm {} s at half the direct rate, workers 2",
            duration.as_secs()
        ),
        ">= 99.9% succeed; workers within 20%; fds back within 5 s",
        &format!("direct {direct}/s (ramp: {ramp}); {two}"),
    );
    figure(
        &format!(
            "connection storm {} s at half the direct rate, workers 1",
            short.as_secs()
        ),
        ">= 99.9% succeed; fds back within 5 s",
        &one,
    );
}

/// The highest rate of [`RAMP`] that the harness sustains against `backend` directly, and the
/// ramp's steps as text (`rate: success%`).
fn direct_rate(backend: SocketAddr) -> (u32, String) {
    let mut sustained = None;
    let mut steps = Vec::new();
    for rate in RAMP {
        let tally = storm(backend, rate, RAMP_STEP);
        steps.push(format!(
            "{rate}/s {:.2}% late {} ms",
            100.0 * tally.success(),
            tally.lag.as_millis()
        ));
        if tally.success() < SUSTAINED_SUCCESS || tally.lag > SUSTAINED_LAG {
            break;
        }
        sustained = Some(rate);
    }
    let steps = steps.join(", ");
    let rate = sustained.unwrap_or_else(|| {
        panic!(
            "the harness does not sustain even {}/s directly: {steps}",
            RAMP[0]
        )
    });
    (rate, steps)
}

/// Runs the storm through a fresh Sluice with `workers`, asserts the pass figures and returns
/// the measured ones as text.
fn storm_through_sluice(
    workers: usize,
    backend: SocketAddr,
    rate: u32,
    duration: Duration,
) -> String {
    let admin = free_addr();
    let listener = Listener::new("storm", &[backend]);
    let front = listener.bind;
    let sluice = Sluice::start(binary(), &config(workers, Some(admin), &[], &[listener]));
    let before = accepted_per_worker(admin, workers);
    let fds_before = sluice.fd_count();
    let cpu_before = sluice.cpu_time();

    let tally = storm(front, rate, duration);
    let storm_ended = Instant::now();
    let cpu = sluice.cpu_time().saturating_sub(cpu_before);
    let fds_after = sluice.wait_fd_count_at_most(fds_before, storm_ended + FDS_BACK_WITHIN);
    let fds_back_in = storm_ended.elapsed();
    let after = accepted_per_worker(admin, workers);

    let success = tally.success();
    assert!(
        success >= STORM_SUCCESS_MIN,
        "workers {workers}: {rate}/s for {duration:?} through Sluice: {} of {} succeeded \
         ({:.3}%); failures: {:?}",
        tally.ok,
        tally.due,
        100.0 * success,
        tally.failures
    );
    let deltas: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let spread = spread(&deltas);
    let per_worker: Vec<String> = deltas.iter().map(|d| format!("{d:.0}")).collect();
    let per_worker = per_worker.join("/");
    assert!(
        spread <= SPREAD_MAX,
        "workers {workers}: accepts per worker {deltas:?}: spread {:.1}% (max - min over mean)",
        100.0 * spread
    );
    assert!(
        fds_after <= fds_before,
        "workers {workers}: Sluice holds {fds_after} fds {FDS_BACK_WITHIN:?} after the storm, \
         {fds_before} before"
    );
    format!(
        "{rate}/s x {} s through Sluice: {:.2}% of {} ok ({} failed, late start max {} ms); \
         accepts per worker {per_worker}, spread {:.1}%; fds back in {:.2} s; Sluice CPU {:.1} s \
         ({:.0} us per connection)",
        duration.as_secs(),
        100.0 * success,
        tally.due,
        tally.due - tally.ok,
        tally.lag.as_millis(),
        100.0 * spread,
        fds_back_in.as_secs_f64(),
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / tally.due.max(1) as f64,
    )
}

/// What a storm did.
#[derive(Debug, Default)]
struct Tally {
    /// Connections due during the storm (every one is tried or counted failed).
    due: u64,
    /// Connections whose echo came back right within [`DUE_TIMEOUT`] of their due time.
    ok: u64,
    /// The latest any connection started after it was due: the generator falling behind.
    lag: Duration,
    /// Failures by kind, with a count each.
    failures: HashMap<String, u64>,
}

impl Tally {
    fn success(&self) -> f64 {
        self.ok as f64 / self.due.max(1) as f64
    }
}

/// Opens `rate` connections per second to `target` for `duration`, [`THREADS`] at a time at
/// most; bounded: connections not started by `duration + DUE_TIMEOUT` count as failed.
fn storm(target: SocketAddr, rate: u32, duration: Duration) -> Tally {
    let due = u64::from(rate) * duration.as_secs();
    let next = AtomicU64::new(0);
    let tally = Mutex::new(Tally {
        due,
        ..Tally::default()
    });
    let start = Instant::now() + Duration::from_millis(20);
    let give_up = start + duration + DUE_TIMEOUT;
    let started_late = AtomicU64::new(0);
    thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= due {
                        return;
                    }
                    let due_at = start + Duration::from_secs_f64(k as f64 / f64::from(rate));
                    let now = Instant::now();
                    if now < due_at {
                        thread::sleep(due_at - now);
                    }
                    let outcome = if Instant::now() >= give_up {
                        Err("not started: the generator fell behind".to_owned())
                    } else {
                        let late = Instant::now().saturating_duration_since(due_at);
                        started_late.fetch_max(late.as_micros() as u64, Ordering::Relaxed);
                        echo_once(target, k, due_at + DUE_TIMEOUT)
                    };
                    let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
                    match outcome {
                        Ok(()) => tally.ok += 1,
                        Err(kind) => *tally.failures.entry(kind).or_default() += 1,
                    }
                }
            });
        }
    });
    let mut tally = tally.into_inner().unwrap_or_else(|p| p.into_inner());
    tally.lag = Duration::from_micros(started_late.load(Ordering::Relaxed));
    tally
}

/// Connection `k`: from its own source address, connect, write 1 KiB seeded by `k`, read the
/// echo and compare, close; all by `deadline`. The error's kind on failure.
fn echo_once(target: SocketAddr, k: u64, deadline: Instant) -> Result<(), String> {
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or_else(|| "deadline passed".to_owned())
    };
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("socket: {:?}", e.kind()))?;
    // Binding over another socket's TIME_WAIT on the same address is fine for a client.
    socket
        .set_reuse_address(true)
        .map_err(|e| format!("SO_REUSEADDR: {:?}", e.kind()))?;
    socket
        .bind(&SocketAddr::from((source_addr(k), 0)).into())
        .map_err(|e| format!("bind: {:?}", e.kind()))?;
    socket
        .connect_timeout(&target.into(), left()?)
        .map_err(|e| format!("connect: {:?}", e.kind()))?;
    let mut stream = TcpStream::from(socket);
    let _ = stream.set_nodelay(true);
    let payload = seeded(k);
    stream
        .set_write_timeout(Some(left()?))
        .and_then(|()| stream.write_all(&payload))
        .map_err(|e| format!("write: {:?}", e.kind()))?;
    let mut echoed = [0u8; PAYLOAD];
    stream
        .set_read_timeout(Some(left()?))
        .and_then(|()| stream.read_exact(&mut echoed))
        .map_err(|e| format!("read: {:?}", e.kind()))?;
    if echoed != payload {
        return Err("echo differs".to_owned());
    }
    left()?;
    Ok(())
}

/// A distinct loopback source address for connection `k` (127.1.0.1 onwards; the last octet
/// avoids 0 and 255), so that no address runs short of ephemeral ports.
fn source_addr(k: u64) -> Ipv4Addr {
    let n = k % (200 * 254 * 254);
    let c = (n % 254) as u8 + 1;
    let b = ((n / 254) % 254) as u8 + 1;
    let a = (n / (254 * 254)) as u8 + 1;
    Ipv4Addr::new(127, a, b, c)
}

/// 1 KiB of bytes that depend on `k` (xorshift64*), so that crossed streams would not match.
fn seeded(k: u64) -> [u8; PAYLOAD] {
    let mut state = k.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes = [0u8; PAYLOAD];
    for chunk in bytes.chunks_mut(8) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    bytes
}

/// Each worker's `sluice_worker_connections_accepted_total`, in worker order (NaN if absent).
fn accepted_per_worker(admin: SocketAddr, workers: usize) -> Vec<f64> {
    let metrics = scrape_metrics(admin).expect("scrape /metrics");
    (0..workers)
        .map(|w| {
            let key = series(
                "sluice_worker_connections_accepted_total",
                &[("worker", &w.to_string())],
            );
            metrics.get(&key).copied().unwrap_or(f64::NAN)
        })
        .collect()
}

/// (max - min) / mean of `values`: 0 when perfectly even; NaN when a value is missing.
fn spread(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    if values.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    (max - min) / mean
}
