//! Tests across the crate's modules: the documented flap-damping bound under backends that
//! toggle as fast as they can, and seeded random sequences of every input checked against the
//! invariants the control plane relies on.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::state::{Reason, RiseFall};
use crate::{
    BackendHealth, Election, FlapDamping, ListenerHealth, Passive, Policy, Start, State, Transition,
};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Probes one backend every `interval` for `span`, probe `n` passing when `passes(n)`, ticking
/// whenever a deadline is due, as the control plane does; returns every transition with its
/// time.
fn probe_for(
    policy: Policy,
    interval: Duration,
    span: Duration,
    passes: impl Fn(u32) -> bool,
) -> Vec<(Instant, Transition)> {
    let t0 = Instant::now();
    let mut backend = BackendHealth::new(policy, Start::Unknown);
    let mut transitions = Vec::new();
    let mut n = 0;
    loop {
        let now = t0 + interval * n;
        if now > t0 + span {
            return transitions;
        }
        if backend.next_deadline().is_some_and(|d| d <= now) {
            transitions.extend(backend.tick(now).map(|t| (now, t)));
        }
        let outcome = if passes(n) {
            backend.probe_passed(now)
        } else {
            backend.probe_failed(now, "connect refused")
        };
        transitions.extend(outcome.map(|t| (now, t)));
        n += 1;
    }
}

/// Asserts the documented bound: within any interval `[a, a + window)`, at most `downs` downs
/// and at most `4 x (downs + 1)` transitions.
fn assert_damped(transitions: &[(Instant, Transition)], damping: &FlapDamping) {
    let downs: Vec<Instant> = transitions
        .iter()
        .filter(|(_, t)| t.from.is_available())
        .map(|(at, _)| *at)
        .collect();
    let all: Vec<Instant> = transitions.iter().map(|(at, _)| *at).collect();
    assert_per_window(&downs, damping.window, u64::from(damping.threshold()));
    assert_per_window(
        &all,
        damping.window,
        4 * (u64::from(damping.threshold()) + 1),
    );
}

fn assert_per_window(times: &[Instant], window: Duration, max: u64) {
    for (i, start) in times.iter().enumerate() {
        let within = times[i..]
            .iter()
            .take_while(|&&t| t < *start + window)
            .count();
        assert!(
            within as u64 <= max,
            "{within} events within {window:?}, bound {max}"
        );
    }
}

#[test]
fn toggling_every_probe_for_ten_minutes_stays_within_the_documented_bound() {
    let damping = FlapDamping::default();
    let policy = Policy {
        active: Some(RiseFall { rise: 1, fall: 1 }),
        passive: None,
        flap: Some(damping),
        slow_start: Duration::ZERO,
        single_primary: false,
    };
    let span = secs(600);
    let transitions = probe_for(policy, secs(2), span, |n| n % 2 == 0);
    let count = transitions.len() as u64;
    // Without damping, each of the 301 probes would be a transition.
    assert!(
        count <= damping.transitions_max(span),
        "{count} transitions"
    );
    assert!(count < 301 / 4, "{count} transitions");
    assert_damped(&transitions, &damping);
    let holds: Vec<u64> = transitions
        .iter()
        .filter_map(|(_, t)| match t.reason {
            Reason::Flapping { hold, .. } => Some(hold.as_secs()),
            _ => None,
        })
        .collect();
    assert_eq!(
        holds,
        [60, 120, 240, 480],
        "a backend that keeps flapping is held longer each time"
    );
}

#[test]
fn toggling_as_fast_as_rise_and_fall_allow_stays_within_the_bound() {
    let damping = FlapDamping::default();
    let policy = Policy {
        active: Some(RiseFall { rise: 2, fall: 3 }),
        passive: None,
        flap: Some(damping),
        single_primary: false,
        slow_start: Duration::ZERO,
    };
    let span = secs(600);
    // Three failures, two passes: every fifth probe changes the verdict.
    let transitions = probe_for(policy, Duration::from_millis(200), span, |n| n % 5 >= 3);
    assert!(transitions.len() as u64 <= damping.transitions_max(span));
    assert_damped(&transitions, &damping);
    // The same toggling on every probe never reaches rise or fall: the first probe only.
    let every_probe = probe_for(policy, Duration::from_millis(200), span, |n| n % 2 == 0);
    assert_eq!(every_probe.len(), 1);
}

