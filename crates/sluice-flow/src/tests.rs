//! Tests of the flow table: scripted scenarios on a fake clock, a seeded random comparison with
//! a plain reference model, the memory bound, and an ignored timing loop.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::*;
use SessionState::{Finished, Open, Unbound};

/// A key per number: distinct numbers give distinct clients of one local address.
fn key(n: u32) -> FlowKey {
    // The address holds bits 8..32 of `n` and the port bits 0..16: distinct for every `n`.
    let port = 1024u16.wrapping_add(n as u16);
    let client = SocketAddrV4::new(Ipv4Addr::from_bits(0x0a00_0000 | (n >> 8)), port);
    FlowKey::new(client.into(), SocketAddr::from(([198, 51, 100, 1], 53)))
}

/// `t0` plus `secs` seconds: the fake clock.
fn at(t0: Instant, secs: u64) -> Instant {
    t0 + Duration::from_secs(secs)
}

fn inserted<S: std::fmt::Debug>(insert: Insert<S>) -> FlowId {
    match insert {
        Insert::Inserted { id } => id,
        other => panic!("expected Inserted, got {other:?}"),
    }
}

/// The payloads from the least to the most recently active session.
fn order(table: &FlowTable<u32>) -> Vec<u32> {
    let order = table.activity_order();
    order
        .iter()
        .map(|&id| table.get_id(id).unwrap().payload)
        .collect()
}

fn limits(requests: u32, responses: u32) -> Limits {
    Limits {
        requests,
        responses,
    }
}

#[test]
fn lookups_by_key_touch_and_reorder() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(8, OnMaxSessions::Drop);
    for n in 0..4 {
        let _ = inserted(table.insert(key(n), n, at(t0, u64::from(n))));
    }
    assert_eq!(order(&table), [0, 1, 2, 3]);

    let session = table.get_mut(&key(1), at(t0, 10)).unwrap();
    assert_eq!(session.payload, 1);
    assert_eq!(session.last_active(), at(t0, 10));
    assert_eq!(session.created(), at(t0, 1));
    assert_eq!(order(&table), [0, 2, 3, 1]);

    // Touching the newest changes nothing but its time.
    table.get_mut(&key(1), at(t0, 11)).unwrap();
    assert_eq!(order(&table), [0, 2, 3, 1]);

    // `get` and `get_id` do not touch.
    assert_eq!(table.get(&key(0)).unwrap().payload, 0);
    let id0 = table.get(&key(0)).unwrap().id();
    assert_eq!(table.get_id(id0).unwrap().payload, 0);
    assert_eq!(order(&table), [0, 2, 3, 1]);

    // A reply (lookup by id) touches too.
    table.get_id_mut(id0, at(t0, 12)).unwrap();
    assert_eq!(order(&table), [2, 3, 1, 0]);
    assert!(table.get_mut(&key(99), at(t0, 12)).is_none());
    table.check_invariants();
}

#[test]
fn full_table_with_drop_refuses_and_returns_the_payload() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(2, OnMaxSessions::Drop);
    let _ = inserted(table.insert(key(0), 0, t0));
    let _ = inserted(table.insert(key(1), 1, t0));
    match table.insert(key(2), 2, at(t0, 1)) {
        Insert::Full { payload } => assert_eq!(payload, 2),
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(table.get(&key(2)).is_none());
    assert_eq!(order(&table), [0, 1]);
    let c = *table.counters();
    assert_eq!(
        (c.active, c.created, c.dropped_full, c.evicted),
        (2, 2, 1, 0)
    );
    table.check_invariants();
}

