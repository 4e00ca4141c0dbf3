//! One backend's health as a state machine: probe outcomes, passive reports and time go in,
//! [`Transition`]s come out, each with the [`Reason`] the control plane logs once and then
//! publishes as a new snapshot.
//!
//! Three verdicts sit underneath the reported [`State`], each in its own module: the active
//! check's (rise/fall, here), passive ejection's ([`crate::ejection`]) and flap damping's
//! ([`crate::flap`]). The reported state is derived from them in one place ([`State`]'s order),
//! so that every input ends the same way: derive, compare, report the change if any.
//!
//! - **Rise/fall.** `fall` failing probes in a row take an up backend down, `rise` passing
//!   ones bring a down backend up. A backend not yet probed is `Unknown` and takes no traffic;
//!   its first probe decides at once (the control plane probes every backend once before a
//!   listener accepts). Without an active check the verdict is always up.
//! - **Time.** Ejections and flap holds end only in [`BackendHealth::tick`], which the caller
//!   runs at [`BackendHealth::next_deadline`]; other inputs never look at the clock, so a replay
//!   of the same inputs gives the same transitions.

use std::fmt;
use std::time::{Duration, Instant};

use crate::ejection::{self, Ejection};
use crate::flap::{Flap, FlapDamping};
use crate::slow_start::Ramp;
use crate::{ActiveCheck, Passive};

/// The state a backend reports (logs, metrics, snapshot). Only `Up` takes new connections;
/// none of them touches established connections.
///
/// When several verdicts apply, the first of `Flapping`, `Down`, `Ejected`, `Unknown` wins,
/// and `Up` is what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Has an active check and has not been probed yet.
    Unknown,
    /// Takes new connections.
    Up,
    /// The active check says down (`fall` probes failed, or the first one).
    Down,
    /// Taken out by passive ejection until its time passes or a probe passes.
    Ejected,
    /// Held down by flap damping until its hold ends.
    Flapping,
}

impl State {
    /// Whether a backend in this state takes new connections.
    pub fn is_available(self) -> bool {
        self == State::Up
    }

    /// The label in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Down => "down",
            State::Ejected => "ejected",
            State::Flapping => "flapping",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// How a new backend starts. Without an active check it starts `Up` whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Not probed yet: no traffic until the first probe, which decides at once.
    Unknown,
    /// Up, as if `rise` probes had passed; no slow start.
    Up,
    /// Down, as if `fall` probes had failed: `rise` probes bring it up.
    Down,
}

/// Why a transition happened; its `Display` is the log line's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The first probe passed.
    FirstProbePassed,
    /// The first probe failed, with the prober's reason.
    FirstProbeFailed { detail: String },
    /// `passes` probes passed in a row (`rise`).
    Rise { passes: u32 },
    /// `failures` probes failed in a row (`fall`); `detail` is the last one's reason.
    Fall { failures: u32, detail: String },
    /// A probe was answered with the wrong role: down at once, whatever `fall` says.
    WrongRole { actual: String, want: String },
    /// `failures` passive failures in a row ejected the backend for `duration`.
    Ejected { failures: u32, duration: Duration },
    /// The ejection's time passed.
    EjectionEnded,
    /// A passing probe ended the ejection.
    EjectionEndedByProbe,
    /// `cause` took the backend down for the `downs`-th time within `window`: it is held down
    /// for `hold`.
    Flapping {
        downs: u32,
        window: Duration,
        hold: Duration,
        cause: Box<Reason>,
    },
    /// The flap hold's time passed.
    HoldEnded,
    /// The listener's health settings changed (an active check, passive ejection or flap
    /// damping was removed).
    Reconfigured,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::FirstProbePassed => write!(f, "first probe passed"),
            Reason::FirstProbeFailed { detail } => write!(f, "first probe failed: {detail}"),
            Reason::Rise { passes } => write!(f, "rise: {passes} probes passed"),
            Reason::Fall { failures, detail } => {
                write!(f, "fall: {failures} probes failed: {detail}")
            }
            Reason::WrongRole { actual, want } => write!(f, "role is {actual}, want {want}"),
            Reason::Ejected { failures, duration } => {
                write!(
                    f,
                    "ejected for {duration:?} after {failures} consecutive failures"
                )
            }
            Reason::EjectionEnded => write!(f, "ejection time passed"),
            Reason::EjectionEndedByProbe => write!(f, "a probe passed, ending the ejection"),
            Reason::Flapping {
                downs,
                window,
                hold,
                cause,
            } => write!(
                f,
                "held down for {hold:?}: flapping, down {downs} times within {window:?} ({cause})"
            ),
            Reason::HoldEnded => write!(f, "flap hold ended"),
            Reason::Reconfigured => write!(f, "health settings changed"),
        }
    }
}

