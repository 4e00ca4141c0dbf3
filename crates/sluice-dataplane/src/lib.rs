//! Sluice's data plane: worker threads, one io_uring ring each, forwarding TCP connections.
//!
//! [`start`] spawns `workers` threads. Each pins itself to a CPU, sets up its own ring and
//! buffer pool, binds its own SO_REUSEPORT socket for every listener, and runs a completion
//! loop that drives one `sluice_conn::Conn` per proxied connection. Workers share nothing
//! mutable on the data path: they read the current `sluice_balance::Snapshot` (lock-free), touch
//! one shared atomic per connection open and close (the `max_connections` caps) and write their
//! own counters.
//!
//! It does not parse configuration, serve metrics or handle signals: the binary builds a
//! [`PlaneConfig`], calls [`start`], and uses the returned [`DataPlane`] to wake, drain, close
//! and read counters.
//!
//! Main types: [`PlaneConfig`], [`ListenerPlan`], [`DataPlane`], [`WorkerCounters`].

mod counters;
mod pipes;
mod sockets;
mod timers;
mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};
use sluice_balance::{BackendLoad, SnapshotCell};

pub use counters::{
    BackendCounters, Counter, ListenerCounters, UdpCounters, UdpDrop, WorkerCounters,
};
pub use sluice_conn::{CloseKind, Limits};
pub use sockets::{
    FdDemand, FdShares, Keepalive, SocketSettings, connections_for_budget, fd_shares,
    pipes_for_budget, raise_fd_limit,
};
pub use worker::RESET_LINGER;

/// What to do with a new connection beyond `max_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMaxConnections {
    /// Stop accepting: new connections wait in the kernel backlog.
    Queue,
    /// Accept and reset at once, counted as rejected.
    Reject,
}

/// One listener as the data plane runs it.
#[derive(Debug, Clone)]
pub struct ListenerPlan {
    pub name: String,
    pub bind: SocketAddr,
    pub limits: Limits,
    /// Cap on this listener's open connections across all workers.
    pub max_connections: u32,
    /// Whether the cap was derived from the fd budget (`max_connections: 0`): such listeners
    /// also share the process-wide `connections_max_total`. An explicit `max_connections` is
    /// honoured as written, even past the budget (accept then meets EMFILE and backs off).
    pub within_fd_budget: bool,
    pub on_max_connections: OnMaxConnections,
    /// Keepalive and user timeout of both sockets of every connection (tcp only).
    pub sockets: SocketSettings,
    /// A udp listener's sessions; `None` for tcp.
    pub udp: Option<UdpPlan>,
    /// How many distinct backends this listener may ever have (its per-worker counters are
    /// allocated for them at start; a reload may add backends up to it).
    pub backends_max: usize,
}

/// What a udp listener does with sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPlan {
    /// Sessions across workers (each worker gets its share).
    pub max_sessions: u32,
    /// Beyond the share: end the least recently active session (else drop the datagram).
    pub evict_lru: bool,
    /// End a session after this many replies; 0 = unlimited.
    pub responses: u32,
    /// End a session after this many requests; 0 = unlimited.
    pub requests: u32,
    /// Balance every datagram on its own.
    pub per_packet: bool,
    /// A session idle this long ends; zero = never.
    pub idle_timeout: Duration,
}

/// What a worker saw of a backend, for passive health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendEvent {
    /// A connect attempt failed (refused, timed out, unreachable).
    ConnectFailed,
    /// An established connection was reset by the backend before any client byte reached it
    /// (a reset after one may be the server's answer to what the client sent).
    Reset,
    /// A connection's first client byte reached the backend after failures: the run of
    /// failures is over.
    Recovered,
}

/// Where workers report [`BackendEvent`]s: the control plane's passive health. Called on a
/// worker thread, only on failures and on the first success after one, so it must not block
/// (a channel send is right).
pub trait BackendEvents: Send + Sync {
    /// `backend` is the backend's shared cell: its identity across snapshots.
    fn report(&self, listener: usize, backend: &Arc<BackendLoad>, event: BackendEvent);
}