#[test]
fn full_table_with_evict_lru_evicts_the_least_recently_active() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(3, OnMaxSessions::EvictLru);
    let ids: Vec<FlowId> = (0..3)
        .map(|n| inserted(table.insert(key(n), n, at(t0, u64::from(n)))))
        .collect();
    // Session 0 is the oldest until touched; then 1 is.
    table.get_mut(&key(0), at(t0, 5)).unwrap();
    match table.insert(key(3), 3, at(t0, 6)) {
        Insert::Evicted { id, evicted } => {
            assert_eq!(evicted.payload, 1);
            assert_eq!(evicted.key(), key(1));
            assert_eq!(evicted.id(), ids[1]);
            assert_eq!(table.get_id(id).unwrap().payload, 3);
        }
        other => panic!("expected Evicted, got {other:?}"),
    }
    assert!(
        table.get_id(ids[1]).is_none(),
        "the evicted session's id is stale"
    );
    assert!(table.get(&key(1)).is_none());
    assert_eq!(order(&table), [2, 0, 3]);
    let c = *table.counters();
    assert_eq!(
        (c.active, c.created, c.evicted, c.dropped_full),
        (3, 4, 1, 0)
    );
    table.check_invariants();
}

#[test]
fn capacity_zero_refuses_under_both_policies() {
    for policy in [OnMaxSessions::Drop, OnMaxSessions::EvictLru] {
        let mut table = FlowTable::new(0, policy);
        assert!(matches!(
            table.insert(key(0), 7, Instant::now()),
            Insert::Full { payload: 7 }
        ));
        assert_eq!(table.counters().dropped_full, 1);
        assert!(table.is_empty());
        table.check_invariants();
    }
}

#[test]
fn expire_removes_only_idle_sessions_oldest_first() {
    let t0 = Instant::now();
    let idle = Duration::from_secs(5);
    let mut table = FlowTable::new(16, OnMaxSessions::Drop);
    for n in 0..10 {
        let _ = inserted(table.insert(key(n), n, at(t0, u64::from(n))));
    }
    // Session 2 was active late: it must survive though older ones around it expire.
    table.get_mut(&key(2), at(t0, 11)).unwrap();
    assert_eq!(table.next_expiry(idle), Some(at(t0, 5)));

    let mut out = Vec::new();
    // At 12 s, sessions last active at or before 7 s have been idle for at least 5 s.
    let visits = table.expiry_visits;
    assert_eq!(table.expire(at(t0, 12), idle, &mut out), 7);
    let expired: Vec<u32> = out.iter().map(|s| s.payload).collect();
    assert_eq!(expired, [0, 1, 3, 4, 5, 6, 7]);
    assert_eq!(
        table.expiry_visits - visits,
        8,
        "one look per expiry plus one"
    );
    assert_eq!(order(&table), [8, 9, 2]);
    assert_eq!(table.next_expiry(idle), Some(at(t0, 13)));
    assert_eq!(table.counters().expired, 7);

    // Nothing more is due before 13 s; at 13 s exactly, session 8 is.
    assert_eq!(table.expire(at(t0, 12), idle, &mut out), 0);
    assert!(table.pop_expired(at(t0, 12), idle).is_none());
    assert_eq!(table.pop_expired(at(t0, 13), idle).unwrap().payload, 8);

    // A zero idle timeout is "off".
    assert_eq!(table.expire(at(t0, 1000), Duration::ZERO, &mut out), 0);
    assert_eq!(table.next_expiry(Duration::ZERO), None);
    table.check_invariants();

    table.expire(at(t0, 1000), idle, &mut out);
    assert!(table.is_empty());
    assert_eq!(table.next_expiry(idle), None);
    table.check_invariants();
}

#[test]
fn expiry_cost_is_proportional_to_what_expires() {
    let t0 = Instant::now();
    let idle = Duration::from_secs(60);
    let mut table = FlowTable::new(10_000, OnMaxSessions::Drop);
    for n in 0..10_000 {
        let start = if n < 3 { t0 } else { at(t0, 30) };
        let _ = inserted(table.insert(key(n), n, start));
    }
    let mut out = Vec::new();
    let visits = table.expiry_visits;
    assert_eq!(table.expire(at(t0, 61), idle, &mut out), 3);
    assert_eq!(table.expiry_visits - visits, 4);
    let visits = table.expiry_visits;
    assert_eq!(table.expire(at(t0, 62), idle, &mut out), 0);
    assert_eq!(table.expiry_visits - visits, 1);
}

