//! Test support for sluice-probe's integration tests: backends on loopback that behave or
//! misbehave on purpose ([`fake`]), real `redis-server` processes ([`redis`]), and temporary
//! directories ([`temp`]). Real PostgreSQL clusters come from `sluice_testkit::PostgresCluster`.
//!
//! Every wait here has a deadline, and every process and directory is cleaned up on drop.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

pub mod fake;
pub mod redis;
pub mod temp;

use std::time::Duration;

use sluice_probe::Outcome;

/// The timeout of probes expected to pass (or fail fast): generous, so a loaded CI machine
/// does not fail them.
pub const PASS_TIMEOUT: Duration = Duration::from_secs(5);

/// The timeout of probes expected to time out.
pub const HANG_TIMEOUT: Duration = Duration::from_millis(200);

/// Panics with the reason unless `outcome` passed.
#[track_caller]
pub fn assert_passed(outcome: &Outcome) {
    if let Some(reason) = outcome.failure() {
        panic!("probe failed: {reason}");
    }
}

/// The failure's text; panics if `outcome` passed.
#[track_caller]
pub fn failure_text(outcome: &Outcome) -> String {
    match outcome.failure() {
        Some(reason) => reason.to_string(),
        None => panic!("probe passed, expected a failure"),
    }
}

/// Asserts that `outcome` failed with a reason starting with `start`.
#[track_caller]
pub fn assert_fails_with(outcome: &Outcome, start: &str) {
    let text = failure_text(outcome);
    assert!(
        text.starts_with(start),
        "reason {text:?} does not start with {start:?}"
    );
}

/// Asserts that `outcome` failed because the backend closed: with a FIN, or with a reset when
/// the request reached it after it closed (which of the two is a race on loopback).
#[track_caller]
pub fn assert_closed_by_backend(outcome: &Outcome) {
    let text = failure_text(outcome);
    assert!(
        text == "connection closed by the backend after 0 bytes"
            || (text.starts_with("I/O error ") && text.contains("reset")),
        "{text}"
    );
}
