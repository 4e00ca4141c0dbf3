//! What choosing a backend costs: building a Maglev table (the control plane's work, once per
//! snapshot) and one pick of each algorithm (a worker's work, once per new connection).
//!
//! Every pick bench cycles through [`CLIENTS`] precomputed client addresses, so that the hashing
//! algorithms see different keys and the compiler cannot fold the pick into a constant. Backends
//! are `10.1.x.y:6379`; the connection counts read by `power_of_two` and `least_connections` are
//! held open (as [`ActiveGuard`]s) for the whole bench. See `README.md` beside this file for the
//! command and the latest numbers.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sluice_balance::maglev::MaglevTable;
use sluice_balance::random::Rng;
use sluice_balance::{
    ActiveGuard, Algorithm, Backend, BackendId, ClientAddr, HashKey, ListenerBackends, Picker,
};

/// Distinct client addresses a pick bench cycles through; a power of two, so the cycle is a mask.
const CLIENTS: usize = 1024;

/// The Maglev table size of every Maglev bench: the smallest and default `M`.
const TABLE_SIZE: u32 = 65537;

/// The seed of every random generator here, so that runs draw the same sequence.
const SEED: u64 = 0x5eed;

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    // One build takes milliseconds: ten samples are enough to see a change and keep the run short.
    group.sample_size(10);
    for count in [100, 1000] {
        let list = backends(&vec![1; count]);
        group.bench_with_input(BenchmarkId::from_parameter(count), &list, |b, list| {
            b.iter(|| MaglevTable::build(black_box(list), TABLE_SIZE));
        });
    }
    group.finish();
}

fn maglev_lookup(c: &mut Criterion) {
    let algorithm = Algorithm::Maglev {
        hash_key: HashKey::ClientIp,
        table_size: Some(TABLE_SIZE),
    };
    let listener = ListenerBackends::new(algorithm, backends(&[1; 100]));
    let clients = clients();
    let mut group = c.benchmark_group("maglev_lookup");
    // What a worker does per connection: hash the client's IP, then look the hash up.
    group.bench_function("pick", |b| {
        let mut picker = Picker::new(&listener, 0, SEED);
        let mut next = 0;
        b.iter(|| picker.pick(&listener, cycle(&clients, &mut next), &[]));
    });
    // The table lookup alone, on hashes computed before the bench.
    let table = MaglevTable::build(&listener.backends, TABLE_SIZE);
    let hashes: Vec<u64> = clients.iter().map(|&c| HashKey::ClientIp.hash(c)).collect();
    group.bench_function("lookup", |b| {
        let mut next = 0;
        b.iter(|| table.lookup(cycle(&hashes, &mut next)));
    });
    group.finish();
}

fn p2c_pick(c: &mut Criterion) {
    let listener = ListenerBackends::new(Algorithm::PowerOfTwo, backends(&[1; 100]));
    let _guards = open_connections(&listener.backends);
    bench_pick(c, "p2c_pick", &listener);
}

fn wrr_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("wrr_pick");
    for count in [10, 100] {
        let weights: Vec<u16> = (0..count).map(|i| (i % 5 + 1) as u16).collect();
        let listener = ListenerBackends::new(Algorithm::RoundRobin, backends(&weights));
        let clients = clients();
        group.bench_function(BenchmarkId::from_parameter(count), |b| {
            let mut picker = Picker::new(&listener, 0, SEED);
            let mut next = 0;
            b.iter(|| picker.pick(&listener, cycle(&clients, &mut next), &[]));
        });
    }
    group.finish();
}

fn least_connections_pick(c: &mut Criterion) {
    let listener = ListenerBackends::new(Algorithm::LeastConnections, backends(&[1; 100]));
    let _guards = open_connections(&listener.backends);
    bench_pick(c, "least_connections_pick", &listener);
}

/// One pick per iteration on `listener`, from one fresh picker.
fn bench_pick(c: &mut Criterion, name: &str, listener: &ListenerBackends) {
    let clients = clients();
    c.bench_function(name, |b| {
        let mut picker = Picker::new(listener, 0, SEED);
        let mut next = 0;
        b.iter(|| picker.pick(listener, cycle(&clients, &mut next), &[]));
    });
}

/// Weight-1 (or `weights[i]`) backends `10.1.x.y:6379`, `x.y` being the index plus one.
fn backends(weights: &[u16]) -> Vec<Backend> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| {
            let [_, _, x, y] = (i as u32 + 1).to_be_bytes();
            let addr = SocketAddr::from(([10, 1, x, y], 6379));
            Backend::new(BackendId(i as u32), addr, weight)
        })
        .collect()
}

/// [`CLIENTS`] pseudo-random IPv4 clients (fixed seed, so every run sees the same ones).
fn clients() -> Vec<ClientAddr> {
    let mut rng = Rng::new(SEED);
    (0..CLIENTS)
        .map(|_| {
            let bits = rng.next_u64();
            let ip = (bits as u32).to_be_bytes();
            ClientAddr(SocketAddr::from((ip, (bits >> 32) as u16)))
        })
        .collect()
}

/// `values[next]`, hidden from the optimiser, and moves `next` on by one around the cycle.
fn cycle<T: Copy>(values: &[T], next: &mut usize) -> T {
    let value = values[*next & (CLIENTS - 1)];
    *next = next.wrapping_add(1);
    black_box(value)
}

/// Uneven loads for the algorithms that read them: backend `i` has `i % 7` active connections.
/// The guards keep them counted until dropped.
fn open_connections(backends: &[Backend]) -> Vec<ActiveGuard> {
    backends
        .iter()
        .enumerate()
        .flat_map(|(i, backend)| (0..i % 7).map(|_| backend.open()))
        .collect()
}

fn config() -> Criterion {
    // Short runs: the whole suite should finish in about a minute on two cores.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = maglev_build, maglev_lookup, p2c_pick, wrr_pick, least_connections_pick
}
criterion_main!(benches);
