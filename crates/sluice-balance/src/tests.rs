//! Tests of the crate's shared types: snapshots, pickers of every algorithm, the cell.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Weak};
use std::thread;

use super::*;

fn client(last: u8, port: u16) -> ClientAddr {
    ClientAddr(SocketAddr::from(([192, 0, 2, last], port)))
}

const ALL: [Algorithm; 6] = [
    Algorithm::RoundRobin,
    Algorithm::LeastConnections,
    Algorithm::Random,
    Algorithm::PowerOfTwo,
    Algorithm::RingHash {
        hash_key: HashKey::ClientIp,
        points_per_weight: 160,
    },
    Algorithm::Maglev {
        hash_key: HashKey::ClientIp,
        table_size: None,
    },
];

#[test]
fn cell_publishes_new_generation_and_old_snapshot_survives_while_held() {
    let listener =
        |weights: &[u16]| ListenerBackends::new(Algorithm::RoundRobin, test_backends(weights));
    let cell = SnapshotCell::new(Snapshot {
        generation: 1,
        listeners: vec![listener(&[1])],
    });
    let held = cell.load();
    cell.publish(Snapshot {
        generation: 2,
        listeners: vec![listener(&[1, 1])],
    });
    assert_eq!(held.generation, 1);
    assert_eq!(held.listeners[0].backends.len(), 1);
    assert_eq!(cell.generation(), 2);
    assert_eq!(cell.load().listeners[0].backends.len(), 2);
}

#[test]
fn every_algorithm_takes_its_next_choice_on_retry_until_none_is_left() {
    for algorithm in ALL {
        let l = ListenerBackends::new(algorithm, test_backends(&[1, 2, 1, 3]));
        let mut p = Picker::new(&l, 0, 99);
        let mut tried = Vec::new();
        while let Some(id) = p.pick(&l, client(1, 1000), &tried) {
            assert!(
                !tried.contains(&id),
                "{algorithm:?} picked {id:?} twice: {tried:?}"
            );
            tried.push(id);
            assert!(tried.len() <= 4);
        }
        tried.sort();
        let all: Vec<BackendId> = (0..4).map(BackendId).collect();
        assert_eq!(tried, all, "{algorithm:?}");
    }
}

#[test]
fn down_and_weight_zero_backends_are_never_picked_by_any_algorithm() {
    for algorithm in ALL {
        let mut backends = test_backends(&[1, 0, 1, 1]);
        backends[2].state = BackendState::Down;
        let l = ListenerBackends::new(algorithm, backends);
        let mut p = Picker::new(&l, 1, 7);
        for i in 0..200u16 {
            let id = p.pick(&l, client((i % 250) as u8, i), &[]).unwrap();
            assert!(
                id == BackendId(0) || id == BackendId(3),
                "{algorithm:?}: {id:?}"
            );
        }
        let shares = l.shares();
        assert_eq!((shares[1], shares[2]), (0.0, 0.0), "{algorithm:?}");
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let none = ListenerBackends::new(algorithm, test_backends(&[0, 0]));
        assert_eq!(
            Picker::new(&none, 0, 1).pick(&none, client(1, 1), &[]),
            None
        );
    }
}

#[test]
fn hashing_algorithms_follow_the_hash_key() {
    for (points_per_weight, table_size) in [(160, None)] {
        let ring = |hash_key| Algorithm::RingHash {
            hash_key,
            points_per_weight,
        };
        let maglev = |hash_key| Algorithm::Maglev {
            hash_key,
            table_size,
        };
        for (by_ip, by_port) in [
            (ring(HashKey::ClientIp), ring(HashKey::ClientIpPort)),
            (maglev(HashKey::ClientIp), maglev(HashKey::ClientIpPort)),
        ] {
            let backends = test_backends(&[1; 10]);
            let ip = ListenerBackends::new(by_ip, backends.clone());
            let port = ListenerBackends::new(by_port, backends);
            let (mut pi, mut pp) = (Picker::new(&ip, 0, 1), Picker::new(&port, 3, 2));
            let mut spread = std::collections::HashSet::new();
            for source_port in 1000..1100 {
                let c = client(9, source_port);
                assert_eq!(pi.pick(&ip, c, &[]), pi.pick(&ip, client(9, 1), &[]));
                assert_eq!(pp.pick(&port, c, &[]), pp.pick(&port, c, &[]));
                spread.insert(pp.pick(&port, c, &[]));
            }
            // One host's 100 ports over 10 backends: client_ip_port spreads them.
            assert!(spread.len() >= 8, "{by_port:?}: {spread:?}");
        }
    }
}

