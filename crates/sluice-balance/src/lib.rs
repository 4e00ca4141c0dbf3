//! Backend choice for Sluice: immutable, versioned [`Snapshot`]s of every listener's backends,
//! the algorithms that pick one backend for a new connection, and the [`SnapshotCell`] through
//! which the control plane publishes a new snapshot to the workers without a lock.
//!
//! This crate does no I/O, reads no clock and starts no thread. It does not know about sockets,
//! io_uring or health checks: the control plane decides which backends exist and in what state,
//! builds a `Snapshot`, and publishes it; each worker asks the snapshot for a backend.
//!
//! Main types:
//! - [`Snapshot`]: generation plus one [`ListenerBackends`] per listener, in config order.
//! - [`Backend`], [`BackendId`]: one backend of one listener and its index in that listener.
//! - [`Picker`]: the per-worker, per-listener mutable state an algorithm needs (round-robin's
//!   current weights); a worker keeps one per listener and resets it when the generation changes.
//! - [`SnapshotCell`]: the lock-free publication point (`arc-swap`).
//!
//! Only round-robin is selectable so far. [`maglev`] (weighted, order-independent tables with a
//! frozen fingerprint) and [`ring_hash`] (ketama) are built and tested over the stable
//! SipHash-2-4 of [`hash`], but not yet behind [`Algorithm`]/[`Picker`]: the balancing issue
//! wires them in, with `least_connections`, `random` and `power_of_two`.

mod round_robin;

pub mod hash;
pub mod maglev;
pub mod ring_hash;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use round_robin::RoundRobin;

/// Index of a backend within its listener's backend list in one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub u32);

impl BackendId {
    /// The index as a `usize`, for indexing per-backend arrays.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// The address a client connected from: the key that hashing algorithms will use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// One backend of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub id: BackendId,
    pub addr: SocketAddr,
    /// 0..=1000; 0 takes no new connections.
    pub weight: u16,
}

/// The balancing algorithm of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
}

/// The backends of one listener as of one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerBackends {
    pub algorithm: Algorithm,
    pub backends: Vec<Backend>,
}

/// An immutable view of every listener's backends. Workers hold an `Arc<Snapshot>` and adopt a
/// newer one between completion batches; connections already established keep their backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub generation: u64,
    /// One entry per listener, in config order.
    pub listeners: Vec<ListenerBackends>,
}

/// Per-worker, per-listener picking state. Created from a snapshot's listener entry; a worker
/// makes a new one when it adopts a snapshot of another generation.
#[derive(Debug, Clone)]
pub enum Picker {
    RoundRobin(RoundRobin),
}

impl Picker {
    /// The picking state for `listener` as of the snapshot it comes from. `offset` staggers
    /// workers so that N workers do not all start on the first backend.
    pub fn new(listener: &ListenerBackends, offset: usize) -> Self {
        match listener.algorithm {
            Algorithm::RoundRobin => {
                Picker::RoundRobin(RoundRobin::new(&listener.backends, offset))
            }
        }
    }

    /// Picks a backend for a new connection from `client`, skipping those in `exclude`
    /// (backends already tried by this connection). `None` when no backend can take it.
    pub fn pick(
        &mut self,
        listener: &ListenerBackends,
        _client: ClientAddr,
        exclude: &[BackendId],
    ) -> Option<BackendId> {
        match self {
            Picker::RoundRobin(rr) => rr.pick(&listener.backends, exclude),
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
        .map(|(i, &weight)| Backend {
            id: BackendId(i as u32),
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16)),
            weight,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(weights: &[u16]) -> ListenerBackends {
        ListenerBackends {
            algorithm: Algorithm::RoundRobin,
            backends: test_backends(weights),
        }
    }

    #[test]
    fn cell_publishes_new_generation_and_old_snapshot_survives_while_held() {
        let cell = SnapshotCell::new(Snapshot {
            generation: 1,
            listeners: vec![listener(&[1])],
        });
        let held = cell.load();
        cell.publish(Snapshot {
            generation: 2,
            listeners: vec![listener(&[1, 1])],
        });
        assert_eq!(held.generation, 1);
        assert_eq!(held.listeners[0].backends.len(), 1);
        assert_eq!(cell.generation(), 2);
        assert_eq!(cell.load().listeners[0].backends.len(), 2);
    }

    #[test]
    fn picker_skips_excluded_backends() {
        let l = listener(&[1, 1, 1]);
        let mut p = Picker::new(&l, 0);
        let client = ClientAddr(SocketAddr::from(([127, 0, 0, 1], 1)));
        let first = p.pick(&l, client, &[]).unwrap();
        let second = p.pick(&l, client, &[first]).unwrap();
        assert_ne!(first, second);
        let third = p.pick(&l, client, &[first, second]).unwrap();
        assert!(third != first && third != second);
        assert_eq!(p.pick(&l, client, &[first, second, third]), None);
    }
}