#[test]
fn time_never_goes_back() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(4, OnMaxSessions::Drop);
    let _ = inserted(table.insert(key(0), 0, at(t0, 10)));
    // An earlier `now` (a stale batch timestamp) is taken as the latest seen.
    let _ = inserted(table.insert(key(1), 1, at(t0, 5)));
    assert_eq!(table.get(&key(1)).unwrap().last_active(), at(t0, 10));
    table.get_mut(&key(0), at(t0, 3)).unwrap();
    assert_eq!(order(&table), [1, 0]);
    table.check_invariants();
}

#[test]
fn responses_one_finishes_and_the_next_datagram_starts_anew() {
    let t0 = Instant::now();
    let l = limits(0, 1);
    let mut table = FlowTable::new(4, OnMaxSessions::Drop);
    let first = inserted(table.insert(key(0), 10, t0));
    assert_eq!(table.get_mut(&key(0), t0).unwrap().record_request(l), Open);
    let state = table
        .get_id_mut(first, at(t0, 1))
        .unwrap()
        .record_response(l);
    assert_eq!(state, Finished);
    // Even before the driver removes it, a finished session takes no more datagrams.
    assert!(table.get_mut(&key(0), at(t0, 2)).is_none());
    assert!(table.get(&key(0)).is_none());
    assert!(table.remove(&key(0)).is_none());
    assert_eq!(table.remove_id(first).unwrap().payload, 10);
    assert!(table.remove_id(first).is_none());
    assert!(table.get_id(first).is_none());

    let second = inserted(table.insert(key(0), 11, at(t0, 3)));
    assert_ne!(second, first);
    assert_eq!(table.counters().closed, 1);
    table.check_invariants();
}

#[test]
fn requests_limit_unbinds_and_the_old_session_still_relays_replies() {
    let t0 = Instant::now();
    let l = limits(1, 0);
    let mut table = FlowTable::new(4, OnMaxSessions::Drop);
    let old = inserted(table.insert(key(0), 10, t0));
    assert_eq!(
        table.get_id_mut(old, t0).unwrap().record_request(l),
        Unbound
    );

    // The client's next datagram finds no open session, and starts one.
    assert!(table.get_mut(&key(0), at(t0, 1)).is_none());
    table.check_invariants();
    let new = inserted(table.insert(key(0), 11, at(t0, 1)));
    assert_eq!(table.get(&key(0)).unwrap().id(), new);

    // The old session still relays its backend's replies, by id, and ages on its own.
    let reply = table.get_id_mut(old, at(t0, 2)).unwrap();
    assert_eq!(reply.payload, 10);
    assert_eq!(reply.record_response(l), Unbound);
    assert_eq!(table.len(), 2);
    let mut out = Vec::new();
    table.expire(at(t0, 62), Duration::from_secs(60), &mut out);
    assert_eq!(out.iter().map(|s| s.payload).collect::<Vec<_>>(), [11, 10]);

    // Removing a session whose key was given to a newer one leaves the newer one's key alone.
    let _ = inserted(table.insert(key(0), 12, at(t0, 70)));
    let a = table.get(&key(0)).unwrap().id();
    table.get_id_mut(a, at(t0, 70)).unwrap().record_request(l);
    let b = inserted(table.insert(key(0), 13, at(t0, 71)));
    assert_eq!(table.remove_id(a).unwrap().payload, 12);
    assert_eq!(table.get(&key(0)).unwrap().id(), b);
    table.check_invariants();
}

#[test]
fn inserting_an_open_key_again_unbinds_the_old_session() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(4, OnMaxSessions::Drop);
    let old = inserted(table.insert(key(0), 10, t0));
    let new = inserted(table.insert(key(0), 11, t0));
    assert_eq!(table.get_id(old).unwrap().state(), Unbound);
    assert_eq!(table.get(&key(0)).unwrap().id(), new);
    assert_eq!(table.remove(&key(0)).unwrap().payload, 11);
    assert!(table.remove(&key(0)).is_none());
    assert_eq!(table.len(), 1);
    table.check_invariants();
}

