//! The config contract as users see it: whole files in, values or positioned errors out.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_config::{
    ActiveCheck, Admin, Algorithm, BackendAddress, BackendSpec, Check, Config, ConfigError,
    ConfigErrors, Expect, HashKey, Keepalive, Listener, Location, OnAllDown, OnMaxConnections,
    OnMaxSessions, Passive, PostgresRole, Protocol, RedisRole, Timeouts, UdpSettings, Workers,
    load, parse,
};

const FILE: &str = "sluice.yaml";

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn check(yaml: &str) -> Result<Config, ConfigErrors> {
    parse(yaml, Path::new(FILE))
}

/// The errors of `yaml` as (line, column, field, message).
fn errors(yaml: &str) -> Vec<(usize, usize, String, String)> {
    match check(yaml) {
        Ok(config) => panic!("accepted:\n{yaml}\nas {config:#?}"),
        Err(errors) => {
            assert!(!errors.0.is_empty(), "empty ConfigErrors");
            errors
                .0
                .into_iter()
                .map(|e| (e.line, e.column, e.field, e.message))
                .collect()
        }
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn design_example_fails_only_on_keys_its_listener_cannot_have() {
    let path = fixture("design-example.yaml");
    let errors = load(&path)
        .expect_err("the example shows every key on one tcp round_robin listener")
        .0;
    let found: Vec<(usize, usize, &str)> = errors
        .iter()
        .map(|e| (e.line, e.column, e.field.as_str()))
        .collect();
    // The example shows every key on one listener: the hashing settings are misplaced beside
    // `algorithm: round_robin`, and the udp-only keys on a tcp listener.
    let expected = [
        (
            10,
            15,
            "listeners[0].hash_key",
            "hash_key applies only to algorithm ring_hash or maglev, not round_robin",
        ),
        (
            11,
            13,
            "listeners[0].maglev",
            "maglev settings apply only to algorithm maglev, not round_robin",
        ),
        (
            12,
            16,
            "listeners[0].ring_hash",
            "ring_hash settings apply only to algorithm ring_hash, not round_robin",
        ),
        (
            40,
            19,
            "listeners[0].max_sessions",
            "max_sessions applies only to protocol udp",
        ),
        (
            41,
            22,
            "listeners[0].on_max_sessions",
            "on_max_sessions applies only to protocol udp",
        ),
        (
            42,
            16,
            "listeners[0].responses",
            "responses applies only to protocol udp",
        ),
        (
            43,
            15,
            "listeners[0].requests",
            "requests applies only to protocol udp",
        ),
        (
            44,
            17,
            "listeners[0].per_packet",
            "per_packet applies only to protocol udp",
        ),
    ];
    assert_eq!(
        found,
        expected.map(|(line, column, field, _)| (line, column, field))
    );
    for (error, (.., message)) in errors.iter().zip(expected) {
        assert_eq!(error.message, message);
        assert_eq!(error.file, path);
    }
}

#[test]
fn design_example_with_maglev_loads_its_hashing_settings() {
    let text = std::fs::read_to_string(fixture("design-example.yaml")).unwrap();
    let yaml = example_without(&text, &["ring_hash"])
        .replace("algorithm: round_robin", "algorithm: maglev")
        .replace("hash_key: client_ip ", "hash_key: client_ip_port ");
    let config = check(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(
        config.listeners[0].algorithm,
        Algorithm::Maglev {
            hash_key: HashKey::ClientIpPort,
            table_size: Some(65537)
        }
    );
    let yaml = example_without(&text, &["maglev"])
        .replace("algorithm: round_robin", "algorithm: ring_hash");
    let config = check(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(
        config.listeners[0].algorithm,
        Algorithm::RingHash {
            hash_key: HashKey::ClientIp,
            points_per_weight: 160
        }
    );
}

/// The design example (a tcp listener) without its udp-only keys, nor the keys in `also`.
fn example_without(text: &str, also: &[&str]) -> String {
    let udp_only = [
        "max_sessions",
        "on_max_sessions",
        "responses",
        "requests",
        "per_packet",
    ];
    text.lines()
        .filter(|line| {
            let line = line.trim_start();
            !udp_only
                .iter()
                .chain(also)
                .any(|key| line.starts_with(&format!("{key}:")))
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

#[test]
fn design_example_without_unsupported_keys_loads_with_its_values() {
    // The example with every not-yet-supported line removed must load, and show that
    // every supported key of the reference is read.
    let text = std::fs::read_to_string(fixture("design-example.yaml")).unwrap();
    let kept = example_without(&text, &["hash_key", "maglev", "ring_hash"]);
    let config = check(&kept).unwrap_or_else(|e| panic!("{e}\n{kept}"));
    assert_eq!(config.workers, Workers::Auto);
    assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(
        config.admin,
        Some(Admin {
            bind: addr("127.0.0.1:9900"),
            max_connections: 64,
        })
    );
    let redis = &config.listeners[0];
    assert_eq!(redis.name, "redis");
    assert_eq!(redis.bind, addr("0.0.0.0:6379"));
    assert_eq!(redis.location, Location { line: 6, column: 5 });
    let weights: Vec<(BackendAddress, u16, bool)> = redis
        .backends
        .iter()
        .map(|b| (b.address.clone(), b.weight, b.backup))
        .collect();
    assert_eq!(
        weights,
        [
            (BackendAddress::Ip(addr("10.0.0.1:6379")), 1, false),
            (BackendAddress::Ip(addr("10.0.0.2:6379")), 2, false),
            (BackendAddress::Ip(addr("10.0.0.3:6379")), 1, true),
        ]
    );
    assert_eq!(
        redis.health,
        Some(ActiveCheck {
            check: Check::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            single_primary: false,
        })
    );
    assert_eq!(redis.passive, Passive::default());
    assert_eq!(redis.on_all_down, OnAllDown::Reject);
    assert_eq!(redis.slow_start, Duration::ZERO);
    assert_eq!(redis.drain_timeout, Duration::from_secs(30));
}

#[test]
fn udp_listeners_read_their_session_keys_and_default_idle_to_60s() {
    let yaml = "\
listeners:
  - name: dns
    protocol: udp
    bind: \"0.0.0.0:53\"
    backends: [\"10.0.0.1:53\"]
    max_sessions: 5000
    on_max_sessions: evict_lru
    responses: 1
    requests: 0
  - name: statsd
    protocol: udp
    bind: \"0.0.0.0:8125\"
    backends: [\"10.0.0.2:8125\"]
    per_packet: true
    timeouts: { idle: 5s }
  - name: dns-tcp
    bind: \"0.0.0.0:53\"
    backends: [\"10.0.0.1:53\"]
";
    let config = check(yaml).unwrap_or_else(|e| panic!("{e}"));
    let [dns, statsd, tcp] = &config.listeners[..] else {
        panic!("three listeners");
    };
    assert_eq!(dns.protocol, Protocol::Udp);
    assert_eq!(
        dns.udp,
        UdpSettings {
            max_sessions: 5000,
            on_max_sessions: OnMaxSessions::EvictLru,
            responses: 1,
            requests: 0,
            per_packet: false,
        }
    );
    assert_eq!(dns.timeouts.idle, Duration::from_secs(60));
    assert!(statsd.udp.per_packet);
    assert_eq!(statsd.timeouts.idle, Duration::from_secs(5));
    assert_eq!(tcp.protocol, Protocol::Tcp);
    assert_eq!(tcp.timeouts.idle, Duration::ZERO);
}

#[test]
fn every_check_reads_its_own_keys() {
    let listener = |health: &str| {
        format!(
            "listeners:\n  - name: a\n    bind: \"0.0.0.0:1\"\n    backends: [\"10.0.0.1:1\"]\n    health: {health}\n"
        )
    };
    let check = |health: &str| {
        let yaml = listener(health);
        let config = check(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        config.listeners[0].health.clone().unwrap()
    };
    let c = check(
        "{ check: send_expect, send: \"PING\\r\\n\", expect: \"+PONG\", interval: 250ms, timeout: 2s, rise: 1, fall: 1 }",
    );
    assert_eq!(
        c,
        ActiveCheck {
            check: Check::SendExpect {
                send: b"PING\r\n".to_vec(),
                expect: Expect::Prefix(b"+PONG".to_vec())
            },
            interval: Duration::from_millis(250),
            timeout: Duration::from_secs(2),
            rise: 1,
            fall: 1,
            single_primary: false,
        }
    );
    let c = check(
        "{ check: send_expect, send_hex: \"2a 31 0d 0a\", expect_regex: \"^\\\\+(PONG|OK)\" }",
    );
    assert_eq!(
        c.check,
        Check::SendExpect {
            send: b"*1\r\n".to_vec(),
            expect: Expect::Regex("^\\+(PONG|OK)".into())
        }
    );
    let c =
        check("{ check: http, path: /readyz, host: example.com, status: \"200-299\", port: 8080 }");
    assert_eq!(
        c.check,
        Check::Http {
            path: "/readyz".into(),
            host: "example.com".into(),
            status: 200..=299,
            port: Some(8080)
        }
    );
    let c = check("{ check: http }");
    assert_eq!(
        c.check,
        Check::Http {
            path: "/".into(),
            host: "localhost".into(),
            status: 200..=399,
            port: None
        }
    );
    let c = check("{ check: redis, role: replica, password_file: /etc/sluice/redis.pass }");
    assert_eq!(
        c.check,
        Check::Redis {
            role: Some(RedisRole::Replica),
            password_file: Some("/etc/sluice/redis.pass".into())
        }
    );
    let c = check("{ check: postgres, role: primary, user: sluice }");
    assert_eq!(
        c.check,
        Check::Postgres {
            role: Some(PostgresRole::Primary),
            user: "sluice".into(),
            database: "postgres".into(),
            password_file: None
        }
    );
}

#[test]
fn single_primary_defaults_to_true_with_a_primary_role_only() {
    let single_primary = |health: &str| {
        let yaml = format!(
            "listeners:\n  - name: a\n    bind: \"127.0.0.1:1\"\n    backends: [\"10.0.0.1:1\"]\n    health: {health}\n"
        );
        let config = check(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        config.listeners[0].health.clone().unwrap().single_primary
    };
    assert!(single_primary("{ check: redis, role: master }"));
    assert!(single_primary("{ check: postgres, role: primary }"));
    assert!(!single_primary(
        "{ check: redis, role: master, single_primary: false }"
    ));
    assert!(!single_primary("{ check: redis, role: replica }"));
    assert!(!single_primary(
        "{ check: postgres, role: standby, single_primary: false }"
    ));
    assert!(!single_primary("{ check: redis }"));
}

#[test]
fn minimal_config_gets_every_default() {
    let yaml = "\
listeners:
  - name: redis
    bind: \"127.0.0.1:6379\"
    backends: [\"10.0.0.1:6379\"]
";
    let config = check(yaml).unwrap();
    let expected = Config {
        workers: Workers::Auto,
        shutdown_timeout: Duration::from_secs(30),
        log: sluice_config::Log::default(),
        admin: None,
        listeners: vec![Listener {
            name: "redis".into(),
            protocol: Protocol::Tcp,
            bind: addr("127.0.0.1:6379"),
            algorithm: Algorithm::RoundRobin,
            backends: vec![BackendSpec {
                address: BackendAddress::Ip(addr("10.0.0.1:6379")),
                weight: 1,
                backup: false,
                location: Location {
                    line: 4,
                    column: 16,
                },
            }],
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                idle: Duration::ZERO,
                half_close: Duration::from_secs(60),
                user_timeout: Duration::ZERO,
            },
            keepalive: Keepalive {
                time: Duration::from_secs(60),
                interval: Duration::from_secs(10),
                probes: 6,
            },
            max_connections: 0,
            on_max_connections: OnMaxConnections::Queue,
            retries: 2,
            health: None,
            passive: Passive {
                consecutive_failures: 5,
                ejection_time: Duration::from_secs(10),
                max_ejection_percent: 50,
            },
            on_all_down: OnAllDown::Reject,
            slow_start: Duration::ZERO,
            drain_timeout: Duration::from_secs(30),
            udp: UdpSettings::default(),
            location: Location { line: 2, column: 5 },
            password_file_location: None,
        }],
    };
    assert_eq!(config, expected);
}

#[test]
fn every_supported_key_is_read() {
    let yaml = "\
workers: 4
shutdown_timeout: 0
admin: { bind: \"[::1]:9900\", max_connections: 8 }
listeners:
  - name: pg
    protocol: tcp
    bind: \"[::]:5432\"
    algorithm: round_robin
    backends:
      - db-1.internal:5432
      - { address: \"[fd00::2]:5432\", weight: 0 }
      - address: 10.0.0.3:5432
        weight: 1000
    timeouts: { connect: 250ms, idle: 5m, half_close: 0, user_timeout: 1500ms }
    keepalive: { time: 1s, interval: 2s, probes: 127 }
    max_connections: 10000
    on_max_connections: reject
    retries: 0
  - name: pg.replica_2
    bind: 0.0.0.0:5433
    backends: [\"10.0.0.4:5432\"]
    timeouts: { idle: \"0\", half_close: 1h }
";
    let config = check(yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.workers,
        Workers::Count(NonZeroUsize::new(4).unwrap())
    );
    assert_eq!(config.shutdown_timeout, Duration::ZERO);
    assert_eq!(
        config.admin,
        Some(Admin {
            bind: addr("[::1]:9900"),
            max_connections: 8,
        })
    );
    let pg = &config.listeners[0];
    assert_eq!(pg.bind, addr("[::]:5432"));
    assert_eq!(
        pg.backends
            .iter()
            .map(|b| (&b.address, b.weight, b.location.line))
            .collect::<Vec<_>>(),
        [
            (
                &BackendAddress::Host {
                    host: "db-1.internal".into(),
                    port: 5432
                },
                1,
                10
            ),
            (&BackendAddress::Ip(addr("[fd00::2]:5432")), 0, 11),
            (&BackendAddress::Ip(addr("10.0.0.3:5432")), 1000, 12),
        ]
    );
    assert_eq!(
        pg.timeouts,
        Timeouts {
            connect: Duration::from_millis(250),
            idle: Duration::from_secs(300),
            half_close: Duration::ZERO,
            user_timeout: Duration::from_millis(1500),
        }
    );
    assert_eq!(
        pg.keepalive,
        Keepalive {
            time: Duration::from_secs(1),
            interval: Duration::from_secs(2),
            probes: 127,
        }
    );
    assert_eq!(pg.max_connections, 10_000);
    assert_eq!(pg.on_max_connections, OnMaxConnections::Reject);
    assert_eq!(pg.retries, 0);
    let replica = &config.listeners[1];
    assert_eq!(replica.name, "pg.replica_2");
    assert_eq!(replica.timeouts.connect, Duration::from_secs(2));
    assert_eq!(replica.timeouts.idle, Duration::ZERO);
    assert_eq!(replica.timeouts.half_close, Duration::from_secs(3600));
    assert_eq!(replica.timeouts.user_timeout, Duration::ZERO);
    assert_eq!(replica.keepalive, Keepalive::default());
    assert!(replica.keepalive.is_on());
}

/// A listener that is fine, to surround the mistake under test.
const GOOD: &str = "\
listeners:
  - name: a
    bind: \"0.0.0.0:1000\"
    backends: [\"10.0.0.1:1\"]
";

/// An expected error: line, column, field and a part of the message.
type Expected = (usize, usize, &'static str, &'static str);

#[test]
fn log_level_is_written_as_the_filter_reads_it() {
    let config = check(&format!(
        "{GOOD}log: {{ level: \"Warning, sluice_health=DEBUG\", format: json }}\n"
    ))
    .unwrap();
    assert_eq!(config.log.level, "warn,sluice_health=debug");
    assert_eq!(config.log.format, sluice_config::LogFormat::Json);
}

#[test]
fn bad_configs_report_position_field_and_expectation() {
    // (what, yaml, [(line, column, field, part of the message)])
    #[rustfmt::skip]
    let cases: &[(&str, String, &[Expected])] = &[
        ("unknown top-level field", format!("{GOOD}lisen: 1\n"),
         &[(5, 1, "lisen", "unknown field \"lisen\", expected one of: workers, shutdown_timeout, log, admin, listeners")]),
        ("unknown log format", format!("{GOOD}log: {{ format: xml }}\n"),
         &[(5, 16, "log.format", "unknown value \"xml\", expected one of: text, json")]),
        ("unknown log level", format!("{GOOD}log:\n  level: \"info,sluice=warning2\"\n"),
         &[(6, 10, "log.level", "unknown level \"warning2\"; expected a level (off, error, warn,")]),
        ("unknown listener field and missing bind, both reported",
         "listeners:\n  - name: a\n    bnid: \"0.0.0.0:1\"\n    backends: [\"10.0.0.1:1\"]\n".into(),
         &[(2, 5, "listeners[0].bind", "missing required field"),
           (3, 5, "listeners[0].bnid", "unknown field \"bnid\", expected one of: name, protocol, bind,")]),
        ("bad duration", format!("{GOOD}    timeouts:\n      connect: 2 sec\n"),
         &[(6, 16, "listeners[0].timeouts.connect",
            "invalid duration \"2 sec\": expected a whole number with a unit (ms, s, m, h), e.g. 250ms or 2s, or 0")]),
        ("fractional duration", format!("{GOOD}    timeouts: {{ idle: 1.5s }}\n"),
         &[(5, 23, "listeners[0].timeouts.idle", "use a smaller unit, e.g. 1500ms")]),
        ("duration without unit", "shutdown_timeout: 30\nlisteners: []\n".into(),
         &[(1, 19, "shutdown_timeout", "invalid duration 30: a unit is required"),
           (2, 12, "listeners", "at least one listener is required")]),
        ("zero connect timeout", format!("{GOOD}    timeouts: {{ connect: 0s }}\n"),
         &[(5, 26, "listeners[0].timeouts.connect", "must be greater than 0")]),
        ("weight 1001", "listeners:\n  - name: a\n    bind: \"0.0.0.0:1\"\n    backends:\n      - { address: \"10.0.0.1:1\", weight: 1001 }\n".into(),
         &[(5, 42, "listeners[0].backends[0].weight", "must be between 0 and 1000, found 1001")]),
        ("IPv6 backend without brackets", "listeners:\n  - name: a\n    bind: \"0.0.0.0:1\"\n    backends: [\"::1:6379\"]\n".into(),
         &[(4, 16, "listeners[0].backends[0]", "invalid backend address \"::1:6379\": an IPv6 address must be in brackets")]),
        ("IPv6 bind without brackets", "listeners:\n  - name: a\n    bind: \"::1:6379\"\n    backends: [\"10.0.0.1:1\"]\n".into(),
         &[(3, 11, "listeners[0].bind", "an IPv6 address must be in brackets")]),
        ("hostname as bind", "admin:\n  bind: localhost:9900\nlisteners: []\n".into(),
         &[(2, 9, "admin.bind", "hostnames are not allowed here"),
           (3, 12, "listeners", "at least one listener is required")]),
        ("backend without port", "listeners:\n  - name: a\n    bind: \"0.0.0.0:1\"\n    backends:\n      - db.example\n".into(),
         &[(5, 9, "listeners[0].backends[0]", "a port is required")]),
        ("duplicate name, naming both lines", format!("{GOOD}  - name: a\n    bind: \"0.0.0.0:2000\"\n    backends: [\"10.0.0.1:1\"]\n"),
         &[(5, 11, "listeners[1].name", "duplicate listener name \"a\", already used at line 2")]),
        ("duplicate bind, naming the first listener", format!("{GOOD}  - name: b\n    bind: 0.0.0.0:1000\n    backends: [\"10.0.0.1:1\"]\n"),
         &[(6, 11, "listeners[1].bind", "tcp 0.0.0.0:1000 is already bound by listener \"a\" at line 2")]),
        ("two udp listeners on one port are duplicates",
         "listeners:\n  - name: a\n    protocol: udp\n    bind: \"0.0.0.0:53\"\n    backends: [\"10.0.0.1:53\"]\n  - name: b\n    protocol: udp\n    bind: \"0.0.0.0:53\"\n    backends: [\"10.0.0.1:53\"]\n".into(),
         &[(8, 11, "listeners[1].bind", "udp 0.0.0.0:53 is already bound by listener \"a\" at line 2")]),
        ("udp key on a tcp listener", format!("{GOOD}    responses: 1\n"),
         &[(5, 16, "listeners[0].responses", "responses applies only to protocol udp")]),
        ("tcp keys on a udp listener",
         "listeners:\n  - name: a\n    protocol: udp\n    bind: \"0.0.0.0:53\"\n    backends: [\"10.0.0.1:53\"]\n    max_connections: 5\n    timeouts: { half_close: 1s }\n".into(),
         &[(6, 22, "listeners[0].max_connections", "max_connections applies only to protocol tcp"),
           (7, 17, "listeners[0].timeouts.half_close", "timeouts.half_close applies only to protocol tcp")]),
        ("keepalive and user_timeout on a udp listener",
         "listeners:\n  - name: a\n    protocol: udp\n    bind: \"0.0.0.0:53\"\n    backends: [\"10.0.0.1:53\"]\n    keepalive: { time: 1s }\n    timeouts: { user_timeout: 2s }\n".into(),
         &[(6, 16, "listeners[0].keepalive", "keepalive applies only to protocol tcp"),
           (7, 17, "listeners[0].timeouts.user_timeout", "timeouts.user_timeout applies only to protocol tcp")]),
        ("keepalive in milliseconds", format!("{GOOD}    keepalive: {{ time: 1500ms }}\n"),
         &[(5, 24, "listeners[0].keepalive.time", "1.5s is not a whole number of seconds: the kernel counts keepalive in seconds")]),
        ("keepalive interval 0", format!("{GOOD}    keepalive:\n      interval: 0\n"),
         &[(6, 17, "listeners[0].keepalive.interval", "must be at least 1s; to turn keepalive off, write listeners[0].keepalive.time: 0")]),
        ("keepalive past the kernel's limit", format!("{GOOD}    keepalive: {{ time: 10h, interval: 250ms }}\n"),
         &[(5, 24, "listeners[0].keepalive.time", "must be at most 32767s (the kernel's limit), found 36000s"),
           (5, 39, "listeners[0].keepalive.interval", "250ms is not a whole number of seconds")]),
        ("keepalive probes 0 and 128", format!("{GOOD}    keepalive: {{ probes: 0 }}\n  - name: b\n    bind: \"0.0.0.0:2\"\n    backends: [\"10.0.0.1:1\"]\n    keepalive: {{ probes: 128 }}\n"),
         &[(5, 26, "listeners[0].keepalive.probes", "must be between 1 and 127, found 0"),
           (9, 26, "listeners[1].keepalive.probes", "must be between 1 and 127, found 128")]),
        ("keepalive unknown key", format!("{GOOD}    keepalive: {{ idle: 1s }}\n"),
         &[(5, 18, "listeners[0].keepalive.idle", "unknown field \"idle\", expected one of: time, interval, probes")]),
        ("user_timeout past the kernel's limit", format!("{GOOD}    timeouts: {{ user_timeout: 600h }}\n"),
         &[(5, 31, "listeners[0].timeouts.user_timeout", "must be at most 596h (TCP_USER_TIMEOUT takes at most 2^31 - 1 ms)")]),
        ("per_packet with responses",
         "listeners:\n  - name: a\n    protocol: udp\n    bind: \"0.0.0.0:53\"\n    backends: [\"10.0.0.1:53\"]\n    per_packet: true\n    responses: 1\n".into(),
         &[(7, 16, "listeners[0].responses", "responses has no effect with per_packet: true (no sessions)")]),
        ("max_sessions 0",
         "listeners:\n  - name: a\n    protocol: udp\n    bind: \"0.0.0.0:53\"\n    backends: [\"10.0.0.1:53\"]\n    max_sessions: 0\n".into(),
         &[(6, 19, "listeners[0].max_sessions", "must be between 1 and 10000000, found 0")]),
        ("unknown protocol", format!("{GOOD}    protocol: sctp\n"),
         &[(5, 15, "listeners[0].protocol", "unknown value \"sctp\", expected one of: tcp, udp")]),
        ("empty backends", "listeners:\n  - name: a\n    bind: \"0.0.0.0:1\"\n    backends: []\n".into(),
         &[(4, 15, "listeners[0].backends", "at least one backend is required")]),
        ("missing backends and name", "listeners:\n  - bind: \"0.0.0.0:1\"\n".into(),
         &[(2, 5, "listeners[0].name", "missing required field; expected a unique name"),
           (2, 5, "listeners[0].backends", "missing required field; expected a list of backends")]),
        ("unknown algorithm", format!("{GOOD}    algorithm: fastest\n"),
         &[(5, 16, "listeners[0].algorithm",
            "unknown algorithm \"fastest\", expected one of: round_robin, least_connections, random, power_of_two, ring_hash, maglev")]),
        ("hash_key on a non-hashing algorithm", format!("{GOOD}    algorithm: least_connections\n    hash_key: client_ip\n"),
         &[(6, 15, "listeners[0].hash_key", "hash_key applies only to algorithm ring_hash or maglev, not least_connections")]),
        ("unknown hash_key", format!("{GOOD}    algorithm: maglev\n    hash_key: source\n"),
         &[(6, 15, "listeners[0].hash_key", "unknown value \"source\", expected one of: client_ip, client_ip_port")]),
        ("maglev settings under ring_hash", format!("{GOOD}    algorithm: ring_hash\n    maglev: {{ table_size: 65537 }}\n"),
         &[(6, 13, "listeners[0].maglev", "maglev settings apply only to algorithm maglev, not ring_hash")]),
        ("maglev table size not prime", format!("{GOOD}    algorithm: maglev\n    maglev: {{ table_size: 65536 }}\n"),
         &[(6, 27, "listeners[0].maglev.table_size", "65536 is not prime: a Maglev table's size must be prime for every backend's permutation to reach every slot (next prime: 65537)")]),
        ("maglev table size below 100 per backend",
         "listeners:\n  - name: a\n    bind: \"0.0.0.0:1\"\n    backends: [\"10.0.0.1:1\", \"10.0.0.2:1\", \"10.0.0.3:1\"]\n    algorithm: maglev\n    maglev:\n      table_size: 293\n".into(),
         &[(7, 19, "listeners[0].maglev.table_size", "293 is below 100 slots for each of the 3 backends (300), the size at which weights hold within 1%; use a prime of at least 300, such as 307, or leave table_size out for the default (65537)")]),
        ("maglev table size too large", format!("{GOOD}    algorithm: maglev\n    maglev: {{ table_size: 16777259 }}\n"),
         &[(6, 27, "listeners[0].maglev.table_size", "must be between 2 and 5000011, found 16777259")]),
        ("maglev unknown setting", format!("{GOOD}    algorithm: maglev\n    maglev: {{ size: 65537 }}\n"),
         &[(6, 15, "listeners[0].maglev.size", "unknown field \"size\", expected one of: table_size")]),
        ("health key of another check", format!("{GOOD}    health: {{ check: tcp, role: master }}\n"),
         &[(5, 33, "listeners[0].health.role", "role applies only to check redis or postgres, not tcp")]),
        ("unknown check", format!("{GOOD}    health: {{ check: icmp }}\n"),
         &[(5, 22, "listeners[0].health.check", "unknown value \"icmp\", expected one of: tcp, send_expect, http, redis, postgres")]),
        ("send_expect without expect", format!("{GOOD}    health: {{ check: send_expect, send: hi }}\n"),
         &[(5, 13, "listeners[0].health.expect", "missing required field; expected expect (a reply prefix) or expect_regex")]),
        ("send and send_hex", format!("{GOOD}    health: {{ check: send_expect, send: hi, send_hex: \"00\", expect: x }}\n"),
         &[(5, 55, "listeners[0].health.send_hex", "give send or send_hex, not both")]),
        ("bad hex", format!("{GOOD}    health: {{ check: send_expect, send_hex: \"0g\", expect: x }}\n"),
         &[(5, 45, "listeners[0].health.send_hex", "invalid hex \"0g\"")]),
        ("bad regex", format!("{GOOD}    health: {{ check: send_expect, send: a, expect_regex: \"(unclosed\" }}\n"),
         &[(5, 58, "listeners[0].health.expect_regex", "invalid regex: unclosed group")]),
        ("http status out of range", format!("{GOOD}    health: {{ check: http, status: \"200-700\" }}\n"),
         &[(5, 36, "listeners[0].health.status", "within 100-599")]),
        ("redis role of postgres", format!("{GOOD}    health: {{ check: redis, role: primary }}\n"),
         &[(5, 35, "listeners[0].health.role", "unknown value \"primary\", expected one of: master, replica")]),
        ("single_primary without a role", format!("{GOOD}    health: {{ check: redis, single_primary: true }}\n"),
         &[(5, 45, "listeners[0].health.single_primary", "single_primary needs role: master (redis) or role: primary (postgres)")]),
        ("single_primary among standbys", format!("{GOOD}    health: {{ check: postgres, role: standby, single_primary: true }}\n"),
         &[(5, 63, "listeners[0].health.single_primary", "single_primary needs role: master (redis) or role: primary (postgres)")]),
        ("single_primary not a boolean", format!("{GOOD}    health: {{ check: redis, role: master, single_primary: yes }}\n"),
         &[(5, 59, "listeners[0].health.single_primary", "expected true or false")]),
        ("single_primary on tcp", format!("{GOOD}    health: {{ check: tcp, single_primary: false }}\n"),
         &[(5, 43, "listeners[0].health.single_primary", "single_primary applies only to check redis or postgres, not tcp")]),
        ("interval too short and rise 0", format!("{GOOD}    health: {{ interval: 1ms, rise: 0 }}\n"),
         &[(5, 25, "listeners[0].health.interval", "must be at least 10ms"),
           (5, 36, "listeners[0].health.rise", "must be between 1 and 1000, found 0")]),
        ("passive ejection_time 0", format!("{GOOD}    passive: {{ ejection_time: 0 }}\n"),
         &[(5, 31, "listeners[0].passive.ejection_time", "must be greater than 0")]),
        ("max_ejection_percent over 100", format!("{GOOD}    passive: {{ max_ejection_percent: 101 }}\n"),
         &[(5, 38, "listeners[0].passive.max_ejection_percent", "must be between 0 and 100, found 101")]),
        ("on_all_down unknown", format!("{GOOD}    on_all_down: queue\n"),
         &[(5, 18, "listeners[0].on_all_down", "unknown value \"queue\", expected one of: reject, use_all")]),
        ("backup not a bool", "listeners:\n  - name: a\n    bind: \"0.0.0.0:1\"\n    backends:\n      - { address: \"10.0.0.1:1\", backup: yes please }\n".into(),
         &[(5, 42, "listeners[0].backends[0].backup", "expected true or false, found a string")]),
        ("ring points per weight 0", format!("{GOOD}    algorithm: ring_hash\n    ring_hash: {{ points_per_weight: 0 }}\n"),
         &[(6, 37, "listeners[0].ring_hash.points_per_weight", "must be between 1 and 10000, found 0")]),
        ("ring too large for its weights",
         "listeners:\n  - name: a\n    bind: \"0.0.0.0:1\"\n    backends:\n      - { address: \"10.0.0.1:1\", weight: 1000 }\n    algorithm: ring_hash\n    ring_hash: { points_per_weight: 9000 }\n".into(),
         &[(7, 37, "listeners[0].ring_hash.points_per_weight", "9000 points per weight over a total weight of 1000 make 9000000 points, more than the ring's limit of 8388608")]),
        ("workers 0", format!("workers: 0\n{GOOD}"),
         &[(1, 10, "workers", "expected \"auto\" or an integer between 1 and 1024, found 0")]),
        ("workers 1025", format!("workers: 1025\n{GOOD}"),
         &[(1, 10, "workers", "found 1025")]),
        ("workers as a word", format!("workers: many\n{GOOD}"),
         &[(1, 10, "workers", "found \"many\"")]),
        ("type error: string for an integer", format!("{GOOD}    retries: \"two\"\n"),
         &[(5, 14, "listeners[0].retries", "expected an integer, found a string")]),
        ("type error: negative integer", format!("{GOOD}    max_connections: -1\n"),
         &[(5, 22, "listeners[0].max_connections", "must be between 0 and 4294967295, found -1")]),
        ("type error: list for a mapping", format!("{GOOD}    timeouts: [1, 2]\n"),
         &[(5, 15, "listeners[0].timeouts", "expected a mapping, found a list")]),
        ("type error: listeners not a list", "listeners: { name: a }\n".into(),
         &[(1, 12, "listeners", "expected a list of listeners, found a mapping")]),
        ("type error: backend is a number", "listeners:\n  - name: a\n    bind: \"0.0.0.0:1\"\n    backends: [42]\n".into(),
         &[(4, 16, "listeners[0].backends[0]", "expected an address like \"10.0.0.1:6379\" or a mapping with `address` and `weight`, found an integer")]),
        ("backend mapping without address", "listeners:\n  - name: a\n    bind: \"0.0.0.0:1\"\n    backends:\n      - weight: 3\n        adress: 10.0.0.1:1\n".into(),
         &[(5, 9, "listeners[0].backends[0].address", "missing required field"),
           (6, 9, "listeners[0].backends[0].adress", "unknown field \"adress\", expected one of: address, weight, backup")]),
        ("duplicate backend", "listeners:\n  - name: a\n    bind: \"0.0.0.0:1\"\n    backends:\n      - 10.0.0.1:1\n      - { address: 10.0.0.1:1, weight: 2 }\n".into(),
         &[(6, 9, "listeners[0].backends[1]", "duplicate backend 10.0.0.1:1, already listed at line 5")]),
        ("admin without bind", format!("admin: {{}}\n{GOOD}"),
         &[(1, 8, "admin.bind", "missing required field")]),
        ("admin.max_connections 0", format!("admin:\n  bind: 127.0.0.1:9900\n  max_connections: 0\n{GOOD}"),
         &[(3, 20, "admin.max_connections", "must be between 1 and 1024, found 0")]),
        ("admin.max_connections too large, and no bind", format!("admin: {{ max_connections: 1025 }}\n{GOOD}"),
         &[(1, 8, "admin.bind", "missing required field"),
           (1, 27, "admin.max_connections", "must be between 1 and 1024, found 1025")]),
        ("admin.max_connections not an integer", format!("admin: {{ bind: 127.0.0.1:9900, max_connections: lots }}\n{GOOD}"),
         &[(1, 49, "admin.max_connections", "expected an integer, found a string")]),
        ("missing listeners", "workers: auto\n".into(),
         &[(1, 1, "listeners", "missing required field; expected a list of listeners")]),
        ("invalid name", "listeners:\n  - name: \"my redis\"\n    bind: \"0.0.0.0:1\"\n    backends: [\"10.0.0.1:1\"]\n".into(),
         &[(2, 11, "listeners[0].name", "invalid name \"my redis\"")]),
        ("YAML 1.1 boolean words stay strings", format!("{GOOD}    on_max_connections: yes\n"),
         &[(5, 25, "listeners[0].on_max_connections", "unknown value \"yes\", expected one of: queue, reject")]),
        ("non-string key", format!("{GOOD}7: x\n"),
         &[(5, 1, "", "expected a field name, found an integer")]),
        ("empty file", String::new(),
         &[(1, 1, "", "the file is empty")]),
        ("document is not a mapping", "- a\n- b\n".into(),
         &[(1, 1, "", "expected a mapping of settings, found a list")]),
        ("YAML syntax error", "listeners:\n  - name: a\n    bind: [\"0.0.0.0:1\"\n".into(),
         &[(3, 11, "", "invalid YAML: unclosed bracket")]),
        ("YAML bad indentation", "listeners:\n  - name: a\n   bind: x\n".into(),
         &[(3, 4, "", "invalid YAML:")]),
        ("duplicate key", format!("{GOOD}    name: b\n"),
         &[(5, 5, "", "invalid YAML: duplicate key \"name\"")]),
        ("two documents", format!("{GOOD}---\n{GOOD}"),
         &[(5, 1, "", "invalid YAML: expected one YAML document, found a second one")]),
    ];
    let mut failures = Vec::new();
    for (what, yaml, expected) in cases {
        let found = errors(yaml);
        let matches = found.len() == expected.len()
            && found
                .iter()
                .zip(expected.iter())
                .all(|(f, e)| (f.0, f.1, f.2.as_str()) == (e.0, e.1, e.2) && f.3.contains(e.3));
        if !matches {
            failures.push(format!(
                "{what}:\n  expected {expected:?}\n  found    {found:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn error_display_names_file_position_and_field() {
    let errors = check(&format!(
        "{GOOD}    timeouts:\n      connect: 2 sec\n    retries: x\n"
    ))
    .unwrap_err();
    assert_eq!(
        errors.to_string(),
        "sluice.yaml:6:16: listeners[0].timeouts.connect: invalid duration \"2 sec\": \
         expected a whole number with a unit (ms, s, m, h), e.g. 250ms or 2s, or 0\n\
         sluice.yaml:7:14: listeners[0].retries: expected an integer, found a string"
    );
    let built = ConfigError::new(
        Path::new("x.yaml"),
        Location { line: 3, column: 4 },
        "workers",
        "bad",
    );
    assert_eq!(built.to_string(), "x.yaml:3:4: workers: bad");
    let syntax = check("a: [").unwrap_err();
    assert!(
        syntax
            .to_string()
            .starts_with("sluice.yaml:1:4: invalid YAML: "),
        "{syntax}"
    );
}

#[test]
fn user_text_cannot_break_the_one_error_per_line_display() {
    let errors = check(&format!("{GOOD}\"evil\\nsluice.yaml:1:1: fake\": 1\n")).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert_eq!(errors.to_string().lines().count(), 1, "{errors}");
}

/// A "billion laughs" document: `levels` anchors, each a list of nine aliases of the one
/// before (9^levels strings in all), and `listeners` aliasing the last.
fn alias_bomb(levels: usize) -> String {
    let names: Vec<char> = ('a'..='z').take(levels).collect();
    let mut yaml = format!("a: &a [{}]\n", ["\"lol\""; 9].join(","));
    for pair in names.windows(2) {
        let (before, name) = (pair[0], pair[1]);
        let aliases = vec![format!("*{before}"); 9].join(",");
        yaml.push_str(&format!("{name}: &{name} [{aliases}]\n"));
    }
    yaml.push_str(&format!("listeners: *{}\n", names[levels - 1]));
    yaml
}

#[test]
fn alias_bomb_is_rejected_quickly() {
    let bomb = &alias_bomb(9);
    let start = Instant::now();
    let errors = check(bomb).unwrap_err();
    // A generous bound that still catches an expansion of 9^9 nodes.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(errors.0.len(), 1);
    assert!(
        errors.0[0].message.starts_with("invalid YAML: "),
        "{errors}"
    );
}

/// Binds that are valid addresses but that the start would refuse: port 0, and an admin
/// endpoint on an address a tcp listener holds (a udp listener does not collide).
#[test]
fn binds_the_start_would_refuse_are_errors_at_their_position() {
    let port_zero =
        "listeners:\n  - name: a\n    bind: \"0.0.0.0:0\"\n    backends: [\"10.0.0.1:1\"]\n";
    assert_eq!(
        check(port_zero).unwrap_err().to_string(),
        "sluice.yaml:3:11: listeners[0].bind: invalid address \"0.0.0.0:0\": the port must be \
         between 1 and 65535 (with port 0 the kernel would pick a port that no client knows)"
    );
    let admin = |bind: &str, listeners: &str| format!("admin: {{ bind: \"{bind}\" }}\n{listeners}");
    assert_eq!(
        check(&admin("127.0.0.1:1000", GOOD))
            .unwrap_err()
            .to_string(),
        "sluice.yaml:1:16: admin.bind: tcp 127.0.0.1:1000 overlaps 0.0.0.0:1000, the bind of \
         listener \"a\" at line 3 (a wildcard address takes the port on every address); give \
         the admin endpoint its own port"
    );
    let exact = GOOD.replace("0.0.0.0:1000", "127.0.0.1:1000");
    assert_eq!(
        check(&admin("127.0.0.1:1000", &exact))
            .unwrap_err()
            .to_string(),
        "sluice.yaml:1:16: admin.bind: tcp 127.0.0.1:1000 is already bound by listener \"a\" at \
         line 3; give the admin endpoint its own port"
    );
    assert!(check(&admin("0.0.0.0:1001", GOOD)).is_ok());
    let udp = GOOD.replace("    bind:", "    protocol: udp\n    bind:");
    assert!(check(&admin("127.0.0.1:1000", &udp)).is_ok());
}

/// The budget's wording names serde-saphyr's types (`RecordedAnchorEvents { .. }`); the message
/// says it in the words of the file instead.
#[test]
fn alias_bomb_message_is_in_config_words() {
    let bomb = &alias_bomb(6);
    let errors = check(bomb).unwrap_err();
    assert_eq!(
        errors.0[0].message,
        "invalid YAML: the document expands too much through aliases: they repeat more than \
         100000 elements of anchored values"
    );
    let big = "x".repeat(1024 * 1024);
    let yaml = format!("a: &a \"{big}\"\nb: [{}]\n", vec!["*a"; 64].join(","));
    let errors = check(&yaml).unwrap_err();
    assert_eq!(
        errors.0[0].message,
        "invalid YAML: the document expands too much through aliases: its values hold more than \
         4 MiB of text"
    );
}

#[test]
fn large_string_aliased_many_times_is_rejected() {
    // Each alias is cheap for the parser, but every copy is a new string in the tree.
    let big = "x".repeat(1024 * 1024);
    let yaml = format!("a: &a \"{big}\"\nb: [{}]\n", vec!["*a"; 64].join(","));
    let errors = check(&yaml).unwrap_err();
    assert!(errors.to_string().contains("expands too much"), "{errors}");
}

#[test]
fn document_whose_tree_would_be_too_large_is_rejected() {
    let yaml = format!("listeners: [{}]\n", vec!["0"; 200_000].join(","));
    let errors = check(&yaml).unwrap_err();
    assert!(errors.to_string().contains("more than 16 MiB"), "{errors}");
}

#[test]
fn deep_nesting_is_rejected_without_overflowing_the_stack() {
    for depth in [100, 10_000, 1_000_000] {
        let flow = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(check(&flow).is_err());
        let flow_maps = format!("{}{}", "{a: ".repeat(depth), "}".repeat(depth));
        assert!(check(&flow_maps).is_err());
    }
    let block: String = (0..200).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
    let errors = check(&block).unwrap_err();
    assert!(errors.0[0].message.starts_with("invalid YAML"), "{errors}");
}

#[test]
fn oversized_input_is_rejected_before_parsing() {
    let text = " ".repeat(sluice_config::FILE_BYTES_MAX + 1);
    let errors = check(&text).unwrap_err();
    assert_eq!((errors.0[0].line, errors.0[0].column), (0, 0));
    assert_eq!(
        errors.to_string(),
        "sluice.yaml: the file is larger than 4 MiB"
    );
}

#[test]
fn load_reports_a_missing_file_without_position() {
    let path = fixture("does-not-exist.yaml");
    let errors = load(&path).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert_eq!(errors.0[0].line, 0);
    assert!(
        errors
            .to_string()
            .starts_with(&format!("{}: cannot open: ", path.display()))
    );
}

#[test]
fn mangled_inputs_never_panic() {
    // A cheap stand-in for the fuzzer until `fuzz/` exists: a seeded xorshift mutates the
    // reference example (delete, duplicate, replace bytes) and every result must be an
    // `Ok` or positioned errors, never a panic.
    let original = std::fs::read(fixture("design-example.yaml")).unwrap();
    let alphabet = b" \n\t:-[]{},&*!|>'\"#%@`?0123456789abcxyz.\\";
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..500 {
        let mut bytes = original.clone();
        for _ in 0..(next() % 8 + 1) {
            let at = (next() % bytes.len() as u64) as usize;
            match next() % 3 {
                0 => {
                    bytes.remove(at);
                }
                1 => bytes.insert(at, alphabet[(next() % alphabet.len() as u64) as usize]),
                _ => bytes[at] = alphabet[(next() % alphabet.len() as u64) as usize],
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Err(errors) = check(&text) {
            assert!(!errors.0.is_empty());
            for error in &errors.0 {
                assert!(!error.message.is_empty());
                assert!(!error.to_string().contains('\n'));
            }
        }
    }
}

#[test]
fn keepalive_time_0_turns_keepalive_off_and_keeps_the_other_defaults() {
    let config = check(&format!(
        "{GOOD}    keepalive: {{ time: 0 }}\n    timeouts: {{ user_timeout: 0 }}\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let listener = &config.listeners[0];
    assert!(!listener.keepalive.is_on());
    assert_eq!(
        listener.keepalive,
        Keepalive {
            time: Duration::ZERO,
            ..Keepalive::default()
        }
    );
    assert_eq!(listener.timeouts.user_timeout, Duration::ZERO);
}
