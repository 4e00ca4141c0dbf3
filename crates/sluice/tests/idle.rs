//! Bulk bytes are spliced through pooled pipes, and a connection that goes idle afterwards
//! holds no pipe (DESIGN: an idle connection holds no pipe and no buffer); it still carries
//! bytes when it wakes up.

mod common;

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, TIMEOUT, binary, config};
use sluice_testkit::{
    EchoServer, SeededStream, Sluice, StreamEnd, free_addr, read_up_to, scrape_metrics,
    write_stream,
};

with_workers_1_and_2!(bulk_is_spliced_and_an_idle_connection_holds_no_pipe);

const BULK: u64 = 32 << 20;

fn metric(admin: std::net::SocketAddr, key: &str) -> f64 {
    scrape_metrics(admin)
        .unwrap()
        .get(key)
        .copied()
        .unwrap_or(f64::NAN)
}

fn bulk_is_spliced_and_an_idle_connection_holds_no_pipe(workers: usize) {
    let backend = EchoServer::echo();
    let admin = free_addr();
    let listener = Listener::new("bulk", &[backend.addr()]);
    let front = listener.bind;
    let _sluice = Sluice::start(binary(), &config(workers, Some(admin), &[], &[listener]));

    // 32 MiB echoed without a FIN: the connection stays open afterwards.
    let stream = TcpStream::connect(front).unwrap();
    let expected = SeededStream::summary(5, BULK);
    let reader = {
        let stream = stream.try_clone().unwrap();
        thread::spawn(move || read_up_to(&stream, BULK, Instant::now() + TIMEOUT))
    };
    let sent = write_stream(&stream, BULK, 5, false).expect("write 32 MiB");
    assert_eq!(sent, expected);
    let echoed = reader.join().unwrap();
    assert_eq!(
        echoed.end,
        StreamEnd::LimitReached,
        "after {} bytes",
        echoed.received.bytes
    );
    assert_eq!(echoed.received, expected);

    // Bulk bursts went through pipes, not only through user-space copies.
    let spliced = metric(admin, "sluice_bytes_spliced_total");
    assert!(spliced > 0.0, "no byte was spliced while moving 2 x 32 MiB");

    // Idle now: every pipe is back in its pool.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut leased = metric(admin, "sluice_pipes_leased");
    while leased != 0.0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        leased = metric(admin, "sluice_pipes_leased");
    }
    assert_eq!(leased, 0.0, "an idle connection still holds a pipe");

    // And it still works.
    let expected = SeededStream::summary(6, 1 << 20);
    let reader = {
        let stream = stream.try_clone().unwrap();
        thread::spawn(move || read_up_to(&stream, 1 << 20, Instant::now() + TIMEOUT))
    };
    write_stream(&stream, 1 << 20, 6, false).unwrap();
    assert_eq!(reader.join().unwrap().received, expected);
}
