//! Backend choice for Sluice: immutable, versioned [`Snapshot`]s of every listener's backends
//! (with the hashing algorithms' tables already built), the per-worker [`Picker`]s that choose
//! one backend for a new connection, and the [`SnapshotCell`] through which the control plane
//! publishes a new snapshot to the workers without a lock.
//!
//! This crate does no I/O, reads no clock and starts no thread. It does not know about sockets,
//! io_uring or health checks: the control plane decides which backends exist, with what weight
//! and in what state, builds a `Snapshot` (building a Maglev table or a ring is its work, never a
//! worker's), and publishes it; each worker asks its pickers for a backend.
//!
//! Main types:
//! - [`Snapshot`]: generation plus one [`ListenerBackends`] per listener, in config order.
//! - [`ListenerBackends`]: the backends, the [`Algorithm`] and its [`Table`], and the
//!   [`fingerprint`](ListenerBackends::fingerprint) that operators compare across instances.
//! - [`Backend`], [`BackendId`]: one backend of one listener and its index in that listener.
//! - [`BackendLoad`], [`ActiveGuard`]: the one piece of shared mutable state, a backend's count of
//!   active connections, read by `least_connections` and `power_of_two` (see
//!   [`least_connections`] for the design and its error bound).
//! - [`Picker`]: the per-worker, per-listener mutable state an algorithm needs (round-robin's
//!   current weights, a random generator, a cursor); a worker makes new ones when it adopts a
//!   snapshot of another generation.
//! - [`SnapshotCell`]: the lock-free publication point (`arc-swap`).
//!
//! One file per algorithm: [`round_robin`], [`least_connections`], [`random`], [`power_of_two`],
//! [`ring_hash`], [`maglev`]; all of the hashing goes through the frozen SipHash-2-4 of [`hash`].

pub mod hash;
pub mod least_connections;
pub mod maglev;
pub mod power_of_two;
pub mod random;
pub mod ring_hash;
pub mod round_robin;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use arc_swap::ArcSwap;

use hash::{Identity, KEY_FINGERPRINT, SipHasher24};
use least_connections::LeastConnections;
use maglev::MaglevTable;
use power_of_two::PowerOfTwo;
use random::{Random, Rng};
use ring_hash::RingHash;
use round_robin::RoundRobin;

/// Index of a backend within its listener's backend list in one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub u32);

impl BackendId {
    /// The index as a `usize`, for indexing per-backend arrays.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// The address a client connected from: the key that hashing algorithms use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// Whether a backend may take new connections, as the control plane (health checks, operators)
/// last decided. A `Down` backend is left out of every pick and every table; its established
/// connections are not touched by this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    Up,
    Down,
}

impl BackendState {
    pub fn label(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
        }
    }
}

/// What every worker shares about one backend: its count of active connections, and two flags
/// the data plane and the control plane pass each other. The struct fills a cache line of its own
/// (so two backends never share one); each field is written at most once per connection open or
/// close, never per byte. It outlives snapshots: the control plane hands the same `Arc` to
/// every snapshot that keeps the backend, so connections opened under one generation and closed
/// under another are counted once, and the `Arc` is the backend's identity in worker reports.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct BackendLoad {
    active: AtomicU32,
    /// A worker reported a failure that no success has followed yet (see [`Self::mark_failing`]).
    failing: AtomicBool,
    /// The backend's drain time is over: workers close its remaining connections.
    drained: AtomicBool,
}

impl BackendLoad {
    /// Connections counted now (relaxed: a hint for choosing, not a synchronisation point).
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Records a failure. Workers report every failure, but a success only when it ends a run of
    /// failures ([`Self::clear_failing`]), so that healthy traffic costs the control plane nothing.
    pub fn mark_failing(&self) {
        self.failing.store(true, Ordering::Relaxed);
    }

    /// Records a success; true when it ends a run of failures (and should be reported).
    pub fn clear_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed)
    }

    /// Tells the workers to close this backend's remaining connections (end of `drain_timeout`).
    pub fn set_drained(&self) {
        self.drained.store(true, Ordering::Release);
    }

    /// Takes the flag back: the backend was configured again before, or after, its drain.
    pub fn clear_drained(&self) {
        self.drained.store(false, Ordering::Release);
    }

    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }
}

