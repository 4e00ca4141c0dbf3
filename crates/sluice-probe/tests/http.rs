//! The `http` check against loopback backends: status ranges, the request it sends, another
//! port, and backends that answer garbage, nothing, or forever.

mod support;

use std::ops::RangeInclusive;

use sluice_health::Check;
use sluice_probe::{ProbeSetupError, Prober};
use sluice_testkit::refusing_addr;
use support::fake::{Behavior, FakeServer};
use support::{
    HANG_TIMEOUT, PASS_TIMEOUT, assert_closed_by_backend, assert_fails_with, assert_passed,
    failure_text,
};

fn http(status: RangeInclusive<u16>, port: Option<u16>) -> Prober {
    Prober::new(&Check::Http {
        path: "/readyz".to_owned(),
        host: "example.com".to_owned(),
        status,
        port,
    })
    .unwrap()
}

fn response(status_line: &str) -> Behavior {
    Behavior::Reply(format!("{status_line}\r\nContent-Length: 2\r\n\r\nok").into_bytes())
}

#[tokio::test]
async fn status_in_range_passes_and_the_request_is_well_formed() {
    let server = FakeServer::start(response("HTTP/1.1 200 OK")).await;
    assert_passed(&http(200..=399, None).probe(server.addr, PASS_TIMEOUT).await);
    let request = String::from_utf8(server.received().concat()).unwrap();
    assert_eq!(
        request,
        "GET /readyz HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\
         User-Agent: sluice-health\r\nAccept: */*\r\n\r\n"
    );
}

#[tokio::test]
async fn status_out_of_range_fails() {
    let server = FakeServer::start(response("HTTP/1.1 503 Service Unavailable")).await;
    let outcome = http(200..=399, None).probe(server.addr, PASS_TIMEOUT).await;
    assert_eq!(failure_text(&outcome), "HTTP status 503 not in 200-399");
}

#[tokio::test]
async fn status_line_in_pieces_passes() {
    let parts = vec![b"HTTP/1.0 2".to_vec(), b"04".to_vec(), b"\r\n\r\n".to_vec()];
    let server = FakeServer::start(Behavior::Parts(parts)).await;
    assert_passed(&http(204..=204, None).probe(server.addr, PASS_TIMEOUT).await);
}

#[tokio::test]
async fn another_port_is_probed_when_configured() {
    let server = FakeServer::start(response("HTTP/1.1 200 OK")).await;
    // The traffic port refuses; the check's own port answers.
    let traffic = refusing_addr();
    assert_eq!(traffic.ip(), server.addr.ip());
    let outcome = http(200..=299, Some(server.addr.port()))
        .probe(traffic, PASS_TIMEOUT)
        .await;
    assert_passed(&outcome);
    let refused = http(200..=299, None).probe(traffic, PASS_TIMEOUT).await;
    assert_fails_with(&refused, "connect refused");
}

#[tokio::test]
async fn garbage_fails_as_a_protocol_error() {
    let server = FakeServer::start(Behavior::Reply(b"\x16\x03\x01\x00\xff garbage".to_vec())).await;
    let outcome = http(200..=399, None).probe(server.addr, PASS_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "protocol error: not an HTTP/1.x response: \\x16\\x03\\x01\\x00\\xff garbage"
    );
}

#[tokio::test]
async fn malformed_status_fails_as_a_protocol_error() {
    let server = FakeServer::start(Behavior::Reply(b"HTTP/1.1 2OO OK\r\n\r\n".to_vec())).await;
    let outcome = http(200..=399, None).probe(server.addr, PASS_TIMEOUT).await;
    assert_fails_with(
        &outcome,
        "protocol error: malformed status line: HTTP/1.1 2OO OK",
    );
}

#[tokio::test]
async fn silent_backend_fails_by_timeout() {
    let server = FakeServer::start(Behavior::Silent).await;
    let outcome = http(200..=399, None).probe(server.addr, HANG_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "timed out after 200ms waiting for the status line (0 bytes received)"
    );
}

#[tokio::test]
async fn backend_closing_at_once_fails() {
    let server = FakeServer::start(Behavior::CloseAtOnce).await;
    let outcome = http(200..=399, None).probe(server.addr, PASS_TIMEOUT).await;
    assert_closed_by_backend(&outcome);
}

#[tokio::test]
async fn endless_status_line_fails_at_its_bound() {
    let server = FakeServer::start(Behavior::Endless(b"HTTP/1.1 200 ".to_vec())).await;
    let outcome = http(200..=399, None).probe(server.addr, PASS_TIMEOUT).await;
    assert_fails_with(&outcome, "protocol error: status line too long");
    assert!(outcome.latency() < PASS_TIMEOUT / 2);
}

#[tokio::test]
async fn refused_port_fails() {
    let outcome = http(200..=399, None)
        .probe(refusing_addr(), PASS_TIMEOUT)
        .await;
    assert_eq!(failure_text(&outcome), "connect refused");
}

#[test]
fn header_injection_is_refused_at_setup() {
    let error = Prober::new(&Check::Http {
        path: "/readyz".to_owned(),
        host: "example.com\r\nX-Evil: 1".to_owned(),
        status: 200..=399,
        port: None,
    })
    .unwrap_err();
    assert!(
        matches!(error, ProbeSetupError::HttpField { field: "host", .. }),
        "{error}"
    );
}
