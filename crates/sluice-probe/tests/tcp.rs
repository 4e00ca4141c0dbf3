//! The `tcp` check against loopback listeners and addresses where nothing listens.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use sluice_health::Check;
use sluice_probe::Prober;
use sluice_testkit::refusing_addr;
use socket2::{Domain, Socket, Type};
use support::fake::{Behavior, FakeServer};
use support::{HANG_TIMEOUT, PASS_TIMEOUT, assert_fails_with, assert_passed, failure_text};

#[tokio::test]
async fn passes_when_the_connect_completes() {
    let server = FakeServer::start(Behavior::Silent).await;
    let prober = Prober::new(&Check::Tcp).unwrap();
    let outcome = prober.probe(server.addr, PASS_TIMEOUT).await;
    assert_passed(&outcome);
    assert!(outcome.latency() < PASS_TIMEOUT);
}

#[tokio::test]
async fn passes_even_when_the_backend_closes_at_once() {
    let server = FakeServer::start(Behavior::CloseAtOnce).await;
    let prober = Prober::new(&Check::Tcp).unwrap();
    assert_passed(&prober.probe(server.addr, PASS_TIMEOUT).await);
}

#[tokio::test]
async fn fails_on_a_refused_port() {
    let prober = Prober::new(&Check::Tcp).unwrap();
    let outcome = prober.probe(refusing_addr(), PASS_TIMEOUT).await;
    assert_eq!(failure_text(&outcome), "connect refused");
    assert!(outcome.latency() < PASS_TIMEOUT);
}

#[tokio::test]
async fn fails_by_timeout_when_the_connect_does_not_complete() {
    // A listener whose accept queue is full: Linux drops further SYNs, so a connect hangs.
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    while let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
        queued.push(stream);
        assert!(queued.len() < 64, "the accept queue never filled");
    }

    let prober = Prober::new(&Check::Tcp).unwrap();
    let outcome = prober.probe(addr, HANG_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "timed out after 200ms while connecting"
    );
    assert!(
        outcome.latency() < HANG_TIMEOUT * 5,
        "{:?}",
        outcome.latency()
    );
}

#[tokio::test]
async fn zero_timeout_fails_without_hanging() {
    let server = FakeServer::start(Behavior::Silent).await;
    let prober = Prober::new(&Check::Tcp).unwrap();
    let outcome = prober.probe(server.addr, Duration::ZERO).await;
    // A connect to loopback may complete within the first poll; if not, it is a timeout.
    if !outcome.is_passed() {
        assert_fails_with(&outcome, "timed out after 0s");
    }
}
