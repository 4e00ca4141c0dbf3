//! The `redis` check: real `redis-server` processes (a master and its replica, a server with
//! `requirepass`) for roles and authentication, and fake backends for the replies a healthy
//! server rarely sends.

mod support;

use std::path::PathBuf;

use sluice_health::{Check, RedisRole};
use sluice_probe::Prober;
use sluice_testkit::refusing_addr;
use support::fake::{Behavior, FakeServer};
use support::redis::RedisServer;
use support::temp::TempDir;
use support::{
    HANG_TIMEOUT, PASS_TIMEOUT, assert_closed_by_backend, assert_fails_with, assert_passed,
    failure_text,
};

fn redis(role: Option<RedisRole>, password_file: Option<PathBuf>) -> Prober {
    Prober::new(&Check::Redis {
        role,
        password_file,
    })
    .unwrap()
}

#[tokio::test]
async fn role_tells_master_from_replica() {
    let master = RedisServer::start(&[]);
    let replica = RedisServer::replica_of(&master);
    let want_master = redis(Some(RedisRole::Master), None);
    let want_replica = redis(Some(RedisRole::Replica), None);
    let any_role = redis(None, None);

    assert_passed(&want_master.probe(master.addr, PASS_TIMEOUT).await);
    assert_passed(&want_replica.probe(replica.addr, PASS_TIMEOUT).await);
    assert_passed(&any_role.probe(master.addr, PASS_TIMEOUT).await);
    assert_passed(&any_role.probe(replica.addr, PASS_TIMEOUT).await);

    let outcome = want_master.probe(replica.addr, PASS_TIMEOUT).await;
    assert_eq!(failure_text(&outcome), "role is replica, want master");
    let outcome = want_replica.probe(master.addr, PASS_TIMEOUT).await;
    assert_eq!(failure_text(&outcome), "role is master, want replica");
}

#[tokio::test]
async fn requirepass_with_right_wrong_and_missing_passwords() {
    const PASSWORD: &str = "correct horse battery";
    let server = RedisServer::start(&["--requirepass", PASSWORD]);
    let dir = TempDir::new("redis-pass");
    let right = dir.write("right.pass", &format!("{PASSWORD}\n"));
    let wrong = dir.write("wrong.pass", "staple\n");

    let outcome = redis(Some(RedisRole::Master), Some(right))
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    assert_passed(&outcome);

    let outcome = redis(None, Some(wrong))
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    assert_fails_with(&outcome, "authentication failed: WRONGPASS ");
    assert!(!failure_text(&outcome).contains("staple"));

    let outcome = redis(None, None).probe(server.addr, PASS_TIMEOUT).await;
    assert_fails_with(
        &outcome,
        "expected +PONG, got -NOAUTH Authentication required.",
    );

    let missing = dir.path().join("missing.pass");
    let error = Prober::new(&Check::Redis {
        role: None,
        password_file: Some(missing.clone()),
    })
    .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with(&format!("password_file {}: ", missing.display())),
        "{error}"
    );
}

#[tokio::test]
async fn a_password_for_a_server_without_one_fails_without_showing_it() {
    let server = RedisServer::start(&[]);
    let dir = TempDir::new("redis-pass");
    let file = dir.write("extra.pass", "not-needed-secret");
    let outcome = redis(None, Some(file))
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    assert_fails_with(&outcome, "authentication failed: ");
    assert!(!failure_text(&outcome).contains("not-needed-secret"));
}

#[tokio::test]
async fn loading_is_a_failure_with_the_servers_message() {
    let reply = b"-LOADING Redis is loading the dataset in memory\r\n".to_vec();
    let server = FakeServer::start(Behavior::Reply(reply)).await;
    let outcome = redis(None, None).probe(server.addr, PASS_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "expected +PONG, got -LOADING Redis is loading the dataset in memory"
    );
    assert_eq!(server.received(), vec![b"*1\r\n$4\r\nPING\r\n".to_vec()]);
}

#[tokio::test]
async fn replies_in_pieces_pass() {
    let parts = vec![
        b"+PO".to_vec(),
        b"NG\r\n*3\r\n$6\r\nmas".to_vec(),
        b"ter\r\n:0\r\n*0\r\n".to_vec(),
    ];
    let server = FakeServer::start(Behavior::Parts(parts)).await;
    let outcome = redis(Some(RedisRole::Master), None)
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    assert_passed(&outcome);
}

#[tokio::test]
async fn an_unknown_role_is_named() {
    let reply = b"+PONG\r\n*2\r\n$8\r\nsentinel\r\n*0\r\n".to_vec();
    let server = FakeServer::start(Behavior::Reply(reply)).await;
    let outcome = redis(Some(RedisRole::Master), None)
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    assert_eq!(failure_text(&outcome), "role is sentinel, want master");
}

#[tokio::test]
async fn role_errors_are_failures() {
    let reply = b"+PONG\r\n-ERR unknown command 'ROLE'\r\n".to_vec();
    let server = FakeServer::start(Behavior::Reply(reply)).await;
    let outcome = redis(Some(RedisRole::Replica), None)
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    assert_eq!(
        failure_text(&outcome),
        "expected a ROLE array, got -ERR unknown command 'ROLE'"
    );
}

#[tokio::test]
async fn garbage_is_a_protocol_error() {
    let server = FakeServer::start(Behavior::Reply(b"\x00\x01garbage\r\n".to_vec())).await;
    let outcome = redis(None, None).probe(server.addr, PASS_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "protocol error: unknown reply type in the PING reply: \\x00\\x01garbage\\r\\n"
    );
}

#[tokio::test]
async fn a_huge_bulk_length_is_a_protocol_error() {
    let reply = b"+PONG\r\n*1\r\n$999999999\r\nmaster".to_vec();
    let server = FakeServer::start(Behavior::Reply(reply)).await;
    let outcome = redis(Some(RedisRole::Master), None)
        .probe(server.addr, PASS_TIMEOUT)
        .await;
    assert_fails_with(
        &outcome,
        "protocol error: bulk string too long in the ROLE reply",
    );
}

#[tokio::test]
async fn an_endless_line_fails_at_its_bound() {
    let server = FakeServer::start(Behavior::Endless(b"+PPPPPPPPPPPPPPPP".to_vec())).await;
    let outcome = redis(None, None).probe(server.addr, PASS_TIMEOUT).await;
    assert_fails_with(&outcome, "protocol error: line too long in the PING reply");
    assert!(outcome.latency() < PASS_TIMEOUT / 2);
}

#[tokio::test]
async fn silent_backend_fails_by_timeout() {
    let server = FakeServer::start(Behavior::Silent).await;
    let outcome = redis(None, None).probe(server.addr, HANG_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "timed out after 200ms waiting for the PING reply (0 bytes received)"
    );
}

#[tokio::test]
async fn backend_closing_at_once_fails() {
    let server = FakeServer::start(Behavior::CloseAtOnce).await;
    assert_closed_by_backend(&redis(None, None).probe(server.addr, PASS_TIMEOUT).await);
}

#[tokio::test]
async fn refused_port_fails() {
    let outcome = redis(Some(RedisRole::Master), None)
        .probe(refusing_addr(), PASS_TIMEOUT)
        .await;
    assert_eq!(failure_text(&outcome), "connect refused");
}