/// Everything [`start`] needs.
#[derive(Clone)]
pub struct PlaneConfig {
    pub workers: usize,
    pub listeners: Vec<ListenerPlan>,
    /// Cap on open connections of the listeners whose cap is derived from the fd budget.
    pub connections_max_total: u32,
    /// Pin worker `i` to the `i`-th allowed CPU.
    pub pin_workers: bool,
    /// Pipes each worker may lease for splice forwarding (0 = always copy).
    pub pipes_per_worker: usize,
    /// Passive health reports; `None` reports nothing.
    pub events: Option<Arc<dyn BackendEvents>>,
}

impl std::fmt::Debug for PlaneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaneConfig")
            .field("workers", &self.workers)
            .field("listeners", &self.listeners)
            .field("connections_max_total", &self.connections_max_total)
            .field("pin_workers", &self.pin_workers)
            .field("pipes_per_worker", &self.pipes_per_worker)
            .field("events", &self.events.is_some())
            .finish()
    }
}

/// Why the data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// io_uring is missing or blocked (exit status 69).
    #[error(transparent)]
    Uring(#[from] sluice_uring::SetupError),
    /// An OS error while binding or setting up (exit status 71).
    #[error("{context}: {source}")]
    Os {
        context: String,
        source: std::io::Error,
    },
}

/// A worker that stopped on its own while the data plane ran: its `run` returned an error (a
/// ring that refuses submissions) or it panicked. The others keep running; the control plane
/// is expected to stop the process (exit status 70).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerFailure {
    /// The worker's index (its thread is `sluice-worker-N`).
    pub worker: usize,
    /// What stopped it, in words.
    pub error: String,
}

impl std::fmt::Display for WorkerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker {} stopped: {}", self.worker, self.error)
    }
}

/// The running workers.
#[derive(Debug)]
pub struct DataPlane {
    shared: Arc<Shared>,
    wakers: Vec<Arc<EventFd>>,
    threads: Vec<JoinHandle<()>>,
    counters: Vec<Arc<WorkerCounters>>,
}

/// Phases of the whole data plane, in order; workers read it after every batch.
const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const CLOSING: u8 = 2;

/// State shared by the control plane and every worker (read per batch, written rarely).
#[derive(Debug)]
pub(crate) struct Shared {
    phase: AtomicU8,
    snapshots: Arc<SnapshotCell>,
    /// Open connections per listener, across workers (one atomic op per open and close).
    listener_active: Vec<AtomicU32>,
    total_active: AtomicU32,
    /// Last time an EMFILE was logged, in ms since start: at most one line a second.
    emfile_logged_ms: AtomicU64,
    started: std::time::Instant,
    /// The first worker that stopped on an error or a panic.
    failure: OnceLock<WorkerFailure>,
}

impl DataPlane {
    /// Wakes every worker: after a snapshot was published or the phase changed.
    pub fn wake(&self) {
        for waker in &self.wakers {
            let _ = waker.write(1);
        }
    }

    /// Stops accepting; workers exit once their connections are done.
    pub fn drain(&self) {
        self.shared.phase.fetch_max(DRAINING, Ordering::SeqCst);
        self.wake();
    }

    /// Closes every connection now (end of `shutdown_timeout`, or a second signal).
    pub fn close_all(&self) {
        self.shared.phase.store(CLOSING, Ordering::SeqCst);
        self.wake();
    }

    /// Open connections across all workers and listeners.
    pub fn active_connections(&self) -> u32 {
        self.shared.total_active.load(Ordering::Relaxed)
    }

    /// Each worker's counters, to be summed by the reader.
    pub fn counters(&self) -> &[Arc<WorkerCounters>] {
        &self.counters
    }

    /// The first worker that stopped on an error or a panic, if one did.
    pub fn failure(&self) -> Option<&WorkerFailure> {
        self.shared.failure.get()
    }

