//! Bad config files: `sluice check` and `sluice run` exit 64 and name the line and the field.

mod common;

use common::binary;
use sluice_testkit::{ConfigFile, run_config_command};

/// A valid config; each case below changes one thing in it.
const VALID: &str = "\
workers: 1
shutdown_timeout: 5s
listeners:
  - name: web
    protocol: tcp
    bind: \"127.0.0.1:18080\"
    algorithm: round_robin
    backends:
      - \"127.0.0.1:18081\"
      - { address: \"127.0.0.1:18082\", weight: 2 }
    timeouts:
      connect: 2s
";

/// A second listener, appended to [`VALID`] by the duplicate cases (lines 13..).
// Written without a line continuation, which would strip the first line's indentation.
const SECOND: &str = concat!(
    "  - name: api\n",
    "    protocol: tcp\n",
    "    bind: \"127.0.0.1:18090\"\n",
    "    backends:\n",
    "      - \"127.0.0.1:18091\"\n",
);

struct Case {
    what: &'static str,
    yaml: String,
    line: usize,
    field: &'static str,
}

fn cases() -> Vec<Case> {
    let edit = |from: &str, to: &str| {
        assert!(VALID.contains(from), "{from:?} is not in the valid config");
        VALID.replacen(from, to, 1)
    };
    vec![
        Case {
            what: "unknown top-level field",
            yaml: format!("workerz: 2\n{VALID}"),
            line: 1,
            field: "workerz",
        },
        Case {
            what: "unknown listener field",
            yaml: edit("    algorithm:", "    colour: red\n    algorithm:"),
            line: 7,
            field: "listeners[0].colour",
        },
        Case {
            what: "duration without a unit",
            yaml: edit("connect: 2s", "connect: 2 sec"),
            line: 12,
            field: "listeners[0].timeouts.connect",
        },
        Case {
            what: "bare non-zero duration",
            yaml: edit("shutdown_timeout: 5s", "shutdown_timeout: 30"),
            line: 2,
            field: "shutdown_timeout",
        },
        Case {
            what: "weight above 1000",
            yaml: edit("weight: 2", "weight: 1001"),
            line: 10,
            field: "listeners[0].backends[1].weight",
        },
        Case {
            what: "unbracketed IPv6 bind",
            yaml: edit("bind: \"127.0.0.1:18080\"", "bind: \"::1:18080\""),
            line: 6,
            field: "listeners[0].bind",
        },
        Case {
            what: "unbracketed IPv6 backend",
            yaml: edit("- \"127.0.0.1:18081\"", "- \"::1:18081\""),
            line: 9,
            field: "listeners[0].backends[0]",
        },
        Case {
            what: "duplicate listener name",
            yaml: format!("{VALID}{}", SECOND.replace("name: api", "name: web")),
            line: 13,
            field: "listeners[1].name",
        },
        Case {
            what: "duplicate bind",
            yaml: format!("{VALID}{}", SECOND.replace("18090", "18080")),
            line: 15,
            field: "listeners[1].bind",
        },
        Case {
            what: "udp-only key (not yet supported)",
            yaml: format!("{VALID}    max_sessions: 10\n"),
            line: 13,
            field: "listeners[0].max_sessions",
        },
        Case {
            what: "health key of another check",
            yaml: format!("{VALID}    health:\n      check: tcp\n      role: master\n"),
            line: 15,
            field: "listeners[0].health.role",
        },
        Case {
            what: "unknown algorithm",
            yaml: edit("algorithm: round_robin", "algorithm: fastest"),
            line: 7,
            field: "listeners[0].algorithm",
        },
        Case {
            what: "unknown on_max_connections",
            yaml: edit(
                "    algorithm:",
                "    on_max_connections: drop\n    algorithm:",
            ),
            line: 7,
            field: "listeners[0].on_max_connections",
        },
    ]
}

#[test]
fn the_valid_base_config_passes_check() {
    let config = ConfigFile::new(VALID);
    let output = run_config_command(binary(), "check", &config);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        output.stdout,
        output.stderr
    );
}

/// The example shipped in deploy/ loads, and `check` summarises its listener and backends.
#[test]
fn the_deploy_example_passes_check_with_a_summary() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/sluice.yaml");
    let mut command = std::process::Command::new(binary());
    command.args(["check", "-c", path]);
    let output = sluice_testkit::run_with_timeout(&mut command, std::time::Duration::from_secs(10))
        .expect("sluice check runs");
    assert_eq!(output.status.code(), Some(0), "stderr:\n{}", output.stderr);
    for expected in [
        "listener redis tcp 0.0.0.0:6379",
        "backend 10.0.0.1:6379 weight 1",
        "backend 10.0.0.2:6379 weight 2",
        "admin: http://127.0.0.1:9900/metrics",
    ] {
        assert!(
            output.stdout.contains(expected),
            "missing {expected:?} in:\n{}",
            output.stdout
        );
    }
}

