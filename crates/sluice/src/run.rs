//! `sluice check` and `sluice run`: start-up (signals are caught from its first step on),
//! readiness, and the signal-driven shutdown.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use sluice_balance::SnapshotCell;
use sluice_dataplane::{DataPlane, StartError};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::exit;
use crate::notify::Notifier;
use crate::plan::{self, Resolved};

/// Loads and checks the config, installs the log it sets (`level`, from the flag or RUST_LOG,
/// over `log.level`), then resolves it; prints errors (one per line) on failure. Config errors
/// are plain text, since no log format is known yet; nothing is logged before the log is
/// installed, so a JSON log is JSON from its first line.
pub(crate) fn load(path: &Path, level: Option<&str>) -> Result<Resolved, ExitCode> {
    let config = sluice_config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(exit::USAGE)
    })?;
    crate::init_logging(&config.log, level, path)?;
    plan::resolve(config, path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(exit::USAGE)
    })
}

/// `sluice check`: validate and summarise.
pub(crate) fn check(path: &Path, level: Option<&str>) -> ExitCode {
    let resolved = match load(path, level) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let config = &resolved.config;
    let mut out = String::new();
    let _ = writeln!(out, "{}: ok", path.display());
    let _ = writeln!(
        out,
        "workers: {} ({})",
        plan::worker_count(config.workers),
        match config.workers {
            sluice_config::Workers::Auto => "auto",
            sluice_config::Workers::Count(_) => "fixed",
        }
    );
    let _ = match &config.admin {
        Some(admin) => writeln!(out, "admin: http://{}/metrics", admin.bind),
        None => writeln!(out, "admin: off"),
    };
    for (listener, addrs) in config.listeners.iter().zip(&resolved.backends) {
        let t = &listener.timeouts;
        let _ = writeln!(
            out,
            "listener {} {} {} {}: {} backend(s), connect {}, idle {}, half_close {}, \
             user_timeout {}, keepalive {}, max_connections {}, on_max_connections {}, \
             retries {}",
            listener.name,
            match listener.protocol {
                sluice_config::Protocol::Tcp => "tcp",
                sluice_config::Protocol::Udp => "udp",
            },
            listener.bind,
            listener.algorithm.name(),
            listener.backends.len(),
            Written(t.connect),
            off_or(t.idle),
            off_or(t.half_close),
            if t.user_timeout.is_zero() {
                "kernel default".to_owned()
            } else {
                Written(t.user_timeout).to_string()
            },
            keepalive_summary(&listener.keepalive),
            if listener.max_connections == 0 {
                "auto".to_string()
            } else {
                listener.max_connections.to_string()
            },
            match listener.on_max_connections {
                sluice_config::OnMaxConnections::Queue => "queue",
                sluice_config::OnMaxConnections::Reject => "reject",
            },
            listener.retries,
        );
        for (spec, addr) in listener.backends.iter().zip(addrs) {
            let written = spec.address.to_string();
            let resolved = if written == addr.to_string() {
                String::new()
            } else {
                format!(" -> {addr}")
            };
            let backup = if spec.backup { " backup" } else { "" };
            let _ = writeln!(
                out,
                "  backend {written}{resolved} weight {}{backup}",
                spec.weight
            );
        }
        let _ = writeln!(out, "  {}", health_summary(listener));
    }
    crate::print(&out)
}

/// One line on a listener's health settings, for `sluice check`.
fn health_summary(listener: &sluice_config::Listener) -> String {
    let active = match &listener.health {
        Some(h) => format!(
            "health {} every {} (timeout {}, rise {}, fall {})",
            h.check.name(),
            Written(h.interval),
            Written(h.timeout),
            h.rise,
            h.fall
        ),
        None => "health: no active check".to_owned(),
    };
    let p = &listener.passive;
    let passive = if p.consecutive_failures == 0 {
        "passive ejection off".to_owned()
    } else {
        format!(
            "passive ejection after {} failures for {} (at most {}%)",
            p.consecutive_failures,
            Written(p.ejection_time),
            p.max_ejection_percent
        )
    };
    format!(
        "{active}; {passive}; on_all_down {}; slow_start {}; drain_timeout {}",
        listener.on_all_down.label(),
        off_or(listener.slow_start),
        off_or(listener.drain_timeout)
    )
}

/// `keepalive` for `sluice check`: `off`, or `60s/10s x6` (time, interval, probes).
fn keepalive_summary(keepalive: &sluice_config::Keepalive) -> String {
    if keepalive.is_on() {
        format!(
            "{}/{} x{}",
            Written(keepalive.time),
            Written(keepalive.interval),
            keepalive.probes
        )
    } else {
        "off".into()
    }
}

fn off_or(d: Duration) -> String {
    if d.is_zero() {
        "off".into()
    } else {
        Written(d).to_string()
    }
}

/// A duration as the config writes it: `2s`, `1500ms` (Rust's `Debug` would say `1.5s`, which
/// the config does not accept).
pub(crate) struct Written(pub Duration);

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{d:?}")
        }
    }
}

