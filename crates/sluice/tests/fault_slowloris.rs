//! Issue 6, "slowloris at L4": thousands of connections that send nothing. With
//! `timeouts.idle: 2s` the idle timeout closes every one of them (each client sees its end
//! within the timeout plus a generous slack), the `idle_timeout` close counter counts them all,
//! Sluice's memory per open connection stays small and every descriptor comes back. With
//! `idle: 0` a quiet connection among such a crowd survives 5 s of silence and still carries
//! bytes afterwards. (`timeouts.rs` holds the one-connection versions.)

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{
    CONNECT_TIMEOUT, CrowdEcho, Sluice, StreamEnd, figure, free_addr, raise_fd_limit,
    scrape_metrics, series, tiered, wait_metric, watch_ends,
};

/// The idle timeout under test.
const IDLE: Duration = Duration::from_secs(2);
/// How late after `IDLE` a close may come: timers, a debug build, a busy two-core machine.
const CLOSE_SLACK: Duration = Duration::from_secs(3);
/// How long a close may come before `IDLE` (the timer starts at Sluice's accept, a little
/// after the client's connect returned; it never fires early, this only absorbs clock reads).
const EARLY_SLACK: Duration = Duration::from_millis(100);
/// How long the quiet connection stays silent under `idle: 0`.
const SILENCE: Duration = Duration::from_secs(5);
/// Generous bound on the CPU Sluice may use while nothing moves for `SILENCE` (a busy loop
/// would use all of it).
const SILENT_CPU_MAX: Duration = Duration::from_millis(500);
/// Bound on every other wait: metrics settling, descriptors coming back.
const SETTLE: Duration = Duration::from_secs(10);
/// Generous bound on Sluice's memory per open, silent connection.
const RSS_PER_CONNECTION_MAX_KIB: f64 = 32.0;
/// Descriptors kept out of the crowd's share of `RLIMIT_NOFILE`. Both processes hold two per
/// connection (client and backend side here, both sides of the proxy in Sluice, which inherits
/// the limit), and Sluice keeps up to 2 x 512 for its workers' splice pipes plus a small reserve
/// before it stops accepting: a crowd above that would wait in the backlog.
const FD_RESERVE: u64 = 2048;

#[test]
fn idle_timeout_closes_a_silent_crowd() {
    let _turn = one_crowd_at_a_time();
    let crowd = crowd_size(tiered(3000, 10_000));
    let backend = CrowdEcho::start();
    let admin = free_addr();
    let listener = Listener::new("slow", &[backend.addr()]).with("timeouts: { idle: 2s }");
    let front = listener.bind;
    let sluice = Sluice::start(binary(), &config(2, Some(admin), &[], &[listener]));
    let _ = scrape_metrics(admin).expect("scrape /metrics");
    let fds_before = sluice.fd_count();
    let rss_before = sluice.rss_kib();

    let (streams, opened) = open_silent(front, crowd);
    let opened_in = opened
        .last()
        .map_or(Duration::ZERO, |last| last.duration_since(opened[0]));
    // Measured once Sluice holds the whole crowd, and before the first close is due (`IDLE`
    // after the first open).
    let active_key = series("sluice_connections_active", &[("listener", "slow")]);
    let active = wait_metric(admin, &active_key, crowd as f64, IDLE);
    let rss_with = sluice.rss_kib();
    let fds_with = sluice.fd_count();
    let measured_at = Instant::now();
    assert!(
        measured_at < opened[0] + IDLE,
        "memory measured {:?} after the first open (opening {crowd} took {opened_in:?}), \
         later than the idle timeout: it would not see them all open",
        measured_at.duration_since(opened[0])
    );
    assert_eq!(
        active,
        Some(crowd as f64),
        "{active_key} with the crowd open"
    );
    let rss_per_connection = rss_with.saturating_sub(rss_before) as f64 / crowd as f64;

    let ends = watch_ends(&streams, Instant::now() + IDLE + CLOSE_SLACK + SETTLE)
        .expect("watch the crowd");
    let mut lifetimes = Vec::with_capacity(crowd);
    let mut resets = 0;
    for (i, end) in ends.iter().enumerate() {
        let Some((at, how)) = end else {
            panic!(
                "connection {i} still open {:?} after it opened",
                opened[i].elapsed()
            );
        };
        match how {
            StreamEnd::Eof => {}
            StreamEnd::Reset => resets += 1,
            other => panic!("connection {i} ended with {other:?}"),
        }
        lifetimes.push(at.duration_since(opened[i]));
    }
    lifetimes.sort();
    let (first, p99, last) = (
        lifetimes[0],
        lifetimes[crowd * 99 / 100],
        lifetimes[crowd - 1],
    );
    assert!(
        first + EARLY_SLACK >= IDLE && last <= IDLE + CLOSE_SLACK,
        "connections lived {first:?} ..= {last:?} with timeouts.idle {IDLE:?}"
    );
    let idle_key = series(
        "sluice_connections_closed_total",
        &[("listener", "slow"), ("reason", "idle_timeout")],
    );
    let counted = wait_metric(admin, &idle_key, crowd as f64, SETTLE);
    assert_eq!(counted, Some(crowd as f64), "{idle_key}");
    // Sluice gave back every descriptor on its own: the clients still hold their ends.
    let fds_after = sluice.wait_fd_count_at_most(fds_before, Instant::now() + SETTLE);
    assert!(
        fds_after <= fds_before,
        "Sluice holds {fds_after} fds after closing the crowd, {fds_before} before"
    );
    drop(streams);
    assert!(
        rss_per_connection <= RSS_PER_CONNECTION_MAX_KIB,
        "Sluice's RSS grew {rss_per_connection:.1} KiB per silent connection \
         ({rss_before} -> {rss_with} KiB)"
    );
    figure(
        &format!("slowloris: {crowd} silent connections, idle 2s"),
        "all closed by idle timeout within 2 s + 3 s, all counted; RSS <= 32 KiB per \
         connection; fds back",
        &format!(
            "opened in {:.2} s; closed after {:.2} ..= {:.2} s (p99 {:.2} s, {resets} resets); counted \
             {crowd}; RSS {rss_per_connection:.1} KiB per connection ({rss_before} -> \
             {rss_with} KiB), fds +{}; fds back",
            opened_in.as_secs_f64(),
            first.as_secs_f64(),
            last.as_secs_f64(),
            p99.as_secs_f64(),
            fds_with.saturating_sub(fds_before),
        ),
    );
}

