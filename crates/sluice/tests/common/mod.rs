//! Shared by the end-to-end tests: the binary's path, config builders, and the macro that runs
//! each scenario with one worker and with two.

#![allow(dead_code)] // Each test file uses its own part of this module.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use sluice_balance::maglev::MaglevTable;
use sluice_balance::{Backend, BackendId, ClientAddr, HashKey};
use sluice_testkit::{Sluice, free_addr};

/// Upper bound for one test's traffic; generous for a debug build on two cores.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The binary under test, built by Cargo for these tests.
pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sluice"))
}

/// One listener of a config.
#[derive(Debug, Clone)]
pub struct Listener {
    /// `name`.
    pub name: String,
    /// `bind`.
    pub bind: SocketAddr,
    /// `protocol`: `tcp` or `udp`.
    pub protocol: String,
    /// Backends in the short form.
    pub backends: Vec<SocketAddr>,
    /// `algorithm`.
    pub algorithm: String,
    /// Per backend, when not empty: its `weight` (the long form).
    pub weights: Vec<u16>,
    /// More keys for the listener, one per line, without indentation (`retries: 1`).
    pub extra: Vec<String>,
}

impl Listener {
    /// A tcp round-robin listener named `name` on a fresh loopback port.
    pub fn new(name: &str, backends: &[SocketAddr]) -> Self {
        Self {
            name: name.to_owned(),
            bind: free_addr(),
            protocol: "tcp".to_owned(),
            backends: backends.to_vec(),
            algorithm: "round_robin".to_owned(),
            weights: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// Adds one `key: value` line to the listener.
    pub fn with(mut self, line: &str) -> Self {
        self.extra.push(line.to_owned());
        self
    }

    /// Speaks `protocol` (`udp`) instead of tcp.
    pub fn protocol(mut self, protocol: &str) -> Self {
        self.protocol = protocol.to_owned();
        self
    }

    /// Balances with `algorithm` instead of round-robin.
    pub fn algorithm(mut self, algorithm: &str) -> Self {
        self.algorithm = algorithm.to_owned();
        self
    }

    /// Gives the backends these weights (one per backend, in order).
    pub fn weights(mut self, weights: &[u16]) -> Self {
        assert_eq!(weights.len(), self.backends.len());
        self.weights = weights.to_vec();
        self
    }

    /// Binds on `bind` instead.
    pub fn bind(mut self, bind: SocketAddr) -> Self {
        self.bind = bind;
        self
    }
}

/// A whole config: `workers`, optional `admin.bind`, top-level extras, and the listeners.
pub fn config(
    workers: usize,
    admin: Option<SocketAddr>,
    top: &[&str],
    listeners: &[Listener],
) -> String {
    let mut yaml = format!("workers: {workers}\n");
    for line in top {
        writeln!(yaml, "{line}").unwrap();
    }
    if let Some(admin) = admin {
        writeln!(yaml, "admin:\n  bind: \"{admin}\"").unwrap();
    }
    yaml.push_str("listeners:\n");
    for listener in listeners {
        writeln!(
            yaml,
            "  - name: {}\n    protocol: {}\n    bind: \"{}\"",
            listener.name, listener.protocol, listener.bind
        )
        .unwrap();
        writeln!(yaml, "    algorithm: {}\n    backends:", listener.algorithm).unwrap();
        for (i, backend) in listener.backends.iter().enumerate() {
            match listener.weights.get(i) {
                Some(weight) => writeln!(
                    yaml,
                    "      - {{ address: \"{backend}\", weight: {weight} }}"
                )
                .unwrap(),
                None => writeln!(yaml, "      - \"{backend}\"").unwrap(),
            }
        }
        for line in &listener.extra {
            writeln!(yaml, "    {line}").unwrap();
        }
    }
    yaml
}

/// Starts Sluice with one listener to `backends`; returns it and the listener's address.
pub fn start(workers: usize, backends: &[SocketAddr]) -> (Sluice, SocketAddr) {
    start_listener(workers, Listener::new("test", backends))
}

/// Starts Sluice with `listener` alone; returns it and the listener's address.
pub fn start_listener(workers: usize, listener: Listener) -> (Sluice, SocketAddr) {
    let bind = listener.bind;
    let sluice = Sluice::start(binary(), &config(workers, None, &[], &[listener]));
    (sluice, bind)
}

/// For each scenario `fn name(workers: usize)`, defines `mod name` with two tests, `workers_1` and
/// `workers_2`, so a failure names the scenario and the worker count.
#[macro_export]
macro_rules! with_workers_1_and_2 {
    ($($scenario:ident),+ $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn workers_1() {
                    super::$scenario(1);
                }

                #[test]
                fn workers_2() {
                    super::$scenario(2);
                }
            }
        )+
    };
}

/// The Maglev table an instance builds for `addrs`, each of weight 1, at the default size.
pub fn equal_weight_table(addrs: &[SocketAddr]) -> MaglevTable {
    let backends: Vec<Backend> = addrs
        .iter()
        .enumerate()
        .map(|(i, &a)| Backend::new(BackendId(i as u32), a, 1))
        .collect();
    MaglevTable::build(&backends, 65537)
}

/// The `client_ip` key of a client at `ip`.
pub fn client_key(ip: Ipv4Addr) -> u64 {
    HashKey::ClientIp.hash(ClientAddr(SocketAddr::from((ip, 1))))
}

/// Asserts that every client reached the backend (an index into `addrs`) that a Maglev table
/// built in this process from `addrs` gives it.
pub fn assert_maglev_choices<'a>(
    addrs: &[SocketAddr],
    choices: impl IntoIterator<Item = (&'a Ipv4Addr, &'a usize)>,
) {
    let table = equal_weight_table(addrs);
    for (&ip, &index) in choices {
        assert_eq!(
            table.lookup(client_key(ip)),
            Some(BackendId(index as u32)),
            "client {ip}"
        );
    }
}
