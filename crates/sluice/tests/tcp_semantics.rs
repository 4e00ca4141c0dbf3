//! TCP behaviour a proxy must carry: half-close both ways, resets after data, server-speaks-first
//! protocols, and refused backends.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, TIMEOUT, start, start_listener};
use sluice_testkit::{
    Checksum, EchoServer, SeededStream, StreamEnd, assert_echo, read_to_end, read_up_to,
    refusing_addr, reset, summary_of, wait_acknowledged, write_stream,
};

with_workers_1_and_2!(
    client_fin_first_still_receives_the_reply,
    backend_fin_first_still_receives_the_client,
    backend_reset_arrives_after_every_byte,
    client_reset_reaches_the_backend_as_a_reset,
    greeting_reaches_a_silent_client,
    refused_backend_is_retried_on_the_next,
    all_backends_refusing_resets_the_client_promptly,
);

/// The client sends 1 MiB and FIN; only then does the backend answer 3 MiB: the client gets it all.
fn client_fin_first_still_receives_the_reply(workers: usize) {
    let backend = EchoServer::read_then_send(3 << 20, 11);
    let (_sluice, front) = start(workers, &[backend.addr()]);
    let stream = TcpStream::connect(front).unwrap();
    let sent = write_stream(&stream, 1 << 20, 10, true).unwrap();
    let read = read_to_end(&stream, Instant::now() + TIMEOUT);
    assert_eq!(
        read.end,
        StreamEnd::Eof,
        "after {} of {} bytes",
        read.received.bytes,
        3 << 20
    );
    assert_eq!(read.received, SeededStream::summary(11, 3 << 20));
    let records = backend
        .wait_records(1, TIMEOUT)
        .expect("the backend connection ends");
    assert_eq!(
        records[0].received, sent,
        "what the backend read before the client's FIN"
    );
    assert_eq!(records[0].error, None);
}

