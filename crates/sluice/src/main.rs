//! The `sluice` binary: command line, start-up, and the control plane (signals, admin
//! endpoint, metrics) around the data plane of `sluice-dataplane`.
//!
//! Exit statuses (sysexits): 0 after a clean shutdown, 64 for a usage or config error, 69 when
//! io_uring is unavailable, 71 for an OS error at start (address in use, permission).

#![forbid(unsafe_code)]

mod admin;
mod health;
mod inspect;
mod metrics_render;
mod notify;
mod plan;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit statuses, as in sysexits.h.
pub(crate) mod exit {
    pub const USAGE: u8 = 64;
    pub const UNAVAILABLE: u8 = 69;
    /// A worker died (internal error).
    pub const INTERNAL: u8 = 70;
    pub const OS_ERROR: u8 = 71;
}

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "An L4 (TCP and UDP) load balancer for Linux"
)]
struct Cli {
    /// Log level: off, error, warn (or warning), info, debug or trace; or comma-separated
    /// target=level directives, as in RUST_LOG ("info,sluice_health=debug"). Defaults to
    /// RUST_LOG, then info. Fatal errors reach stderr whatever the level.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the load balancer.
    Run(ConfigArg),
    /// Validate the config file and print a summary of listeners and backends.
    Check(ConfigArg),
    /// Print each listener's balancing: algorithm, table fingerprint, each backend's share.
    /// Equal fingerprints on two instances mean they choose backends alike.
    Inspect(ConfigArg),
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// The config file.
    #[arg(
        short,
        long,
        value_name = "FILE",
        default_value = "/etc/sluice/sluice.yaml"
    )]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The log is installed once the config file is read (`run::load`), with the file's format:
    // a JSON log is JSON from its first line. A bad flag or RUST_LOG is reported before that.
    let level = match log_override(cli.log_level.as_deref(), std::env::var("RUST_LOG")) {
        Ok(level) => level,
        Err(message) => {
            eprintln!("sluice: {message}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let level = level.as_deref();
    match cli.command {
        Command::Check(arg) => run::check(&arg.config, level),
        Command::Run(arg) => run::run(&arg.config, level),
        Command::Inspect(arg) => match run::load(&arg.config, level) {
            Ok(resolved) => inspect::inspect(&resolved, &arg.config),
            Err(code) => code,
        },
    }
}

/// The log filter from `--log-level`, else RUST_LOG; `None` when neither is set, and the
/// config file's `log.level` applies. Checked ([`sluice_config::log_directives`]) so that a
/// word the filter would take for a target name (`warning2`, `verbose`), which turns every
/// log line off, is a usage error instead.
fn log_override(
    flag: Option<&str>,
    env: Result<String, std::env::VarError>,
) -> Result<Option<String>, String> {
    let (source, text) = match (flag, env) {
        (Some(flag), _) => ("--log-level", flag.to_owned()),
        (None, Ok(env)) if !env.trim().is_empty() => ("RUST_LOG", env),
        (None, Err(std::env::VarError::NotUnicode(_))) => {
            return Err("RUST_LOG is not valid UTF-8".to_owned());
        }
        (None, _) => return Ok(None),
    };
    let filter = sluice_config::log_directives(&text)
        .and_then(|filter| checked_filter(&filter).map(|()| filter))
        .map_err(|message| format!("{source} {text:?}: {message}"))?;
    Ok(Some(filter))
}

/// The filter parser's own check, for what [`sluice_config::log_directives`] leaves to it
/// (the target's syntax: `a[=debug`).
fn checked_filter(filter: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| format!("{e}; expected comma-separated target=level directives"))
}

/// Installs the log: on stderr, filtered by `level` (from [`log_override`]) or else the file's
/// `log.level`, in the file's `log.format`. A JSON line holds `timestamp`, `level`, `message`
/// and the event's fields at its top level (flattened), so that `jq .listener` finds them.
/// The format and level hold until exit: SIGHUP does not change them.
pub(crate) fn init_logging(
    log: &sluice_config::Log,
    level: Option<&str>,
    file: &std::path::Path,
) -> Result<(), ExitCode> {
    let filter = match level {
        Some(level) => level,
        None => {
            if let Err(message) = checked_filter(&log.level) {
                let at = log
                    .level_location
                    .unwrap_or(sluice_config::Location { line: 0, column: 0 });
                eprintln!(
                    "{}",
                    sluice_config::ConfigError::new(file, at, "log.level", message)
                );
                return Err(ExitCode::from(exit::USAGE));
            }
            &log.level
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false);
    // Another subscriber can only be there in tests that install one; theirs is kept.
    let _ = match log.format {
        sluice_config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        sluice_config::LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

/// Reports an error that ends the process. It goes to stderr directly, not through the log,
/// so that no log filter (`--log-level off`) can hide why Sluice exited.
pub(crate) fn fatal(message: impl std::fmt::Display) {
    eprintln!("sluice: {message}");
}

/// Writes a command's report to stdout. A reader that went away (`| head`) is not an error of
/// ours: exit 0 without a panic, as `cat` would.
pub(crate) fn print(text: &str) -> ExitCode {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: cannot write to stdout: {e}");
            ExitCode::from(exit::OS_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(text: &str) -> Result<String, String> {
        log_override(Some(text), Err(std::env::VarError::NotPresent)).map(Option::unwrap_or_default)
    }

    #[test]
    fn level_names_and_aliases_become_filter_levels() {
        assert_eq!(flag("warning").as_deref(), Ok("warn"));
        assert_eq!(flag("WARN").as_deref(), Ok("warn"));
        assert_eq!(flag("Off").as_deref(), Ok("off"));
        assert_eq!(
            flag("info, sluice_health=Warning").as_deref(),
            Ok("info,sluice_health=warn")
        );
        assert_eq!(
            log_override(None, Err(std::env::VarError::NotPresent)),
            Ok(None)
        );
        assert_eq!(
            log_override(None, Ok("debug".into())),
            Ok(Some("debug".to_owned()))
        );
        assert_eq!(
            log_override(Some("error"), Ok("debug".into())),
            Ok(Some("error".to_owned()))
        );
    }

    #[test]
    fn words_the_filter_would_take_for_targets_are_refused() {
        for bad in [
            "verbose",
            "sluice",
            "info,loud",
            "sluice=loud",
            "=debug",
            "",
            " , ",
        ] {
            let message = flag(bad).unwrap_err();
            assert!(message.starts_with("--log-level "), "{bad:?}: {message}");
            assert!(
                message.contains("off, error, warn, warning, info, debug, trace"),
                "{message}"
            );
        }
        let message = log_override(None, Ok("verbose".into())).unwrap_err();
        assert!(
            message.starts_with("RUST_LOG \"verbose\": unknown level"),
            "{message}"
        );
    }
}