/// `sluice run`: start the data plane, then the control plane on this thread.
pub(crate) fn run(path: &Path, level: Option<&str>) -> ExitCode {
    // Under systemd's `Type=notify`: READY once serving, RELOADING/READY around each SIGHUP,
    // STOPPING at the first SIGTERM/SIGINT, and STATUS lines along the way.
    let notifier = Arc::new(Notifier::from_env());
    notifier.status("loading the config");
    // The runtime and the signal handlers come before anything slow (resolving hostnames, the
    // first probes): the default action of SIGHUP and SIGTERM is to kill the process.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            crate::fatal(format_args!("starting the control plane: {e}"));
            return ExitCode::from(exit::OS_ERROR);
        }
    };
    let mut signals = match Signals::install(&runtime) {
        Ok(signals) => signals,
        Err(e) => {
            crate::fatal(format_args!("cannot install signal handlers: {e}"));
            return ExitCode::from(exit::OS_ERROR);
        }
    };
    let resolved = match load(path, level) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let mut health = crate::health::Manager::new(&resolved);
    let fd_limit = sluice_dataplane::raise_fd_limit();
    let mut plane_config = plan::plane(&resolved.config, fd_limit);
    plane_config.events = Some(health.sink());
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        workers = plane_config.workers,
        fd_limit,
        connections_max = plane_config.connections_max_total,
        "starting"
    );
    // Every backend with an active check is probed once before any listener accepts.
    notifier.status("probing the backends once before listening");
    let probed = runtime.block_on(signals.during_start(health.probe_all_once()));
    if probed.is_none() {
        notifier.stopping("stopped during start-up");
        return ExitCode::SUCCESS;
    }
    notifier.status("starting the workers");
    let snapshots = Arc::new(SnapshotCell::new(
        health.snapshot(std::time::Instant::now()),
    ));
    // A signal that arrives while the workers start waits in its handler for the loops below.
    let plane = match sluice_dataplane::start(plane_config, Arc::clone(&snapshots)) {
        Ok(plane) => Arc::new(plane),
        Err(e) => {
            crate::fatal(&e);
            return ExitCode::from(match e {
                StartError::Uring(_) => exit::UNAVAILABLE,
                StartError::Os { .. } => exit::OS_ERROR,
            });
        }
    };
    let health_view = health.view();
    let config = resolved.config;
    runtime.block_on(async move {
        let Signals {
            term,
            int,
            hup,
            reload_pending,
        } = signals;
        let reloads = health.sender();
        health.spawn(Arc::clone(&snapshots), Arc::clone(&plane));
        tokio::spawn(reload_on_sighup(
            hup,
            path.to_owned(),
            config.log.clone(),
            reloads,
            reload_pending,
            Arc::clone(&notifier),
        ));
        if let Some(admin) = config.admin {
            let names = config.listeners.iter().map(|l| l.name.clone()).collect();
            let udp = config
                .listeners
                .iter()
                .map(|l| l.protocol == sluice_config::Protocol::Udp)
                .collect();
            let view = crate::metrics_render::MetricsView::new(
                plane.clone(),
                snapshots,
                health_view,
                names,
                udp,
            );
            if let Err(e) = crate::admin::serve(admin.bind, admin.max_connections, view).await {
                crate::fatal(format_args!("admin endpoint {}: {e}", admin.bind));
                plane.close_all();
                return ExitCode::from(exit::OS_ERROR);
            }
        }
        for listener in &config.listeners {
            tracing::info!(listener = %listener.name, bind = %listener.bind, "listening");
        }
        tracing::info!("sluice ready");
        notifier.ready(&serving(config.listeners.len()));
        wait_for_shutdown(&plane, config.shutdown_timeout, term, int, &notifier).await
    })
}

/// The signals `run` acts on, caught from the start of `run` on.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    /// A SIGHUP came during start-up: reload once started.
    reload_pending: bool,
}

impl Signals {
    fn install(runtime: &tokio::runtime::Runtime) -> std::io::Result<Signals> {
        let _context = runtime.enter();
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            reload_pending: false,
        })
    }

    /// Runs one step of the start-up while watching the signals. SIGTERM or SIGINT ends the
    /// start (`None`): nothing listens yet, so there is nothing to drain. SIGHUP is logged and
    /// kept: the file is read again once Sluice has started, so an edit made meanwhile is
    /// applied, not lost.
    async fn during_start<T>(&mut self, step: impl Future<Output = T>) -> Option<T> {
        let mut step = std::pin::pin!(step);
        loop {
            let name = tokio::select! {
                done = &mut step => return Some(done),
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP during start-up: the config is reloaded once started");
                    self.reload_pending = true;
                    continue;
                }
            };
            tracing::info!("{name} during start-up: exiting before any listener accepts");
            return None;
        }
    }
}