#[test]
fn fingerprints_ignore_list_order_and_see_weight_and_state_changes() {
    for algorithm in ALL {
        let list = test_backends(&[1, 2, 3, 4]);
        let mut reversed: Vec<Backend> = list.iter().rev().cloned().collect();
        for (i, b) in reversed.iter_mut().enumerate() {
            b.id = BackendId(i as u32);
        }
        let a = ListenerBackends::new(algorithm, list.clone());
        let b = ListenerBackends::new(algorithm, reversed);
        assert_eq!(a.fingerprint(), b.fingerprint(), "{algorithm:?}");
        let mut heavier = list.clone();
        heavier[0].weight = 5;
        let c = ListenerBackends::new(algorithm, heavier);
        assert_ne!(a.fingerprint(), c.fingerprint(), "{algorithm:?}");
        let mut down = list;
        down[0].state = BackendState::Down;
        let d = ListenerBackends::new(algorithm, down);
        assert_ne!(a.fingerprint(), d.fingerprint(), "{algorithm:?}");
    }
    let rr = ListenerBackends::new(Algorithm::RoundRobin, test_backends(&[1, 1]));
    let random = ListenerBackends::new(Algorithm::Random, test_backends(&[1, 1]));
    assert_ne!(rr.fingerprint(), random.fingerprint());
}

#[test]
fn maglev_table_size_follows_the_configured_backends_not_the_eligible_ones() {
    // A backend going down must not change M, or every client would move.
    let algorithm = Algorithm::Maglev {
        hash_key: HashKey::ClientIp,
        table_size: None,
    };
    let mut backends = test_backends(&[1; 700]);
    let all = ListenerBackends::new(algorithm, backends.clone());
    backends[0].state = BackendState::Down;
    let fewer = ListenerBackends::new(algorithm, backends);
    let size = |l: &ListenerBackends| match &l.table {
        Table::Maglev(t) => t.table_size(),
        other => panic!("{other:?}"),
    };
    assert_eq!(size(&all), maglev::default_table_size(700));
    assert_eq!(size(&all), size(&fewer));
    assert!(size(&all) >= 70_000);
}

/// A snapshot whose every part says which generation it belongs to: backend count, weights,
/// ports and algorithm all derive from `generation`, so a reader that sees parts of two
/// generations notices.
fn snapshot_of(generation: u64, loads: &[Arc<BackendLoad>]) -> Snapshot {
    let count = 1 + (generation % 5) as usize;
    let backends: Vec<Backend> = (0..count)
        .map(|i| {
            let port = 10_000 + (generation % 50_000) as u16;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut b = Backend::new(BackendId(i as u32), addr, 1 + (generation % 7) as u16);
            b.load = Arc::clone(&loads[i]);
            b
        })
        .collect();
    let algorithm = match generation % 6 {
        0 => ALL[0],
        1 => ALL[1],
        2 => ALL[2],
        3 => ALL[3],
        4 => Algorithm::RingHash {
            hash_key: HashKey::ClientIpPort,
            points_per_weight: 4,
        },
        _ => Algorithm::Maglev {
            hash_key: HashKey::ClientIpPort,
            table_size: Some(211),
        },
    };
    Snapshot {
        generation,
        listeners: vec![ListenerBackends::new(algorithm, backends)],
    }
}