/// [`Backend::ramp`] of a backend that is not ramping.
pub const RAMP_FULL: u16 = 1000;

/// One connection counted in a backend's [`BackendLoad`]: made by [`Backend::open`], uncounted
/// when dropped, so each connection is counted exactly once whatever path closes it.
#[derive(Debug)]
pub struct ActiveGuard(Arc<BackendLoad>);

impl ActiveGuard {
    /// The backend's shared cell.
    pub fn load(&self) -> &Arc<BackendLoad> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One backend of one listener.
#[derive(Debug, Clone)]
pub struct Backend {
    pub id: BackendId,
    pub addr: SocketAddr,
    /// 0..=1000; 0 takes no new connections.
    pub weight: u16,
    /// Slow start: the share of `weight` in use, in thousandths (1..=1000; 1000 when not
    /// ramping). Applies to the weighted algorithms (round_robin, least_connections, random,
    /// power_of_two), as Envoy's slow start does; the hashing tables use `weight` alone, so
    /// that a ramp never moves clients between backends.
    pub ramp: u16,
    pub state: BackendState,
    /// Takes connections only while no non-backup backend of its listener can.
    pub backup: bool,
    pub load: Arc<BackendLoad>,
    /// Whether the listener's algorithm may choose it now: set by [`ListenerBackends::new`] from
    /// the weights, states and backup flags of the whole listener (see [`OnAllDown`]).
    selectable: bool,
}

impl Backend {
    /// An `Up` backend with a fresh load count.
    pub fn new(id: BackendId, addr: SocketAddr, weight: u16) -> Self {
        Backend {
            id,
            addr,
            weight,
            ramp: RAMP_FULL,
            state: BackendState::Up,
            backup: false,
            load: Arc::default(),
            selectable: true,
        }
    }

    /// The weight the weighted algorithms use: `weight` times `ramp` (in thousandths), so
    /// that a ramp has a fine grain even for weight 1.
    pub fn effective_weight(&self) -> u64 {
        u64::from(self.weight) * u64::from(self.ramp.clamp(1, RAMP_FULL))
    }

    /// Whether the algorithm may choose this backend for a new connection: decided for the whole
    /// listener when its [`ListenerBackends`] is built (up, with a weight, and a backup only while
    /// no other backend qualifies; every weighted backend under `on_all_down: use_all` when none
    /// is up).
    pub fn eligible(&self) -> bool {
        self.selectable && self.weight > 0
    }

    /// Counts one more active connection until the guard is dropped.
    pub fn open(&self) -> ActiveGuard {
        self.load.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(&self.load))
    }

    /// The active connections now counted on this backend by every worker.
    pub fn active(&self) -> u32 {
        self.load.active()
    }
}

/// What a listener does when none of its backends is up (backups included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnAllDown {
    /// New connections are reset at once (and counted); nothing waits for a backend.
    #[default]
    Reject,
    /// Envoy's panic mode: balance over every backend with a weight, as if all were up, on the
    /// grounds that health checks are more likely wrong than every backend at once.
    UseAll,
}

impl OnAllDown {
    pub fn label(self) -> &'static str {
        match self {
            OnAllDown::Reject => "reject",
            OnAllDown::UseAll => "use_all",
        }
    }
}

/// Marks which backends the algorithm may choose: the up, weighted non-backup ones; failing
/// that the up, weighted backups; failing that, under `use_all`, every weighted backend.
fn select(backends: &mut [Backend], on_all_down: OnAllDown) {
    let up = |b: &Backend| b.weight > 0 && b.state == BackendState::Up;
    let primaries = backends.iter().any(|b| up(b) && !b.backup);
    let backups = backends.iter().any(|b| up(b) && b.backup);
    for b in backends.iter_mut() {
        b.selectable = if primaries {
            up(b) && !b.backup
        } else if backups {
            up(b) && b.backup
        } else {
            on_all_down == OnAllDown::UseAll && b.weight > 0
        };
    }
}

