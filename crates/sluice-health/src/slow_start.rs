//! Slow start: a backend that comes back (from `Down`, `Ejected` or `Flapping` to `Up`, never
//! at process start or on its first probe) has cold caches and pools, so its effective weight
//! ramps up linearly over the listener's `slow_start` instead of taking its full share at once.
//!
//! The rule, after Envoy's slow start (linear, `min_weight_percent` 10):
//! - The ramp has [`STEPS`] steps: during step `k` (from `k / STEPS` of the window to
//!   `(k + 1) / STEPS`), the weight is `configured x k / STEPS`, rounded down, but never less
//!   than [`MIN_WEIGHT_PERCENT`] of the configured weight, rounded up, and never 0, so the
//!   backend gets some traffic from the start. From the end of the window on, it is the
//!   configured weight. A configured weight of 0 (draining) stays 0.
//! - With a configured weight of 100 that is 10 until 15% of the window, then 15, 20, ... 95,
//!   and 100 at the end; 25 at a quarter and 50 at half of it.
//! - The weight changes only at step boundaries, so the control plane republishes a snapshot at
//!   most [`STEPS`] times per ramp: [`Ramp::next_change`] says when.
//! - A zero `slow_start` turns the ramp off. A backend that goes down during its ramp starts a
//!   new one when it comes back.

use std::time::{Duration, Instant};

use crate::later;

/// Steps of one ramp: the weight changes every twentieth of the window.
pub const STEPS: u32 = 20;

/// The weight a ramp starts from, as a share of the configured weight (rounded up, at least 1).
pub const MIN_WEIGHT_PERCENT: u32 = 10;

/// The first step whose share can exceed the starting weight.
const FIRST_STEP: u32 = STEPS * MIN_WEIGHT_PERCENT / 100 + 1;

/// One backend's ramp: it came back `since`, and ramps over `length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ramp {
    /// When the backend came back up.
    pub since: Instant,
    /// The listener's `slow_start`; zero means no ramp.
    pub length: Duration,
}

impl Ramp {
    /// The effective weight at `now` of a backend configured with weight `configured`.
    pub fn weight(&self, configured: u16, now: Instant) -> u16 {
        let configured = u32::from(configured);
        let share = configured * self.step(now) / STEPS;
        let floor = (configured * MIN_WEIGHT_PERCENT).div_ceil(100).max(1);
        // Both are at most `configured`, a u16 (and 0 only when it is 0).
        u16::try_from(share.max(floor).min(configured)).unwrap_or(u16::MAX)
    }

    /// The step `now` falls in, `0..=STEPS`; `STEPS` once the ramp is over.
    pub fn step(&self, now: Instant) -> u32 {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= self.length {
            return STEPS;
        }
        let step = elapsed.as_nanos() * u128::from(STEPS) / self.length.as_nanos();
        // Below STEPS, since elapsed < length.
        u32::try_from(step).unwrap_or(STEPS)
    }

    /// Whether the ramp is over at `now` (the weight is the configured one).
    pub fn is_over(&self, now: Instant) -> bool {
        self.step(now) == STEPS
    }

    /// The next step boundary after `now` at which a weight can change; `None` once the ramp is
    /// over. Always later than `now`.
    pub fn next_change(&self, now: Instant) -> Option<Instant> {
        let step = self.step(now);
        if step == STEPS {
            return None;
        }
        let next = (step + 1).max(FIRST_STEP);
        let offset = (self.length.as_nanos() * u128::from(next)).div_ceil(u128::from(STEPS));
        let offset = Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX));
        Some(later(self.since, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(t0: Instant) -> Ramp {
        Ramp {
            since: t0,
            length: Duration::from_secs(100),
        }
    }

    #[test]
    fn weight_at_start_quarter_half_and_end() {
        let t0 = Instant::now();
        let at = |s: u64, w: u16| ramp(t0).weight(w, t0 + Duration::from_secs(s));
        assert_eq!(
            [at(0, 100), at(25, 100), at(50, 100), at(100, 100)],
            [10, 25, 50, 100]
        );
        assert_eq!(
            [at(0, 1000), at(25, 1000), at(50, 1000), at(100, 1000)],
            [100, 250, 500, 1000]
        );
        assert_eq!(at(99, 100), 95, "one step short of the end");
        assert_eq!(at(1000, 100), 100);
    }

    #[test]
    fn weight_is_never_zero_unless_configured_zero() {
        let t0 = Instant::now();
        for configured in [1, 2, 9, 11] {
            assert!(ramp(t0).weight(configured, t0) >= 1);
        }
        assert_eq!(ramp(t0).weight(11, t0), 2, "10% rounds up");
        assert_eq!(ramp(t0).weight(0, t0 + Duration::from_secs(50)), 0);
    }

    #[test]
    fn zero_length_is_off() {
        let t0 = Instant::now();
        let off = Ramp {
            since: t0,
            length: Duration::ZERO,
        };
        assert_eq!(off.weight(100, t0), 100);
        assert!(off.is_over(t0));
        assert_eq!(off.next_change(t0), None);
    }

    #[test]
    fn weight_changes_only_at_next_change() {
        let t0 = Instant::now();
        let ramp = ramp(t0);
        let mut now = t0;
        let mut changes = 0;
        while let Some(next) = ramp.next_change(now) {
            assert!(next > now);
            let before = ramp.weight(100, next - Duration::from_nanos(1));
            assert_eq!(ramp.weight(100, now), before, "no change before {next:?}");
            assert!(ramp.weight(100, next) > before);
            now = next;
            changes += 1;
        }
        assert_eq!(changes, STEPS - FIRST_STEP + 1);
        assert!(ramp.is_over(now));
        assert_eq!(now, t0 + ramp.length);
    }

    #[test]
    fn first_change_skips_steps_below_the_floor() {
        let t0 = Instant::now();
        assert_eq!(ramp(t0).next_change(t0), Some(t0 + Duration::from_secs(15)));
    }
}