/// Marsaglia's xorshift64: enough to drive the inputs, and seeded, so a failure replays.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn random_policy(rng: &mut XorShift) -> Policy {
    let rise_fall = RiseFall {
        rise: 1 + rng.below(3) as u32,
        fall: 1 + rng.below(3) as u32,
    };
    let passive = Passive {
        consecutive_failures: 1 + rng.below(4) as u32,
        ejection_time: secs(1 + rng.below(20)),
        max_ejection_percent: [0, 25, 50, 100, rng.below(101) as u8][rng.below(5) as usize],
    };
    let flap = FlapDamping {
        downs: 2 + rng.below(3) as u32,
        window: secs(5 + rng.below(60)),
        hold_max: secs(rng.below(300)),
    };
    let active = rng.chance(80).then_some(rise_fall);
    Policy {
        active,
        passive: rng.chance(90).then_some(passive),
        single_primary: active.is_some() && rng.chance(30),
        flap: rng.chance(80).then_some(flap),
        slow_start: secs([0, 1 + rng.below(60)][rng.below(2) as usize]),
    }
}

/// What the random sequences reached, so that the test fails if they stop reaching the rare
/// paths: every kind of move between states, and listeners at their ejection limit.
#[derive(Default)]
struct Coverage {
    moves: BTreeMap<(State, State), u64>,
    at_limit: u64,
    /// Inputs after which two or more backends claimed the primary role: none elected, or one
    /// by its timeline.
    contested: u64,
    outranked: u64,
}

/// One random sequence against one listener; checks the invariants after every input.
fn random_sequence(seed: u64, coverage: &mut Coverage) {
    let mut rng = XorShift::new(seed);
    let policy = random_policy(&mut rng);
    let backends = 1 + rng.below(6) as u32;
    let mut listener = ListenerHealth::new(policy);
    let starts = [Start::Unknown, Start::Up, Start::Down];
    for key in 0..backends {
        listener.insert(key, starts[rng.below(3) as usize]);
    }
    let mut states: BTreeMap<u32, State> = listener.iter().map(|(k, b)| (*k, b.state())).collect();
    let mut log: BTreeMap<u32, Vec<(Instant, Transition)>> = BTreeMap::new();
    let t0 = Instant::now();
    let mut now = t0;
    for _ in 0..300 {
        now += Duration::from_millis(rng.below(3000));
        let key = rng.below(u64::from(backends)) as u32;
        let transitions = match rng.below(10) {
            0..=1 => {
                let timeline = [None, Some(1), Some(2)][rng.below(3) as usize];
                listener
                    .probe_passed_on(&key, now, timeline)
                    .map(|t| vec![(key, t)])
            }
            2 => listener
                .probe_failed(&key, now, "timeout")
                .map(|t| vec![(key, t)]),
            3 if rng.chance(50) => listener
                .probe_wrong_role(&key, now, "replica", "master")
                .map(|t| vec![(key, t)]),
            3 => listener
                .probe_failed(&key, now, "timeout")
                .map(|t| vec![(key, t)]),
            4..=6 => listener.passive_failure(&key, now).map(|t| vec![(key, t)]),
            7 => {
                listener.passive_success(&key);
                None
            }
            _ => Some(tick(&mut listener, now)),
        };
        for (key, t) in transitions.unwrap_or_default() {
            check_transition(&listener, &mut states, key, &t);
            *coverage.moves.entry((t.from, t.to)).or_default() += 1;
            log.entry(key).or_default().push((now, t));
        }
        check_listener(&listener, now);
        let limit = listener.ejected_max();
        coverage.at_limit += u64::from(limit > 0 && listener.ejected() == limit);
        match listener.election() {
            Election::Contested { .. } => coverage.contested += 1,
            Election::Held { outranked, .. } if !outranked.is_empty() => coverage.outranked += 1,
            _ => {}
        }
    }
    if let Some(damping) = policy.flap {
        for transitions in log.values() {
            assert_damped(transitions, &damping);
            let span = now - t0;
            assert!(transitions.len() as u64 <= damping.transitions_max(span));
        }
    }
}

