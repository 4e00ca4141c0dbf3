//! Per-worker counters: written by their worker only, read by the control plane when scraped.
//!
//! Each counter is an `AtomicU64` that only its worker writes, with a plain load and store
//! (no read-modify-write, no lock prefix, no shared cache line written by two cores), so
//! counting costs what a plain add costs; a reader sums the workers' values.

use std::sync::atomic::{AtomicU64, Ordering};

use sluice_conn::CloseKind;

/// A counter with a single writer.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning worker calls this.
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Subtracts `n` (gauges). Only the owning worker calls this.
    pub fn sub(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }

    /// Sets a gauge. Only the owning worker calls this.
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One backend of one listener, as seen by one worker.
#[derive(Debug, Default)]
pub struct BackendCounters {
    /// Successful connects.
    pub connections: Counter,
    pub connections_active: Counter,
    pub connect_failures: Counter,
    pub bytes_to_backend: Counter,
    pub bytes_to_client: Counter,
}

/// One listener, as seen by one worker.
#[derive(Debug)]
pub struct ListenerCounters {
    pub accepted: Counter,
    pub active: Counter,
    /// Reset at accept because `max_connections` was reached with `on_max_connections: reject`.
    pub rejected: Counter,
    /// Times accepting stopped because `max_connections` (or the fd-budget cap) was reached
    /// in queue mode: new connections then wait in the kernel backlog.
    pub paused_at_cap: Counter,
    /// Accepts that failed for lack of file descriptors (EMFILE/ENFILE) or memory.
    pub accept_fd_exhausted: Counter,
    /// Indexed by [`CloseKind::index`].
    pub closed: [Counter; CloseKind::ALL.len()],
    /// Indexed by backend id (the listener's backend list at start).
    pub backends: Vec<BackendCounters>,
}

impl ListenerCounters {
    pub fn new(backends: usize) -> Self {
        ListenerCounters {
            accepted: Counter::default(),
            active: Counter::default(),
            rejected: Counter::default(),
            paused_at_cap: Counter::default(),
            accept_fd_exhausted: Counter::default(),
            closed: Default::default(),
            backends: (0..backends).map(|_| BackendCounters::default()).collect(),
        }
    }
}

/// Everything one worker counts.
#[derive(Debug)]
pub struct WorkerCounters {
    pub listeners: Vec<ListenerCounters>,
    /// Receives that found the buffer pool empty (each re-armed later).
    pub buffer_waits: Counter,
    /// Pipes leased for splicing now (a gauge).
    pub pipes_leased: Counter,
    /// Bytes written by splicing from a pipe (the rest of the bytes were copied).
    pub bytes_spliced: Counter,
    /// Pipes the kernel made smaller than asked (fs.pipe-user-pages-soft): copied instead.
    pub pipes_shrunk: Counter,
}

impl WorkerCounters {
    pub fn new(backends_per_listener: &[usize]) -> Self {
        WorkerCounters {
            listeners: backends_per_listener
                .iter()
                .map(|&n| ListenerCounters::new(n))
                .collect(),
            buffer_waits: Counter::default(),
            pipes_leased: Counter::default(),
            bytes_spliced: Counter::default(),
            pipes_shrunk: Counter::default(),
        }
    }
}