/// SIGHUP (and, when `pending`, one that came during start-up): reads the config file again;
/// a file that loads and resolves goes to the health manager, which applies what can change
/// while running. A bad file changes nothing: its errors are logged (file:line:column) and the
/// running config stays. The log (`log`, as `started`) is not changed: a new one is warned of.
///
/// Under `Type=notify` each reload is framed by RELOADING=1 and READY=1, the latter with a
/// STATUS that says whether it was applied or refused (and why).
async fn reload_on_sighup(
    mut hup: Signal,
    path: std::path::PathBuf,
    started: sluice_config::Log,
    reloads: tokio::sync::mpsc::Sender<crate::health::Event>,
    mut pending: bool,
    notifier: Arc<Notifier>,
) {
    loop {
        if !std::mem::take(&mut pending) && hup.recv().await.is_none() {
            return;
        }
        tracing::info!(config = path.display().to_string(), "SIGHUP: reloading");
        notifier.reloading(&format!("reloading {}", path.display()));
        let file = path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let config = sluice_config::load(&file)?;
            plan::resolve(config, &file)
        })
        .await;
        match loaded {
            Ok(Ok(resolved)) => {
                let log = &resolved.config.log;
                if (&log.level, log.format) != (&started.level, started.format) {
                    tracing::warn!(
                        "reload: log.level and log.format change only at a restart; kept as running"
                    );
                }
                let (applied, done) = tokio::sync::oneshot::channel();
                let event = crate::health::Event::Reload(Box::new(resolved), applied);
                if reloads.send(event).await.is_err() || done.await.is_err() {
                    return; // The manager is gone: the process is stopping.
                }
                notifier.ready(&format!("reload applied: serving {}", path.display()));
            }
            Ok(Err(errors)) => {
                for error in &errors.0 {
                    tracing::error!("reload rejected, running config kept: {error}");
                }
                notifier.ready(&refused(&errors));
            }
            Err(e) => {
                tracing::error!(error = e.to_string(), "reload failed; running config kept");
                notifier.ready("reload failed; running config kept");
            }
        }
    }
}

/// STATUS while serving.
fn serving(listeners: usize) -> String {
    format!(
        "serving {listeners} listener{}",
        if listeners == 1 { "" } else { "s" }
    )
}

/// STATUS after a refused reload: the first error (file:line:column) on one line, and how many
/// more were logged.
fn refused(errors: &sluice_config::ConfigErrors) -> String {
    let first = errors
        .0
        .first()
        .map_or_else(|| "the file has errors".to_owned(), ToString::to_string);
    let mut status = format!(
        "reload refused, running config kept: {}",
        first.replace(['\n', '\r'], " ")
    );
    if errors.0.len() > 1 {
        let _ = write!(status, " (and {} more, logged)", errors.0.len() - 1);
    }
    status
}

/// Waits for SIGTERM/SIGINT, drains, and exits once no connection remains or at
/// `shutdown_timeout`; a second signal closes everything at once.
async fn wait_for_shutdown(
    plane: &DataPlane,
    shutdown_timeout: Duration,
    mut term: Signal,
    mut int: Signal,
    notifier: &Notifier,
) -> ExitCode {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = watch_workers(plane) => {
            notifier.status("a worker stopped; exiting");
            return worker_died(plane).await;
        }
    }
    let open = plane.active_connections();
    notifier.stopping(&format!(
        "stopping: draining {open} connection(s) for at most {}",
        Written(shutdown_timeout)
    ));
    tracing::info!(
        open,
        shutdown_timeout = %Written(shutdown_timeout),
        "shutting down: no longer accepting"
    );
    plane.drain();
    let drained = async {
        while !plane.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        _ = drained => {
            tracing::info!("all connections done; exiting");
        }
        _ = tokio::time::sleep(shutdown_timeout) => {
            tracing::info!(open = plane.active_connections(), "shutdown_timeout reached; closing");
            plane.close_all();
            wait_finished(plane).await;
        }
        _ = term.recv() => { second_signal(plane).await; }
        _ = int.recv() => { second_signal(plane).await; }
    }
    if plane.failure().is_some() {
        return worker_died(plane).await;
    }
    ExitCode::SUCCESS
}

/// A worker stopped on its own (its ring failed, or it panicked): the process cannot serve
/// its share of the listeners' traffic any more, so it stops with status 70, naming the worker
/// and the error, after closing what the other workers hold (bounded).
async fn worker_died(plane: &DataPlane) -> ExitCode {
    match plane.failure() {
        Some(failure) => crate::fatal(format_args!("{failure}; exiting")),
        None => crate::fatal("every worker stopped; exiting"),
    }
    plane.close_all();
    wait_finished(plane).await;
    ExitCode::from(exit::INTERNAL)
}

async fn second_signal(plane: &DataPlane) {
    tracing::info!(
        open = plane.active_connections(),
        "second signal: closing everything now"
    );
    plane.close_all();
    wait_finished(plane).await;
}

/// Bounded wait for the workers to finish closing (they cancel and reap their operations).
async fn wait_finished(plane: &DataPlane) {
    for _ in 0..300 {
        if plane.is_finished() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!("workers still closing after 3 s; exiting anyway");
}

/// Resolves once a worker stopped on its own (an error or a panic), or every worker stopped.
async fn watch_workers(plane: &DataPlane) {
    while plane.failure().is_none() && !plane.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
