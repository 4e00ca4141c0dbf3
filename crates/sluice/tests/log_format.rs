//! Sluice's own log as the config file sets it: `log.format` (text or json, every line of
//! stderr one JSON object from the first line on) and `log.level`, which `--log-level` and
//! RUST_LOG override; and the config errors of a bad `log` mapping, at their line.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{
    CommandOutput, ConfigFile, EchoServer, Sluice, assert_echo, run_with_timeout,
};

/// A config with `log_line` at the top (line 2) and one listener to `echo`.
fn config_with_log(log_line: &str, echo: &EchoServer) -> (ConfigFile, SocketAddr) {
    let listener = Listener::new("front", &[echo.addr()]);
    let bind = listener.bind;
    (
        ConfigFile::new(&config(1, None, &[log_line], &[listener])),
        bind,
    )
}

fn path(config: &ConfigFile) -> &str {
    config.path().to_str().expect("temp paths are UTF-8")
}

/// `sluice run -c CONFIG` with `flags` first and `env` set (RUST_LOG removed unless set here),
/// returned once its process exists; the marker is written by the shell before it execs
/// Sluice, so that a run whose level hides every line can be started too.
fn spawn(config: &ConfigFile, flags: &[&str], env: &[(&str, &str)]) -> Sluice {
    let mut command = Command::new("sh");
    command
        .args(["-c", "echo spawned >&2; exec \"$0\" \"$@\""])
        .arg(binary())
        .args(flags)
        .args(["run", "-c", path(config)])
        .env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    Sluice::start_stand_in(command, "spawned")
}

/// Waits (bounded) until `bind` accepts; panics if Sluice exits or 20 s pass first.
fn wait_serving(sluice: &mut Sluice, bind: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&bind, Duration::from_millis(200)).is_err() {
        if let Some(status) = sluice.try_exit_status() {
            panic!(
                "exited ({status}) before serving:\n{}",
                sluice.stderr_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{bind} not accepting within 20 s:\n{}",
            sluice.stderr_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Starts Sluice, sends one connection through it, stops it with SIGTERM; its stderr, less
/// the shell's marker line.
fn run_once(config: &ConfigFile, bind: SocketAddr, flags: &[&str], env: &[(&str, &str)]) -> String {
    let mut sluice = spawn(config, flags, env);
    wait_serving(&mut sluice, bind);
    assert_echo(bind, 16 * 1024, 3, Duration::from_secs(10));
    let status = sluice.terminate(Duration::from_secs(10));
    let stderr = sluice.stderr_text();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "stderr:\n{stderr}");
    stderr
        .strip_prefix("spawned\n")
        .unwrap_or_else(|| panic!("no marker first:\n{stderr}"))
        .to_owned()
}

fn check(config: &ConfigFile) -> CommandOutput {
    let mut command = Command::new(binary());
    command
        .args(["check", "-c", path(config)])
        .env_remove("RUST_LOG");
    run_with_timeout(&mut command, Duration::from_secs(10)).expect("sluice check")
}

#[test]
fn json_format_makes_every_line_a_json_object() {
    let echo = EchoServer::echo();
    let (config, bind) = config_with_log("log: { format: json }", &echo);
    let stderr = run_once(&config, bind, &[], &[]);
    assert!(!stderr.is_empty(), "nothing logged");
    let mut listening = None;
    for line in stderr.lines() {
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\n--- stderr ---\n{stderr}"));
        for key in ["timestamp", "level", "message"] {
            assert!(
                object.get(key).is_some_and(serde_json::Value::is_string),
                "no string {key:?} at the top of {line}"
            );
        }
        if object["message"] == "listening" {
            listening = Some(object);
        }
    }
    let listening = listening.unwrap_or_else(|| panic!("no \"listening\" line:\n{stderr}"));
    assert_eq!(listening["level"], "INFO", "{listening}");
    assert_eq!(listening["listener"], "front", "{listening}");
    assert_eq!(listening["bind"], bind.to_string(), "{listening}");
    assert!(
        stderr.lines().any(|l| l.contains("\"sluice ready\"")),
        "no ready line:\n{stderr}"
    );
}

#[test]
fn text_format_is_the_default_and_names_fields_bare() {
    let echo = EchoServer::echo();
    // Without `log:` (the default) and with `format: text` written out.
    for log_line in ["shutdown_timeout: 30s", "log: { format: text }"] {
        let (config, bind) = config_with_log(log_line, &echo);
        let stderr = run_once(&config, bind, &[], &[]);
        let listening = stderr
            .lines()
            .find(|l| l.contains("listening"))
            .unwrap_or_else(|| panic!("{log_line}: no listening line:\n{stderr}"));
        assert!(
            !listening.starts_with('{') && listening.contains("listener=front"),
            "{log_line}: {listening}"
        );
    }
}

#[test]
fn warn_level_hides_info_lines_and_the_flag_or_rust_log_bring_them_back() {
    let echo = EchoServer::echo();
    let (config, bind) = config_with_log("log: { level: warn }", &echo);
    let quiet = run_once(&config, bind, &[], &[]);
    assert!(
        !quiet.contains("listening") && !quiet.contains("sluice ready"),
        "log.level warn shows info lines:\n{quiet}"
    );
    for (flags, env) in [
        (&["--log-level", "info"][..], &[][..]),
        (&[][..], &[("RUST_LOG", "info")][..]),
    ] {
        let loud = run_once(&config, bind, flags, env);
        assert!(
            loud.contains("listening") && loud.contains("sluice ready"),
            "{flags:?} {env:?} does not override log.level warn:\n{loud}"
        );
    }
}

#[test]
fn unknown_log_format_is_a_config_error_at_its_line() {
    let echo = EchoServer::echo();
    let (config, _) = config_with_log("log: { format: xml }", &echo);
    let output = check(&config);
    assert_eq!(output.status.code(), Some(64), "{}", output.stderr);
    let at = format!("{}:2:16: log.format: ", path(&config));
    assert!(
        output.stderr.contains(&at)
            && output.stderr.contains("\"xml\"")
            && output.stderr.contains("text, json"),
        "expected {at:?}, the value and the accepted ones:\n{}",
        output.stderr
    );
}

#[test]
fn unknown_log_level_is_a_config_error_at_its_line() {
    let echo = EchoServer::echo();
    let (config, _) = config_with_log("log: { level: warning2 }", &echo);
    let output = check(&config);
    assert_eq!(output.status.code(), Some(64), "{}", output.stderr);
    let at = format!("{}:2:15: log.level: ", path(&config));
    assert!(
        output.stderr.contains(&at)
            && output.stderr.contains("\"warning2\"")
            && output
                .stderr
                .contains("off, error, warn, warning, info, debug, trace"),
        "expected {at:?}, the value and the level names:\n{}",
        output.stderr
    );
}
