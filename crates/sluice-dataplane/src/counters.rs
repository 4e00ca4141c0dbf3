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
    /// A udp listener's datagrams and sessions (zero for tcp).
    pub udp: UdpCounters,
}

/// Why a udp listener dropped a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpDrop {
    /// No backend could take a new session.
    NoBackend,
    /// The worker's session table was full (`on_max_sessions: drop`).
    SessionsFull,
    /// Longer than the datagram buffers: never forwarded cut.
    Truncated,
    /// The kernel refused to send it (buffer full, unreachable).
    SendFailed,
    /// A reply on a shared `per_packet` socket, which no session claims.
    Unclaimed,
    /// A socket toward the backend could not be created.
    Socket,
}

impl UdpDrop {
    pub const ALL: [UdpDrop; 6] = [
        UdpDrop::NoBackend,
        UdpDrop::SessionsFull,
        UdpDrop::Truncated,
        UdpDrop::SendFailed,
        UdpDrop::Unclaimed,
        UdpDrop::Socket,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            UdpDrop::NoBackend => "no_backend",
            UdpDrop::SessionsFull => "sessions_full",
            UdpDrop::Truncated => "truncated",
            UdpDrop::SendFailed => "send_failed",
            UdpDrop::Unclaimed => "unclaimed",
            UdpDrop::Socket => "socket",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// One udp listener, as seen by one worker.
#[derive(Debug, Default)]
pub struct UdpCounters {
    /// Datagrams and bytes from clients, forwarded to backends.
    pub datagrams_to_backend: Counter,
    pub bytes_to_backend: Counter,
    /// Datagrams and bytes from backends, forwarded to clients.
    pub datagrams_to_client: Counter,
    pub bytes_to_client: Counter,
    /// Sessions in the worker's table now (a gauge).
    pub sessions_active: Counter,
    pub sessions_created: Counter,
    /// Ended by `timeouts.idle`.
    pub sessions_expired: Counter,
    /// Ended to make room (`on_max_sessions: evict_lru`).
    pub sessions_evicted: Counter,
    /// Ended otherwise: `responses`/`requests` reached, backend down or drained, ICMP error,
    /// shutdown.
    pub sessions_closed: Counter,
    /// Indexed by [`UdpDrop::index`].
    pub dropped: [Counter; UdpDrop::ALL.len()],
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
            udp: UdpCounters::default(),
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
    /// Chunks moved out of the buffer pool into a connection's spill: their direction was
    /// stalled behind a peer that does not read while the pool ran low.
    pub chunks_spilled: Counter,
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
            chunks_spilled: Counter::default(),
        }
    }
}
