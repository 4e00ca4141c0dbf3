//! A backend killed with SIGKILL in the middle of 200 transfers: its connections close toward
//! their clients within a second, every other transfer finishes with matching digests, and new
//! connections see no failure (retries and passive ejection hide the dead backend).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, TIMEOUT, binary, config};
use sluice_testkit::{
    Checksum, ChildEcho, EchoServer, SeededStream, Sluice, StreamSummary, figure, serve_if_child,
    tiered, verify_echo_many,
};

with_workers_1_and_2!(backend_killed_mid_transfer);

/// Bytes each transfer sends (and gets back), paced so that every transfer is still running
/// when the backend dies.
const STREAM: u64 = 160 * 1024;
/// One paced write.
const PIECE: usize = 1024;
/// Pause between paced writes: a transfer lasts about STREAM / PIECE x PACE = 1.6 s.
const PACE: Duration = Duration::from_millis(10);
/// The bound on how long a dead backend's connection may stay open toward its client.
const CLOSE_BOUND: Duration = Duration::from_secs(1);

/// How one paced transfer ended.
struct Transfer {
    sent: StreamSummary,
    received: StreamSummary,
    /// When the client saw the end of the stream (EOF or reset).
    ended_at: Instant,
    complete: bool,
}

fn paced_transfer(front: SocketAddr, seed: u64, started: &Barrier) -> Transfer {
    let stream = TcpStream::connect(front).expect("connect through sluice");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let writer = {
        let stream = stream.try_clone().unwrap();
        thread::spawn(move || {
            let mut out = &stream;
            let mut source = SeededStream::with_max_write(seed, STREAM, PIECE);
            let mut sent = Checksum::new();
            while let Some(chunk) = source.next_chunk() {
                if out.write_all(chunk).is_err() {
                    break;
                }
                sent.update(chunk);
                thread::sleep(PACE);
            }
            let _ = stream.shutdown(Shutdown::Write);
            sent.finish()
        })
    };
    started.wait();
    let mut received = Checksum::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + TIMEOUT;
    let mut input = &stream;
    while Instant::now() < deadline {
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.update(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock) => {}
            Err(_) => break,
        }
    }
    let ended_at = Instant::now();
    // The writer stops at its first failed write, or finishes its paced stream.
    let sent = writer.join().expect("writer");
    let received = received.finish();
    Transfer {
        complete: sent.bytes == STREAM && sent == received,
        sent,
        received,
        ended_at,
    }
}

fn backend_killed_mid_transfer(workers: usize) {
    let test = format!("backend_killed_mid_transfer::workers_{workers}");
    serve_if_child();
    let mut doomed = ChildEcho::spawn(&test);
    let survivor = EchoServer::echo();
    let listener = Listener::new("kill", &[doomed.addr(), survivor.addr()]);
    let front = listener.bind;
    let mut sluice = Sluice::start(binary(), &config(workers, None, &[], &[listener]));

    let transfers = tiered(200, 1000);
    let started = Arc::new(Barrier::new(transfers + 1));
    let clients: Vec<_> = (0..transfers)
        .map(|i| {
            let started = Arc::clone(&started);
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || paced_transfer(front, 1000 + i as u64, &started))
                .unwrap()
        })
        .collect();
    started.wait();
    // Every transfer is connected and has its writer running: let them get well into it.
    thread::sleep(Duration::from_millis(500));
    let on_survivor = survivor.accepted() as usize;
    let killed_at = Instant::now();
    doomed.kill();
    let results: Vec<Transfer> = clients.into_iter().map(|c| c.join().unwrap()).collect();

    let complete = results.iter().filter(|t| t.complete).count();
    let cut: Vec<&Transfer> = results.iter().filter(|t| !t.complete).collect();
    assert_eq!(
        complete, on_survivor,
        "every transfer on the surviving backend completes with matching digests, and only those"
    );
    assert!(!cut.is_empty(), "no transfer was on the killed backend");
    let slowest_close = cut
        .iter()
        .map(|t| t.ended_at.saturating_duration_since(killed_at))
        .max()
        .unwrap();
    for transfer in &cut {
        // A cut transfer never gets more back than a whole stream (nothing duplicated); its
        // bytes' order is not checked here, only the survivors' digests are.
        assert!(transfer.received.bytes <= transfer.sent.bytes.max(STREAM));
    }
    assert!(
        slowest_close < CLOSE_BOUND,
        "a dead backend's connection stayed open toward its client for {slowest_close:?}"
    );

    // New connections: none fails (the dead backend refuses, the retry finds the survivor).
    let fresh = verify_echo_many(front, 100, 16 * 1024, 9000, TIMEOUT);
    let failed = fresh
        .iter()
        .filter(|r| !r.as_ref().is_ok_and(|r| r.sent == r.received))
        .count();
    assert_eq!(failed, 0, "new connections failed after the kill");
    assert!(sluice.try_exit_status().is_none(), "sluice exited");
    figure(
        &format!("backend SIGKILLed mid-transfer ({transfers} transfers, {workers} worker(s))"),
        "its connections closed toward clients < 1 s; others' digests match; 0 new failures",
        &format!(
            "closed within {:.0} ms ({} cut); {complete}/{complete} digests match; 0/100 new failed",
            slowest_close.as_secs_f64() * 1000.0,
            cut.len()
        ),
    );
}