#[test]
fn removal_and_reinsertion_reuse_slots_without_growth() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(4, OnMaxSessions::Drop);
    let allocated = table.allocated();
    let ids: Vec<FlowId> = (0..4)
        .map(|n| inserted(table.insert(key(n), n, t0)))
        .collect();
    for round in 0..100u32 {
        let victim = key(round % 4);
        let id = table.get(&victim).unwrap().id();
        assert_eq!(table.remove(&victim).unwrap().id(), id);
        let again = inserted(table.insert(victim, round, t0));
        assert_eq!(again.slot(), id.slot(), "the freed slot is reused");
        assert_ne!(again, id, "with a new generation");
        assert!(table.get_id(id).is_none());
        assert_eq!(table.slab_len(), 4);
        assert_no_growth(&table, allocated);
    }
    assert!(ids.iter().all(|&id| table.get_id(id).is_none()));
    assert_eq!(table.counters().closed, 100);
    table.check_invariants();
}

#[test]
fn retain_closes_what_it_does_not_keep() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(8, OnMaxSessions::Drop);
    for n in 0..8 {
        let _ = inserted(table.insert(key(n), n, at(t0, u64::from(n))));
    }
    let mut out = Vec::new();
    assert_eq!(table.retain(|s| s.payload % 2 == 0, &mut out), 4);
    let mut closed: Vec<u32> = out.iter().map(|s| s.payload).collect();
    closed.sort_unstable();
    assert_eq!(closed, [1, 3, 5, 7]);
    assert_eq!(order(&table), [0, 2, 4, 6]);
    for session in table.iter_mut() {
        session.payload += 100;
    }
    let mut left: Vec<u32> = table.iter().map(|s| s.payload).collect();
    left.sort_unstable();
    assert_eq!(left, [100, 102, 104, 106]);
    assert_eq!(table.counters().closed, 4);
    table.check_invariants();
}

#[test]
fn worker_shares_add_up() {
    for max_sessions in [0, 1, 2, 3, 7, 10, 100, 99_999, 100_000, u32::MAX] {
        for workers in 1..=33 {
            let shares: Vec<u32> = (0..workers)
                .map(|w| worker_share(max_sessions, workers, w))
                .collect();
            let total: u64 = shares.iter().map(|&s| u64::from(s)).sum();
            assert_eq!(
                total,
                u64::from(max_sessions),
                "{max_sessions} over {workers}"
            );
            let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            assert!(
                max - min <= 1,
                "even split of {max_sessions} over {workers}"
            );
            // The remainder goes to the first workers.
            assert!(shares.windows(2).all(|w| w[0] >= w[1]));
            if max_sessions as usize >= workers {
                assert!(*min >= 1);
            }
        }
    }
    assert_eq!(worker_share(100_000, 3, 0), 33_334);
    assert_eq!(worker_share(100_000, 3, 2), 33_333);
    assert_eq!(worker_share(2, 4, 1), 1);
    assert_eq!(worker_share(2, 4, 2), 0);
    assert_eq!(worker_share(10, 4, 4), 0);
    assert_eq!(worker_share(10, 0, 0), 0);
}