/// The backend sends 1 MiB and FIN, then keeps reading: the client, which is sending throughout,
/// sees a clean EOF and keeps sending; the backend gets every byte the client sent, before and
/// after the backend's FIN.
fn backend_fin_first_still_receives_the_client(workers: usize) {
    let backend = EchoServer::send_then_fin(1 << 20, 21);
    let (_sluice, front) = start(workers, &[backend.addr()]);
    let stream = TcpStream::connect(front).unwrap();
    let client_bytes: u64 = 6 << 20;
    let eof_seen = AtomicBool::new(false);
    let (sent, read) = thread::scope(|scope| {
        let writer = scope.spawn(|| {
            // Half the stream while the backend sends, the rest after the client has seen its FIN.
            let mut source = SeededStream::new(20, client_bytes);
            let mut checksum = Checksum::new();
            while let Some(chunk) = source.next_chunk() {
                if checksum.bytes() >= client_bytes / 2 {
                    let deadline = Instant::now() + TIMEOUT;
                    while !eof_seen.load(Ordering::SeqCst) && Instant::now() < deadline {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
                (&stream)
                    .write_all(chunk)
                    .expect("the client keeps sending after the backend's FIN");
                checksum.update(chunk);
            }
            stream.shutdown(Shutdown::Write).unwrap();
            checksum.finish()
        });
        let read = read_to_end(&stream, Instant::now() + TIMEOUT);
        eof_seen.store(true, Ordering::SeqCst);
        (writer.join().unwrap(), read)
    });
    assert_eq!(read.end, StreamEnd::Eof);
    assert_eq!(read.received, SeededStream::summary(21, 1 << 20));
    let records = backend
        .wait_records(1, TIMEOUT)
        .expect("the backend connection ends");
    assert_eq!(
        records[0].received, sent,
        "what the backend read after its own FIN"
    );
    assert_eq!(records[0].error, None);
}

/// The backend sends 4 MiB and resets. The client starts reading only 300 ms later, so the reset
/// reaches Sluice while bytes are still on their way: the client gets all of them, then a reset.
fn backend_reset_arrives_after_every_byte(workers: usize) {
    let backend = EchoServer::send_then_reset(4 << 20, 31);
    let (_sluice, front) = start(workers, &[backend.addr()]);
    let stream = TcpStream::connect(front).unwrap();
    thread::sleep(Duration::from_millis(300));
    let read = read_to_end(&stream, Instant::now() + TIMEOUT);
    assert_eq!(
        read.received,
        SeededStream::summary(31, 4 << 20),
        "bytes before the reset"
    );
    assert_eq!(
        read.end,
        StreamEnd::Reset,
        "the backend's reset must reach the client as a reset"
    );
    let records = backend
        .wait_records(1, TIMEOUT)
        .expect("the backend connection ends");
    assert_eq!(
        records[0].error, None,
        "the backend could not see its bytes acknowledged before resetting"
    );
}

/// Sluice connects upstream at accept, so a greeting reaches a client that sends nothing; the
/// connection then works both ways.
fn greeting_reaches_a_silent_client(workers: usize) {
    let greeting = b"+OK sluice test greeting\r\n";
    let backend = EchoServer::greeting(greeting);
    let (_sluice, front) = start(workers, &[backend.addr()]);
    let mut stream = TcpStream::connect(front).unwrap();
    let read = read_up_to(
        &stream,
        greeting.len() as u64,
        Instant::now() + Duration::from_secs(5),
    );
    assert_eq!(
        read.end,
        StreamEnd::LimitReached,
        "greeting not received: {:?}",
        read.received
    );
    assert_eq!(read.received, summary_of(greeting));
    stream.write_all(b"ping").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut pong = [0; 4];
    stream.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"ping");
}

/// With the first backend refusing, every connection still works: refused connects are retried
/// on the next backend.
fn refused_backend_is_retried_on_the_next(workers: usize) {
    let backend = EchoServer::echo();
    let listener = Listener::new("retry", &[refusing_addr(), backend.addr()]).with("retries: 1");
    let (_sluice, front) = start_listener(workers, listener);
    for seed in 0..6 {
        assert_echo(front, 100_000, seed, TIMEOUT);
    }
    assert_eq!(backend.accepted(), 6);
}

/// With every backend refusing, the client is reset within 2 s (not left hanging, not a clean EOF).
fn all_backends_refusing_resets_the_client_promptly(workers: usize) {
    let listener = Listener::new("refused", &[refusing_addr(), refusing_addr()]).with("retries: 2");
    let (_sluice, front) = start_listener(workers, listener);
    for _ in 0..3 {
        let started = Instant::now();
        let stream = TcpStream::connect(front).unwrap();
        let read = read_to_end(&stream, started + Duration::from_secs(2));
        let elapsed = started.elapsed();
        assert_eq!(read.end, StreamEnd::Reset, "after {elapsed:?}");
        assert_eq!(read.received.bytes, 0);
    }
}

/// The client sends 1 MiB, then resets: the backend gets every byte, then a reset (not a FIN).
fn client_reset_reaches_the_backend_as_a_reset(workers: usize) {
    let backend = EchoServer::read_then_send(1, 1);
    let (_sluice, front) = start(workers, &[backend.addr()]);
    let stream = TcpStream::connect(front).unwrap();
    let sent = write_stream(&stream, 1 << 20, 21, false).unwrap();
    assert!(
        wait_acknowledged(&stream, Duration::from_secs(10)),
        "Sluice took the bytes"
    );
    // Acknowledged by Sluice's kernel is not yet read by Sluice: give it a moment to forward.
    thread::sleep(Duration::from_millis(500));
    reset(stream);
    let records = backend
        .wait_records(1, Duration::from_secs(10))
        .unwrap_or_else(|seen| panic!("the backend connection did not end: {seen:?}"));
    assert_eq!(records.len(), 1, "one backend connection ended");
    assert_eq!(records[0].received, sent, "every byte reached the backend");
    assert_eq!(
        records[0].error,
        Some(std::io::ErrorKind::ConnectionReset),
        "the backend saw {:?}, not a reset",
        records[0].error
    );
}
