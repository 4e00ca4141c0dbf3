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
    /// Log level or filter (error, warn, info, debug, trace, or a RUST_LOG-style filter).
    /// Defaults to RUST_LOG, then info.
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
    if let Err(message) = init_logging(cli.log_level.as_deref()) {
        eprintln!("sluice: --log-level: {message}");
        return ExitCode::from(exit::USAGE);
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

fn init_logging(level: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => EnvFilter::try_new(level).map_err(|e| e.to_string())?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    Ok(())
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