#[test]
fn idle_zero_keeps_a_quiet_connection_among_a_silent_crowd() {
    let _turn = one_crowd_at_a_time();
    let crowd = crowd_size(tiered(1000, 3000));
    let backend = CrowdEcho::start();
    let admin = free_addr();
    let listener = Listener::new("forever", &[backend.addr()]).with("timeouts: { idle: 0 }");
    let front = listener.bind;
    let sluice = Sluice::start(binary(), &config(2, Some(admin), &[], &[listener]));

    let mut quiet = TcpStream::connect_timeout(&front, CONNECT_TIMEOUT).expect("connect");
    quiet.set_read_timeout(Some(SETTLE)).unwrap();
    echo(&mut quiet, b"before the silence");
    let (streams, _) = open_silent(front, crowd);
    // Five seconds in which nobody sends a byte: nobody is closed, and Sluice sleeps.
    let cpu_before = sluice.cpu_time();
    let ends = watch_ends(&streams, Instant::now() + SILENCE).expect("watch the crowd");
    let cpu = sluice.cpu_time().saturating_sub(cpu_before);
    let ended = ends.iter().filter(|end| end.is_some()).count();
    assert_eq!(
        ended, 0,
        "{ended} of {crowd} silent connections ended under idle: 0"
    );
    assert!(
        cpu <= SILENT_CPU_MAX,
        "Sluice used {cpu:?} of CPU during {SILENCE:?} in which no connection moved a byte"
    );
    echo(&mut quiet, b"after 5 s of silence");
    let active_key = series("sluice_connections_active", &[("listener", "forever")]);
    let active = wait_metric(admin, &active_key, (crowd + 1) as f64, SETTLE);
    assert_eq!(active, Some((crowd + 1) as f64), "{active_key}");
    figure(
        &format!("slowloris with idle 0: a quiet connection among {crowd} silent ones"),
        "survives 5 s of silence, then echoes; Sluice CPU <= 0.5 s meanwhile",
        &format!(
            "{crowd} + 1 open after 5 s; the quiet one echoed; Sluice CPU {} ms in the silence",
            cpu.as_millis()
        ),
    );
}

/// The two tests share the test process's descriptors (two per connection: the client and
/// the backend's side): one crowd at a time.
fn one_crowd_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `wanted` silent connections, or fewer when the test process's descriptors (raised to the
/// hard limit) would not hold them.
fn crowd_size(wanted: usize) -> usize {
    let limit = raise_fd_limit();
    let crowd = wanted.min((limit.saturating_sub(FD_RESERVE) / 2) as usize);
    assert!(
        crowd >= 1000,
        "RLIMIT_NOFILE {limit} leaves room for {crowd} connections only"
    );
    if crowd < wanted {
        eprintln!("{wanted} connections do not fit RLIMIT_NOFILE {limit}: {crowd} instead");
    }
    crowd
}

/// Opens `count` connections that send nothing; returns them and when each connect returned.
fn open_silent(front: SocketAddr, count: usize) -> (Vec<TcpStream>, Vec<Instant>) {
    let mut streams = Vec::with_capacity(count);
    let mut opened = Vec::with_capacity(count);
    for i in 0..count {
        let stream = TcpStream::connect_timeout(&front, CONNECT_TIMEOUT)
            .unwrap_or_else(|error| panic!("connection {i}: connect: {error}"));
        opened.push(Instant::now());
        streams.push(stream);
    }
    (streams, opened)
}

fn echo(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).unwrap();
    let mut echoed = vec![0u8; bytes.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, bytes);
}
