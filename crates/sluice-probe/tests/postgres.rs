//! The `postgres` check against real PostgreSQL clusters made by the test (a primary with
//! SCRAM-SHA-256, md5 and trust users, and a streaming standby made with `pg_basebackup -R`),
//! and against fake backends that never answer, answer garbage or send forever.

mod support;

use std::path::PathBuf;

use sluice_health::{Check, PostgresRole};
use sluice_probe::Prober;
use sluice_testkit::PostgresCluster;
use support::fake::{Behavior, FakeServer};
use support::temp::TempDir;
use support::{HANG_TIMEOUT, PASS_TIMEOUT, assert_passed, failure_text};

const SCRAM_USER: &str = PostgresCluster::SCRAM_USER;
const SCRAM_PASSWORD: &str = PostgresCluster::SCRAM_PASSWORD;
const MD5_USER: &str = PostgresCluster::MD5_USER;
const MD5_PASSWORD: &str = PostgresCluster::MD5_PASSWORD;
const TRUST_USER: &str = PostgresCluster::TRUST_USER;

fn postgres(role: Option<PostgresRole>, user: &str, password_file: Option<PathBuf>) -> Prober {
    postgres_db(role, user, "postgres", password_file)
}

fn postgres_db(
    role: Option<PostgresRole>,
    user: &str,
    database: &str,
    password_file: Option<PathBuf>,
) -> Prober {
    Prober::new(&Check::Postgres {
        role,
        user: user.to_owned(),
        database: database.to_owned(),
        password_file,
    })
    .unwrap()
}

#[tokio::test]
async fn primary_authentication_and_role() {
    let primary = PostgresCluster::primary();
    let dir = TempDir::new("pg-pass");
    let scram = dir.write("scram.pass", &format!("{SCRAM_PASSWORD}\n"));
    let md5 = dir.write("md5.pass", MD5_PASSWORD);
    let wrong = dir.write("wrong.pass", "wrong-secret\n");
    let addr = primary.addr();

    // SCRAM-SHA-256: the role decides.
    let want_primary = postgres(Some(PostgresRole::Primary), SCRAM_USER, Some(scram.clone()));
    assert_passed(&want_primary.probe(addr, PASS_TIMEOUT).await);
    let any_role = postgres(None, SCRAM_USER, Some(scram.clone()));
    assert_passed(&any_role.probe(addr, PASS_TIMEOUT).await);
    let want_standby = postgres(Some(PostgresRole::Standby), SCRAM_USER, Some(scram.clone()));
    let outcome = want_standby.probe(addr, PASS_TIMEOUT).await;
    assert_eq!(failure_text(&outcome), "role is primary, want standby");

    // md5 and trust.
    let md5_right = postgres(Some(PostgresRole::Primary), MD5_USER, Some(md5));
    assert_passed(&md5_right.probe(addr, PASS_TIMEOUT).await);
    let trust = postgres(Some(PostgresRole::Primary), TRUST_USER, None);
    assert_passed(&trust.probe(addr, PASS_TIMEOUT).await);

    // Wrong and missing passwords, for both methods; the password never shows.
    for user in [SCRAM_USER, MD5_USER] {
        let outcome = postgres(None, user, Some(wrong.clone()))
            .probe(addr, PASS_TIMEOUT)
            .await;
        assert_eq!(
            failure_text(&outcome),
            format!(
                "authentication failed: FATAL 28P01: password authentication failed for user \
                 \"{user}\""
            )
        );
        assert!(!failure_text(&outcome).contains("wrong-secret"));
        let outcome = postgres(None, user, None).probe(addr, PASS_TIMEOUT).await;
        assert_eq!(
            failure_text(&outcome),
            "authentication failed: the server asks for a password and no password_file is set"
        );
    }

    // A database that does not exist is the server's error, not an authentication failure.
    let no_db = postgres_db(None, SCRAM_USER, "no_such_db", Some(scram));
    let outcome = no_db.probe(addr, PASS_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "server error: FATAL 3D000: database \"no_such_db\" does not exist"
    );
}

