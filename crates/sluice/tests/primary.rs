//! `single_primary` through the real binary, with real servers: at most one backend of a
//! `role: master` / `role: primary` listener takes new connections at a time.
//!
//! - Two standalone redis-servers, both masters: no connection reaches either (each is reset,
//!   counted as `no_backend`) until one steps down; the contest is logged once, with both
//!   addresses. Then the remaining master takes every new connection.
//! - A Redis failover in the order that used to alternate (the new master rises before the old
//!   one is demoted), with the default rise/fall: once a connection reached the new master, no
//!   later one reaches the old.
//! - PostgreSQL: the standby promoted while the old primary still runs; the promoted one
//!   (higher timeline) takes every new connection, the old one none.
//!
//! Each client asks the server that answers it who it is (`INFO server`'s `run_id`, or
//! PostgreSQL's port), so every connection is attributed. Every wait has a deadline.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{
    PostgresCluster, RedisServer, Reply, Sluice, free_addr, metric, psql_over_tcp, redis_command,
    require_installed, run_id, series, wait_metric,
};

/// How long one client connection may take, connect to last byte.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// The checks under test: a fast interval, the default rise 2 and fall 3.
const REDIS_HEALTH: &str = "health: { check: redis, role: master, interval: 200ms }";
/// Connections in a row that must all reach the expected server.
const STREAK: usize = 10;
/// How long a change of primary may take to show, far above `(rise + 1) x interval`.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The `run_id` of the server behind a fresh connection through `proxy`, or why there is none
/// (a reset: no backend took it).
fn served_by(proxy: SocketAddr) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&proxy, CONNECTION_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(CONNECTION_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let info = redis_command(&stream, &["INFO", "server"]).map_err(|e| format!("INFO: {e}"))?;
    run_id(&info)
}

/// Makes `server` a replica of `master`.
fn replica_of(server: &RedisServer, master: &RedisServer) {
    let (ip, port) = (
        master.addr().ip().to_string(),
        master.addr().port().to_string(),
    );
    let reply = server.command(&["REPLICAOF", &ip, &port]).unwrap();
    assert!(matches!(reply, Reply::Status(_)), "{reply:?}");
}

/// Waits until `STREAK` new connections in a row reach `want`; returns every attempt's result
/// on the way, in order, with when it started.
fn until_streak(
    proxy: SocketAddr,
    want: &str,
    failure: &dyn Fn(String) -> String,
) -> Vec<(Instant, Result<String, String>)> {
    let deadline = Instant::now() + SWITCH_TIMEOUT;
    let mut seen = Vec::new();
    let mut streak = 0;
    while streak < STREAK {
        assert!(
            Instant::now() < deadline,
            "{}",
            failure(format!(
                "no {STREAK} connections in a row reached {want} within {SWITCH_TIMEOUT:?}; \
                 last {:?}",
                seen.last()
            ))
        );
        let at = Instant::now();
        let result = served_by(proxy);
        if result.as_deref() == Ok(want) {
            streak += 1;
        } else {
            streak = 0;
            std::thread::sleep(Duration::from_millis(10));
        }
        seen.push((at, result));
    }
    seen
}

#[test]
fn two_redis_masters_at_once_get_no_connection_until_one_steps_down() {
    require_installed(&["redis-server"]);
    let first = RedisServer::start();
    let second = RedisServer::start();
    let first_id = first.run_id();
    let listener = Listener::new("redis", &[first.addr(), second.addr()]).with(REDIS_HEALTH);
    let proxy = listener.bind;
    let admin = free_addr();
    let sluice = Sluice::start(binary(), &config(2, Some(admin), &[], &[listener]));
    let failure = |what: String| -> String {
        format!("{what}\n--- sluice stderr ---\n{}", sluice.stderr_text())
    };

    // Both answered their first probe as masters before the listener accepted.
    const ATTEMPTS: usize = 20;
    for n in 0..ATTEMPTS {
        if let Ok(id) = served_by(proxy) {
            let which = if id == first_id { "first" } else { "second" };
            panic!(
                "{}",
                failure(format!(
                    "connection {n} reached the {which} master while both claim the role"
                ))
            );
        }
    }
    let no_backend = series(
        "sluice_connections_closed_total",
        &[("listener", "redis"), ("reason", "no_backend")],
    );
    let counted = wait_metric(admin, &no_backend, ATTEMPTS as f64, SWITCH_TIMEOUT);
    assert_eq!(counted, Some(ATTEMPTS as f64), "{}", failure(no_backend));
    let stderr = sluice.stderr_text();
    let contested: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("primary contested"))
        .collect();
    assert_eq!(contested.len(), 1, "{}", failure("logged once".into()));
    for addr in [first.addr(), second.addr()] {
        assert!(contested[0].contains(&addr.to_string()), "{}", contested[0]);
    }

    // Both pass their own check (state up), and neither takes new connections (up 0).
    for addr in [first.addr(), second.addr()] {
        let backend = addr.to_string();
        let labels = [("listener", "redis"), ("backend", backend.as_str())];
        let up = series("sluice_backend_up", &labels);
        assert_eq!(metric(admin, &up), 0.0, "{up}");
        let state = [labels[0], labels[1], ("state", "up")];
        assert_eq!(metric(admin, &series("sluice_backend_state", &state)), 1.0);
    }

    replica_of(&second, &first);
    let stepped_down = Instant::now();
    until_streak(proxy, &first_id, &failure);
    eprintln!(
        "every connection on the remaining master {:?} after the other stepped down",
        stepped_down.elapsed()
    );
}

