//! PostgreSQL roles through the real binary: a primary and a streaming standby made with
//! `pg_basebackup -R` behind one listener with `health: { check: postgres, role: primary }`.
//! Every connection reaches the primary; once the primary is stopped and the standby promoted,
//! every new connection reaches the promoted server within a few intervals.
//!
//! Clients are real `psql` processes asking `pg_is_in_recovery()` and `inet_server_port()`, so
//! each one knows which server, in which role, answered it. Each case starts two clusters (a
//! few seconds); every step has a deadline. The PostgreSQL binaries are required: without them
//! the test fails and names `scripts/install-deps.sh`.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{PostgresCluster, Sluice, psql_over_tcp};

with_workers_1_and_2!(postgres_role_primary_follows_a_promotion);

/// What each client asks: the answering server's role (`f` on a primary) and port.
const WHO: &str = "select pg_is_in_recovery(), inet_server_port()";
/// The health check under test: fast, and `fall: 1` so one failed probe takes a backend out.
const HEALTH: &str = "check: postgres, role: primary, interval: 200ms, timeout: 1s, rise: 1, \
                      fall: 1";
/// Connections in a row that must all reach the expected server.
const STREAK: usize = 10;
/// How long the promoted server may take to get every new connection, from the end of
/// `pg_ctl promote -w`: far above `fall x interval` plus `rise x interval`.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(15);

fn postgres_role_primary_follows_a_promotion(workers: usize) {
    let mut primary = PostgresCluster::primary();
    let standby = PostgresCluster::standby_of(&primary);
    let user = PostgresCluster::SCRAM_USER;
    let password_file = primary.password_file(user);
    let listener = Listener::new("postgres", &[primary.addr(), standby.addr()]).with(&format!(
        "health: {{ {HEALTH}, user: {user}, password_file: \"{}\" }}",
        password_file.display()
    ));
    let proxy = listener.bind;
    let sluice = Sluice::start(binary(), &config(workers, None, &[], &[listener]));
    let who = || psql_over_tcp(proxy, user, PostgresCluster::SCRAM_PASSWORD, WHO);
    let failure = |what: String, primary: &PostgresCluster| -> String {
        format!(
            "workers {workers}: {what}\n--- sluice stderr ---\n{}\n--- primary log ---\n{}\n\
             --- standby log ---\n{}",
            sluice.stderr_text(),
            primary.log(),
            standby.log()
        )
    };

    // Both servers are backends, but only the primary passes the check.
    let on_primary = format!("f|{}", primary.addr().port());
    for n in 0..STREAK {
        let seen = who().unwrap_or_else(|e| panic!("{}", failure(e, &primary)));
        assert_eq!(
            seen,
            on_primary,
            "{}",
            failure(format!("connection {n} before the failover"), &primary)
        );
    }
    // The standby answers too, directly, as a standby: the check, not luck, kept it out.
    let direct = psql_over_tcp(standby.addr(), user, PostgresCluster::SCRAM_PASSWORD, WHO);
    assert_eq!(direct, Ok(format!("t|{}", standby.addr().port())));

    primary.stop();
    standby.promote();
    let promoted = Instant::now();

    // In between, connections may be reset (no backend up) or still reach the standby before
    // its next probe; then ten in a row must reach the promoted server.
    let on_promoted = format!("f|{}", standby.addr().port());
    let mut streak = 0;
    let mut last = Err(String::new());
    while streak < STREAK {
        assert!(
            promoted.elapsed() < FAILOVER_TIMEOUT,
            "{}",
            failure(
                format!(
                    "no {STREAK} connections in a row reached the promoted server within \
                     {FAILOVER_TIMEOUT:?}; last {last:?}"
                ),
                &primary
            )
        );
        last = who();
        if last.as_ref() == Ok(&on_promoted) {
            streak += 1;
        } else {
            streak = 0;
            thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!(
        "workers {workers}: every connection on the promoted server {:?} after the promotion",
        promoted.elapsed()
    );
    for n in 0..STREAK {
        let seen = who().unwrap_or_else(|e| panic!("{}", failure(e, &primary)));
        assert_eq!(
            seen,
            on_promoted,
            "{}",
            failure(format!("connection {n} after the failover"), &primary)
        );
    }
    assert!(
        !sluice
            .stderr_text()
            .contains(PostgresCluster::SCRAM_PASSWORD),
        "{}",
        failure("the password shows in Sluice's log".into(), &primary)
    );
}
