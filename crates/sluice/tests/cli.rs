//! What a user meets at the command line: `--log-level` (and `RUST_LOG`), fatal errors that reach
//! stderr whatever the filter, signals that arrive while Sluice is still starting, and messages
//! written in config words rather than Rust's `Debug` shapes.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{Listener, binary, config};
use sluice_testkit::{
    CommandOutput, ConfigFile, EchoServer, Signal, Sluice, assert_echo, free_addr, run_with_timeout,
};

/// How long the first probe of the silent backend below takes: long enough to send a signal
/// in the middle of start-up, short enough to keep the tests quick.
const SLOW_PROBE: Duration = Duration::from_secs(3);

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

// --- Signals during start-up ---

/// A listener to an echo backend and to a silent one (it accepts nothing, so its first probe
/// waits for a reply until [`SLOW_PROBE`]): the first probes, and so the start, take that long.
struct SlowStart {
    echo: EchoServer,
    _silent: TcpListener,
    config: ConfigFile,
    bind: SocketAddr,
}

impl SlowStart {
    fn new() -> Self {
        let echo = EchoServer::echo();
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let listener =
            Listener::new("slow", &[echo.addr(), silent.local_addr().unwrap()]).with(&format!(
                "health: {{ check: send_expect, send: \"PING\\r\\n\", expect: \"PING\", \
                 interval: 1s, timeout: {}s }}",
                SLOW_PROBE.as_secs()
            ));
        let bind = listener.bind;
        let config = ConfigFile::new(&config(1, None, &[], &[listener]));
        SlowStart {
            echo,
            _silent: silent,
            config,
            bind,
        }
    }

    /// Sluice, returned once it has logged "starting" (before the first probes).
    fn spawn(&self) -> Sluice {
        let mut command = Command::new(binary());
        command
            .args(["run", "-c", path(&self.config), "--log-level", "info"])
            .env_remove("RUST_LOG");
        Sluice::start_stand_in(command, "starting")
    }
}

