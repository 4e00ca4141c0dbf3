//! All the backends of one listener: the one place that knows how many are ejected, so the one
//! place that may eject (`max_ejection_percent` is a limit across backends, which no single
//! backend can enforce). It also carries per-backend state across reloads, keyed by whatever
//! stable key the caller uses (a `SocketAddr`, a name), because a backend that stays in the
//! config keeps its counters, back-off levels and ramp.
//!
//! With `single_primary`, it also decides which backend holds the primary role ([`Election`]):
//! at most one is available at a time, and availability is always read from the current
//! election, so a snapshot built from it never has two primaries up, not even for the instant
//! the role moves from one to the other.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use crate::ejection::ejected_max;
use crate::state::{BackendHealth, Policy, Start, Transition};

/// Who holds the primary role among the backends of a `single_primary` listener. The
/// claimants are the backends that are up by their own verdicts (their role check passes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election<K> {
    /// No backend claims the role.
    Vacant,
    /// `primary` takes new connections; `outranked` claim the role too, on lower timelines
    /// (PostgreSQL: the higher timeline is the later promotion).
    Held { primary: K, outranked: Vec<K> },
    /// Several backends claim the role and none outranks the others (Redis, or PostgreSQL on
    /// equal timelines): none takes new connections until all but one step down.
    Contested { claimants: Vec<K> },
}

impl<K> Election<K> {
    /// The backend that takes new connections, if any.
    pub fn primary(&self) -> Option<&K> {
        match self {
            Election::Held { primary, .. } => Some(primary),
            _ => None,
        }
    }
}

impl<K: fmt::Display> fmt::Display for Election<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<K: fmt::Display>(keys: &[K]) -> String {
            keys.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
        match self {
            Election::Vacant => f.write_str("no backend claims the primary role"),
            Election::Held { primary, outranked } if outranked.is_empty() => {
                write!(f, "{primary} is the primary")
            }
            Election::Held { primary, outranked } => write!(
                f,
                "{primary} is the primary: its timeline is higher than that of {}",
                list(outranked)
            ),
            Election::Contested { claimants } => write!(
                f,
                "{} all claim the primary role: none takes new connections until one steps down",
                list(claimants)
            ),
        }
    }
}

/// The health of every backend of one listener, keyed by `K`. Inputs for a key that is not
/// there (a probe result for a backend a reload just removed) are ignored.
#[derive(Debug, Clone)]
pub struct ListenerHealth<K> {
    policy: Policy,
    /// A `BTreeMap`, so that `tick` reports in a stable order and replays exactly.
    backends: BTreeMap<K, BackendHealth>,
    /// The election as last returned by [`election_changed`](Self::election_changed).
    reported: Election<K>,
}

impl<K: Ord + Clone> ListenerHealth<K> {
    /// A listener with `policy` and no backends yet.
    pub fn new(policy: Policy) -> Self {
        ListenerHealth {
            policy,
            backends: BTreeMap::new(),
            reported: Election::Vacant,
        }
    }

    /// The policy every backend applies.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Adds a backend starting as `start`; false (and its state kept) when it is already there.
    pub fn insert(&mut self, key: K, start: Start) -> bool {
        if self.backends.contains_key(&key) {
            return false;
        }
        self.backends
            .insert(key, BackendHealth::new(self.policy, start));
        true
    }

    /// Removes a backend, returning its last health.
    pub fn remove(&mut self, key: &K) -> Option<BackendHealth> {
        self.backends.remove(key)
    }

    /// After a reload: keeps the backends in `keys` that were already here, with their state,
    /// adds the new ones starting as `start`, and removes the others. Ejections already running
    /// stay, even when fewer backends now allow fewer; no new one starts until under the limit.
    pub fn set_backends(&mut self, keys: impl IntoIterator<Item = K>, start: Start) {
        let mut kept = BTreeMap::new();
        for key in keys {
            if kept.contains_key(&key) {
                continue;
            }
            let health = self
                .backends
                .remove(&key)
                .unwrap_or_else(|| BackendHealth::new(self.policy, start));
            kept.insert(key, health);
        }
        self.backends = kept;
    }