    /// True once every worker thread has exited.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// Waits for every worker thread to exit.
    pub fn join(self) {
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

/// Starts the workers; returns once every worker has bound its listeners and armed accept,
/// or with the first error (after stopping the workers that did start).
pub fn start(config: PlaneConfig, snapshots: Arc<SnapshotCell>) -> Result<DataPlane, StartError> {
    let snapshot = snapshots.load();
    let backends_per_listener: Vec<usize> = snapshot
        .listeners
        .iter()
        .zip(&config.listeners)
        .map(|(l, plan)| l.backends.len().max(plan.backends_max))
        .collect();
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(RUNNING),
        snapshots,
        listener_active: config.listeners.iter().map(|_| AtomicU32::new(0)).collect(),
        total_active: AtomicU32::new(0),
        emfile_logged_ms: AtomicU64::new(0),
        started: std::time::Instant::now(),
        failure: OnceLock::new(),
    });
    let config = Arc::new(config);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, StartError>>();
    let mut plane = DataPlane {
        shared: shared.clone(),
        wakers: vec![],
        threads: vec![],
        counters: vec![],
    };
    for index in 0..config.workers {
        let waker =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map(Arc::new)
                .map_err(|e| StartError::Os {
                    context: "eventfd".into(),
                    source: e.into(),
                })?;
        let counters = Arc::new(WorkerCounters::new(&backends_per_listener));
        let args = worker::WorkerArgs {
            index,
            config: config.clone(),
            shared: shared.clone(),
            waker: waker.clone(),
            counters: counters.clone(),
        };
        let ready = ready_tx.clone();
        let failures = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("sluice-worker-{index}"))
            .spawn(move || {
                // A panic is caught here only to be recorded (the hook has printed it already):
                // the worker is gone either way, and the control plane stops the process.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker::run(args, ready)
                }));
                let error = match outcome {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
                };
                let _ = failures.failure.set(WorkerFailure {
                    worker: index,
                    error,
                });
            })
            .map_err(|e| StartError::Os {
                context: "spawning a worker thread".into(),
                source: e,
            })?;
        plane.wakers.push(waker);
        plane.threads.push(thread);
        plane.counters.push(counters);
    }
    drop(ready_tx);
    for _ in 0..config.workers {
        let result = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                Err(StartError::Os {
                    context: "waiting for the workers".into(),
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                })
            });
        if let Err(e) = result {
            plane.close_all();
            plane.join();
            return Err(match shared.failure.get() {
                Some(failure) => StartError::Os {
                    context: failure.to_string(),
                    source: std::io::Error::other("before it was ready"),
                },
                None => e,
            });
        }
    }
    Ok(plane)
}

/// The message a panic carried (`panic!` with a literal or a format string), else a placeholder.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message
    } else {
        "a panic without a message"
    }
}

/// Test-only (debug builds): `SLUICE_TEST_WORKER_FAULT=N:panic` or `N:error` makes worker `N`
/// panic, or stop with an error, after its loop has run for 1 s, so that the end-to-end tests
/// can see what the process does when a worker dies (`crates/sluice/tests/worker_death.rs`).
/// Release builds never read the variable.
#[cfg(debug_assertions)]
#[derive(Debug)]
pub(crate) struct TestFault {
    at: std::time::Instant,
    panic: bool,
}

#[cfg(debug_assertions)]
impl TestFault {
    /// Worker `worker`'s fault, if the variable names it.
    pub(crate) fn from_env(worker: usize) -> Option<TestFault> {
        let fault = std::env::var("SLUICE_TEST_WORKER_FAULT").ok()?;
        let (index, kind) = fault.split_once(':')?;
        if index.parse::<usize>().ok()? != worker {
            return None;
        }
        let panic = match kind {
            "panic" => true,
            "error" => false,
            _ => return None,
        };
        Some(TestFault {
            at: std::time::Instant::now() + Duration::from_secs(1),
            panic,
        })
    }

    /// Fires once its time has come.
    pub(crate) fn check(&self) -> std::io::Result<()> {
        if std::time::Instant::now() < self.at {
            return Ok(());
        }
        assert!(
            !self.panic,
            "test fault injected by SLUICE_TEST_WORKER_FAULT"
        );
        Err(std::io::Error::other(
            "test fault injected by SLUICE_TEST_WORKER_FAULT",
        ))
    }
}