/// Waits (bounded) until stderr holds `needle`; panics if the process exits first.
fn wait_for_line(sluice: &mut Sluice, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !sluice.stderr_text().contains(needle) {
        if let Some(status) = sluice.try_exit_status() {
            panic!(
                "exited ({status}) before logging {needle:?}:\n{}",
                sluice.stderr_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} within {within:?}:\n{}",
            sluice.stderr_text()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A SIGHUP while the first probes run neither kills Sluice nor is lost: it is logged, Sluice
/// starts and serves, then reloads once.
#[test]
fn sighup_during_start_up_is_applied_after_start() {
    let setup = SlowStart::new();
    let mut sluice = setup.spawn();
    sluice.signal(Signal::SIGHUP);
    let sent = Instant::now();
    assert!(
        !sluice.stderr_text().contains("sluice ready"),
        "the start was over before the signal; the test proves nothing:\n{}",
        sluice.stderr_text()
    );
    wait_for_line(
        &mut sluice,
        "sluice ready",
        SLOW_PROBE + Duration::from_secs(10),
    );
    eprintln!("ready {:?} after the SIGHUP", sent.elapsed());
    assert_echo(setup.bind, 64 * 1024, 7, Duration::from_secs(10));
    assert!(setup.echo.accepted() > 0);
    wait_for_line(&mut sluice, "reloaded", Duration::from_secs(10));
    let stderr = sluice.stderr_text();
    assert!(
        stderr.contains("SIGHUP during start-up"),
        "the early SIGHUP is not logged:\n{stderr}"
    );
    let status = sluice.terminate(Duration::from_secs(5));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{stderr}");
}

/// A SIGTERM while the first probes run ends Sluice at once, cleanly, without listening.
#[test]
fn sigterm_during_start_up_exits_zero_at_once() {
    let setup = SlowStart::new();
    let mut sluice = setup.spawn();
    sluice.signal(Signal::SIGTERM);
    let status = sluice
        .wait_exit(Duration::from_secs(2))
        .unwrap_or_else(|| panic!("still running 2 s after SIGTERM:\n{}", sluice.stderr_text()));
    let stderr = sluice.stderr_text();
    assert_eq!(status.code(), Some(0), "exit {status}; stderr:\n{stderr}");
    assert!(!stderr.contains("sluice ready"), "{stderr}");
    assert!(stderr.contains("SIGTERM during start-up"), "{stderr}");
}

// --- Config words, not Rust's Debug output ---

/// Shapes of Rust's `Debug` output that must never reach a user.
const DEBUG_SHAPES: &[&str] = &[
    "Some(",
    "None",
    "Ok(",
    "Err(",
    "BackendId(",
    "{ ",
    " }",
    "Queue",
    "Reject",
    "Tcp",
    "Udp",
    "RoundRobin",
    "Maglev {",
];

/// The lines of `text` that show a `Debug` shape.
fn debug_shapes(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|line| DEBUG_SHAPES.iter().any(|shape| line.contains(shape)))
        .collect()
}

/// The `key=value` fields of a log line whose value holds a space without being quoted (the
/// text up to the next ` key=` or the end of the line).
fn unquoted_values(line: &str) -> Vec<String> {
    let starts: Vec<(usize, usize)> = line
        .match_indices('=')
        .filter_map(|(eq, _)| {
            let key_start = line[..eq]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(0, |i| i + 1);
            let is_field = key_start < eq && line[..key_start].ends_with(' ');
            is_field.then_some((key_start, eq))
        })
        .collect();
    let mut bad = Vec::new();
    for (i, &(key_start, eq)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(line.len(), |&(next, _)| next - 1);
        let value = &line[eq + 1..end.max(eq + 1)];
        if value.contains(' ') && !value.starts_with('"') {
            bad.push(line[key_start..end.max(eq + 1)].to_owned());
        }
    }
    bad
}

#[test]
fn the_value_check_itself_finds_unquoted_values() {
    let line = "2025-01-01T00:00:00Z  WARN backend state listener=web reason=fall: 1 probe failed \
                to=down note=\"a b\"";
    assert_eq!(unquoted_values(line), ["reason=fall: 1 probe failed"]);
    assert!(unquoted_values("INFO reloaded generation=2").is_empty());
}

#[test]
fn check_prints_config_words() {
    let admin = free_addr();
    let tcp = Listener::new("web", &[free_addr(), free_addr()])
        .algorithm("maglev")
        .with("on_max_connections: reject")
        .with("health: { check: tcp, interval: 1500ms }");
    let udp = Listener::new("dns", &[free_addr()]).protocol("udp");
    let config = ConfigFile::new(&config(2, Some(admin), &[], &[tcp, udp]));
    let output = sluice(&["check", "-c", path(&config)], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", output.stderr);
    let text = format!("{}{}", output.stdout, output.stderr);
    assert!(debug_shapes(&text).is_empty(), "Debug output:\n{text}");
    assert!(text.contains("on_max_connections reject"), "{text}");
}

#[test]
fn yaml_budget_errors_are_in_config_words() {
    let bomb = "\
a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
listeners: *f
";
    let config = ConfigFile::new(bomb);
    let output = sluice(&["check", "-c", path(&config)], &[]);
    assert_eq!(output.status.code(), Some(64), "{}", output.stderr);
    assert!(
        debug_shapes(&output.stderr).is_empty() && !output.stderr.contains("Anchor"),
        "{}",
        output.stderr
    );
}

/// A short run that logs what users see most: the start, a backend going down, a reload that
/// changes backends and a restart-only key, a rejected reload, and the shutdown. No line shows
/// a `Debug` shape, and every value with a space in it is quoted.
#[test]
fn run_logs_config_words_and_quote_values_with_spaces() {
    let stays = EchoServer::echo();
    let goes = EchoServer::echo();
    let added = EchoServer::echo();
    let health = "health: { check: tcp, interval: 100ms, timeout: 500ms, rise: 1, fall: 1 }";
    let listener = Listener::new("web", &[stays.addr(), goes.addr()]).with(health);
    let yaml = config(
        1,
        None,
        &["shutdown_timeout: 2s"],
        std::slice::from_ref(&listener),
    );
    let file = ConfigFile::new(&yaml);
    let mut command = Command::new(binary());
    // Debug level: the data plane's per-connection lines are checked too.
    command
        .args(["run", "-c", path(&file), "--log-level", "debug"])
        .env_remove("RUST_LOG");
    let mut sluice = Sluice::start_stand_in(command, "sluice ready");
    assert_echo(listener.bind, 1024, 1, Duration::from_secs(10));

    let goes_addr = goes.addr();
    drop(goes);
    wait_for_line(&mut sluice, "to=down", Duration::from_secs(10));

    let mut changed = listener.clone();
    changed.backends = vec![stays.addr(), added.addr()];
    changed.extra.push("retries: 1".to_owned());
    std::fs::write(
        file.path(),
        config(1, None, &["shutdown_timeout: 2s"], &[changed]),
    )
    .unwrap();
    sluice.signal(Signal::SIGHUP);
    wait_for_line(&mut sluice, "reloaded", Duration::from_secs(10));
    wait_for_line(&mut sluice, "backend removed", Duration::from_secs(10));

    std::fs::write(file.path(), format!("{yaml}    colour: red\n")).unwrap();
    sluice.signal(Signal::SIGHUP);
    wait_for_line(&mut sluice, "reload rejected", Duration::from_secs(10));

    let status = sluice.terminate(Duration::from_secs(5));
    let stderr = sluice.stderr_text();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{stderr}");
    assert!(stderr.contains(&goes_addr.to_string()), "{stderr}");
    let shapes = debug_shapes(&stderr);
    assert!(shapes.is_empty(), "Debug shapes in:\n{}", shapes.join("\n"));
    let unquoted: Vec<String> = stderr.lines().flat_map(unquoted_values).collect();
    assert!(
        unquoted.is_empty(),
        "values with spaces, not quoted:\n{}\n--- stderr ---\n{stderr}",
        unquoted.join("\n")
    );
}