    /// After a reload that changed the health settings: every backend applies `policy` from
    /// now on, keeping its counters and back-off levels. What the new policy no longer has ends
    /// now: without an active check every backend is up, without passive ejection or flap
    /// damping running ejections or holds end. Returns the transitions this causes.
    pub fn reconfigure(&mut self, policy: Policy, now: Instant) -> Vec<(K, Transition)> {
        self.policy = policy;
        self.each(|backend| backend.set_policy(policy, now))
    }

    /// One backend's health.
    pub fn backend(&self, key: &K) -> Option<&BackendHealth> {
        self.backends.get(key)
    }

    /// Every backend, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &BackendHealth)> {
        self.backends.iter()
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether there are no backends.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// A probe of `key` passed (see [`BackendHealth::probe_passed`]).
    pub fn probe_passed(&mut self, key: &K, now: Instant) -> Option<Transition> {
        self.backends.get_mut(key)?.probe_passed(now)
    }

    /// A probe of `key` passed and reported its `timeline` (see
    /// [`BackendHealth::probe_passed_on`]).
    pub fn probe_passed_on(
        &mut self,
        key: &K,
        now: Instant,
        timeline: Option<u64>,
    ) -> Option<Transition> {
        self.backends.get_mut(key)?.probe_passed_on(now, timeline)
    }

    /// A probe of `key` was answered with the wrong role (see
    /// [`BackendHealth::probe_wrong_role`]).
    pub fn probe_wrong_role(
        &mut self,
        key: &K,
        now: Instant,
        actual: &str,
        want: &str,
    ) -> Option<Transition> {
        self.backends
            .get_mut(key)?
            .probe_wrong_role(now, actual, want)
    }

    /// A probe of `key` failed for `detail` (see [`BackendHealth::probe_failed`]).
    pub fn probe_failed(&mut self, key: &K, now: Instant, detail: &str) -> Option<Transition> {
        self.backends.get_mut(key)?.probe_failed(now, detail)
    }

    /// A worker saw a connect to `key` fail, or `key` reset a connection. Ejects it when this
    /// makes `consecutive_failures` in a row and fewer than [`ejected_max`](Self::ejected_max)
    /// backends are ejected.
    pub fn passive_failure(&mut self, key: &K, now: Instant) -> Option<Transition> {
        let may_eject = self.ejected() < self.ejected_max();
        self.backends.get_mut(key)?.passive_failure(now, may_eject)
    }

    /// A worker's connect to `key` succeeded.
    pub fn passive_success(&mut self, key: &K) {
        if let Some(backend) = self.backends.get_mut(key) {
            backend.passive_success();
        }
    }

    /// Ends every ejection and flap hold whose time has passed; returns the transitions, in key
    /// order.
    pub fn tick(&mut self, now: Instant) -> Vec<(K, Transition)> {
        self.each(|backend| backend.tick(now))
    }