/// Ticks as the control plane does, and checks that the deadline moved past `now`.
fn tick(listener: &mut ListenerHealth<u32>, now: Instant) -> Vec<(u32, Transition)> {
    let transitions = listener.tick(now);
    assert!(
        listener.next_deadline().is_none_or(|d| d > now),
        "deadline in the past"
    );
    for (_, backend) in listener.iter() {
        assert!(backend.next_deadline().is_none_or(|d| d > now));
    }
    transitions
}

fn check_transition(
    listener: &ListenerHealth<u32>,
    states: &mut BTreeMap<u32, State>,
    key: u32,
    t: &Transition,
) {
    assert_ne!(t.from, t.to, "{t}");
    assert_eq!(t.from, states[&key], "{t} after {}", states[&key]);
    assert_eq!(t.to, listener.backend(&key).unwrap().state(), "{t}");
    assert_ne!(t.to, State::Unknown, "{t}");
    assert_eq!(
        t.to == State::Flapping,
        matches!(t.reason, Reason::Flapping { .. }),
        "{t}"
    );
    states.insert(key, t.to);
}

fn check_listener(listener: &ListenerHealth<u32>, now: Instant) {
    assert!(listener.ejected() <= listener.ejected_max());
    let available = listener.available().count();
    let up = listener
        .iter()
        .filter(|(_, b)| b.state() == State::Up)
        .count();
    if listener.policy().single_primary {
        // Never two primaries; one exactly when the election names one.
        let primary = listener.election().primary().copied();
        assert_eq!(
            listener.available().copied().collect::<Vec<_>>(),
            Vec::from_iter(primary)
        );
        assert!(available <= 1.min(up));
    } else {
        assert_eq!(available, up);
    }
    for (_, backend) in listener.iter() {
        let weight = backend.effective_weight(100, now);
        assert!((10..=100).contains(&weight), "weight {weight}");
        assert_eq!(backend.effective_weight(1, now), 1);
        assert_eq!(backend.effective_weight(0, now), 0);
        assert!(backend.next_weight_change(now).is_none_or(|at| at > now));
    }
    assert!(listener.next_weight_change(now).is_none_or(|at| at > now));
}

#[test]
fn random_inputs_keep_the_invariants() {
    let mut coverage = Coverage::default();
    for seed in 0..3000 {
        random_sequence(seed, &mut coverage);
    }
    use State::*;
    let possible = [
        (Unknown, Up),
        (Unknown, Down),
        (Up, Down),
        (Up, Ejected),
        (Up, Flapping),
        (Down, Up),
        (Ejected, Up),
        (Ejected, Down),
        (Flapping, Up),
        (Flapping, Down),
        (Flapping, Ejected),
    ];
    for pair in possible {
        assert!(
            coverage.moves.get(&pair) > Some(&10),
            "{pair:?} reached too rarely"
        );
    }
    let reached: Vec<_> = coverage
        .moves
        .keys()
        .filter(|p| !possible.contains(p))
        .collect();
    assert!(
        reached.is_empty(),
        "moves the design rules out: {reached:?}"
    );
    assert!(
        coverage.contested > 1000 && coverage.outranked > 1000,
        "contested {}, held by timeline {}",
        coverage.contested,
        coverage.outranked
    );
    assert!(
        coverage.at_limit > 1000,
        "ejection limit reached {} times",
        coverage.at_limit
    );
}
