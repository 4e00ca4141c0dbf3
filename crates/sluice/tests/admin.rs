//! Issue 11, item 5: the admin endpoint has its own connection cap (`admin.max_connections`,
//! default 64), one deadline per exchange (the request within 5 s, its response written within
//! 5 s), and its descriptors are kept out of the data plane's fd budget.
//!
//! - 600 idle admin connections under RLIMIT_NOFILE 512: tcp forwarding goes on, Sluice holds at
//!   most the cap of admin connections (the rest are closed at once), the idle ones are closed at
//!   the request deadline, and /metrics answers again.
//! - Clients that ask for a large /metrics and never read: closed at the response deadline, every
//!   descriptor back, the memory of their responses given back.
//! - A request that never completes (slowloris), or never starts: closed at the request deadline.
//! - `admin.max_connections: 2`: a third connection is closed at once; a slot frees on close.
//!
//! The tests of this file take turns: their bounds are on time and on Sluice's memory, which a
//! neighbour rendering a 5 MB /metrics on the same two cores would blur.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{
    CONNECT_TIMEOUT, EchoServer, READY_TIMEOUT, Sluice, StreamEnd, assert_echo, fd_limit_wrapper,
    fd_limits, figure, free_addr, http_get, metric, raise_fd_limit, scrape_metrics, verify_echo,
    watch_ends,
};

with_workers_1_and_2!(idle_admin_crowd_neither_stops_forwarding_nor_passes_the_cap);