#[test]
fn memory_stays_bounded_under_a_flood_of_new_flows() {
    for policy in [OnMaxSessions::EvictLru, OnMaxSessions::Drop] {
        let t0 = Instant::now();
        let mut table = FlowTable::new(10_000, policy);
        let allocated = table.allocated();
        let mut refused_or_evicted = 0u64;
        for n in 0..100_000u32 {
            let now = t0 + Duration::from_millis(u64::from(n));
            match table.insert(key(n), n, now) {
                Insert::Inserted { .. } => {}
                Insert::Evicted { evicted, .. } => {
                    // The oldest goes first: flow n evicts flow n - 10,000.
                    assert_eq!(evicted.payload, n - 10_000);
                    refused_or_evicted += 1;
                }
                Insert::Full { payload } => {
                    assert_eq!(payload, n);
                    refused_or_evicted += 1;
                }
            }
            assert!(table.slab_len() <= 10_000);
            assert_no_growth(&table, allocated);
        }
        assert_eq!(table.len(), 10_000);
        assert_eq!(refused_or_evicted, 90_000);
        let c = *table.counters();
        match policy {
            OnMaxSessions::EvictLru => assert_eq!((c.evicted, c.dropped_full), (90_000, 0)),
            OnMaxSessions::Drop => assert_eq!((c.evicted, c.dropped_full), (0, 90_000)),
        }
        assert_eq!(c.created, 100_000 - c.dropped_full);
        assert_eq!(table.slab_len(), 10_000);
        assert!(
            allocated.0 <= 10_000 + 16,
            "slab reserved for about 10,000 entries"
        );
        table.check_invariants();
    }
}

#[test]
fn index_does_not_grow_under_sustained_churn_at_capacity() {
    // Every eviction leaves a tombstone in the index; a million of them at full load must be
    // cleaned up in place, never by growing the index.
    let t0 = Instant::now();
    let mut table = FlowTable::new(1_000, OnMaxSessions::EvictLru);
    let allocated = table.allocated();
    for n in 0..1_000_000u32 {
        let _ = table.insert(key(n), n, t0);
        assert_no_growth(&table, allocated);
    }
    assert_eq!(table.counters().evicted, 999_000);
    table.check_invariants();
}

/// Checks that neither the slab nor the index reallocated since `allocated` was taken. The
/// index's `capacity()` is its length plus its remaining room, which tombstones lower and an
/// in-place rehash restores; it exceeds the first value only if the index grew.
fn assert_no_growth<S>(table: &FlowTable<S>, allocated: (usize, usize)) {
    let (slab, index) = table.allocated();
    assert_eq!(slab, allocated.0, "the slab reallocated");
    assert!(
        index <= allocated.1,
        "the index grew: {index} > {}",
        allocated.1
    );
}

/// A seeded xorshift64: no dependency, replays exactly.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The reference: sessions in a `Vec` from the least to the most recently active, every
/// operation a linear scan.
struct Model {
    capacity: usize,
    sessions: Vec<ModelSession>,
    latest: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq)]
struct ModelSession {
    tag: u32,
    key: FlowKey,
    id: FlowId,
    last_active: Instant,
    requests: u64,
    responses: u64,
    state: SessionState,
}

impl Model {
    fn observe(&mut self, now: Instant) -> Instant {
        let now = self.latest.map_or(now, |latest| latest.max(now));
        self.latest = Some(now);
        now
    }

    fn position_of_key(&self, key: FlowKey) -> Option<usize> {
        self.sessions
            .iter()
            .position(|s| s.key == key && s.state == Open)
    }

    fn position_of_id(&self, id: FlowId) -> Option<usize> {
        self.sessions.iter().position(|s| s.id == id)
    }

    fn touch(&mut self, at: usize, now: Instant) -> &mut ModelSession {
        let mut session = self.sessions.remove(at);
        session.last_active = now;
        self.sessions.push(session);
        self.sessions.last_mut().unwrap()
    }

    /// The same rule as `Session::judge`, written out again.
    fn judge(limits: Limits, s: &mut ModelSession) -> SessionState {
        if s.state != Finished {
            let r = u64::from(limits.requests);
            let m = u64::from(limits.responses);
            if (r == 0 || s.requests >= r) && m != 0 && s.responses >= m * s.requests {
                s.state = Finished;
            } else if r != 0 && s.requests >= r {
                s.state = Unbound;
            }
        }
        s.state
    }
}