/// The part of the client's address that the hashing algorithms hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashKey {
    /// Every connection from one host goes to one backend (source affinity).
    #[default]
    ClientIp,
    /// Connections spread over backends, each one stable (what ECMP does with a 5-tuple).
    ClientIpPort,
}

impl HashKey {
    pub fn label(self) -> &'static str {
        match self {
            HashKey::ClientIp => "client_ip",
            HashKey::ClientIpPort => "client_ip_port",
        }
    }

    /// The frozen hash of `client` under this key (see [`hash`]).
    pub fn hash(self, client: ClientAddr) -> u64 {
        match self {
            HashKey::ClientIp => hash::client_ip_hash(client),
            HashKey::ClientIpPort => hash::client_ip_port_hash(client),
        }
    }
}

/// The balancing algorithm of a listener, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    LeastConnections,
    Random,
    PowerOfTwo,
    RingHash {
        hash_key: HashKey,
        points_per_weight: u32,
    },
    Maglev {
        hash_key: HashKey,
        /// `None`: [`maglev::default_table_size`] of the backend count.
        table_size: Option<u32>,
    },
}

impl Algorithm {
    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::Random => "random",
            Algorithm::PowerOfTwo => "power_of_two",
            Algorithm::RingHash { .. } => "ring_hash",
            Algorithm::Maglev { .. } => "maglev",
        }
    }

    /// The hash key of the hashing algorithms, `None` for the others.
    pub fn hash_key(self) -> Option<HashKey> {
        match self {
            Algorithm::RingHash { hash_key, .. } | Algorithm::Maglev { hash_key, .. } => {
                Some(hash_key)
            }
            _ => None,
        }
    }
}

/// What an algorithm precomputes from a listener's backends when the snapshot is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    /// Round-robin and least-connections need nothing precomputed.
    None,
    /// Cumulative weights of the eligible backends, for `random` and `power_of_two`.
    Weights(random::WeightTable),
    Ring(RingHash),
    Maglev(MaglevTable),
}

/// The backends of one listener as of one generation, with the algorithm's table built from the
/// eligible ones. Immutable: a change of weight or state makes a new one in a new snapshot.
#[derive(Debug, Clone)]
pub struct ListenerBackends {
    pub algorithm: Algorithm,
    pub on_all_down: OnAllDown,
    pub backends: Vec<Backend>,
    /// Up, weighted backups not selectable because a primary is up: the last resort of a
    /// retry that has tried every selectable backend.
    pub backups_standing_by: Vec<BackendId>,
    pub table: Table,
    fingerprint: u64,
}

impl ListenerBackends {
    /// Builds the algorithm's table from `backends` (their `id`s must be their indices). For
    /// `maglev` this is the expensive step (milliseconds for a 65537-slot table): the control
    /// plane does it, never a worker.
    pub fn new(algorithm: Algorithm, backends: Vec<Backend>) -> Self {
        Self::with_fallback(algorithm, OnAllDown::Reject, backends)
    }

    /// [`new`](Self::new) with the listener's choice for when every backend is down.
    pub fn with_fallback(
        algorithm: Algorithm,
        on_all_down: OnAllDown,
        mut backends: Vec<Backend>,
    ) -> Self {
        debug_assert!(backends.iter().enumerate().all(|(i, b)| b.id.index() == i));
        select(&mut backends, on_all_down);
        let eligible: Vec<Backend> = backends.iter().filter(|b| b.eligible()).cloned().collect();
        let table = match algorithm {
            Algorithm::RoundRobin | Algorithm::LeastConnections => Table::None,
            Algorithm::Random | Algorithm::PowerOfTwo => {
                Table::Weights(random::WeightTable::new(&backends))
            }
            Algorithm::RingHash {
                points_per_weight, ..
            } => Table::Ring(RingHash::build(&eligible, points_per_weight)),
            Algorithm::Maglev { table_size, .. } => {
                let size = table_size.unwrap_or_else(|| maglev::default_table_size(backends.len()));
                Table::Maglev(MaglevTable::build(&eligible, size))
            }
        };
        let fingerprint = match &table {
            Table::Ring(ring) => ring.fingerprint(),
            Table::Maglev(maglev) => maglev.fingerprint(),
            Table::None | Table::Weights(_) => weights_fingerprint(algorithm, &eligible),
        };
        let backups_standing_by = backends
            .iter()
            .filter(|b| b.backup && !b.selectable && b.weight > 0 && b.state == BackendState::Up)
            .map(|b| b.id)
            .collect();
        ListenerBackends {
            algorithm,
            on_all_down,
            backups_standing_by,
            backends,
            table,
            fingerprint,
        }
    }