/// The fd limit of the crowd test, soft and hard.
const FD_LIMIT: u64 = 512;
/// Idle admin connections: more than RLIMIT_NOFILE.
const CROWD: usize = 600;
/// `admin.max_connections`'s default.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// Descriptors beyond the cap that the admin endpoint may hold at a moment: one accepted over
/// the cap before it is closed, and the odd one of the control plane.
const ADMIN_FDS_SLACK: usize = 4;
/// The deadline for a request to arrive, and the one for its response to be written.
const DEADLINE: Duration = Duration::from_secs(5);
/// How late after its deadline a close may come: timers, a debug build, two busy cores.
const CLOSE_SLACK: Duration = Duration::from_secs(3);
/// How early before the deadline a close may come (the deadline starts at Sluice's accept,
/// a little after the client's connect returned; this only absorbs clock reads).
const EARLY_SLACK: Duration = Duration::from_millis(200);
/// Bound on forwarding one small stream while the admin crowd is held: well under `DEADLINE`,
/// so that the crowd's own close cannot be what lets it through.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes of each forwarded stream: below one 16 KiB pool buffer, so it is copied and leases no
/// pipe (a pipe leased on first use would move the fd baseline).
const FORWARD_BYTES: u64 = 4000;
/// Backends of the large-/metrics test: about 1 KB of /metrics each, so the text (about 5 MB)
/// is larger than the kernel's socket buffers take (tcp_wmem's maximum, 4 MB by default).
const BACKENDS: usize = 5000;
/// Clients that ask for the large /metrics and never read.
const NEVER_READING: usize = 10;
/// Generous bound on what Sluice's RSS may keep once the never-reading clients are closed; they
/// held about 5 MB each, `NEVER_READING` x 5 MB (50 MB) if their responses stayed.
const RSS_GROWTH_MAX_KIB: u64 = 24 * 1024;

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// 600 idle admin connections under RLIMIT_NOFILE 512 take at most the admin's own cap of
/// descriptors: forwarding a stream through the listener works meanwhile, the idle connections
/// end at the request deadline, and /metrics answers again after that.
fn idle_admin_crowd_neither_stops_forwarding_nor_passes_the_cap(workers: usize) {
    let _turn = one_at_a_time();
    let wrapper = match fd_limit_wrapper(FD_LIMIT) {
        Ok(wrapper) => wrapper,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    raise_fd_limit();
    let backend = EchoServer::echo();
    let admin = free_addr();
    let listener = Listener::new("data", &[backend.addr()]);
    let front = listener.bind;
    let yaml = config(workers, Some(admin), &[], &[listener]);
    let sluice = Sluice::try_start_with(binary(), &yaml, READY_TIMEOUT, &wrapper)
        .unwrap_or_else(|e| panic!("{e}\n--- config ---\n{yaml}"));
    assert_eq!(fd_limits(sluice.pid()), Some((FD_LIMIT, FD_LIMIT)));
    // Everything created on first use (a pipe, the exporter) exists before the baseline.
    assert_echo(front, FORWARD_BYTES, 1, FORWARD_TIMEOUT);
    scrape_metrics(admin).expect("/metrics before the crowd");
    let baseline = settled_fd_count(&sluice, Duration::from_secs(3));

    let started = Instant::now();
    let crowd: Vec<TcpStream> = (0..CROWD)
        .map(|i| {
            TcpStream::connect_timeout(&admin, CONNECT_TIMEOUT)
                .unwrap_or_else(|e| panic!("admin connection {i} (the backlog holds it): {e}"))
        })
        .collect();
    let held = settled_fd_count(&sluice, Duration::from_secs(2));

    let forwarded = Instant::now();
    let report = verify_echo(front, FORWARD_BYTES, 2, FORWARD_TIMEOUT);
    let forwarded_in = forwarded.elapsed();
    assert!(
        report.is_ok(),
        "{workers} worker(s): with {CROWD} idle admin connections open ({} fds held, baseline \
         {baseline}), forwarding through the listener failed: {:?}\n--- sluice stderr ---\n{}",
        held,
        report.err(),
        tail(&sluice.stderr_text())
    );
    let admin_fds = held.saturating_sub(baseline);
    assert!(
        admin_fds <= ADMIN_MAX_CONNECTIONS + ADMIN_FDS_SLACK,
        "{workers} worker(s): {CROWD} idle admin connections hold {admin_fds} fds (baseline \
         {baseline}, {held} open): the cap of {ADMIN_MAX_CONNECTIONS} does not hold"
    );

    // The ones beyond the cap were closed at once; the others end at the request deadline.
    let ends = watch_ends(&crowd, started + DEADLINE + CLOSE_SLACK).unwrap();
    let open = ends.iter().filter(|end| end.is_none()).count();
    assert_eq!(
        open,
        0,
        "{workers} worker(s): {open} of {CROWD} idle admin connections still open {:?} after \
         the first connect",
        DEADLINE + CLOSE_SLACK
    );
    let early = ends
        .iter()
        .flatten()
        .filter(|(at, _)| *at < started + DEADLINE - EARLY_SLACK)
        .count();
    assert!(
        early >= CROWD - ADMIN_MAX_CONNECTIONS - ADMIN_FDS_SLACK,
        "{workers} worker(s): {early} of {CROWD} idle admin connections were closed before the \
         deadline: the ones over the cap must be closed at once, not left in the backlog"
    );
    let last_end = ends
        .iter()
        .flatten()
        .map(|(at, _)| at.duration_since(started))
        .max()
        .unwrap_or_default();

    // Room again: /metrics answers.
    let metrics_deadline = Instant::now() + CLOSE_SLACK;
    let answered = loop {
        match scrape_metrics(admin) {
            Ok(_) => break Ok(started.elapsed()),
            Err(e) if Instant::now() >= metrics_deadline => break Err(e),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    };
    let answered = answered.unwrap_or_else(|e| {
        panic!("{workers} worker(s): /metrics after the idle crowd was closed: {e}")
    });
    drop(crowd);
    let fds = sluice.wait_fd_count_at_most(baseline, Instant::now() + Duration::from_secs(5));
    assert!(
        fds <= baseline,
        "fds {fds} after the crowd, baseline {baseline}"
    );
    assert_echo(front, FORWARD_BYTES, 3, FORWARD_TIMEOUT);
    figure(
        &format!("{CROWD} idle admin connections, RLIMIT_NOFILE {FD_LIMIT}, {workers} worker(s)"),
        &format!(
            "forwarding works meanwhile; <= {ADMIN_MAX_CONNECTIONS} + {ADMIN_FDS_SLACK} admin \
             fds; every one closed by {:?}",
            DEADLINE + CLOSE_SLACK
        ),
        &format!(
            "forwarded in {:.0} ms; {admin_fds} admin fds held; {early} closed at once, the \
             last at {:.2} s; /metrics answered again at {:.2} s",
            forwarded_in.as_secs_f64() * 1000.0,
            last_end.as_secs_f64(),
            answered.as_secs_f64()
        ),
    );
}

/// Clients that ask for a /metrics larger than the kernel's socket buffers and never read are
/// closed at the response deadline: every descriptor comes back and Sluice's memory does not
/// keep their responses.
#[test]
fn metrics_clients_that_never_read_are_closed_at_the_response_deadline() {
    let _turn = one_at_a_time();
    let admin = free_addr();
    let backends: Vec<SocketAddr> = (0..BACKENDS)
        .map(|i| SocketAddr::from(([127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8], 1)))
        .collect();
    let yaml = config(1, Some(admin), &[], &[Listener::new("big", &backends)]);
    let sluice = Sluice::start(binary(), &yaml);
    // Twice: the exporter's registry and the allocator's working set for one render exist
    // before the baseline. The second one says how long a render takes here (about 0.5 s in a
    // debug build; more on a busy machine).
    let size = http_get(admin, "/metrics").unwrap().body.len();
    let render_started = Instant::now();
    let _ = http_get(admin, "/metrics").unwrap();
    let render = render_started.elapsed();
    let send_buffer_max = tcp_wmem_max();
    assert!(
        size as u64 > send_buffer_max,
        "/metrics is {size} bytes, within what the kernel buffers ({send_buffer_max}): the \
         test needs more backends"
    );
    let baseline_fds = settled_fd_count(&sluice, Duration::from_secs(3));
    let baseline_rss = sluice.rss_kib();

    let started = Instant::now();
    let clients: Vec<TcpStream> = (0..NEVER_READING).map(|_| never_reading(admin)).collect();
    let peak_fds = wait_fd_count_at_least(
        &sluice,
        baseline_fds + NEVER_READING,
        started + Duration::from_secs(3),
    );
    // The control plane renders one /metrics at a time, so the last client's response
    // deadline starts up to `NEVER_READING` renders after the first: allow each twice what
    // the warm-up took.
    let bound =
        DEADLINE + render.max(Duration::from_millis(500)) * 2 * NEVER_READING as u32 + CLOSE_SLACK;
    let fds = sluice.wait_fd_count_at_most(baseline_fds, started + bound);
    let closed_in = started.elapsed();
    let peak_rss = sluice.rss_kib();
    assert!(
        fds <= baseline_fds,
        "{NEVER_READING} clients that never read a {size}-byte /metrics still hold {} fds \
         after {closed_in:?} (baseline {baseline_fds}); RSS {} KiB over the baseline",
        fds - baseline_fds,
        peak_rss.saturating_sub(baseline_rss)
    );
    // One more scrape: what the allocator kept from the closed responses serves it.
    scrape_metrics(admin).expect("/metrics after the never-reading clients");
    let rss = sluice.rss_kib();
    let growth = rss.saturating_sub(baseline_rss);
    assert!(
        growth <= RSS_GROWTH_MAX_KIB,
        "RSS {rss} KiB, {growth} KiB over the baseline after the {NEVER_READING} never-reading \
         clients were closed: their responses are still held"
    );
    drop(clients);
    figure(
        &format!("{NEVER_READING} clients never read a {size}-byte /metrics"),
        &format!(
            "closed within {:.1} s; fds back; RSS growth <= {} MiB",
            bound.as_secs_f64(),
            RSS_GROWTH_MAX_KIB / 1024
        ),
        &format!(
            "one render {:.2} s; {} fds at peak, all closed in {:.2} s; RSS {} KiB over the \
             baseline afterwards",
            render.as_secs_f64(),
            peak_fds.saturating_sub(baseline_fds),
            closed_in.as_secs_f64(),
            growth
        ),
    );
}

/// A request head sent a few bytes at a time that never ends, and a connection that never
/// sends anything, are both closed at the request deadline.
#[test]
fn a_request_that_never_completes_is_closed_at_the_request_deadline() {
    let _turn = one_at_a_time();
    let backend = EchoServer::echo();
    let admin = free_addr();
    let yaml = config(
        1,
        Some(admin),
        &[],
        &[Listener::new("data", &[backend.addr()])],
    );
    let sluice = Sluice::start(binary(), &yaml);
    scrape_metrics(admin).expect("/metrics");
    let baseline = settled_fd_count(&sluice, Duration::from_secs(3));

    let started = Instant::now();
    let silent = TcpStream::connect_timeout(&admin, CONNECT_TIMEOUT).unwrap();
    let mut slow = TcpStream::connect_timeout(&admin, CONNECT_TIMEOUT).unwrap();
    slow.set_nodelay(true).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: sluice\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    // One header line every 250 ms, far below any header size limit, until the server ends it.
    let hard_stop = started + DEADLINE * 2 + CLOSE_SLACK;
    let slow_end = loop {
        let now = Instant::now();
        if now >= hard_stop {
            break None;
        }
        if slow.write_all(b"X-Slow: 1\r\n").is_err() {
            break Some((now, "write failed".to_owned()));
        }
        let mut byte = [0u8; 1024];
        match slow.read(&mut byte) {
            Ok(0) => break Some((Instant::now(), "end of stream".to_owned())),
            Ok(n) => {
                let text = String::from_utf8_lossy(&byte[..n]).into_owned();
                break Some((Instant::now(), format!("a response: {text:?}")));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => break Some((Instant::now(), e.to_string())),
        }
    };
    let silent_end = watch_ends(std::slice::from_ref(&silent), hard_stop).unwrap()[0];

    let (slow_at, how) = slow_end.unwrap_or_else(|| {
        panic!("a request head that never ends is still open after {hard_stop:?}")
    });
    let slow_in = slow_at.duration_since(started);
    assert!(
        slow_in >= DEADLINE - EARLY_SLACK && slow_in <= DEADLINE + CLOSE_SLACK,
        "a request head that never ends was ended ({how}) after {slow_in:?}: expected the \
         {DEADLINE:?} request deadline"
    );
    let (silent_at, silent_how) =
        silent_end.unwrap_or_else(|| panic!("a silent admin connection is still open"));
    let silent_in = silent_at.duration_since(started);
    assert!(
        matches!(silent_how, StreamEnd::Eof | StreamEnd::Reset)
            && silent_in >= DEADLINE - EARLY_SLACK
            && silent_in <= DEADLINE + CLOSE_SLACK,
        "a silent admin connection ended ({silent_how:?}) after {silent_in:?}: expected the \
         {DEADLINE:?} request deadline"
    );
    drop((silent, slow));
    let fds = sluice.wait_fd_count_at_most(baseline, Instant::now() + Duration::from_secs(5));
    assert!(fds <= baseline, "fds {fds}, baseline {baseline}");
    figure(
        "admin request that never completes",
        &format!("closed at the {DEADLINE:?} request deadline"),
        &format!(
            "slowloris ended ({how}) at {:.2} s, silent at {:.2} s",
            slow_in.as_secs_f64(),
            silent_in.as_secs_f64()
        ),
    );
}

/// `admin.max_connections: 2`: with two connections open a third is closed at once, and a
/// slot is free again as soon as one of the two closes.
#[test]
fn admin_max_connections_is_the_cap() {
    let _turn = one_at_a_time();
    let backend = EchoServer::echo();
    let admin = free_addr();
    let top = format!("admin: {{ bind: \"{admin}\", max_connections: 2 }}");
    let yaml = config(
        1,
        None,
        &[&top],
        &[Listener::new("data", &[backend.addr()])],
    );
    let sluice = Sluice::start(binary(), &yaml);
    scrape_metrics(admin).expect("/metrics");
    let baseline = settled_fd_count(&sluice, Duration::from_secs(3));

    let first = TcpStream::connect_timeout(&admin, CONNECT_TIMEOUT).unwrap();
    let second = TcpStream::connect_timeout(&admin, CONNECT_TIMEOUT).unwrap();
    let held = wait_fd_count_at_least(&sluice, baseline + 2, Instant::now() + CLOSE_SLACK);
    assert_eq!(held, baseline + 2, "both admin connections are held");
    let started = Instant::now();
    let third = TcpStream::connect_timeout(&admin, CONNECT_TIMEOUT).unwrap();
    let end = watch_ends(
        std::slice::from_ref(&third),
        started + DEADLINE - EARLY_SLACK,
    )
    .unwrap()[0];
    let (at, how) = end.unwrap_or_else(|| {
        panic!("a third admin connection over admin.max_connections 2 is still open")
    });
    assert!(
        matches!(how, StreamEnd::Eof | StreamEnd::Reset),
        "the third connection ended with {how:?}"
    );
    let closed_in = at.duration_since(started);
    assert!(
        http_get(admin, "/healthz").is_err(),
        "/healthz answered over the cap"
    );
    assert_eq!(sluice.fd_count(), baseline + 2, "the cap holds");

    drop(first);
    let deadline = Instant::now() + CLOSE_SLACK;
    let answered = loop {
        match http_get(admin, "/healthz") {
            Ok(response) => break response,
            Err(e) if Instant::now() >= deadline => {
                panic!("/healthz after one of the two closed: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    assert_eq!((answered.status, answered.body.as_str()), (200, "ok\n"));
    // The third connection and the /healthz tried over the cap were counted.
    let refused = metric(admin, "sluice_admin_connections_refused_total");
    assert!(
        refused >= 2.0,
        "{refused} admin connections counted as refused"
    );
    drop((second, third));
    let fds = sluice.wait_fd_count_at_most(baseline, Instant::now() + CLOSE_SLACK);
    assert!(fds <= baseline, "fds {fds}, baseline {baseline}");
    figure(
        "admin.max_connections 2",
        "a third connection is closed at once; a slot is free when one closes",
        &format!(
            "third closed ({how:?}) in {:.1} ms",
            closed_in.as_secs_f64() * 1000.0
        ),
    );
}

/// A client with a small receive buffer that sends `GET /metrics` and never reads.
fn never_reading(admin: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // Before connect, so the window it advertises is small from the start.
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .connect_timeout(&admin.into(), CONNECT_TIMEOUT)
        .unwrap();
    let mut stream = TcpStream::from(socket);
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: sluice\r\n\r\n")
        .unwrap();
    stream
}

/// Sluice's fd count once it stayed the same for 200 ms (waiting at most `within`). A baseline
/// is taken so: the server closes the connection of a scrape just answered on its own time, and
/// a count taken at once may still include it (the cap test then saw one fd too many).
fn settled_fd_count(sluice: &Sluice, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut last = (sluice.fd_count(), Instant::now());
    loop {
        thread::sleep(Duration::from_millis(20));
        let fds = sluice.fd_count();
        if fds != last.0 {
            last = (fds, Instant::now());
        }
        if last.1.elapsed() >= Duration::from_millis(200) || Instant::now() >= deadline {
            return fds;
        }
    }
}

/// Polls Sluice's fd count until it is at least `wanted` or `deadline` passes; returns the
/// last count.
fn wait_fd_count_at_least(sluice: &Sluice, wanted: usize, deadline: Instant) -> usize {
    loop {
        let fds = sluice.fd_count();
        if fds >= wanted || Instant::now() >= deadline {
            return fds;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The most a TCP socket's send buffer grows to (the third field of `tcp_wmem`).
fn tcp_wmem_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * 1024 * 1024)
}

/// The last lines of Sluice's stderr.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