#[tokio::test]
async fn standby_from_pg_basebackup_and_its_promotion() {
    let primary = PostgresCluster::primary();
    let standby = PostgresCluster::standby_of(&primary);
    let dir = TempDir::new("pg-pass");
    let scram = dir.write("scram.pass", SCRAM_PASSWORD);
    let want_primary = postgres(Some(PostgresRole::Primary), SCRAM_USER, Some(scram.clone()));
    let want_standby = postgres(Some(PostgresRole::Standby), SCRAM_USER, Some(scram));

    assert_passed(&want_standby.probe(standby.addr(), PASS_TIMEOUT).await);
    let outcome = want_primary.probe(standby.addr(), PASS_TIMEOUT).await;
    assert_eq!(failure_text(&outcome), "role is standby, want primary");
    assert_passed(&want_primary.probe(primary.addr(), PASS_TIMEOUT).await);

    standby.promote();
    assert_passed(&want_primary.probe(standby.addr(), PASS_TIMEOUT).await);
    let outcome = want_standby.probe(standby.addr(), PASS_TIMEOUT).await;
    assert_eq!(failure_text(&outcome), "role is primary, want standby");
}

#[tokio::test]
async fn silent_backend_fails_by_timeout() {
    let server = FakeServer::start(Behavior::Silent).await;
    let prober = postgres(Some(PostgresRole::Primary), "sluice", None);
    let outcome = prober.probe(server.addr, HANG_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "timed out after 200ms while authenticating"
    );
}

#[tokio::test]
async fn garbage_fails_at_once() {
    let server = FakeServer::start(Behavior::Reply(b"\x00\x01garbage\r\n".to_vec())).await;
    let prober = postgres(Some(PostgresRole::Primary), "sluice", None);
    let outcome = prober.probe(server.addr, PASS_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "protocol error: not a PostgreSQL server: message type 0x00"
    );
}

#[tokio::test]
async fn an_http_server_fails_at_once() {
    let reply = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec();
    let server = FakeServer::start(Behavior::Reply(reply)).await;
    let prober = postgres(None, "sluice", None);
    let outcome = prober.probe(server.addr, PASS_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "protocol error: message of 1414811695 bytes announced"
    );
}

#[tokio::test]
async fn a_cleartext_password_request_is_refused_and_the_password_never_sent() {
    // AuthenticationCleartextPassword: R, length 8, code 3.
    let request = b"R\x00\x00\x00\x08\x00\x00\x00\x03".to_vec();
    let server = FakeServer::start(Behavior::Reply(request)).await;
    let dir = TempDir::new("pg-pass");
    let file = dir.write("cleartext.pass", "do-not-send-me");
    let prober = postgres(None, "sluice", Some(file));
    let outcome = prober.probe(server.addr, PASS_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "authentication failed: server asked for the password in cleartext; refused (use \
         scram-sha-256 or md5)"
    );
    let received = server.received_when_closed().await.concat();
    assert!(
        received.windows(5).any(|w| w == b"user\x00"),
        "no startup message"
    );
    assert!(!received.windows(14).any(|w| w == b"do-not-send-me"));
}

#[tokio::test]
async fn backend_closing_at_once_fails() {
    let server = FakeServer::start(Behavior::CloseAtOnce).await;
    let prober = postgres(None, "sluice", None);
    let outcome = prober.probe(server.addr, PASS_TIMEOUT).await;
    let text = failure_text(&outcome);
    assert!(
        text == "connection closed by the backend" || text.contains("reset"),
        "{text}"
    );
}

#[tokio::test]
async fn endless_parameters_are_read_only_up_to_the_limit() {
    // AuthenticationOk, then ParameterStatus messages forever: the client library keeps
    // reading them until ReadyForQuery; the probe stops at its read limit.
    let ok = b"R\x00\x00\x00\x08\x00\x00\x00\x00".to_vec();
    let parameter = b"S\x00\x00\x00\x0bname\x00v\x00".to_vec();
    let server = FakeServer::start(Behavior::EndlessAfter(ok, parameter.repeat(100))).await;
    let prober = postgres(None, "sluice", None);
    let outcome = prober.probe(server.addr, PASS_TIMEOUT).await;
    assert_eq!(
        failure_text(&outcome),
        "reply longer than 65536 bytes without an answer"
    );
    assert!(outcome.latency() < PASS_TIMEOUT / 2);
}
