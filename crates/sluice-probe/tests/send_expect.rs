//! The `send_expect` check against loopback backends that answer right, wrong, in pieces,
//! never, or forever.

mod support;

use sluice_health::{Check, Expect};
use sluice_probe::{Prober, READ_LIMIT};
use sluice_testkit::refusing_addr;
use support::fake::{Behavior, FakeServer};
use support::{
    HANG_TIMEOUT, PASS_TIMEOUT, assert_closed_by_backend, assert_fails_with, assert_passed,
    failure_text,
};

fn prefix(send: &[u8], prefix: &[u8]) -> Prober {
    Prober::new(&Check::SendExpect {
        send: send.to_vec(),
        expect: Expect::Prefix(prefix.to_vec()),
    })
    .unwrap()
}

fn regex(send: &[u8], pattern: &str) -> Prober {
    Prober::new(&Check::SendExpect {
        send: send.to_vec(),
        expect: Expect::Regex(pattern.to_owned()),
    })
    .unwrap()
}

#[tokio::test]
async fn prefix_passes_and_the_bytes_are_sent() {
    let server = FakeServer::start(Behavior::Reply(b"+PONG\r\n".to_vec())).await;
    assert_passed(
        &prefix(b"PING\r\n", b"+PONG")
            .probe(server.addr, PASS_TIMEOUT)
            .await,
    );
    assert_eq!(server.received(), vec![b"PING\r\n".to_vec()]);
}

#[tokio::test]
async fn prefix_passes_when_the_reply_arrives_in_pieces() {
    let parts = vec![b"+P".to_vec(), b"ON".to_vec(), b"G\r\n".to_vec()];
    let server = FakeServer::start(Behavior::Parts(parts)).await;
    assert_passed(
        &prefix(b"PING\r\n", b"+PONG")
            .probe(server.addr, PASS_TIMEOUT)
            .await,
    );
}

#[tokio::test]
async fn empty_send_waits_for_a_banner() {
    let server = FakeServer::start(Behavior::Greet(b"SSH-2.0-OpenSSH_9.2\r\n".to_vec())).await;
    assert_passed(
        &prefix(b"", b"SSH-2.0-")
            .probe(server.addr, PASS_TIMEOUT)
            .await,
    );
}

#[tokio::test]
async fn regex_passes_across_pieces() {
    let parts = vec![b"status: re".to_vec(), b"ady\n".to_vec()];
    let server = FakeServer::start(Behavior::Parts(parts)).await;
    let prober = regex(b"status\n", r"status: (ready|ok)\n");
    assert_passed(&prober.probe(server.addr, PASS_TIMEOUT).await);
}

#[tokio::test]
async fn wrong_reply_fails_at_once_with_both_shown() {
    let server = FakeServer::start(Behavior::Reply(
        b"-NOAUTH Authentication required.\r\n".to_vec(),
    ))
    .await;
    let outcome = prefix(b"PING\r\n", b"+PONG")
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    assert_eq!(
        failure_text(&outcome),
        "expected +PONG, got -NOAUTH Authentication required.\\r\\n"
    );
    // Decided on the first bytes, not at the timeout.
    assert!(outcome.latency() < PASS_TIMEOUT / 2);
}

#[tokio::test]
async fn garbage_fails_the_regex_at_eof() {
    let server = FakeServer::start(Behavior::ReplyAndClose(b"\x00\xff\x13garbage".to_vec())).await;
    let outcome = regex(b"hello\n", "^OK")
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    assert_eq!(
        failure_text(&outcome),
        "reply does not match /^OK/: got \\x00\\xff\\x13garbage"
    );
}

#[tokio::test]
async fn a_reply_that_never_matches_times_out_with_the_bytes_counted() {
    let server = FakeServer::start(Behavior::Reply(b"not yet".to_vec())).await;
    let outcome = regex(b"hello\n", "^OK")
        .probe(server.addr, HANG_TIMEOUT)
        .await;
    assert_eq!(
        failure_text(&outcome),
        "timed out after 200ms waiting for the reply (7 bytes received)"
    );
}

#[tokio::test]
async fn silent_backend_fails_by_timeout() {
    let server = FakeServer::start(Behavior::Silent).await;
    let outcome = prefix(b"PING\r\n", b"+PONG")
        .probe(server.addr, HANG_TIMEOUT)
        .await;
    assert_eq!(
        failure_text(&outcome),
        "timed out after 200ms waiting for the reply (0 bytes received)"
    );
    assert!(outcome.latency() >= HANG_TIMEOUT);
    assert!(
        outcome.latency() < HANG_TIMEOUT * 5,
        "{:?}",
        outcome.latency()
    );
}

#[tokio::test]
async fn backend_closing_at_once_fails() {
    let server = FakeServer::start(Behavior::CloseAtOnce).await;
    let outcome = prefix(b"PING\r\n", b"+PONG")
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    assert_closed_by_backend(&outcome);
}

#[tokio::test]
async fn backend_closing_mid_prefix_fails_with_what_it_sent() {
    let server = FakeServer::start(Behavior::ReplyAndClose(b"+PO".to_vec())).await;
    let outcome = prefix(b"PING\r\n", b"+PONG")
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    // At EOF the bytes received are the whole reply.
    assert_eq!(failure_text(&outcome), "expected +PONG, got +PO");
}

#[tokio::test]
async fn endless_stream_is_read_only_up_to_the_limit() {
    let server = FakeServer::start(Behavior::Endless(vec![b'a'; 1000])).await;
    let outcome = regex(b"hello\n", "^OK")
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    assert_eq!(
        failure_text(&outcome),
        format!("reply longer than {READ_LIMIT} bytes without an answer")
    );
    assert!(outcome.latency() < PASS_TIMEOUT / 2);
}

#[tokio::test]
async fn endless_stream_that_starts_right_passes() {
    let server = FakeServer::start(Behavior::Endless(b"+PONG\r\n".to_vec())).await;
    assert_passed(&prefix(b"", b"+PONG").probe(server.addr, PASS_TIMEOUT).await);
}

#[tokio::test]
async fn refused_port_fails() {
    let outcome = prefix(b"PING\r\n", b"+PONG")
        .probe(refusing_addr(), PASS_TIMEOUT)
        .await;
    assert_fails_with(&outcome, "connect refused");
}

#[test]
fn invalid_regex_is_a_setup_error() {
    let error = Prober::new(&Check::SendExpect {
        send: Vec::new(),
        expect: Expect::Regex("a{99999999}".to_owned()),
    })
    .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("expect_regex \"a{99999999}\" does not compile"),
        "{error}"
    );
}