    /// A stable 64-bit hash of what decides where connections go: for `maglev` and `ring_hash`
    /// the table itself, for the others the algorithm and the set of eligible (address, weight)
    /// pairs. Independent of list order and of process, machine and version: two instances with
    /// the same fingerprint choose alike (hashing algorithms: the same backend for the same
    /// client).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// What each backend holds of the algorithm's table, in `backends` order: its slots
    /// (`maglev`), its points (`ring_hash`), or its weight (the others); 0 for a backend that is
    /// down or has weight 0.
    pub fn holdings(&self) -> Vec<u64> {
        let mut counts = vec![0u64; self.backends.len()];
        match &self.table {
            Table::Maglev(maglev) => {
                for (id, slots) in maglev.shares() {
                    counts[id.index()] = u64::from(slots);
                }
            }
            Table::Ring(ring) => {
                for (id, points) in ring.shares() {
                    counts[id.index()] = points as u64;
                }
            }
            Table::None | Table::Weights(_) => {
                for b in self.backends.iter().filter(|b| b.eligible()) {
                    counts[b.id.index()] = u64::from(b.weight);
                }
            }
        }
        counts
    }

    /// Each backend's share of new connections as a fraction of the [`holdings`](Self::holdings)
    /// (all 0 when no backend can take a connection).
    pub fn shares(&self) -> Vec<f64> {
        let counts = self.holdings();
        let total: u64 = counts.iter().sum();
        counts
            .iter()
            .map(|&c| {
                if total == 0 {
                    0.0
                } else {
                    c as f64 / total as f64
                }
            })
            .collect()
    }
}

/// SipHash of the algorithm's name and the eligible (identity, weight) pairs in identity order.
fn weights_fingerprint(algorithm: Algorithm, eligible: &[Backend]) -> u64 {
    let mut pairs: Vec<(Identity, u16)> = eligible
        .iter()
        .map(|b| (Identity::new(b.addr), b.weight))
        .collect();
    pairs.sort_unstable();
    let mut hasher = SipHasher24::new(KEY_FINGERPRINT);
    hasher.write(algorithm.name().as_bytes());
    for (identity, weight) in pairs {
        hasher.write(identity.as_bytes());
        hasher.write(&weight.to_be_bytes());
    }
    hasher.finish()
}

/// An immutable view of every listener's backends. Workers hold an `Arc<Snapshot>` and adopt a
/// newer one between completion batches; connections already established keep their backend.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub generation: u64,
    /// One entry per listener, in config order.
    pub listeners: Vec<ListenerBackends>,
}

/// Per-worker, per-listener picking state. Created from a snapshot's listener entry; a worker
/// makes a new one when it adopts a snapshot of another generation.
pub struct Picker {
    kind: PickerKind,
}

enum PickerKind {
    RoundRobin(RoundRobin),
    LeastConnections(LeastConnections),
    Random(Random),
    PowerOfTwo(PowerOfTwo),
    /// Ring hash and Maglev keep no per-worker state: the table is in the snapshot.
    Hashing,
}

impl fmt::Debug for Picker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.kind {
            PickerKind::RoundRobin(_) => "round_robin",
            PickerKind::LeastConnections(_) => "least_connections",
            PickerKind::Random(_) => "random",
            PickerKind::PowerOfTwo(_) => "power_of_two",
            PickerKind::Hashing => "hashing",
        };
        f.debug_struct("Picker").field("kind", &name).finish()
    }
}

