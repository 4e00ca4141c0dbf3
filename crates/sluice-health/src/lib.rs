//! Backend health for Sluice, as pure logic: what a check is ([`check`]), and the state machine
//! that turns probe outcomes, passive reports from workers and time into each backend's state,
//! with rise/fall, passive ejection and its back-off ([`ejection`]), flap damping ([`flap`]) and
//! slow start ([`slow_start`]).
//!
//! This crate does no I/O, reads no clock, draws no random number and starts no thread: time
//! comes in as `now`, and the probes themselves run in `sluice-probe` on the control plane, never
//! on a worker's ring. It does not build snapshots either: the control plane logs each
//! [`Transition`] it gets back, once, with its [`Reason`], and publishes a new snapshot.
//!
//! Main types:
//! - [`ListenerHealth`]: every backend of one listener, keyed by the caller's stable key; the
//!   entry point for every input, and the only one that may eject (`max_ejection_percent`).
//! - [`BackendHealth`]: one backend's state machine; [`State`] is what it reports, [`Start`]
//!   how it begins.
//! - [`Policy`]: a listener's settings ([`RiseFall`], [`Passive`], [`FlapDamping`], slow start).
//! - [`Transition`] and [`Reason`]: what changed and why, for the log.
//! - [`Ramp`]: a slow-start ramp, the effective weight over time.

pub mod check;
pub mod ejection;
pub mod flap;
pub mod listener;
pub mod slow_start;
pub mod state;

use std::time::{Duration, Instant};

pub use check::{ActiveCheck, Check, Expect, Passive, PostgresRole, RedisRole};
pub use flap::FlapDamping;
pub use listener::{Election, ListenerHealth};
pub use slow_start::Ramp;
pub use state::{BackendHealth, Policy, Reason, RiseFall, Start, State, Transition};

/// `now + length`, saturating: a length too far out for `Instant` (only from a wild config)
/// becomes a year, not a panic.
fn later(now: Instant, length: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    now.checked_add(length)
        .or_else(|| now.checked_add(YEAR))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests;
