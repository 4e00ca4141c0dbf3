//! Passive ejection: workers see connect failures and resets on real traffic before any probe
//! does, so `consecutive_failures` of them in a row take a backend out for a while.
//!
//! The rules, after Envoy's outlier detection:
//! - **Counting.** Failures are counted in a row across workers; any success resets the count.
//!   Reports about a backend that is not available are ignored: they come from connections
//!   opened before it went out.
//! - **Back-off.** The first ejection lasts `ejection_time`; each repeat doubles it, up to
//!   [`EJECTION_TIME_MAX`] (300 s, Envoy's `max_ejection_time` default) or `ejection_time`
//!   itself when that is longer. The doubling decays: the level drops by one for each full
//!   `ejection_time` between the end of one ejection and the start of the next (Envoy lowers its
//!   multiplier once per healthy interval). [`ejection_time`] computes one ejection's length.
//! - **End.** An ejection ends when its time has passed, or at once when an active probe
//!   passes.
//! - **Limit.** A listener never has more than [`ejected_max`] of its backends ejected at once;
//!   [`crate::ListenerHealth`] asks before each ejection, so a backend never ejects itself.
//!   A backend refused by the limit keeps its count and is ejected by its next failure once
//!   the limit allows.
//! - `consecutive_failures` or `ejection_time` of zero turns passive ejection off.

use std::time::{Duration, Instant};

use crate::Passive;
use crate::later;

/// The cap on one ejection's length, unless `ejection_time` alone is longer (Envoy's
/// `max_ejection_time` default).
pub const EJECTION_TIME_MAX: Duration = Duration::from_secs(300);

/// One ejection's length at `level` (0 for the first) for a listener's `ejection_time` of
/// `base`: `base x 2^level`, at most `max(EJECTION_TIME_MAX, base)`.
pub fn ejection_time(base: Duration, level: u32) -> Duration {
    let cap = EJECTION_TIME_MAX.max(base);
    let factor = 1u32 << level.min(31);
    base.checked_mul(factor).unwrap_or(cap).min(cap)
}

/// The most backends of a listener of `backends` that may be ejected at once: the share
/// `max_ejection_percent` (at most 100) rounded down, so 50% of 1 backend is none and 50% of 3
/// is one. Unlike Envoy, which always allows one, a listener never loses its only backend,
/// or its last healthy half, to passive ejection.
pub fn ejected_max(backends: usize, max_ejection_percent: u8) -> usize {
    backends * usize::from(max_ejection_percent.min(100)) / 100
}

/// Whether `passive` ejects at all.
pub(crate) fn enabled(passive: &Passive) -> bool {
    passive.consecutive_failures > 0 && !passive.ejection_time.is_zero()
}

/// One backend's passive state: its failures in a row, its ejection and its back-off.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ejection {
    failures: u32,
    until: Option<Instant>,
    /// Doublings of the next ejection.
    level: u32,
    ended_at: Option<Instant>,
    count: u64,
}

impl Ejection {
    /// Counts one failure; returns the failures in a row so far.
    pub(crate) fn failure(&mut self) -> u32 {
        self.failures = self.failures.saturating_add(1);
        self.failures
    }

    /// A success: the count starts again.
    pub(crate) fn success(&mut self) {
        self.failures = 0;
    }

    /// When the running ejection ends, if one is running.
    pub(crate) fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Ejections so far.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Starts an ejection at `now`; returns its length.
    pub(crate) fn start(&mut self, now: Instant, passive: &Passive) -> Duration {
        if let Some(ended) = self.ended_at {
            let healthy = now.saturating_duration_since(ended).as_nanos();
            let steps = healthy / passive.ejection_time.as_nanos().max(1);
            self.level = self
                .level
                .saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX));
        }
        let length = ejection_time(passive.ejection_time, self.level);
        if length < EJECTION_TIME_MAX.max(passive.ejection_time) {
            self.level += 1;
        }
        self.until = Some(later(now, length));
        self.failures = 0;
        self.count += 1;
        length
    }

    /// Ends the running ejection at `now`; true when one was running.
    pub(crate) fn end(&mut self, now: Instant) -> bool {
        let ejected = self.until.take().is_some();
        if ejected {
            self.ended_at = Some(now);
        }
        ejected
    }

    /// Ends the ejection if its time has come; true when it did.
    pub(crate) fn end_if_due(&mut self, now: Instant) -> bool {
        match self.until {
            Some(until) if until <= now => self.end(now),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn ejection_time_doubles_up_to_the_cap() {
        let lengths: Vec<u64> = (0..8)
            .map(|l| ejection_time(secs(10), l).as_secs())
            .collect();
        assert_eq!(lengths, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(
            ejection_time(secs(400), 3),
            secs(400),
            "a long base is its own cap"
        );
        assert_eq!(ejection_time(secs(10), u32::MAX), secs(300));
    }

    #[test]
    fn ejected_max_rounds_down() {
        assert_eq!(ejected_max(1, 50), 0);
        assert_eq!(ejected_max(3, 50), 1);
        assert_eq!(ejected_max(4, 50), 2);
        assert_eq!(ejected_max(10, 10), 1);
        assert_eq!(ejected_max(4, 100), 4);
        assert_eq!(ejected_max(4, 255), 4);
        assert_eq!(ejected_max(0, 50), 0);
    }

    #[test]
    fn back_off_decays_one_level_per_ejection_time_after_the_end() {
        let passive = Passive::default();
        let t0 = Instant::now();
        let mut ejection = Ejection::default();
        assert_eq!(ejection.start(t0, &passive), secs(10));
        assert!(ejection.end_if_due(t0 + secs(10)));
        assert_eq!(ejection.start(t0 + secs(11), &passive), secs(20));
        assert!(
            ejection.end(t0 + secs(12)),
            "ended early, as by a passing probe"
        );
        assert_eq!(ejection.start(t0 + secs(13), &passive), secs(40));
        assert!(ejection.end_if_due(t0 + secs(53)));
        // Level 3; 25 s healthy is two full ejection times: back to level 1.
        assert_eq!(ejection.start(t0 + secs(78), &passive), secs(20));
        assert_eq!(ejection.count(), 4);
    }

    #[test]
    fn start_resets_the_failure_count() {
        let mut ejection = Ejection::default();
        for n in 1..=5 {
            assert_eq!(ejection.failure(), n);
        }
        ejection.start(Instant::now(), &Passive::default());
        assert_eq!(ejection.failure(), 1);
        ejection.success();
        assert_eq!(ejection.failure(), 1);
    }

    #[test]
    fn zero_count_or_time_turns_ejection_off() {
        assert!(enabled(&Passive::default()));
        let no_count = Passive {
            consecutive_failures: 0,
            ..Passive::default()
        };
        let no_time = Passive {
            ejection_time: Duration::ZERO,
            ..Passive::default()
        };
        assert!(!enabled(&no_count));
        assert!(!enabled(&no_time));
    }
}
