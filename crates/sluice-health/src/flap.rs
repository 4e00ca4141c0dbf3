//! Flap damping: a backend whose availability changes too often is held down for a growing
//! period, so that a backend that cannot make up its mind does not make the control plane
//! rebuild the snapshot (and move clients between backends) on every probe.
//!
//! The rule is a sliding window over *downs*. A down is a change from available (`Up`) to not
//! available, whatever the cause: failing probes, a passive ejection.
//! - A down that comes within `window` after `downs - 1` other downs is a *flap*: instead of
//!   going `Down` or `Ejected`, the backend goes `Flapping` and is held there for
//!   `window x 2^level`, at most `hold_max`. The level grows by one with each hold (until the
//!   hold reaches `hold_max`) and drops by one for each full `window` between the end of one
//!   hold and the start of the next, so a backend that keeps flapping is held longer and
//!   longer, and one that settled down starts again from the short hold.
//! - `downs` is at least 2: one down/up cycle is one down, and never counts as flapping.
//! - While held, probes and passive reports still count underneath; when the hold ends the
//!   backend takes the state they decided (often `Up`, sometimes `Down` or `Ejected`). A
//!   passing probe does not end a hold: holding is the point.
//!
//! **The bound.** Every hold lasts at least `window` and starts at a down, so no interval of
//! length `window` contains more than `downs` downs, whatever the probes and workers report
//! (the `downs`-th one starts a hold that outlasts the interval). Hence at most `2 x downs + 1`
//! changes of availability per `window`. Counting every reported transition, including those
//! between two unavailable states: one period out of `Up` is entered once, left at most once,
//! and inside it can only move forward along `Flapping -> Ejected -> Down` (a hold starts only
//! at a down, an ejection only while `Up`, and `Down` ends only by `rise`, which also ends any
//! ejection), so it holds at most 4 transitions. At most `downs` such periods start within one
//! window, plus one already running when it opens: at most `4 x (downs + 1)` transitions per
//! `window`, for any backend and any inputs, as long as the policy is not changed meanwhile.
//! [`FlapDamping::transitions_max`] computes this bound over any span. In the long run, a
//! backend that keeps flapping makes at most `downs` downs per `hold_max` plus the time it takes
//! it to go down `downs` times.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::later;

/// When a backend counts as flapping and how long it is then held down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlapDamping {
    /// Downs within `window` that make the last of them a flap; clamped to `2..=64` (one
    /// down/up cycle never counts as flapping).
    pub downs: u32,
    /// The sliding window, and the first hold's length. A zero window sees no two downs
    /// together, so it turns damping off, like a policy without damping.
    pub window: Duration,
    /// The longest hold; never less than `window`.
    pub hold_max: Duration,
}

impl Default for FlapDamping {
    /// The 3rd down within 60 s holds the backend for 60 s, then 120 s, 240 s, 480 s, 600 s.
    fn default() -> Self {
        FlapDamping {
            downs: 3,
            window: Duration::from_secs(60),
            hold_max: Duration::from_secs(600),
        }
    }
}

impl FlapDamping {
    /// `downs`, clamped to the range the rule and its bound need.
    pub fn threshold(&self) -> u32 {
        self.downs.clamp(2, 64)
    }

    /// The hold at `level` (0 for the first): `window x 2^level`, at most `hold_max` (and at
    /// least `window`, which the bound needs).
    pub fn hold(&self, level: u32) -> Duration {
        let factor = 1u32 << level.min(31);
        let hold = self.window.checked_mul(factor).unwrap_or(Duration::MAX);
        hold.min(self.hold_max.max(self.window))
    }

    /// The documented bound: the most transitions one backend can report within any `span`,
    /// `4 x (downs + 1)` per started `window` (see the module's documentation). `u64::MAX` for
    /// a zero window, which turns damping off.
    pub fn transitions_max(&self, span: Duration) -> u64 {
        if self.window.is_zero() {
            return u64::MAX;
        }
        let windows = span.as_nanos() / self.window.as_nanos() + 1;
        let per_window = 4 * (u128::from(self.threshold()) + 1);
        u64::try_from(windows * per_window).unwrap_or(u64::MAX)
    }
}

/// One backend's damping state: its recent downs and its current hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct Flap {
    /// Downs within the last window, oldest first; fewer than the threshold.
    downs: VecDeque<Instant>,
    held_until: Option<Instant>,
    /// Doublings of the next hold.
    level: u32,
    hold_ended_at: Option<Instant>,
    holds: u64,
}

impl Flap {
    /// When the current hold ends, if one is running.
    pub(crate) fn held_until(&self) -> Option<Instant> {
        self.held_until
    }

    /// Holds started so far.
    pub(crate) fn holds(&self) -> u64 {
        self.holds
    }

