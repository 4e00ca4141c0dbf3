//! UDP flow state for Sluice: the bounded session table that each worker owns for each UDP
//! listener. A datagram from a client finds its session (and so its backend socket) by the
//! flow's [`FlowKey`]; a reply from a backend finds its session by the [`FlowId`] the driver put
//! in its operation's `user_data`; idle sessions expire, a full table drops or evicts per
//! `on_max_sessions`, and `requests`/`responses` end sessions as nginx's
//! `proxy_requests`/`proxy_responses` do (see [`session`]).
//!
//! This crate does no I/O, reads no clock and starts no thread: time comes in as `now`, and the
//! sockets, backends and snapshot generations live in the driver's payload `S`, which the table
//! never looks at. So it does not pick backends either. Moving the sessions of a backend that went
//! down is the driver's check on each client datagram: [`FlowTable::get_mut`] hands it the
//! session, it compares the backend (and generation) in its payload with the current snapshot,
//! and if the backend is no longer eligible it removes the session by id and inserts a new one on
//! a fresh pick, whose new id makes any late reply from the old socket stale. Nothing in the
//! table is needed for that beyond [`FlowTable::iter_mut`] and [`FlowTable::retain`] for the rare
//! bulk cases (drain timeout, shutdown).
//!
//! Main types:
//! - [`FlowTable`]: a slab of sessions with a free list, an intrusive least-recently-active list
//!   and a `HashMap` index; O(1) per datagram, allocated in full when made.
//! - [`FlowKey`]: client address and the local address it sent to; [`FlowId`]: a session's
//!   handle, stale once the session is gone.
//! - [`Session`]: the driver's payload plus activity times, request/response counts and its
//!   [`SessionState`]; [`Limits`]: the listener's `requests`/`responses`.
//! - [`Insert`]: what an insert did (inserted, evicted one, or refused); [`OnMaxSessions`]: drop
//!   or evict when full; [`Counters`]: active, created, expired, evicted, dropped, closed.
//! - [`worker_share`]: a worker's part of a listener's `max_sessions`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod key;
pub mod session;
pub mod table;

pub use key::{FlowId, FlowKey};
pub use session::{Limits, Session, SessionState};
pub use table::{Counters, FlowTable, Insert, OnMaxSessions};

/// Worker `worker`'s share (of `workers`) of a listener's `max_sessions`: an even split, the
/// remainder going one each to the first workers, so the shares add up to `max_sessions` exactly.
/// Each share is at least 1 when `max_sessions >= workers`.
///
/// When `max_sessions < workers`, only the first `max_sessions` workers get 1 and the others get
/// 0, so the total still holds; a worker with 0 refuses every new session, and since the kernel
/// spreads clients over the workers' `SO_REUSEPORT` sockets by hash, the clients it receives get
/// no session at all. Config validation should warn about (or refuse) such a setting. A `worker`
/// outside `0..workers` (including any worker when `workers` is 0) gets 0.
pub fn worker_share(max_sessions: u32, workers: usize, worker: usize) -> u32 {
    if worker >= workers {
        return 0;
    }
    let (max_sessions, workers, worker) = (u64::from(max_sessions), workers as u64, worker as u64);
    let share = max_sessions / workers + u64::from(worker < max_sessions % workers);
    // At most `max_sessions`, which came from a `u32`.
    share as u32
}

#[cfg(test)]
mod tests;
