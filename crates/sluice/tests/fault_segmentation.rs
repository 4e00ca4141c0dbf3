//! Byte-at-a-time segmentation and stalled peers.
//!
//! Fault proxies sit on both legs: between the client and Sluice, and between Sluice and the
//! echo backend. Sliced, every segment Sluice receives (from the client and from the backend)
//! carries 1 to 64 bytes, with small random gaps; digests must still match both ways. A peer
//! stalled mid-transfer (it stops reading) must leave Sluice idle, not polling: under 10% of a
//! core while stalled. CPU per MiB is reported for the sliced and the bulk case side by side.

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, TIMEOUT, binary, config};
use sluice_testkit::{
    EchoServer, Fault, FaultProxy, Leg, Sluice, VerifyReport, figure, free_addr, reset,
    scrape_metrics, series, tiered, verify_echo,
};

with_workers_1_and_2!(
    sliced_both_legs_keeps_every_byte,
    stalled_peer_leaves_sluice_idle,
    reset_behind_a_stalled_backend_closes_promptly
);

/// Pieces of 1 ..= 64 bytes, up to 200 us apart.
const SLICE: Fault = Fault::Slice {
    max: 64,
    gap: Duration::from_micros(200),
};
/// How long a stall is measured.
const STALL: Duration = Duration::from_secs(2);
/// Sluice's CPU bound while a peer is stalled: 10% of one core.
const STALLED_CPU_MAX: f64 = 0.10;

/// A client-side proxy in front of Sluice, a backend-side proxy in front of an echo server.
struct Chain {
    client_leg: FaultProxy,
    backend_leg: FaultProxy,
    front: SocketAddr,
    admin: SocketAddr,
    sluice: Sluice,
    _backend: EchoServer,
}

fn chain(workers: usize) -> Chain {
    let backend = EchoServer::echo();
    let backend_leg = FaultProxy::start(backend.addr());
    let listener = Listener::new("faulty", &[backend_leg.addr()]);
    let front = listener.bind;
    let admin = free_addr();
    let sluice = Sluice::start(binary(), &config(workers, Some(admin), &[], &[listener]));
    Chain {
        client_leg: FaultProxy::start(front),
        backend_leg,
        front,
        admin,
        sluice,
        _backend: backend,
    }
}

fn cpu_per_mib(cpu: Duration, report: &VerifyReport) -> f64 {
    let mib = (report.sent.bytes + report.received.bytes) as f64 / f64::from(1 << 20);
    cpu.as_secs_f64() * 1000.0 / mib
}

fn sliced_both_legs_keeps_every_byte(workers: usize) {
    let chain = chain(workers);
    chain.client_leg.set(Leg::Upstream, SLICE);
    chain.backend_leg.set(Leg::Downstream, SLICE);
    let sliced_bytes = tiered(256 * 1024, 4 << 20);

    let cpu = chain.sluice.cpu_time();
    let sliced = verify_echo(chain.client_leg.addr(), sliced_bytes, 11, TIMEOUT)
        .expect("sliced transfer through sluice");
    let sliced_cpu = chain.sluice.cpu_time() - cpu;
    sliced.assert_echoed();
    assert_eq!(chain.client_leg.forwarded(Leg::Upstream), sliced_bytes);
    assert_eq!(chain.backend_leg.forwarded(Leg::Downstream), sliced_bytes);

    // The bulk case, same process, straight to Sluice's listener and through the (now passing)
    // backend-side proxy, for CPU per MiB side by side.
    chain.backend_leg.set(Leg::Downstream, Fault::Pass);
    let cpu = chain.sluice.cpu_time();
    let bulk = verify_echo(chain.front, tiered(64 << 20, 256 << 20), 12, TIMEOUT)
        .expect("bulk transfer through sluice");
    let bulk_cpu = chain.sluice.cpu_time() - cpu;
    bulk.assert_echoed();

    figure(
        &format!("1-64 B segments on both legs, {workers} worker(s)"),
        "SHA-256 and counts match both ways; CPU per MiB reported next to bulk",
        &format!(
            "{} KiB each way matched in {:.1} s; CPU {:.0} ms/MiB sliced vs {:.1} ms/MiB bulk",
            sliced_bytes / 1024,
            sliced.elapsed.as_secs_f64(),
            cpu_per_mib(sliced_cpu, &sliced),
            cpu_per_mib(bulk_cpu, &bulk)
        ),
    );
}