/// One random run against both the table and the model; answers the table's counters and
/// how many sessions became unbound and finished, so the caller can check what was exercised.
fn compare_with_model(
    seed: u64,
    capacity: u32,
    policy: OnMaxSessions,
    limits: Limits,
) -> (Counters, u64, u64) {
    let mut rng = XorShift(seed);
    let t0 = Instant::now();
    let idle = Duration::from_millis(800);
    let keys = u64::from(capacity) * 2 + 3;
    let mut table: FlowTable<u32> = FlowTable::new(capacity, policy);
    let mut model = Model {
        capacity: capacity as usize,
        sessions: Vec::new(),
        latest: None,
    };
    let mut clock_ms = 0u64;
    let mut stale: Vec<FlowId> = Vec::new();
    let mut next_tag = 0u32;
    let mut out = Vec::new();
    let (mut unbound, mut finished) = (0u64, 0u64);

    for step in 0..4_000 {
        // Time mostly moves forward a little, sometimes not at all, rarely backwards.
        match rng.below(10) {
            0 => {}
            1 => clock_ms = clock_ms.saturating_sub(rng.below(300)),
            _ => clock_ms += rng.below(120),
        }
        let now = t0 + Duration::from_millis(clock_ms);
        let context = format!("seed {seed} step {step}");

        match rng.below(100) {
            // A datagram from a client: find its session or start one.
            0..=44 => {
                let k = key(rng.below(keys) as u32);
                let found = table.get_mut(&k, now).map(|s| s.id());
                let model_now = model.observe(now);
                let expected = model.position_of_key(k);
                match (found, expected) {
                    (Some(id), Some(at)) => {
                        let m = model.touch(at, model_now);
                        assert_eq!(m.id, id, "{context}");
                        m.requests += 1;
                        let want = Model::judge(limits, m);
                        let got = table.get_id_mut(id, now).unwrap().record_request(limits);
                        assert_eq!(got, want, "{context}");
                        unbound += u64::from(got == Unbound);
                        if got == Finished {
                            finished += 1;
                            assert!(table.remove_id(id).is_some());
                            model.sessions.retain(|s| s.id != id);
                            stale.push(id);
                        }
                    }
                    (None, None) => {
                        let tag = next_tag;
                        next_tag += 1;
                        let full = model.sessions.len() == model.capacity;
                        match table.insert(k, tag, now) {
                            Insert::Full { payload } => {
                                assert_eq!(payload, tag, "{context}");
                                assert!(full, "{context}");
                                assert!(
                                    policy == OnMaxSessions::Drop || model.capacity == 0,
                                    "{context}"
                                );
                            }
                            Insert::Evicted { id, evicted } => {
                                assert!(full && policy == OnMaxSessions::EvictLru, "{context}");
                                let victim = model.sessions.remove(0);
                                assert_eq!(evicted.payload, victim.tag, "{context}");
                                assert_eq!(evicted.id(), victim.id, "{context}");
                                stale.push(victim.id);
                                model_insert(&mut model, k, tag, id, model_now);
                            }
                            Insert::Inserted { id } => {
                                assert!(!full, "{context}");
                                model_insert(&mut model, k, tag, id, model_now);
                            }
                        }
                    }
                    (found, expected) => panic!("{context}: table {found:?}, model {expected:?}"),
                }
            }
            // A reply from a backend, for a live session or a stale id.
            45..=74 => {
                let live = !model.sessions.is_empty() && rng.below(5) != 0;
                let id = if live {
                    model.sessions[rng.below(model.sessions.len() as u64) as usize].id
                } else if let Some(&id) = stale.get(rng.below(stale.len() as u64 + 1) as usize) {
                    id
                } else {
                    continue;
                };
                let model_now = model.observe(now);
                match (table.get_id_mut(id, now), model.position_of_id(id)) {
                    (None, None) => {}
                    (Some(session), Some(at)) => {
                        let m = model.touch(at, model_now);
                        assert_eq!(session.payload, m.tag, "{context}");
                        m.responses += 1;
                        let want = Model::judge(limits, m);
                        assert_eq!(session.record_response(limits), want, "{context}");
                        if want == Finished {
                            finished += 1;
                            assert!(table.remove_id(id).is_some());
                            model.sessions.retain(|s| s.id != id);
                            stale.push(id);
                        }
                    }
                    (found, expected) => {
                        panic!(
                            "{context}: reply table {:?}, model {expected:?}",
                            found.is_some()
                        )
                    }
                }
            }
            // The driver closes a client's session by key.
            75..=82 => {
                let k = key(rng.below(keys) as u32);
                let removed = table.remove(&k).map(|s| s.payload);
                let expected = model.position_of_key(k).map(|at| model.sessions.remove(at));
                assert_eq!(removed, expected.as_ref().map(|s| s.tag), "{context}");
                if let Some(s) = expected {
                    stale.push(s.id);
                }
            }
            // The expiry timer fires.
            _ => {
                let model_now = model.observe(now);
                let want_next = model.sessions.first().map(|s| s.last_active + idle);
                assert_eq!(table.next_expiry(idle), want_next, "{context}");
                out.clear();
                table.expire(now, idle, &mut out);
                let mut expected = Vec::new();
                while model
                    .sessions
                    .first()
                    .is_some_and(|s| model_now.duration_since(s.last_active) >= idle)
                {
                    expected.push(model.sessions.remove(0));
                }
                let got: Vec<u32> = out.iter().map(|s| s.payload).collect();
                let want: Vec<u32> = expected.iter().map(|s| s.tag).collect();
                assert_eq!(got, want, "{context}");
                stale.extend(expected.iter().map(|s| s.id));
            }
        }

        // Same sessions, same order, same state.
        table.check_invariants();
        let table_order = table.activity_order();
        let model_order: Vec<FlowId> = model.sessions.iter().map(|s| s.id).collect();
        assert_eq!(table_order, model_order, "{context}");
        for m in &model.sessions {
            let s = table.get_id(m.id).unwrap();
            assert_eq!(
                (
                    s.payload,
                    s.key(),
                    s.last_active(),
                    s.requests(),
                    s.responses()
                ),
                (m.tag, m.key, m.last_active, m.requests, m.responses),
                "{context}"
            );
            assert_eq!(s.state(), m.state, "{context}");
        }
        assert_eq!(table.len(), model.sessions.len(), "{context}");
    }
    (*table.counters(), unbound, finished)
}