impl Picker {
    /// The picking state for `listener`. `worker` staggers workers so that N workers do not all
    /// start on the first backend; `seed` seeds the random algorithms (the caller takes it from
    /// the OS, so that instances do not draw the same sequence).
    pub fn new(listener: &ListenerBackends, worker: usize, seed: u64) -> Self {
        let kind = match listener.algorithm {
            Algorithm::RoundRobin => {
                PickerKind::RoundRobin(RoundRobin::new(&listener.backends, worker))
            }
            Algorithm::LeastConnections => {
                PickerKind::LeastConnections(LeastConnections::new(worker))
            }
            Algorithm::Random => PickerKind::Random(Random::new(Rng::new(seed))),
            Algorithm::PowerOfTwo => PickerKind::PowerOfTwo(PowerOfTwo::new(Rng::new(seed))),
            Algorithm::RingHash { .. } | Algorithm::Maglev { .. } => PickerKind::Hashing,
        };
        Picker { kind }
    }

    /// Picks an eligible backend for a new connection from `client`, skipping those in `exclude`
    /// (backends already tried by this connection: a retry takes the algorithm's next choice).
    /// `None` when no backend can take it.
    pub fn pick(
        &mut self,
        listener: &ListenerBackends,
        client: ClientAddr,
        exclude: &[BackendId],
    ) -> Option<BackendId> {
        let picked = self.pick_selectable(listener, client, exclude);
        if picked.is_some() || exclude.is_empty() {
            return picked;
        }
        // Every selectable backend was tried on this connection: a retry may still go to an
        // up backup (the least loaded), so a primary that refuses before health checks notice
        // does not fail the client while a backup could serve it.
        listener
            .backups_standing_by
            .iter()
            .filter(|id| !exclude.contains(id))
            .min_by_key(|id| listener.backends[id.index()].active())
            .copied()
    }

    fn pick_selectable(
        &mut self,
        listener: &ListenerBackends,
        client: ClientAddr,
        exclude: &[BackendId],
    ) -> Option<BackendId> {
        let backends = &listener.backends;
        match (&mut self.kind, &listener.table) {
            (PickerKind::RoundRobin(rr), _) => rr.pick(backends, exclude),
            (PickerKind::LeastConnections(lc), _) => lc.pick(backends, exclude),
            (PickerKind::Random(r), Table::Weights(w)) => r.pick(backends, w, exclude),
            (PickerKind::PowerOfTwo(p), Table::Weights(w)) => p.pick(backends, w, exclude),
            (PickerKind::Hashing, Table::Maglev(table)) => {
                let key = listener
                    .algorithm
                    .hash_key()
                    .unwrap_or_default()
                    .hash(client);
                table.pick(key, exclude)
            }
            (PickerKind::Hashing, Table::Ring(ring)) => {
                let key = listener
                    .algorithm
                    .hash_key()
                    .unwrap_or_default()
                    .hash(client);
                ring.pick(key, exclude)
            }
            // A picker made from another listener entry than the one it is asked about: the
            // worker makes pickers and snapshot entries together, so this is a bug; choose
            // nothing rather than the wrong thing.
            _ => None,
        }
    }
}

/// The publication point of snapshots: the control plane stores, workers load, nobody locks.
#[derive(Debug)]
pub struct SnapshotCell {
    current: ArcSwap<Snapshot>,
}

impl SnapshotCell {
    pub fn new(snapshot: Snapshot) -> Self {
        SnapshotCell {
            current: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The newest snapshot. Cheap (no lock, no allocation); call it between batches.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot. The caller also wakes the workers so that a sleeping one sees it.
    /// The old snapshot is freed when the last worker holding it adopts the new one.
    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }

    /// The generation of the newest snapshot, without taking a reference to it.
    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }
}

/// Backends `127.0.0.1:7000 + i` with the given weights, for the tests of this crate.
#[cfg(test)]
pub(crate) fn test_backends(weights: &[u16]) -> Vec<Backend> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| {
            Backend::new(
                BackendId(i as u32),
                SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16)),
                weight,
            )
        })
        .collect()
}

/// Whether `id` may be chosen: eligible and not already tried.
pub(crate) fn can_take(backend: &Backend, exclude: &[BackendId]) -> bool {
    backend.eligible() && !exclude.contains(&backend.id)
}

#[cfg(test)]
mod tests;
