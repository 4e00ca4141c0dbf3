//! What a user meets at the command line: `--log-level` (and `RUST_LOG`) and fatal errors that
//! reach stderr whatever the filter.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use common::{Listener, binary, config};
use sluice_testkit::{CommandOutput, ConfigFile, free_addr, run_with_timeout};

/// Runs `sluice ARGS...` with `env` set, to its end (bounded to 10 s).
fn sluice(args: &[&str], env: &[(&str, &str)]) -> CommandOutput {
    let mut command = Command::new(binary());
    command.args(args).env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    run_with_timeout(&mut command, Duration::from_secs(10))
        .unwrap_or_else(|error| panic!("sluice {args:?}: {error}"))
}

/// A config whose only listener binds `bind`, to one backend that nothing needs to serve.
fn one_listener(bind: SocketAddr) -> ConfigFile {
    let listener = Listener::new("x", &[free_addr()]).bind(bind);
    ConfigFile::new(&config(1, None, &[], &[listener]))
}

fn path(config: &ConfigFile) -> &str {
    config.path().to_str().expect("temp paths are UTF-8")
}

// --- --log-level and RUST_LOG ---

#[test]
fn unknown_log_level_is_a_usage_error_naming_the_levels() {
    let config = one_listener(free_addr());
    // (flags, environment, what the message names)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        (&["--log-level", "verbose"], &[], "--log-level"),
        (&["--log-level", "info,sluice=loud"], &[], "--log-level"),
        (&["--log-level", "sluice"], &[], "--log-level"),
        (&[], &[("RUST_LOG", "verbose")], "RUST_LOG"),
    ];
    let mut failures = Vec::new();
    for (flags, env, source) in cases {
        let args: Vec<&str> = flags
            .iter()
            .copied()
            .chain(["check", "-c", path(&config)])
            .collect();
        let output = sluice(&args, env);
        let names_levels = ["error", "warn", "info", "debug", "trace", "off"]
            .iter()
            .all(|level| output.stderr.contains(level));
        if output.status.code() != Some(64) || !output.stderr.contains(source) || !names_levels {
            failures.push(format!(
                "{args:?} {env:?}: exit {:?}, expected 64 and a message naming {source} and the \
                 levels\n--- stderr ---\n{}",
                output.status.code(),
                output.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn level_names_users_type_are_accepted() {
    let config = one_listener(free_addr());
    for level in [
        "error",
        "warn",
        "warning",
        "WARNING",
        "Info",
        "debug",
        "trace",
        "off",
        "info,sluice=debug",
        "warning,sluice_health=trace",
    ] {
        let output = sluice(&["--log-level", level, "check", "-c", path(&config)], &[]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "--log-level {level}: stderr:\n{}",
            output.stderr
        );
    }
    let output = sluice(&["check", "-c", path(&config)], &[("RUST_LOG", "warning")]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "RUST_LOG=warning: {}",
        output.stderr
    );
}

/// `warning` is `warn`: a bind conflict (an error) is shown, not filtered out.
#[test]
fn warning_level_shows_the_error_of_a_bind_conflict() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = taken.local_addr().unwrap();
    let config = one_listener(bind);
    let output = sluice(&["--log-level", "warning", "run", "-c", path(&config)], &[]);
    assert_eq!(output.status.code(), Some(71), "stderr:\n{}", output.stderr);
    assert!(
        output.stderr.contains(&bind.to_string()),
        "the bind conflict is not named; stderr:\n{}",
        output.stderr
    );
}

/// A fatal error reaches stderr even with logging off, from the flag or from RUST_LOG.
#[test]
fn fatal_errors_reach_stderr_with_logging_off() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = taken.local_addr().unwrap();
    let config = one_listener(bind);
    for (flags, env) in [
        (&["--log-level", "off"][..], &[][..]),
        (&[][..], &[("RUST_LOG", "off")][..]),
    ] {
        let args: Vec<&str> = flags
            .iter()
            .copied()
            .chain(["run", "-c", path(&config)])
            .collect();
        let output = sluice(&args, env);
        assert_eq!(
            output.status.code(),
            Some(71),
            "{args:?} {env:?}: {}",
            output.stderr
        );
        assert!(
            output.stderr.contains(&bind.to_string()) && output.stderr.contains("listener"),
            "{args:?} {env:?}: the bind conflict is not on stderr:\n{}",
            output.stderr
        );
    }
}