/// One change of a backend's reported state; never from a state to itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: State,
    /// The state after.
    pub to: State,
    /// Why, for the log.
    pub reason: Reason,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}: {}", self.from, self.to, self.reason)
    }
}

/// Consecutive probe counts of an active check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RiseFall {
    /// Passing probes in a row that bring a down backend up (0 counts as 1).
    pub rise: u32,
    /// Failing probes in a row that take an up backend down (0 counts as 1).
    pub fall: u32,
}

impl From<&ActiveCheck> for RiseFall {
    fn from(check: &ActiveCheck) -> Self {
        RiseFall {
            rise: check.rise,
            fall: check.fall,
        }
    }
}

/// A listener's health settings, as every one of its backends applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The active check's rise/fall; `None` when the listener has no `health:` (every backend
    /// is then up unless ejected).
    pub active: Option<RiseFall>,
    /// Passive ejection; `None` (or zeros, see [`crate::ejection`]) turns it off.
    pub passive: Option<Passive>,
    /// Flap damping; `None` turns it off.
    pub flap: Option<FlapDamping>,
    /// The slow-start ramp's length; zero turns it off.
    pub slow_start: Duration,
    /// At most one backend is available at a time (see [`crate::listener::Election`]).
    pub single_primary: bool,
}

impl Policy {
    /// A listener's policy from its config, with the default flap damping.
    pub fn new(
        active: Option<&ActiveCheck>,
        passive: Option<Passive>,
        slow_start: Duration,
    ) -> Self {
        Policy {
            active: active.map(RiseFall::from),
            passive,
            flap: Some(FlapDamping::default()),
            slow_start,
            single_primary: active.is_some_and(|a| a.single_primary),
        }
    }
}

/// The active check's own verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Unknown,
    Up,
    Down,
}

/// One backend's health. Probe outcomes and [`tick`](Self::tick) go straight here; passive
/// failures go through [`crate::ListenerHealth`], which owns the ejection limit.
#[derive(Debug, Clone)]
pub struct BackendHealth {
    policy: Policy,
    state: State,
    verdict: Verdict,
    passes: u32,
    failures: u32,
    ejection: Ejection,
    flap: Flap,
    /// When the backend last came back up (the start of its slow-start ramp).
    came_back_at: Option<Instant>,
    /// The timeline the last passing probe reported (PostgreSQL primaries only).
    timeline: Option<u64>,
}

impl BackendHealth {
    /// A backend of a listener with `policy`, starting as `start` says.
    pub fn new(policy: Policy, start: Start) -> Self {
        let verdict = match (policy.active, start) {
            (None, _) | (Some(_), Start::Up) => Verdict::Up,
            (Some(_), Start::Unknown) => Verdict::Unknown,
            (Some(_), Start::Down) => Verdict::Down,
        };
        let mut backend = BackendHealth {
            policy,
            state: State::Unknown,
            verdict,
            passes: 0,
            failures: 0,
            ejection: Ejection::default(),
            flap: Flap::default(),
            came_back_at: None,
            timeline: None,
        };
        backend.state = backend.derive();
        backend
    }

    /// The reported state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the backend takes new connections.
    pub fn is_available(&self) -> bool {
        self.state.is_available()
    }

    /// Whether a passive ejection is running, even when another state is reported over it;
    /// these count against the listener's `max_ejection_percent`.
    pub fn is_ejected(&self) -> bool {
        self.ejection.until().is_some()
    }

    /// Passive ejections so far.
    pub fn ejections(&self) -> u64 {
        self.ejection.count()
    }

    /// Flap holds so far.
    pub fn holds(&self) -> u64 {
        self.flap.holds()
    }