/// Waits until `proxy` has stopped forwarding on `leg` for 200 ms: the pipeline is full.
fn wait_quiet(proxy: &FaultProxy, leg: Leg) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = proxy.forwarded(leg);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        let now = proxy.forwarded(leg);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_millis(200) {
            return;
        }
    }
    panic!("the transfer never stalled");
}

fn stalled_peer_leaves_sluice_idle(workers: usize) {
    let chain = chain(workers);
    let bytes = tiered(64 << 20, 512 << 20);
    let mut figures = Vec::new();
    // First the backend stops reading (Sluice -> backend), then the client (Sluice -> client).
    for (name, proxy, leg, seed) in [
        ("backend", &chain.backend_leg, Leg::Upstream, 21),
        ("client", &chain.client_leg, Leg::Downstream, 22),
    ] {
        let before = proxy.forwarded(leg);
        let client_addr = chain.client_leg.addr();
        let transfer = thread::spawn(move || verify_echo(client_addr, bytes, seed, TIMEOUT));
        // Mid-transfer: a few MiB have gone by.
        let deadline = Instant::now() + TIMEOUT;
        while proxy.forwarded(leg) - before < 4 << 20 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        proxy.set(leg, Fault::Stall);
        wait_quiet(&chain.client_leg, Leg::Upstream);
        let cpu = chain.sluice.cpu_time();
        let wall = Instant::now();
        thread::sleep(STALL);
        let share = (chain.sluice.cpu_time() - cpu).as_secs_f64() / wall.elapsed().as_secs_f64();
        proxy.set(leg, Fault::Pass);
        let report = transfer
            .join()
            .unwrap()
            .expect("the transfer finishes once the stall ends");
        report.assert_echoed();
        assert!(
            share < STALLED_CPU_MAX,
            "sluice used {:.1}% of a core while the {name} was stalled",
            share * 100.0
        );
        figures.push(format!("{name} stalled: {:.1}% of a core", share * 100.0));
    }
    figure(
        &format!("peer stalled mid-transfer, {workers} worker(s)"),
        "Sluice < 10% of a core while stalled; digests match after",
        &figures.join("; "),
    );
}

/// A client that resets while its bytes wait behind a backend that stopped reading: Sluice
/// has no receive armed on that client (its direction is full), and used to notice the reset
/// only once the backend drained the queue, at its pace; a backend that never reads kept the
/// connection forever. Its error watch notices at once; the reset linger (2 s) bounds the rest.
fn reset_behind_a_stalled_backend_closes_promptly(workers: usize) {
    let chain = chain(workers);
    chain.backend_leg.set(Leg::Upstream, Fault::Stall);
    let mut client = std::net::TcpStream::connect(chain.front).unwrap();
    client
        .set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // Push until every buffer between the client and the stalled backend is full.
    let chunk = vec![0x42u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::io::Write::write(&mut client, &chunk).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the stalled backend never pushed back"
        );
    }
    let active = series("sluice_connections_active", &[("listener", "faulty")]);
    let metrics = scrape_metrics(chain.admin).unwrap();
    assert_eq!(metrics.get(&active).copied(), Some(1.0));

    let reset_at = Instant::now();
    reset(client);
    let deadline = reset_at + Duration::from_secs(5);
    let closed_after = loop {
        let metrics = scrape_metrics(chain.admin).unwrap();
        if metrics.get(&active).copied() == Some(0.0) {
            break reset_at.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the connection of a client that reset behind a stalled backend is still open"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let reason = series(
        "sluice_connections_closed_total",
        &[("listener", "faulty"), ("reason", "client_reset")],
    );
    let metrics = scrape_metrics(chain.admin).unwrap();
    assert_eq!(metrics.get(&reason).copied(), Some(1.0));
    figure(
        &format!("client reset behind a stalled backend, {workers} worker(s)"),
        "closed within the reset linger (2 s) + slack, counted client_reset",
        &format!("closed after {:.2} s", closed_after.as_secs_f64()),
    );
}
