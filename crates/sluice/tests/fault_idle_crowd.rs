//! Issue 6, "8000 idle proxied connections": each connection first carries a few bytes both
//! ways (so it is fully proxied, backend connected), then stays quiet. Idle, they hold no pipe,
//! cost Sluice a bounded amount of memory and two descriptors each, and no CPU, not even when
//! their connect deadlines pass; closing them all gives back every descriptor and brings the
//! active gauge to 0.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{
    CONNECT_TIMEOUT, CrowdEcho, Sluice, figure, free_addr, raise_fd_limit, scrape_metrics, series,
    wait_metric,
};

/// The crowd: the 8000 in both tiers (the test process holds two descriptors per
/// connection, its client and the backend's, so more would not fit a 20000-fd hard limit).
const CROWD: usize = 8000;
/// Descriptors kept out of the crowd's share of `RLIMIT_NOFILE`. Both processes hold two per
/// connection (client and backend side here, both sides of the proxy in Sluice, which inherits
/// the limit), and Sluice keeps up to 2 x 512 for its workers' splice pipes plus a small reserve
/// before it stops accepting.
const FD_RESERVE: u64 = 2048;
/// Each round trip, and each wait for Sluice to settle, is bounded by this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Generous bound on Sluice's memory per idle connection (a slot, two sockets, no buffer).
const RSS_PER_CONNECTION_MAX_KIB: f64 = 32.0;

/// When every connection's connect deadline (the default `timeouts.connect` of 2 s after its
/// accept) has passed, counted from the last open, with a margin; and the CPU Sluice may use
/// until then. A connect that completed leaves no timer behind (it used to cost one wake-up
/// per connection: 170-240 ms of CPU for 8000 here); a busy loop would use all of it.
const CONNECT_DEADLINES_DONE: Duration = Duration::from_millis(2500);
const CONNECT_DEADLINES_CPU_MAX: Duration = Duration::from_millis(200);
/// How long the crowd is then watched doing nothing, and the CPU Sluice may use meanwhile
/// (generous: a busy loop would use all of it).
const QUIET: Duration = Duration::from_secs(1);
const QUIET_CPU_MAX: Duration = Duration::from_millis(200);

/// The two worker counts share the test process's descriptors: one crowd at a time.
static ONE_CROWD_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn workers_1() {
    idle_crowd(1);
}

#[test]
fn workers_2() {
    idle_crowd(2);
}