    /// The policy the backend applies.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The timeline the last passing probe reported; `None` when it reported none.
    pub fn timeline(&self) -> Option<u64> {
        self.timeline
    }

    /// A probe passed: counts toward `rise`, decides at once when it is the first, and ends a
    /// running ejection. Ignored without an active check.
    pub fn probe_passed(&mut self, now: Instant) -> Option<Transition> {
        self.probe_passed_on(now, None)
    }

    /// A probe passed and reported the backend's `timeline` (a PostgreSQL primary's), which
    /// decides between two backends that both claim the primary role.
    pub fn probe_passed_on(&mut self, now: Instant, timeline: Option<u64>) -> Option<Transition> {
        let rise_fall = self.policy.active?;
        self.timeline = timeline;
        self.failures = 0;
        self.passes = self.passes.saturating_add(1);
        let ejection_ended = self.ejection.end(now);
        let reason = match self.verdict {
            Verdict::Unknown => Reason::FirstProbePassed,
            Verdict::Down if self.passes >= rise_fall.rise.max(1) => Reason::Rise {
                passes: self.passes,
            },
            Verdict::Up if ejection_ended => Reason::EjectionEndedByProbe,
            _ => return None,
        };
        self.verdict = Verdict::Up;
        self.settle(now, reason)
    }

    /// A probe failed for `detail` (the prober's reason, for the log): counts toward `fall`,
    /// and decides at once when it is the first. Ignored without an active check.
    pub fn probe_failed(&mut self, now: Instant, detail: &str) -> Option<Transition> {
        let rise_fall = self.policy.active?;
        self.passes = 0;
        self.failures = self.failures.saturating_add(1);
        let reason = match self.verdict {
            Verdict::Unknown => Reason::FirstProbeFailed {
                detail: detail.to_owned(),
            },
            Verdict::Up if self.failures >= rise_fall.fall.max(1) => Reason::Fall {
                failures: self.failures,
                detail: detail.to_owned(),
            },
            _ => return None,
        };
        self.verdict = Verdict::Down;
        self.settle(now, reason)
    }

    /// A probe was answered, with the wrong role (`actual`, where the check wants `want`): the
    /// backend goes down at once, whatever `fall` says, since a wrong role is an answer, not a
    /// missed probe. Ignored without an active check.
    pub fn probe_wrong_role(
        &mut self,
        now: Instant,
        actual: &str,
        want: &str,
    ) -> Option<Transition> {
        self.policy.active?;
        self.passes = 0;
        self.failures = self.failures.saturating_add(1);
        self.timeline = None;
        if self.verdict == Verdict::Down {
            return None;
        }
        self.verdict = Verdict::Down;
        let reason = Reason::WrongRole {
            actual: actual.to_owned(),
            want: want.to_owned(),
        };
        self.settle(now, reason)
    }

    /// A connect to the backend succeeded: its passive failure count starts again. Never
    /// changes the state.
    pub fn passive_success(&mut self) {
        self.ejection.success();
    }

