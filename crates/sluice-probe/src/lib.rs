//! Active health probes for Sluice's control plane: connect to one backend, ask it what a
//! [`Check`](sluice_health::Check) describes, and say whether it passed, how long it took and,
//! if not, why.
//!
//! - [`Prober`] prepares a check once (compiles the `expect_regex`, reads the `password_file`,
//!   encodes the request) and [`Prober::probe`]s a backend address with a timeout that bounds
//!   the whole probe, connect included.
//! - [`Outcome`] is the result: passed or failed, with its latency; [`Failure`] says why in
//!   words fit for a log line ("connect refused", "role is replica, want master", "HTTP status
//!   503 not in 200-399"), with backend text escaped and truncated.
//! - Checks: `tcp` (connect), `send_expect` (prefix or regex over bytes), `http` (status line of
//!   a `GET`), `redis` (RESP: `AUTH`, `PING`, `ROLE`), `postgres` (`tokio-postgres` over plain
//!   TCP: trust, md5 and SCRAM-SHA-256, then `pg_is_in_recovery()`; a request for the password
//!   in cleartext is refused, since nothing would protect it).
//!
//! Every probe reads at most [`READ_LIMIT`] bytes (64 KiB for PostgreSQL), never panics on what a
//! backend sends, and closes its socket whether it passes, fails, times out or is dropped.
//! Passwords never appear in `Debug` output or in a [`Failure`].
//!
//! What it does not do: it keeps no state between probes, schedules nothing (intervals,
//! jitter, rise/fall and flap damping belong to `sluice-health`'s state machine and the control
//! plane's loop), logs nothing, and never runs on a worker's ring. It speaks no TLS: an `http`
//! check is for a plain endpoint, and PostgreSQL is probed without `sslmode`.

#![forbid(unsafe_code)]

mod conn;
mod http;
mod outcome;
mod postgres;
mod postgres_stream;
mod prober;
mod redis;
mod resp;
mod secret;
mod send_expect;

pub use conn::READ_LIMIT;
pub use outcome::{Failure, Outcome, Step};
pub use prober::{ProbeSetupError, Prober};
pub use secret::PASSWORD_FILE_MAX;