    /// When [`tick`](Self::tick) next has work; after `tick(now)`, `None` or later than `now`.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.backends
            .values()
            .filter_map(BackendHealth::next_deadline)
            .min()
    }

    /// When some backend's effective weight can next change (a slow-start step): republish
    /// then.
    pub fn next_weight_change(&self, now: Instant) -> Option<Instant> {
        self.backends
            .values()
            .filter_map(|backend| backend.next_weight_change(now))
            .min()
    }

    /// Whether `key` takes new connections (false for an unknown key): it is up, and with
    /// `single_primary` it is also the elected primary.
    pub fn is_available(&self, key: &K) -> bool {
        let up = self
            .backends
            .get(key)
            .is_some_and(BackendHealth::is_available);
        up && (!self.policy.single_primary || self.election().primary() == Some(key))
    }

    /// The backends that take new connections, in key order.
    pub fn available(&self) -> impl Iterator<Item = &K> {
        let primary = self
            .policy
            .single_primary
            .then(|| self.election().primary().cloned());
        self.backends
            .iter()
            .filter(move |(key, backend)| {
                backend.is_available() && primary.as_ref().is_none_or(|p| p.as_ref() == Some(*key))
            })
            .map(|(key, _)| key)
    }

    /// Who holds the primary role now, from the backends' current states; always
    /// [`Election::Vacant`] without `single_primary`. A claimant outranks the others only when
    /// every claimant reported a timeline and its own is the one highest.
    pub fn election(&self) -> Election<K> {
        if !self.policy.single_primary {
            return Election::Vacant;
        }
        let claimants: Vec<(&K, Option<u64>)> = self
            .backends
            .iter()
            .filter(|(_, backend)| backend.is_available())
            .map(|(key, backend)| (key, backend.timeline()))
            .collect();
        match claimants.as_slice() {
            [] => Election::Vacant,
            [(key, _)] => Election::Held {
                primary: (*key).clone(),
                outranked: Vec::new(),
            },
            _ => {
                let timelines: Option<Vec<u64>> = claimants.iter().map(|(_, t)| *t).collect();
                let highest = timelines.as_ref().and_then(|t| t.iter().max().copied());
                let leaders: Vec<&K> = claimants
                    .iter()
                    .filter(|(_, t)| timelines.is_some() && *t == highest)
                    .map(|(key, _)| *key)
                    .collect();
                match leaders.as_slice() {
                    [leader] => Election::Held {
                        primary: (*leader).clone(),
                        outranked: claimants
                            .iter()
                            .map(|(key, _)| *key)
                            .filter(|key| key != leader)
                            .cloned()
                            .collect(),
                    },
                    _ => Election::Contested {
                        claimants: claimants.iter().map(|(key, _)| (*key).clone()).collect(),
                    },
                }
            }
        }
    }

    /// The election, when it differs from the one this last returned: the caller logs it
    /// once (a contest is reported once, however long it lasts) and republishes, since a
    /// change of primary need not come with any backend's transition (a timeline that moves).
    pub fn election_changed(&mut self) -> Option<Election<K>> {
        let now = self.election();
        if now == self.reported {
            return None;
        }
        self.reported = now.clone();
        Some(now)
    }

    /// Backends with a passive ejection running (whatever state they report).
    pub fn ejected(&self) -> usize {
        self.backends.values().filter(|b| b.is_ejected()).count()
    }

    /// The most backends that may be ejected at once (see [`crate::ejection::ejected_max`]);
    /// 0 without passive ejection.
    pub fn ejected_max(&self) -> usize {
        let percent = self.policy.passive.map_or(0, |p| p.max_ejection_percent);
        ejected_max(self.backends.len(), percent)
    }

    fn each(
        &mut self,
        mut input: impl FnMut(&mut BackendHealth) -> Option<Transition>,
    ) -> Vec<(K, Transition)> {
        let mut transitions = Vec::new();
        for (key, backend) in &mut self.backends {
            if let Some(transition) = input(backend) {
                transitions.push((key.clone(), transition));
            }
        }
        transitions
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::state::{Reason, RiseFall, State};
    use crate::{FlapDamping, Passive};

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Passive defaults (5 failures, 10 s, 50%), an active check with rise 1 and fall 1, no
    /// flap damping unless a test wants it.
    fn policy() -> Policy {
        Policy {
            active: Some(RiseFall { rise: 1, fall: 1 }),
            passive: Some(Passive::default()),
            flap: None,
            slow_start: Duration::ZERO,
            single_primary: false,
        }
    }

    fn listener(backends: u32, policy: Policy) -> ListenerHealth<u32> {
        let mut listener = ListenerHealth::new(policy);
        listener.set_backends(0..backends, Start::Up);
        listener
    }

    /// `n` passive failures of `key`; the transition of the last one.
    fn fail(l: &mut ListenerHealth<u32>, key: u32, n: u32, now: Instant) -> Option<Transition> {
        let mut last = None;
        for _ in 0..n {
            last = l.passive_failure(&key, now);
        }
        last
    }

    #[test]
    fn ejects_after_exactly_consecutive_failures_not_one_fewer() {
        let t0 = Instant::now();
        let mut l = listener(4, policy());
        assert_eq!(fail(&mut l, 0, 4, t0), None);
        assert!(l.is_available(&0));
        let t = l.passive_failure(&0, t0).unwrap();
        assert_eq!((t.from, t.to), (State::Up, State::Ejected));
        assert_eq!(
            t.reason,
            Reason::Ejected {
                failures: 5,
                duration: secs(10)
            }
        );
        assert_eq!(l.backend(&0).unwrap().ejections(), 1);
        assert_eq!(l.available().copied().collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn a_success_in_between_restarts_the_count() {
        let t0 = Instant::now();
        let mut l = listener(4, policy());
        assert_eq!(fail(&mut l, 0, 4, t0), None);
        l.passive_success(&0);
        assert_eq!(fail(&mut l, 0, 4, t0), None);
        assert!(l.is_available(&0));
        assert!(fail(&mut l, 0, 1, t0).is_some());
    }

    #[test]
    fn repeat_ejections_double_up_to_the_cap_then_decay() {
        let t0 = Instant::now();
        let mut l = listener(2, policy());
        let mut now = t0;
        let mut lengths = Vec::new();
        for _ in 0..7 {
            let t = fail(&mut l, 0, 5, now).unwrap();
            let Reason::Ejected { duration, .. } = t.reason else {
                panic!("{t}")
            };
            lengths.push(duration.as_secs());
            now += duration;
            assert_eq!(l.next_deadline(), Some(now));
            let ended = l.tick(now);
            assert_eq!(ended.len(), 1);
            assert_eq!(ended[0].1.reason, Reason::EjectionEnded);
        }
        assert_eq!(lengths, [10, 20, 40, 80, 160, 300, 300]);
        // Level 5 (the cap); 30 s healthy are three steps down: 10 s x 2^2.
        let t = fail(&mut l, 0, 5, now + secs(30)).unwrap();
        assert_eq!(
            t.reason,
            Reason::Ejected {
                failures: 5,
                duration: secs(40)
            }
        );
    }

    #[test]
    fn a_passing_probe_ends_an_ejection_at_once() {
        let t0 = Instant::now();
        let mut l = listener(2, policy());
        fail(&mut l, 1, 5, t0).unwrap();
        let t = l.probe_passed(&1, t0 + secs(1)).unwrap();
        assert_eq!((t.from, t.to), (State::Ejected, State::Up));
        assert_eq!(t.reason, Reason::EjectionEndedByProbe);
        assert_eq!(l.ejected(), 0);
        assert_eq!(l.next_deadline(), None);
    }

    #[test]
    fn max_ejection_percent_refuses_the_third_of_four_until_one_returns() {
        let t0 = Instant::now();
        let mut l = listener(4, policy());
        assert_eq!(l.ejected_max(), 2);
        assert!(fail(&mut l, 0, 5, t0).is_some());
        assert!(fail(&mut l, 1, 5, t0).is_some());
        assert_eq!(fail(&mut l, 2, 20, t0), None, "a third would exceed 50%");
        assert_eq!(l.ejected(), 2);
        assert!(l.is_available(&2));
        l.tick(t0 + secs(10));
        // Still over the count: its next failure ejects it now that the limit allows.
        let t = fail(&mut l, 2, 1, t0 + secs(11)).unwrap();
        assert_eq!(
            t.reason,
            Reason::Ejected {
                failures: 21,
                duration: secs(10)
            }
        );
    }

    #[test]
    fn a_lone_backend_is_never_ejected_at_fifty_percent() {
        let t0 = Instant::now();
        let mut l = listener(1, policy());
        assert_eq!(l.ejected_max(), 0);
        assert_eq!(fail(&mut l, 0, 1000, t0), None);
        assert!(l.is_available(&0));
        assert_eq!(l.backend(&0).unwrap().ejections(), 0);
    }

    #[test]
    fn passive_failures_of_an_unavailable_backend_are_ignored() {
        let t0 = Instant::now();
        let mut l = listener(4, policy());
        l.probe_failed(&0, t0, "timeout").unwrap();
        assert_eq!(fail(&mut l, 0, 10, t0), None);
        l.probe_passed(&0, t0 + secs(2)).unwrap();
        assert_eq!(
            fail(&mut l, 0, 4, t0 + secs(2)),
            None,
            "the count started afresh"
        );
    }

    #[test]
    fn ejections_count_as_downs_for_flap_damping() {
        let t0 = Instant::now();
        let flapping = Policy {
            active: None,
            flap: Some(FlapDamping::default()),
            ..policy()
        };
        let mut l = listener(2, flapping);
        let mut now = t0;
        for _ in 0..2 {
            let t = fail(&mut l, 0, 5, now).unwrap();
            assert_eq!(t.to, State::Ejected);
            now = l.next_deadline().unwrap();
            l.tick(now);
        }
        let t = fail(&mut l, 0, 5, now).unwrap();
        assert_eq!((t.from, t.to), (State::Up, State::Flapping));
        assert!(
            l.backend(&0).unwrap().is_ejected(),
            "the ejection runs under the hold"
        );
        assert_eq!(l.ejected(), 1);
    }

    #[test]
    fn set_backends_keeps_the_state_of_those_that_stay() {
        let t0 = Instant::now();
        let mut l = listener(3, policy());
        l.probe_failed(&1, t0, "timeout").unwrap();
        l.set_backends([1, 2, 7, 7], Start::Unknown);
        let states: Vec<_> = l.iter().map(|(k, b)| (*k, b.state())).collect();
        assert_eq!(
            states,
            [(1, State::Down), (2, State::Up), (7, State::Unknown)]
        );
        assert_eq!(l.probe_passed(&0, t0), None, "removed: ignored");
        assert!(!l.insert(2, Start::Down));
        assert!(l.insert(9, Start::Down));
        assert_eq!(l.remove(&9).map(|b| b.state()), Some(State::Down));
    }

    #[test]
    fn tick_reports_in_key_order_and_moves_the_deadline_on() {
        let t0 = Instant::now();
        let mut l = listener(
            4,
            Policy {
                passive: Some(Passive {
                    max_ejection_percent: 100,
                    ..Passive::default()
                }),
                ..policy()
            },
        );
        fail(&mut l, 3, 5, t0).unwrap();
        fail(&mut l, 1, 5, t0).unwrap();
        fail(&mut l, 2, 5, t0 + secs(1)).unwrap();
        assert_eq!(l.next_deadline(), Some(t0 + secs(10)));
        assert!(l.tick(t0 + secs(9)).is_empty());
        let keys: Vec<u32> = l.tick(t0 + secs(10)).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, [1, 3]);
        assert_eq!(l.next_deadline(), Some(t0 + secs(11)));
        assert_eq!(l.tick(t0 + secs(11)).len(), 1);
        assert_eq!(l.next_deadline(), None);
    }

    #[test]
    fn reconfigure_reports_what_the_new_policy_changes() {
        let t0 = Instant::now();
        let mut l = listener(3, policy());
        l.probe_failed(&0, t0, "timeout").unwrap();
        fail(&mut l, 1, 5, t0).unwrap();
        let changed = l.reconfigure(
            Policy {
                active: None,
                passive: None,
                ..policy()
            },
            t0,
        );
        let keys: Vec<u32> = changed.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [0, 1]);
        assert_eq!(l.available().count(), 3);
        assert_eq!(l.ejected_max(), 0);
    }

    /// `single_primary` with the defaults: rise 2, fall 3.
    fn primary_policy() -> Policy {
        Policy {
            active: Some(RiseFall { rise: 2, fall: 3 }),
            single_primary: true,
            ..policy()
        }
    }

    fn available(l: &ListenerHealth<u32>) -> Vec<u32> {
        l.available().copied().collect()
    }

    #[test]
    fn two_masters_at_once_neither_is_available_until_one_steps_down() {
        let t0 = Instant::now();
        let mut l = ListenerHealth::new(primary_policy());
        l.set_backends([0, 1], Start::Unknown);
        l.probe_passed(&0, t0).unwrap();
        assert_eq!(available(&l), [0], "alone, it holds the role");
        l.probe_passed(&1, t0).unwrap();
        assert_eq!(available(&l), Vec::<u32>::new());
        assert!(!l.is_available(&0) && !l.is_available(&1));
        let contest = l.election_changed().unwrap();
        assert_eq!(
            contest,
            Election::Contested {
                claimants: vec![0, 1]
            }
        );
        assert_eq!(
            contest.to_string(),
            "0, 1 all claim the primary role: none takes new connections until one steps down"
        );
        for n in 1..10 {
            let now = t0 + Duration::from_millis(200 * n);
            l.probe_passed(&0, now);
            l.probe_passed(&1, now);
            assert_eq!(l.election_changed(), None, "the contest is reported once");
            assert!(available(&l).is_empty());
        }
        let t = l
            .probe_wrong_role(&1, t0 + secs(2), "replica", "master")
            .unwrap();
        assert_eq!(t.to, State::Down);
        assert_eq!(available(&l), [0], "the remaining master is up at once");
        assert_eq!(
            l.election_changed().unwrap().to_string(),
            "0 is the primary"
        );
    }

    /// A Redis failover: the replica is promoted first and rises (rise 2) before the old
    /// master is demoted; at no probe are both available, and once the new one is, the old
    /// one never is again.
    #[test]
    fn a_failover_where_the_new_rises_before_the_old_falls_never_has_two_up() {
        let t0 = Instant::now();
        let (old, new) = (0, 1);
        let mut l = ListenerHealth::new(primary_policy());
        l.set_backends([old, new], Start::Unknown);
        l.probe_passed(&old, t0);
        l.probe_wrong_role(&new, t0, "replica", "master");
        assert_eq!(available(&l), [old]);
        let mut new_was_up = false;
        for n in 1..20u64 {
            let now = t0 + Duration::from_millis(200 * n);
            // Promoted at probe 3, demoted at probe 6.
            if n >= 3 {
                l.probe_passed(&new, now);
            } else {
                l.probe_wrong_role(&new, now, "replica", "master");
            }
            if n >= 6 {
                l.probe_wrong_role(&old, now, "replica", "master");
            } else {
                l.probe_passed(&old, now);
            }
            let up = available(&l);
            assert!(up.len() <= 1, "two primaries at probe {n}: {up:?}");
            new_was_up |= up == [new];
            assert!(
                !(new_was_up && l.is_available(&old)),
                "old back at probe {n}"
            );
        }
        assert_eq!(available(&l), [new]);
    }

    #[test]
    fn the_higher_timeline_wins_and_the_old_primary_is_out_in_the_same_state() {
        let t0 = Instant::now();
        let (old, promoted) = (0, 1);
        let mut l = ListenerHealth::new(primary_policy());
        l.set_backends([old, promoted], Start::Unknown);
        l.probe_passed_on(&old, t0, Some(1));
        l.probe_wrong_role(&promoted, t0, "standby", "primary");
        assert_eq!(l.election_changed().unwrap().primary(), Some(&old));
        l.probe_passed_on(&promoted, t0 + secs(1), Some(2));
        assert_eq!(available(&l), [old], "rise 2: not yet");
        let t = l.probe_passed_on(&promoted, t0 + secs(2), Some(2)).unwrap();
        assert_eq!((t.from, t.to), (State::Down, State::Up));
        assert!(l.is_available(&promoted));
        assert!(
            !l.is_available(&old),
            "out in the same state that brings the new one in"
        );
        assert_eq!(available(&l), [promoted]);
        let held = l.election_changed().unwrap();
        assert_eq!(
            held,
            Election::Held {
                primary: promoted,
                outranked: vec![old]
            }
        );
        assert_eq!(
            held.to_string(),
            "1 is the primary: its timeline is higher than that of 0"
        );
        l.probe_passed_on(&old, t0 + secs(3), Some(1));
        assert_eq!(available(&l), [promoted], "the old one keeps losing");
    }

    #[test]
    fn equal_or_unknown_timelines_fail_closed() {
        let t0 = Instant::now();
        for (a, b) in [(Some(2), Some(2)), (Some(2), None), (None, None)] {
            let mut l = ListenerHealth::new(primary_policy());
            l.set_backends([0, 1], Start::Unknown);
            l.probe_passed_on(&0, t0, a);
            l.probe_passed_on(&1, t0, b);
            assert!(available(&l).is_empty(), "{a:?} {b:?}");
            assert!(matches!(l.election(), Election::Contested { .. }));
        }
    }

    #[test]
    fn without_single_primary_every_up_backend_is_available() {
        let t0 = Instant::now();
        let mut l = listener(2, policy());
        l.probe_passed(&0, t0);
        l.probe_passed(&1, t0);
        assert_eq!(available(&l), [0, 1]);
        assert_eq!(l.election(), Election::Vacant);
        assert_eq!(l.election_changed(), None);
    }
}