    /// Ends ejections and flap holds whose time has passed.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        let hold_ended = self.flap.end_if_due(now);
        let ejection_ended = self.ejection.end_if_due(now);
        let reason = if hold_ended {
            Reason::HoldEnded
        } else if ejection_ended {
            Reason::EjectionEnded
        } else {
            return None;
        };
        self.settle(now, reason)
    }

    /// When [`tick`](Self::tick) next has work: the end of the running ejection or flap hold.
    /// After `tick(now)` it is `None` or later than `now`.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.ejection.until(), self.flap.held_until()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The backend's slow-start ramp, from its last return to `Up`; `None` when it never came
    /// back or slow start is off. The ramp may be over.
    pub fn ramp(&self) -> Option<Ramp> {
        let since = self.came_back_at?;
        let length = self.policy.slow_start;
        (!length.is_zero()).then_some(Ramp { since, length })
    }

    /// The weight to publish at `now` for a backend configured with `configured`: lower during
    /// a slow-start ramp (see [`crate::slow_start`]), `configured` otherwise.
    pub fn effective_weight(&self, configured: u16, now: Instant) -> u16 {
        match self.ramp() {
            Some(ramp) => ramp.weight(configured, now),
            None => configured,
        }
    }

    /// When the effective weight can next change (a ramp step); `None` outside a ramp.
    pub fn next_weight_change(&self, now: Instant) -> Option<Instant> {
        self.ramp()?.next_change(now)
    }

    /// A passive failure, ejecting the backend when it reaches `consecutive_failures` and the
    /// listener's limit allows (`may_eject`).
    pub(crate) fn passive_failure(&mut self, now: Instant, may_eject: bool) -> Option<Transition> {
        let passive = self.policy.passive.filter(ejection::enabled)?;
        if !self.is_available() {
            return None;
        }
        let failures = self.ejection.failure();
        if failures < passive.consecutive_failures || !may_eject {
            return None;
        }
        let duration = self.ejection.start(now, &passive);
        self.settle(now, Reason::Ejected { failures, duration })
    }

    /// Applies a new policy. Counters and back-off levels stay; what the new policy no longer
    /// has ends now (no active check: up; no passive ejection or flap damping: their running
    /// ejection or hold ends).
    pub(crate) fn set_policy(&mut self, policy: Policy, now: Instant) -> Option<Transition> {
        self.policy = policy;
        if policy.active.is_none() {
            self.verdict = Verdict::Up;
        }
        if !policy.passive.is_some_and(|p| ejection::enabled(&p)) {
            self.ejection.end(now);
        }
        if policy.flap.is_none() {
            self.flap.end(now);
        }
        self.settle(now, Reason::Reconfigured)
    }

    /// The state the verdicts say, in [`State`]'s order.
    fn derive(&self) -> State {
        if self.flap.held_until().is_some() {
            State::Flapping
        } else if self.verdict == Verdict::Down {
            State::Down
        } else if self.is_ejected() {
            State::Ejected
        } else if self.verdict == Verdict::Unknown {
            State::Unknown
        } else {
            State::Up
        }
    }

    /// Reports the change, if any, that the verdicts make to the state: a down may become a
    /// flap, a return to `Up` starts the slow-start ramp.
    fn settle(&mut self, now: Instant, reason: Reason) -> Option<Transition> {
        let from = self.state;
        let mut to = self.derive();
        if to == from {
            return None;
        }
        let mut reason = reason;
        if from.is_available()
            && let Some(damping) = self.policy.flap
            && let Some(hold) = self.flap.went_down(now, &damping)
        {
            let cause = Box::new(reason);
            reason = Reason::Flapping {
                downs: damping.threshold(),
                window: damping.window,
                hold,
                cause,
            };
            to = State::Flapping;
        }
        if to.is_available() {
            self.came_back_at = (from != State::Unknown).then_some(now);
        }
        self.state = to;
        Some(Transition { from, to, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSED: &str = "connect refused";

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn policy(rise: u32, fall: u32) -> Policy {
        Policy {
            active: Some(RiseFall { rise, fall }),
            passive: Some(Passive::default()),
            flap: Some(FlapDamping::default()),
            slow_start: Duration::ZERO,
            single_primary: false,
        }
    }

    fn moved(t: Option<Transition>) -> (State, State) {
        let t = t.expect("a transition");
        (t.from, t.to)
    }

    #[test]
    fn fall_takes_exactly_fall_failures_and_rise_exactly_rise_passes() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new(policy(2, 3), Start::Up);
        assert_eq!(b.probe_failed(t0, REFUSED), None);
        assert_eq!(b.probe_failed(t0, REFUSED), None);
        let down = b.probe_failed(t0, REFUSED).unwrap();
        assert_eq!((down.from, down.to), (State::Up, State::Down));
        assert_eq!(
            down.to_string(),
            "up -> down: fall: 3 probes failed: connect refused"
        );
        assert_eq!(b.probe_failed(t0, REFUSED), None, "already down");
        assert_eq!(b.probe_passed(t0), None);
        let up = b.probe_passed(t0).unwrap();
        assert_eq!(up.reason, Reason::Rise { passes: 2 });
        assert_eq!(up.to_string(), "down -> up: rise: 2 probes passed");
        assert_eq!(b.probe_passed(t0), None, "already up");
    }

    #[test]
    fn an_opposite_outcome_restarts_the_count() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new(policy(2, 2), Start::Down);
        assert_eq!(b.probe_passed(t0), None);
        assert_eq!(b.probe_failed(t0, REFUSED), None);
        assert_eq!(b.probe_passed(t0), None);
        assert_eq!(moved(b.probe_passed(t0)), (State::Down, State::Up));
        assert_eq!(b.probe_failed(t0, REFUSED), None);
        assert_eq!(b.probe_passed(t0), None);
        assert_eq!(b.probe_failed(t0, REFUSED), None);
        assert_eq!(moved(b.probe_failed(t0, REFUSED)), (State::Up, State::Down));
    }

    #[test]
    fn first_probe_decides_at_once() {
        let t0 = Instant::now();
        let mut passed = BackendHealth::new(policy(5, 5), Start::Unknown);
        assert_eq!(passed.state(), State::Unknown);
        assert!(
            !passed.is_available(),
            "no traffic to a backend of unknown role"
        );
        let t = passed.probe_passed(t0).unwrap();
        assert_eq!(
            (t.from, t.to, t.reason),
            (State::Unknown, State::Up, Reason::FirstProbePassed)
        );
        assert_eq!(passed.ramp(), None, "no slow start at process start");

        let mut failed = BackendHealth::new(policy(5, 5), Start::Unknown);
        let t = failed.probe_failed(t0, "role is replica").unwrap();
        assert_eq!((t.from, t.to), (State::Unknown, State::Down));
        assert_eq!(
            t.to_string(),
            "unknown -> down: first probe failed: role is replica"
        );
    }

    #[test]
    fn without_an_active_check_a_backend_is_up_and_probes_are_ignored() {
        let t0 = Instant::now();
        let no_check = Policy {
            active: None,
            ..policy(1, 1)
        };
        for start in [Start::Unknown, Start::Up, Start::Down] {
            let mut b = BackendHealth::new(no_check, start);
            assert_eq!(b.state(), State::Up);
            assert_eq!(b.probe_failed(t0, REFUSED), None);
            assert_eq!(b.state(), State::Up);
        }
    }

    #[test]
    fn one_or_two_down_up_cycles_never_hold_the_third_does() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new(policy(1, 1), Start::Up);
        for cycle in 0..2 {
            let at = t0 + secs(10 * cycle);
            assert_eq!(moved(b.probe_failed(at, REFUSED)), (State::Up, State::Down));
            assert_eq!(
                moved(b.probe_passed(at + secs(2))),
                (State::Down, State::Up)
            );
        }
        let held = b.probe_failed(t0 + secs(20), REFUSED).unwrap();
        assert_eq!((held.from, held.to), (State::Up, State::Flapping));
        assert_eq!(
            held.to_string(),
            "up -> flapping: held down for 60s: flapping, down 3 times within 60s \
             (fall: 1 probes failed: connect refused)"
        );
        assert_eq!(b.next_deadline(), Some(t0 + secs(80)));
        assert_eq!(
            b.probe_passed(t0 + secs(22)),
            None,
            "a passing probe does not end a hold"
        );
        assert_eq!(b.tick(t0 + secs(79)), None);
        let back = b.tick(t0 + secs(80)).unwrap();
        assert_eq!(
            (back.from, back.to, back.reason),
            (State::Flapping, State::Up, Reason::HoldEnded)
        );
        assert_eq!(b.holds(), 1);
        assert_eq!(b.next_deadline(), None);
    }

    #[test]
    fn a_hold_ends_in_the_state_the_probes_decided_meanwhile() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new(policy(1, 1), Start::Up);
        for s in [0, 2, 4] {
            b.probe_failed(t0 + secs(s), REFUSED);
            b.probe_passed(t0 + secs(s + 1));
        }
        assert_eq!(b.state(), State::Flapping);
        b.probe_failed(t0 + secs(30), REFUSED);
        assert_eq!(moved(b.tick(t0 + secs(64))), (State::Flapping, State::Down));
    }

    #[test]
    fn slow_start_ramps_after_a_return_only() {
        let t0 = Instant::now();
        let ramped = Policy {
            slow_start: secs(100),
            ..policy(1, 1)
        };
        let mut b = BackendHealth::new(ramped, Start::Up);
        assert_eq!(b.effective_weight(100, t0), 100, "no ramp at start");
        assert_eq!(b.next_weight_change(t0), None);
        b.probe_failed(t0, REFUSED);
        b.probe_passed(t0 + secs(10));
        let at = |s: u64| b.effective_weight(100, t0 + secs(10 + s));
        assert_eq!([at(0), at(25), at(50), at(100)], [10, 25, 50, 100]);
        assert_eq!(b.next_weight_change(t0 + secs(10)), Some(t0 + secs(25)));
        assert_eq!(b.next_weight_change(t0 + secs(110)), None);

        let mut off = BackendHealth::new(policy(1, 1), Start::Up);
        off.probe_failed(t0, REFUSED);
        off.probe_passed(t0 + secs(10));
        assert_eq!(
            off.effective_weight(100, t0 + secs(10)),
            100,
            "zero slow_start is off"
        );
    }

    #[test]
    fn passive_ejection_is_refused_without_the_listeners_leave() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new(policy(1, 1), Start::Up);
        for _ in 0..10 {
            assert_eq!(b.passive_failure(t0, false), None);
        }
        assert_eq!(b.state(), State::Up);
        let t = b.passive_failure(t0, true).unwrap();
        assert_eq!(
            t.to_string(),
            "up -> ejected: ejected for 10s after 11 consecutive failures"
        );
    }

    #[test]
    fn a_fall_during_an_ejection_reports_down_and_rise_ends_both() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new(policy(2, 1), Start::Up);
        for _ in 0..4 {
            b.passive_failure(t0, true);
        }
        assert_eq!(
            moved(b.passive_failure(t0, true)),
            (State::Up, State::Ejected)
        );
        assert_eq!(
            moved(b.probe_failed(t0 + secs(1), REFUSED)),
            (State::Ejected, State::Down)
        );
        assert_eq!(
            b.probe_passed(t0 + secs(2)),
            None,
            "ends the ejection; rise not reached"
        );
        assert!(!b.is_ejected());
        assert_eq!(b.tick(t0 + secs(10)), None);
        assert_eq!(
            moved(b.probe_passed(t0 + secs(12))),
            (State::Down, State::Up)
        );
    }

    #[test]
    fn a_wrong_role_takes_a_backend_down_at_once_whatever_fall_says() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new(policy(2, 3), Start::Up);
        let t = b.probe_wrong_role(t0, "replica", "master").unwrap();
        assert_eq!(
            (t.from, t.to, t.reason.clone()),
            (
                State::Up,
                State::Down,
                Reason::WrongRole {
                    actual: "replica".to_owned(),
                    want: "master".to_owned()
                }
            )
        );
        assert_eq!(t.to_string(), "up -> down: role is replica, want master");
        assert_eq!(
            b.probe_wrong_role(t0, "replica", "master"),
            None,
            "already down"
        );
        assert_eq!(
            b.probe_passed(t0),
            None,
            "rise still applies on the way back"
        );
        assert_eq!(moved(b.probe_passed(t0)), (State::Down, State::Up));

        let mut first = BackendHealth::new(policy(2, 3), Start::Unknown);
        let t = first.probe_wrong_role(t0, "primary", "standby").unwrap();
        assert_eq!(
            t.to_string(),
            "unknown -> down: role is primary, want standby"
        );

        let mut plain = BackendHealth::new(policy(2, 3), Start::Up);
        assert_eq!(
            plain.probe_failed(t0, "role is replica"),
            None,
            "a plain failure waits for fall"
        );
    }

    #[test]
    fn a_passing_probe_records_its_timeline_and_a_wrong_role_clears_it() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new(policy(1, 1), Start::Unknown);
        b.probe_passed_on(t0, Some(3));
        assert_eq!(b.timeline(), Some(3));
        b.probe_wrong_role(t0, "standby", "primary");
        assert_eq!(b.timeline(), None);
    }

    #[test]
    fn reconfigure_without_an_active_check_brings_down_backends_up() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new(policy(1, 1), Start::Down);
        let t = b
            .set_policy(
                Policy {
                    active: None,
                    ..policy(1, 1)
                },
                t0,
            )
            .unwrap();
        assert_eq!(
            (t.from, t.to, t.reason),
            (State::Down, State::Up, Reason::Reconfigured)
        );
    }
}