/// Master M with replica R. R is promoted and, a second later (after R's rise: 2 probes of
/// 200 ms), M is demoted: the order in which new connections used to alternate between two
/// masters until M's fall. Once a connection reached R, none reaches M.
#[test]
fn a_redis_failover_never_alternates_between_the_old_and_the_new_master() {
    require_installed(&["redis-server"]);
    let old = RedisServer::start();
    let new = RedisServer::start_replica_of(old.addr());
    let (old_id, new_id) = (old.run_id(), new.run_id());
    let listener = Listener::new("redis", &[old.addr(), new.addr()]).with(REDIS_HEALTH);
    let proxy = listener.bind;
    let sluice = Sluice::start(binary(), &config(2, None, &[], &[listener]));
    let failure = |what: String| -> String {
        format!("{what}\n--- sluice stderr ---\n{}", sluice.stderr_text())
    };
    for n in 0..STREAK {
        let seen = served_by(proxy).unwrap_or_else(|e| panic!("{}", failure(e)));
        assert_eq!(seen, old_id, "{}", failure(format!("connection {n}")));
    }

    let promoted = new.command(&["REPLICAOF", "NO", "ONE"]).unwrap();
    assert_eq!(promoted, Reply::Status("OK".into()));
    let promoted_at = Instant::now();
    let mut seen = Vec::new();
    while promoted_at.elapsed() < Duration::from_secs(1) {
        seen.push((promoted_at.elapsed(), served_by(proxy)));
        std::thread::sleep(Duration::from_millis(5));
    }
    replica_of(&old, &new);
    let demoted_at = promoted_at.elapsed();
    let after = until_streak(proxy, &new_id, &failure);
    seen.extend(after.into_iter().map(|(at, r)| (at - promoted_at, r)));

    let first_new = seen.iter().position(|(_, r)| r.as_deref() == Ok(&new_id));
    let first_new = first_new.expect("until_streak saw the new master");
    let old_after_new: Vec<Duration> = seen[first_new..]
        .iter()
        .filter(|(_, r)| r.as_deref() == Ok(&old_id))
        .map(|(at, _)| *at)
        .collect();
    let resets = seen.iter().filter(|(_, r)| r.is_err()).count();
    eprintln!(
        "{} connections after the promotion, demoted at {demoted_at:?}, first on the new \
         master at {:?}, {resets} reset (failing closed)",
        seen.len(),
        seen[first_new].0
    );
    assert!(
        old_after_new.is_empty(),
        "{}",
        failure(format!(
            "{} connections reached the old master after one reached the new (alternation \
             from {:?} to {:?} after the promotion)",
            old_after_new.len(),
            seen[first_new].0,
            old_after_new.last().unwrap()
        ))
    );
}

/// A primary and its standby; the standby is promoted (`pg_ctl promote`) while the old primary
/// keeps running, a primary too: the promoted one, on the higher timeline, takes every new
/// connection, and once it did, the old one takes none.
#[test]
fn postgres_a_promoted_standby_takes_over_from_a_primary_still_running() {
    let primary = PostgresCluster::primary();
    let standby = PostgresCluster::standby_of(&primary);
    let user = PostgresCluster::SCRAM_USER;
    let password_file = primary.password_file(user);
    let listener = Listener::new("postgres", &[primary.addr(), standby.addr()]).with(&format!(
        "health: {{ check: postgres, role: primary, interval: 200ms, user: {user}, \
         password_file: \"{}\" }}",
        password_file.display()
    ));
    let proxy = listener.bind;
    let sluice = Sluice::start(binary(), &config(2, None, &[], &[listener]));
    let who = || {
        psql_over_tcp(
            proxy,
            user,
            PostgresCluster::SCRAM_PASSWORD,
            "select inet_server_port()",
        )
    };
    let failure = |what: String| -> String {
        format!(
            "{what}\n--- sluice stderr ---\n{}\n--- primary log ---\n{}\n--- standby log ---\n{}",
            sluice.stderr_text(),
            primary.log(),
            standby.log()
        )
    };
    let (old, new) = (
        primary.addr().port().to_string(),
        standby.addr().port().to_string(),
    );
    for n in 0..STREAK {
        let seen = who().unwrap_or_else(|e| panic!("{}", failure(e)));
        assert_eq!(seen, old, "{}", failure(format!("connection {n}")));
    }

    standby.promote();
    let promoted = Instant::now();
    let mut seen = Vec::new();
    let mut streak = 0;
    while streak < STREAK {
        assert!(
            promoted.elapsed() < SWITCH_TIMEOUT,
            "{}",
            failure(format!(
                "no {STREAK} connections in a row reached the promoted server within \
                 {SWITCH_TIMEOUT:?}; last {:?}",
                seen.last()
            ))
        );
        let result = who();
        streak = if result.as_deref() == Ok(new.as_str()) {
            streak + 1
        } else {
            0
        };
        seen.push(result);
    }
    eprintln!(
        "every connection on the promoted server {:?} after the promotion",
        promoted.elapsed()
    );
    for n in 0..STREAK {
        let seen = who().unwrap_or_else(|e| panic!("{}", failure(e)));
        assert_eq!(seen, new, "{}", failure(format!("connection {n} after")));
    }
    let first_new = seen.iter().position(|r| r.as_deref() == Ok(new.as_str()));
    let old_after_new = seen[first_new.unwrap()..]
        .iter()
        .filter(|r| r.as_deref() == Ok(old.as_str()))
        .count();
    assert_eq!(
        old_after_new,
        0,
        "{}",
        failure("the old primary took connections after the promoted one".into())
    );
    assert!(
        sluice.stderr_text().contains("its timeline is higher"),
        "{}",
        failure("the election by timeline is logged".into())
    );
}
