//! `sluice inspect`: what each listener's balancing will do, in a form two operators can
//! compare: the algorithm and its settings, the fingerprint of the table (or of the weights),
//! and each backend's share of new connections.
//!
//! The snapshot printed is the one `sluice run` starts with (built by the same code), so equal
//! fingerprints from two hosts mean the two instances choose alike: for `maglev` and `ring_hash`,
//! the same backend for the same client.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use sluice_balance::{Algorithm, ListenerBackends, Table};

use crate::plan::{self, Resolved};

/// Prints the report of the config at `path`.
pub(crate) fn inspect(resolved: &Resolved, path: &Path) -> ExitCode {
    let snapshot = plan::snapshot(resolved);
    crate::print(&report(resolved, &snapshot.listeners, path))
}

fn report(resolved: &Resolved, listeners: &[ListenerBackends], path: &Path) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "config {}", path.display());
    for (listener, backends) in resolved.config.listeners.iter().zip(listeners) {
        let _ = writeln!(
            out,
            "listener {} {}: {}",
            listener.name,
            listener.bind,
            settings(backends)
        );
        let _ = writeln!(out, "  fingerprint {:016x}", backends.fingerprint());
        let unit = match &backends.table {
            Table::Maglev(_) => "slots",
            Table::Ring(_) => "points",
            Table::None | Table::Weights(_) => "weight",
        };
        let counts = backends.holdings();
        let width = backends
            .backends
            .iter()
            .map(|b| b.addr.to_string().len())
            .max()
            .unwrap_or(0)
            .max("backend".len());
        let _ = writeln!(
            out,
            "  {:<width$}  {:>6}  {:>5}  {:>8}  {unit:>8}",
            "backend", "weight", "state", "share"
        );
        for ((backend, share), count) in backends.backends.iter().zip(backends.shares()).zip(counts)
        {
            let _ = writeln!(
                out,
                "  {:<width$}  {:>6}  {:>5}  {:>7.3}%  {count:>8}",
                backend.addr.to_string(),
                backend.weight,
                backend.state.label(),
                share * 100.0,
            );
        }
    }
    out
}

/// The algorithm and the settings that shape its table.
fn settings(backends: &ListenerBackends) -> String {
    match (backends.algorithm, &backends.table) {
        (Algorithm::Maglev { hash_key, .. }, Table::Maglev(table)) => format!(
            "maglev, hash_key {}, table_size {}",
            hash_key.label(),
            table.table_size()
        ),
        (
            Algorithm::RingHash {
                hash_key,
                points_per_weight,
            },
            Table::Ring(ring),
        ) => format!(
            "ring_hash, hash_key {}, points_per_weight {points_per_weight}, {} points",
            hash_key.label(),
            ring.len()
        ),
        (algorithm, _) => algorithm.name().to_owned(),
    }
}