fn model_insert(model: &mut Model, key: FlowKey, tag: u32, id: FlowId, now: Instant) {
    for s in model.sessions.iter_mut().filter(|s| s.key == key) {
        if s.state == Open {
            s.state = Unbound;
        }
    }
    model.sessions.push(ModelSession {
        tag,
        key,
        id,
        last_active: now,
        requests: 0,
        responses: 0,
        state: Open,
    });
}

#[test]
fn random_operations_match_the_reference_model() {
    let all_limits = [
        limits(0, 0),
        limits(0, 1),
        limits(3, 0),
        limits(2, 2),
        limits(1, 1),
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut total = Counters::default();
    let (mut unbound, mut finished) = (0, 0);
    for capacity in [0, 1, 2, 5, 16] {
        for policy in [OnMaxSessions::Drop, OnMaxSessions::EvictLru] {
            for limits in all_limits {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                if capacity == 0 {
                    // Nothing can be inserted: no expiry to exercise, so just check refusals.
                    let mut table: FlowTable<u32> = FlowTable::new(0, policy);
                    assert!(matches!(
                        table.insert(key(1), 1, Instant::now()),
                        Insert::Full { .. }
                    ));
                    continue;
                }
                let (c, u, f) = compare_with_model(seed | 1, capacity, policy, limits);
                total.created += c.created;
                total.expired += c.expired;
                total.evicted += c.evicted;
                total.dropped_full += c.dropped_full;
                total.closed += c.closed;
                unbound += u;
                finished += f;
            }
        }
    }
    // Every path was taken, many times.
    let t = total;
    let paths = [
        t.created,
        t.expired,
        t.evicted,
        t.dropped_full,
        t.closed,
        unbound,
        finished,
    ];
    assert!(
        paths.iter().all(|&n| n >= 100),
        "{total:?} unbound {unbound} finished {finished}"
    );
}

/// Cost per operation, for the report: `cargo test -p sluice-flow --release -- --ignored
/// --nocapture`. A table of 1,000 sessions stays in cache and shows the work itself; one of
/// 100,000 (a worker's share of a large `max_sessions`), looked up at random, shows the cache
/// misses that dominate at that size.
#[test]
#[ignore = "timing, run in release by hand"]
fn timing() {
    println!(
        "session with a u64 payload: {} bytes; index bucket: {} bytes",
        std::mem::size_of::<Session<u64>>(),
        std::mem::size_of::<(FlowKey, u32)>()
    );
    for sessions in [1_000, 100_000] {
        time_table(sessions);
    }
}

fn time_table(sessions: u32) {
    use std::hint::black_box;

    const OPS: u32 = 5_000_000;
    let t0 = Instant::now();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let lookups: Vec<u32> = (0..OPS)
        .map(|_| rng.below(u64::from(sessions)) as u32)
        .collect();
    let per_op = |start: Instant, ops: u32| start.elapsed().as_nanos() as f64 / f64::from(ops);
    println!("table of {sessions} sessions:");

    let mut table: FlowTable<u64> = FlowTable::new(sessions, OnMaxSessions::EvictLru);
    let start = Instant::now();
    for n in 0..sessions {
        let _ = black_box(table.insert(key(n), u64::from(n), t0));
    }
    println!(
        "  insert into a filling table: {:.1} ns",
        per_op(start, sessions)
    );

    let mut sum = 0u64;
    let start = Instant::now();
    for &n in &lookups {
        let s = table.get_mut(&key(n), t0).unwrap();
        s.payload += 1;
        sum += s.payload;
    }
    println!(
        "  get_mut hit (random key, touch): {:.1} ns",
        per_op(start, OPS)
    );

    let start = Instant::now();
    for &n in &lookups {
        black_box(table.get_mut(&key(sessions + n), t0));
    }
    println!("  get_mut miss: {:.1} ns", per_op(start, OPS));

    let ids: Vec<FlowId> = (0..sessions)
        .map(|n| table.get(&key(n)).unwrap().id())
        .collect();
    let start = Instant::now();
    for &n in &lookups {
        sum += table.get_id_mut(ids[n as usize], t0).unwrap().payload;
    }
    black_box(sum);
    println!(
        "  get_id_mut hit (reply path, touch): {:.1} ns",
        per_op(start, OPS)
    );

    let start = Instant::now();
    for n in 0..OPS {
        let _ = black_box(table.insert(key(sessions + n), u64::from(n), t0));
    }
    println!("  insert evicting the oldest: {:.1} ns", per_op(start, OPS));

    let start = Instant::now();
    for n in 0..OPS {
        let id = match table.insert(key(2 * OPS + n), 0, t0) {
            Insert::Inserted { id } | Insert::Evicted { id, .. } => id,
            Insert::Full { .. } => unreachable!(),
        };
        black_box(table.remove_id(id));
    }
    println!(
        "  insert + remove_id (DNS session churn): {:.1} ns",
        per_op(start, OPS)
    );

    // The first pass writes `out`'s pages for the first time; time the second.
    let idle = Duration::from_secs(60);
    let mut out = Vec::with_capacity(sessions as usize);
    table.expire(t0 + idle, idle, &mut out);
    out.clear();
    for n in 0..sessions {
        let _ = table.insert(key(n), 0, t0 + idle);
    }
    let start = Instant::now();
    let expired = table.expire(t0 + 2 * idle, idle, &mut out);
    println!(
        "  expire, per session: {:.1} ns",
        per_op(start, expired as u32)
    );
    assert_eq!(expired, sessions as usize);
}
