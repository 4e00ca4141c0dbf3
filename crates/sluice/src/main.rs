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
    match log_filter(cli.log_level.as_deref(), std::env::var("RUST_LOG")) {
        Ok(filter) => init_logging(&filter),
        Err(message) => {
            eprintln!("sluice: {message}");
            return ExitCode::from(exit::USAGE);
        }
    }
    match cli.command {
        Command::Check(arg) => run::check(&arg.config),
        Command::Run(arg) => run::run(&arg.config),
        Command::Inspect(arg) => match run::load(&arg.config) {
            Ok(resolved) => inspect::inspect(&resolved, &arg.config),
            Err(code) => code,
        },
    }
}

/// The level names `--log-level` and RUST_LOG accept, and the level each means.
const LEVELS: &[(&str, &str)] = &[
    ("off", "off"),
    ("error", "error"),
    ("warn", "warn"),
    ("warning", "warn"),
    ("info", "info"),
    ("debug", "debug"),
    ("trace", "trace"),
];

/// The log filter, from `--log-level`, else RUST_LOG, else `info`, checked so that a word the
/// filter would take for a target name (`warning`, `verbose`), which turns every log line
/// off, is a usage error instead. Each comma-separated directive is a level name or
/// `target=level`; level names are case-insensitive and `warning` means `warn`.
fn log_filter(
    flag: Option<&str>,
    env: Result<String, std::env::VarError>,
) -> Result<String, String> {
    let (source, text) = match (flag, env) {
        (Some(flag), _) => ("--log-level", flag.to_owned()),
        (None, Ok(env)) if !env.trim().is_empty() => ("RUST_LOG", env),
        (None, Err(std::env::VarError::NotUnicode(_))) => {
            return Err("RUST_LOG is not valid UTF-8".to_owned());
        }
        (None, _) => return Ok("info".to_owned()),
    };
    let invalid = |why: String| {
        let names: Vec<&str> = LEVELS.iter().map(|(name, _)| *name).collect();
        format!(
            "{source} {text:?}: {why}; expected a level ({}) or comma-separated target=level \
             directives, like \"info,sluice_health=debug\"",
            names.join(", ")
        )
    };
    let mut directives = Vec::new();
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        let Some((_, level)) = LEVELS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(level))
        else {
            return Err(invalid(format!("unknown level {level:?}")));
        };
        directives.push(match target {
            Some("") => return Err(invalid(format!("no target before \"={level}\""))),
            Some(target) => format!("{target}={level}"),
            None => (*level).to_owned(),
        });
    }
    if directives.is_empty() {
        return Err(invalid("empty".to_owned()));
    }
    let filter = directives.join(",");
    tracing_subscriber::EnvFilter::try_new(&filter).map_err(|e| invalid(e.to_string()))?;
    Ok(filter)
}

/// Logs go to stderr, filtered by `filter` (checked by [`log_filter`]).
fn init_logging(filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
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
        log_filter(Some(text), Err(std::env::VarError::NotPresent))
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
            log_filter(None, Err(std::env::VarError::NotPresent)).as_deref(),
            Ok("info")
        );
        assert_eq!(log_filter(None, Ok("debug".into())).as_deref(), Ok("debug"));
        assert_eq!(
            log_filter(Some("error"), Ok("debug".into())).as_deref(),
            Ok("error")
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
        let message = log_filter(None, Ok("verbose".into())).unwrap_err();
        assert!(
            message.starts_with("RUST_LOG \"verbose\": unknown level"),
            "{message}"
        );
    }
}