fn idle_crowd(workers: usize) {
    let _turn = ONE_CROWD_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let needed = 2 * CROWD as u64 + FD_RESERVE;
    let limit = raise_fd_limit();
    if limit < needed {
        eprintln!(
            "SKIPPED: {CROWD} idle connections need {needed} descriptors (two per connection in \
             the test process and in Sluice, plus reserves); RLIMIT_NOFILE allows {limit}"
        );
        return;
    }
    let backend = CrowdEcho::start();
    let admin = free_addr();
    let listener = Listener::new("crowd", &[backend.addr()]);
    let front = listener.bind;
    let sluice = Sluice::start(binary(), &config(workers, Some(admin), &[], &[listener]));
    let active_key = series("sluice_connections_active", &[("listener", "crowd")]);
    // One scrape first, so that the admin endpoint's own state is part of the baseline.
    let _ = scrape_metrics(admin).expect("scrape /metrics");
    let fds_before = sluice.fd_count();
    let rss_before = sluice.rss_kib();

    let started = Instant::now();
    let crowd: Vec<TcpStream> = (0..CROWD).map(|i| round_trip(front, i)).collect();
    let opened_in = started.elapsed();
    let (opened_at, cpu_at_open) = (Instant::now(), sluice.cpu_time());
    assert_eq!(
        wait_value(admin, &active_key, CROWD as f64),
        CROWD as f64,
        "active connections with the whole crowd open"
    );
    // Nothing moves now: every pipe is back in its pool.
    let leased = wait_value(admin, "sluice_pipes_leased", 0.0);
    assert_eq!(leased, 0.0, "idle connections still hold {leased} pipes");
    let rss_with = sluice.rss_kib();
    let fds_with = sluice.fd_count();
    let rss_per_connection = rss_with.saturating_sub(rss_before) as f64 / CROWD as f64;
    let fds_per_connection = fds_with.saturating_sub(fds_before) as f64 / CROWD as f64;
    assert!(
        (fds_with as i64 - fds_before as i64 - 2 * CROWD as i64).abs() <= 16,
        "Sluice holds {fds_with} fds with {CROWD} connections open, {fds_before} before: \
         not two per connection"
    );
    assert!(
        rss_per_connection <= RSS_PER_CONNECTION_MAX_KIB,
        "Sluice's RSS grew {rss_per_connection:.1} KiB per idle connection \
         ({rss_before} -> {rss_with} KiB)"
    );
    assert_eq!(backend.open() as usize, CROWD, "backend connections open");
    // Each connection still wakes its worker once, at its connect deadline (its connect
    // finished long before): the CPU that costs is reported, and bounded only against a spin.
    thread::sleep((opened_at + CONNECT_DEADLINES_DONE).saturating_duration_since(Instant::now()));
    let cpu_deadlines = sluice.cpu_time().saturating_sub(cpu_at_open);
    assert!(
        cpu_deadlines <= CONNECT_DEADLINES_CPU_MAX,
        "Sluice used {cpu_deadlines:?} of CPU in the {CONNECT_DEADLINES_DONE:?} after {CROWD} \
         connections opened and went idle"
    );
    // Then idle means asleep: a second in which nothing moves costs Sluice next to no CPU.
    let cpu_before = sluice.cpu_time();
    thread::sleep(QUIET);
    let cpu = sluice.cpu_time().saturating_sub(cpu_before);
    assert!(
        cpu <= QUIET_CPU_MAX,
        "Sluice used {cpu:?} of CPU in {QUIET:?} with {CROWD} idle connections"
    );

    // Close them all: every descriptor comes back, the gauge returns to 0.
    let closing = Instant::now();
    drop(crowd);
    let fds_after = sluice.wait_fd_count_at_most(fds_before, Instant::now() + IO_TIMEOUT);
    let back_in = Instant::now();
    assert!(
        fds_after <= fds_before,
        "Sluice holds {fds_after} fds {IO_TIMEOUT:?} after the crowd closed, {fds_before} before"
    );
    assert_eq!(
        wait_value(admin, &active_key, 0.0),
        0.0,
        "active after close"
    );
    let deadline = Instant::now() + IO_TIMEOUT;
    while backend.open() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(backend.open(), 0, "backend connections still open");
    figure(
        &format!("{CROWD} idle proxied connections, workers {workers}"),
        "no pipe held; RSS <= 32 KiB and 2 fds per connection; CPU <= 0.2 s in 1 s idle; \
         all fds back at close",
        &format!(
            "opened in {:.1} s; RSS {rss_per_connection:.1} KiB per connection \
             ({rss_before} -> {rss_with} KiB); fds +{} ({fds_per_connection:.2} per connection); \
             pipes 0; CPU {} ms in the 2.5 s of connect deadlines, then {} ms in 1 s idle; \
             fds back in {:.2} s",
            opened_in.as_secs_f64(),
            fds_with - fds_before,
            cpu_deadlines.as_millis(),
            cpu.as_millis(),
            back_in.duration_since(closing).as_secs_f64()
        ),
    );
}

/// Opens connection `i` and echoes 8 bytes through it (its number), so it is fully proxied.
fn round_trip(front: SocketAddr, i: usize) -> TcpStream {
    let mut stream = TcpStream::connect_timeout(&front, CONNECT_TIMEOUT)
        .unwrap_or_else(|error| panic!("connection {i}: connect: {error}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let sent = (i as u64).to_le_bytes();
    stream
        .write_all(&sent)
        .unwrap_or_else(|error| panic!("connection {i}: write: {error}"));
    let mut echoed = [0u8; 8];
    stream
        .read_exact(&mut echoed)
        .unwrap_or_else(|error| panic!("connection {i}: read the echo: {error}"));
    assert_eq!(echoed, sent, "connection {i}: echo");
    stream
}

/// Polls `/metrics` until `key` reads `expected` or [`IO_TIMEOUT`] passes; the last value.
fn wait_value(admin: SocketAddr, key: &str, expected: f64) -> f64 {
    wait_metric(admin, key, expected, IO_TIMEOUT).unwrap_or(f64::NAN)
}