#[test]
fn check_rejects_each_bad_config_naming_line_and_field() {
    let mut failures = Vec::new();
    for case in cases() {
        let config = ConfigFile::new(&case.yaml);
        let output = run_config_command(binary(), "check", &config);
        let location = format!("{}:{}:", config.path().display(), case.line);
        let named = output.stderr.lines().any(|line| {
            line.starts_with(&location) && line.contains(&format!(" {}: ", case.field))
        });
        if output.status.code() != Some(64) || !named {
            failures.push(format!(
                "{}: exit {:?}, expected 64 and a line starting {location:?} naming {:?}\n--- stderr ---\n{}",
                case.what, output.status.code(), case.field, output.stderr
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn run_with_a_bad_config_exits_64() {
    let config = ConfigFile::new(&VALID.replace("weight: 2", "weight: 1001"));
    let output = run_config_command(binary(), "run", &config);
    assert_eq!(output.status.code(), Some(64), "stderr:\n{}", output.stderr);
    assert!(
        output.stderr.contains("listeners[0].backends[1].weight"),
        "stderr:\n{}",
        output.stderr
    );
}

/// A backend given by hostname is resolved once at start; `check` shows what it resolved to.
#[test]
fn a_backend_hostname_is_resolved_at_start() {
    let yaml = format!(
        "listeners:\n  - name: byname\n    bind: \"{}\"\n    backends: [\"localhost:7001\"]\n",
        sluice_testkit::free_addr()
    );
    let config = ConfigFile::new(&yaml);
    let output = run_config_command(binary(), "check", &config);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{}", output.stderr);
    assert!(
        output
            .stdout
            .contains("backend localhost:7001 -> 127.0.0.1:7001")
            || output
                .stdout
                .contains("backend localhost:7001 -> [::1]:7001"),
        "localhost not shown resolved to a loopback address:\n{}",
        output.stdout
    );
}

/// What `run` would refuse at start, `check` refuses first: both exit 64 with the same
/// `file:line:column: field: message` line.
#[test]
fn check_refuses_what_run_refuses_with_the_same_message() {
    let dir = std::env::temp_dir();
    let edit = |from: &str, to: &str| {
        assert!(VALID.contains(from), "{from:?} is not in the valid config");
        VALID.replacen(from, to, 1)
    };
    let admin = |bind: &str| format!("{VALID}admin:\n  bind: \"{bind}\"\n");
    let health =
        |file: &str| format!("{VALID}    health: {{ check: redis, password_file: {file} }}\n");
    let cases = vec![
        Case {
            what: "listener bind on port 0",
            yaml: edit("bind: \"127.0.0.1:18080\"", "bind: \"127.0.0.1:0\""),
            line: 6,
            field: "listeners[0].bind",
        },
        Case {
            what: "admin bind on port 0",
            yaml: admin("127.0.0.1:0"),
            line: 14,
            field: "admin.bind",
        },
        Case {
            what: "admin.bind equal to a listener's bind",
            yaml: admin("127.0.0.1:18080"),
            line: 14,
            field: "admin.bind",
        },
        Case {
            what: "admin.bind inside a wildcard listener's bind",
            yaml: format!(
                "{}admin:\n  bind: \"127.0.0.1:18080\"\n",
                edit("bind: \"127.0.0.1:18080\"", "bind: \"0.0.0.0:18080\"")
            ),
            line: 14,
            field: "admin.bind",
        },
        Case {
            what: "admin.bind on a wildcard over a listener's bind",
            yaml: admin("0.0.0.0:18080"),
            line: 14,
            field: "admin.bind",
        },
        Case {
            what: "password_file that does not exist",
            yaml: health("/nonexistent/sluice-test.pass"),
            line: 13,
            field: "listeners[0].health.password_file",
        },
        Case {
            what: "password_file that cannot be read (a directory)",
            yaml: health(&dir.display().to_string()),
            line: 13,
            field: "listeners[0].health.password_file",
        },
    ];
    let mut failures = Vec::new();
    for case in cases {
        let config = ConfigFile::new(&case.yaml);
        let location = format!("{}:{}:", config.path().display(), case.line);
        let check = run_config_command(binary(), "check", &config);
        let line = check.stderr.lines().find(|line| {
            line.starts_with(&location) && line.contains(&format!(" {}: ", case.field))
        });
        let Some(line) = line.filter(|_| check.status.code() == Some(64)) else {
            failures.push(format!(
                "{}: check exited {:?}, expected 64 and a line starting {location:?} naming {:?}\n--- stderr ---\n{}",
                case.what, check.status.code(), case.field, check.stderr
            ));
            continue;
        };
        let mut command = std::process::Command::new(binary());
        command.arg("run").arg("-c").arg(config.path());
        match sluice_testkit::run_with_timeout(&mut command, std::time::Duration::from_secs(5)) {
            Ok(run) if run.status.code() == Some(64) && run.stderr.lines().any(|l| l == line) => {}
            Ok(run) => failures.push(format!(
                "{}: run exited {:?}, expected 64 and the line check printed:\n{line}\n--- stderr ---\n{}",
                case.what, run.status.code(), run.stderr
            )),
            Err(error) => failures.push(format!("{}: run did not refuse it: {error}", case.what)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