    /// Records a down at `now`; returns the hold it starts when it is a flap.
    pub(crate) fn went_down(&mut self, now: Instant, damping: &FlapDamping) -> Option<Duration> {
        self.downs
            .retain(|&down| now.saturating_duration_since(down) < damping.window);
        if self.downs.len() + 1 < damping.threshold() as usize {
            self.downs.push_back(now);
            return None;
        }
        // Counting starts afresh after a hold; the hold outlasts the window anyway.
        self.downs.clear();
        Some(self.start_hold(now, damping))
    }

    /// Ends the hold if its time has come; true when it did.
    pub(crate) fn end_if_due(&mut self, now: Instant) -> bool {
        match self.held_until {
            Some(until) if until <= now => {
                self.end(now);
                true
            }
            _ => false,
        }
    }

    /// Ends any hold now (damping was turned off); true when one was running.
    pub(crate) fn end(&mut self, now: Instant) -> bool {
        let held = self.held_until.take().is_some();
        if held {
            self.hold_ended_at = Some(now);
        }
        held
    }

    fn start_hold(&mut self, now: Instant, damping: &FlapDamping) -> Duration {
        if let Some(ended) = self.hold_ended_at {
            let quiet = now.saturating_duration_since(ended).as_nanos();
            let steps = quiet / damping.window.as_nanos().max(1);
            self.level = self
                .level
                .saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX));
        }
        let hold = damping.hold(self.level);
        if hold < damping.hold_max {
            self.level += 1;
        }
        self.held_until = Some(later(now, hold));
        self.holds += 1;
        hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn hold_doubles_from_window_up_to_hold_max() {
        let damping = FlapDamping::default();
        let holds: Vec<u64> = (0..7).map(|l| damping.hold(l).as_secs()).collect();
        assert_eq!(holds, [60, 120, 240, 480, 600, 600, 600]);
        let short_max = FlapDamping {
            hold_max: secs(1),
            ..damping
        };
        assert_eq!(
            short_max.hold(3),
            secs(60),
            "a hold never undercuts the window"
        );
    }

    #[test]
    fn threshold_is_clamped_so_one_cycle_never_flaps() {
        for downs in [0, 1, 2] {
            assert_eq!(
                FlapDamping {
                    downs,
                    ..Default::default()
                }
                .threshold(),
                2
            );
        }
        let many = FlapDamping {
            downs: 1000,
            ..Default::default()
        };
        assert_eq!(many.threshold(), 64);
    }

    #[test]
    fn third_down_within_window_holds_and_downs_outside_do_not() {
        let damping = FlapDamping::default();
        let t0 = Instant::now();
        let mut flap = Flap::default();
        assert_eq!(flap.went_down(t0, &damping), None);
        assert_eq!(flap.went_down(t0 + secs(30), &damping), None);
        // The first down left the window at t0 + 60 s: two in the window, no flap.
        assert_eq!(flap.went_down(t0 + secs(60), &damping), None);
        assert_eq!(flap.went_down(t0 + secs(61), &damping), Some(secs(60)));
        assert_eq!(flap.held_until(), Some(t0 + secs(121)));
        assert!(!flap.end_if_due(t0 + secs(120)));
        assert!(flap.end_if_due(t0 + secs(121)));
        assert_eq!(flap.holds(), 1);
    }

    #[test]
    fn level_grows_while_flapping_and_decays_per_quiet_window() {
        let damping = FlapDamping {
            downs: 2,
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut flap = Flap::default();
        let mut now = t0;
        let hold_at = |flap: &mut Flap, now: Instant| {
            assert_eq!(flap.went_down(now, &damping), None);
            let hold = flap.went_down(now + secs(1), &damping).unwrap();
            assert!(flap.end_if_due(now + secs(1) + hold));
            (hold, now + secs(1) + hold)
        };
        let mut holds = Vec::new();
        for _ in 0..3 {
            let (hold, end) = hold_at(&mut flap, now);
            holds.push(hold.as_secs());
            now = end;
        }
        assert_eq!(holds, [60, 120, 240]);
        // Two quiet windows bring the level from 3 back to 1.
        let (hold, _) = hold_at(&mut flap, now + secs(120));
        assert_eq!(hold, secs(120));
    }

    #[test]
    fn transitions_max_counts_started_windows() {
        let damping = FlapDamping::default();
        assert_eq!(damping.transitions_max(Duration::ZERO), 16);
        assert_eq!(damping.transitions_max(secs(59)), 16);
        assert_eq!(damping.transitions_max(secs(600)), 11 * 16);
        let off = FlapDamping {
            window: Duration::ZERO,
            ..damping
        };
        assert_eq!(off.transitions_max(secs(1)), u64::MAX);
    }
}