#[test]
fn a_thousand_publications_under_concurrent_picking_tear_nothing_and_free_every_old_snapshot() {
    const PUBLICATIONS: u64 = 1000;
    let loads: Vec<Arc<BackendLoad>> = (0..5).map(|_| Arc::default()).collect();
    let cell = Arc::new(SnapshotCell::new(snapshot_of(0, &loads)));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let cell = Arc::clone(&cell);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut snapshot = cell.load();
                let mut picker = Picker::new(&snapshot.listeners[0], w, w as u64);
                let (mut picks, mut adopted) = (0u64, 0u64);
                let mut guards = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    // A batch of picks on one snapshot, then adopt a newer one if there is one.
                    for i in 0..16u16 {
                        let l = &snapshot.listeners[0];
                        let g = snapshot.generation;
                        let id = picker.pick(l, client(w as u8, i), &[]).expect("a backend");
                        let b = &l.backends[id.index()];
                        assert_eq!(l.backends.len(), 1 + (g % 5) as usize, "torn at {g}");
                        assert_eq!(b.addr.port(), 10_000 + (g % 50_000) as u16, "torn at {g}");
                        assert_eq!(b.weight, 1 + (g % 7) as u16, "torn at {g}");
                        guards.push(b.open());
                        if guards.len() > 8 {
                            guards.remove(0);
                        }
                        picks += 1;
                    }
                    if cell.generation() != snapshot.generation {
                        snapshot = cell.load();
                        picker = Picker::new(&snapshot.listeners[0], w, picks);
                        adopted += 1;
                    }
                }
                (picks, adopted)
            })
        })
        .collect();
    let mut published: Vec<Weak<Snapshot>> = Vec::new();
    for generation in 1..=PUBLICATIONS {
        cell.publish(snapshot_of(generation, &loads));
        published.push(Arc::downgrade(&cell.load()));
        if generation % 50 == 0 {
            thread::yield_now();
        }
    }
    // Let every worker see the last generation before stopping.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline
        && published.iter().filter(|w| w.strong_count() > 0).count() > 1
    {
        thread::sleep(std::time::Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let mut total_adopted = 0;
    for worker in workers {
        let (picks, adopted) = worker.join().expect("no torn read");
        assert!(picks > 0);
        total_adopted += adopted;
    }
    assert!(total_adopted > 0);
    let live: Vec<u64> = published
        .iter()
        .filter_map(Weak::upgrade)
        .map(|s| s.generation)
        .collect();
    assert_eq!(
        live,
        vec![PUBLICATIONS],
        "only the current snapshot may live"
    );
    // Every guard was dropped with its worker: the shared counts are back to zero.
    assert!(loads.iter().all(|l| l.active() == 0), "{loads:?}");
}

#[test]
fn backups_serve_only_while_no_other_backend_is_up() {
    let mut backends = test_backends(&[1, 1, 1]);
    backends[2].backup = true;
    for algorithm in ALL {
        let l = ListenerBackends::new(algorithm, backends.clone());
        let mut p = Picker::new(&l, 0, 3);
        for i in 0..50 {
            assert_ne!(
                p.pick(&l, client(i, 1), &[]),
                Some(BackendId(2)),
                "{algorithm:?}"
            );
        }
        // A retry that has tried every primary falls back to the backup.
        let l = ListenerBackends::new(algorithm, backends.clone());
        let mut p = Picker::new(&l, 0, 3);
        let tried = [BackendId(0), BackendId(1)];
        assert_eq!(
            p.pick(&l, client(1, 1), &tried),
            Some(BackendId(2)),
            "{algorithm:?}"
        );
        assert_eq!(
            p.pick(&l, client(1, 1), &[BackendId(0)]).map(|id| id.0 < 2),
            Some(true)
        );
        let mut down = backends.clone();
        down[0].state = BackendState::Down;
        down[1].weight = 0;
        let l = ListenerBackends::new(algorithm, down);
        let mut p = Picker::new(&l, 0, 3);
        for i in 0..50 {
            assert_eq!(
                p.pick(&l, client(i, 1), &[]),
                Some(BackendId(2)),
                "{algorithm:?}"
            );
        }
    }
}

#[test]
fn every_backend_down_rejects_or_uses_all_weighted_ones() {
    let mut backends = test_backends(&[1, 2, 0]);
    for b in &mut backends {
        b.state = BackendState::Down;
    }
    for algorithm in ALL {
        let reject =
            ListenerBackends::with_fallback(algorithm, OnAllDown::Reject, backends.clone());
        assert_eq!(
            Picker::new(&reject, 0, 1).pick(&reject, client(1, 1), &[]),
            None
        );
        let all = ListenerBackends::with_fallback(algorithm, OnAllDown::UseAll, backends.clone());
        let mut p = Picker::new(&all, 0, 1);
        let mut seen = std::collections::HashSet::new();
        for i in 0..100 {
            seen.insert(
                p.pick(&all, client(i, i.into()), &[])
                    .expect("use_all picks"),
            );
        }
        assert!(
            !seen.contains(&BackendId(2)),
            "{algorithm:?} chose weight 0"
        );
        assert!(seen.contains(&BackendId(0)) || seen.contains(&BackendId(1)));
    }
}

#[test]
fn a_ramping_backend_takes_its_share_of_the_weighted_algorithms_only() {
    // Backend 1 at 25% of its weight: 1 : 0.25 for weighted picks; the Maglev table ignores it.
    let mut backends = test_backends(&[1, 1]);
    backends[1].ramp = 250;
    let rr = ListenerBackends::new(Algorithm::RoundRobin, backends.clone());
    let mut p = Picker::new(&rr, 0, 1);
    let ones = (0..500)
        .filter(|&i| p.pick(&rr, client(1, i), &[]) == Some(BackendId(1)))
        .count();
    assert_eq!(ones, 100, "round-robin 1 : 0.25 over 500 picks");
    let maglev = Algorithm::Maglev {
        hash_key: HashKey::ClientIp,
        table_size: None,
    };
    let full = ListenerBackends::new(maglev, test_backends(&[1, 1]));
    let ramping = ListenerBackends::new(maglev, backends);
    assert_eq!(full.fingerprint(), ramping.fingerprint());
}
