//! Test support for Sluice's end-to-end tests: real sockets on loopback, real bytes, real processes.
//!
//! What it offers:
//! - [`EchoServer`]: a loopback TCP backend that echoes (carrying half-close) or misbehaves on
//!   purpose ([`Behavior`]: greet first, send then reset, send then FIN while still reading), and
//!   counts and records its connections; [`refusing_addr`] is an address where nothing listens.
//!   [`CrowdEcho`] echoes for thousands of connections from one epoll thread; [`watch_ends`]
//!   sees when each of thousands of client streams ends; [`raise_fd_limit`] makes room for them.
//! - Clients: [`verify_echo`] writes a [`SeededStream`] (seeded pseudo-random bytes in writes of
//!   1 B ..= 300 KB), half-closes, reads everything back concurrently and compares SHA-256 and
//!   counts ([`StreamSummary`]); [`read_to_end`] tells a clean EOF from a reset.
//! - [`Sluice`]: the binary under test as a child process, started from a YAML string, ready once
//!   it logs `sluice ready`, observed through /proc (RSS, fds, CPU time), stopped with SIGTERM,
//!   killed on drop; [`check_config`] and [`run_with_timeout`] for one-shot commands.
//! - [`scrape_metrics`]: the admin endpoint's Prometheus text as a map keyed by [`series`].
//! - [`free_addr`] and friends: loopback ports for tests running in parallel.
//! - [`Netns`]: a network namespace behind a veth pair whose traffic nftables can blackhole
//!   and tc can slow down;
//!   [`fd_limit_wrapper`] starts [`Sluice`] under a low RLIMIT_NOFILE it cannot raise.
//! - [`UdpEchoPool`]: UDP echo backends that prefix each reply with their name and count what
//!   they receive; a backend can be killed (ICMP port unreachable) and restarted on its address.
//! - Faults: [`FaultProxy`] (on either leg: [`Fault`] slices writes into 1-64 B segments,
//!   delays, stalls, blackholes; `reset_all` resets), [`ChildEcho`] (an echo backend in a child
//!   process, to SIGKILL; the test calls [`serve_if_child`] first), [`SlowBackend`],
//!   [`SlowReader`] and [`Pusher`] (thousands of slow peers), and [`figure`] / [`tiered`]
//!   (each fault test's measured figure; sizes of the slow tier).
//!
//! What it does not do: it knows nothing of Sluice's crates (it drives the binary from outside,
//! as a user would), and it never waits without a bound: every wait and loop here has a deadline.
//! It uses std threads, not an async runtime, so a stuck test shows plain thread stacks.

mod addr;
mod child;
mod client;
mod crowd;
mod data;
mod echo;
mod fault;
mod metrics;
mod netns;
mod postgres;
mod process;
mod redis;
mod slow;
mod tcp;
mod tier;
mod udp;

pub use addr::{free_addr, free_addr_v6, free_port, ipv6_loopback_available, refusing_addr};
pub use child::{ChildEcho, serve_if_child};
pub use client::{
    CONNECT_TIMEOUT, ReadOutcome, StreamEnd, VerifyError, VerifyReport, assert_echo, read_to_end,
    read_up_to, verify_echo, verify_echo_many, write_stream,
};
pub use crowd::{CrowdEcho, raise_fd_limit, watch_ends};
pub use data::{Checksum, MAX_WRITE, SeededStream, StreamSummary, summary_of};
pub use echo::{Behavior, ConnRecord, EchoServer};
pub use fault::{Fault, FaultProxy, Leg};
pub use metrics::{
    HttpResponse, closed_connections, http_get, metric, parse_prometheus, scrape_metrics, series,
    wait_metric,
};
pub use netns::Netns;
/// Signals for [`Sluice::signal`].
pub use nix::sys::signal::Signal;
pub use postgres::{PostgresCluster, psql_over_tcp};
pub use process::{
    CommandOutput, ConfigFile, READY_MARKER, READY_TIMEOUT, Sluice, StartError, check_config,
    fd_limit_wrapper, fd_limits, run_config_command, run_with_timeout,
};
pub use redis::{
    RedisServer, Reply, read_reply, redis_command, require_installed, run_id, write_command,
};
pub use slow::{Pusher, SlowBackend, SlowReader};
pub use tcp::{reset, send_queue, wait_acknowledged};
pub use tier::{figure, slow_tier, tiered};
pub use udp::{UdpEcho, UdpEchoPool, split_echo_reply};
