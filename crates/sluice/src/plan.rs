//! Turns a checked config into what the data plane runs: resolved backends, the first
//! snapshot, per-listener limits and the fd-derived connection cap.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use sluice_balance::{Backend, BackendId, ListenerBackends, Snapshot};
use sluice_config::{BackendAddress, Config, ConfigError, ConfigErrors, Workers};
use sluice_dataplane::{
    Keepalive, Limits, ListenerPlan, OnMaxConnections, PlaneConfig, RESET_LINGER, SocketSettings,
    UdpPlan,
};

/// A config with every hostname resolved.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub config: Config,
    /// Per listener, per backend: the address to connect to.
    pub backends: Vec<Vec<SocketAddr>>,
}

/// Resolves every backend hostname once (the first address the resolver returns). An address
/// that does not resolve is a config error at the backend's line.
pub(crate) fn resolve(config: Config, file: &Path) -> Result<Resolved, ConfigErrors> {
    let mut errors = Vec::new();
    let mut backends = Vec::with_capacity(config.listeners.len());
    for (li, listener) in config.listeners.iter().enumerate() {
        let mut addrs = Vec::with_capacity(listener.backends.len());
        for (bi, backend) in listener.backends.iter().enumerate() {
            match &backend.address {
                BackendAddress::Ip(addr) => addrs.push(*addr),
                BackendAddress::Host { host, port } => {
                    match (host.as_str(), *port)
                        .to_socket_addrs()
                        .map(|mut a| a.next())
                    {
                        Ok(Some(addr)) => addrs.push(addr),
                        Ok(None) | Err(_) => errors.push(ConfigError::new(
                            file,
                            backend.location,
                            format!("listeners[{li}].backends[{bi}]"),
                            format!("cannot resolve hostname {host:?}"),
                        )),
                    }
                }
            }
        }
        backends.push(addrs);
    }
    if errors.is_empty() {
        Ok(Resolved { config, backends })
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The snapshot of the config with every backend up (what `sluice inspect` shows; `run` takes
/// its first snapshot from the health manager after the first probes).
pub(crate) fn snapshot(resolved: &Resolved) -> Snapshot {
    let listeners = resolved
        .config
        .listeners
        .iter()
        .zip(&resolved.backends)
        .map(|(listener, addrs)| {
            let backends = listener
                .backends
                .iter()
                .zip(addrs)
                .enumerate()
                .map(|(i, (spec, addr))| {
                    let mut backend = Backend::new(BackendId(i as u32), *addr, spec.weight);
                    backend.backup = spec.backup;
                    backend
                })
                .collect();
            ListenerBackends::with_fallback(listener.algorithm, listener.on_all_down, backends)
        })
        .collect();
    Snapshot {
        generation: 1,
        listeners,
    }
}

/// How many distinct backends a listener configured with `configured` may ever have: room for
/// reloads to add as many again (at least 64 more), each costing a few counters per worker.
pub(crate) fn backends_max(configured: usize) -> usize {
    configured + configured.max(64)
}

/// The kernel settings of both sockets of a tcp listener's connections.
fn socket_settings(listener: &sluice_config::Listener) -> SocketSettings {
    let k = &listener.keepalive;
    SocketSettings {
        user_timeout: listener.timeouts.user_timeout,
        keepalive: k.is_on().then_some(Keepalive {
            time: k.time,
            interval: k.interval,
            probes: k.probes,
        }),
    }
}

/// The number of workers `workers: auto` means: the CPUs this process may run on.
pub(crate) fn worker_count(workers: Workers) -> usize {
    match workers {
        Workers::Count(n) => n.get(),
        Workers::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// The descriptors the admin endpoint may hold: its connections, its listening socket, and one
/// accepted over its cap before it is closed. They are kept out of the data plane's budget, so
/// that neither can take the other's.
pub(crate) fn admin_fds(config: &Config) -> u64 {
    config
        .admin
        .map_or(0, |admin| u64::from(admin.max_connections) + 2)
}

/// The data plane's configuration, given the fd limit in force.
pub(crate) fn plane(config: &Config, fd_limit: u64) -> PlaneConfig {
    let workers = worker_count(config.workers);
    // The data plane's share of the descriptors: the limit less the admin endpoint's.
    let budget = fd_limit.saturating_sub(admin_fds(config));
    let cap = sluice_dataplane::connections_for_budget(budget, workers, config.listeners.len());
    let listeners = config
        .listeners
        .iter()
        .map(|l| ListenerPlan {
            name: l.name.clone(),
            bind: l.bind,
            limits: Limits {
                connect_timeout: l.timeouts.connect,
                idle_timeout: l.timeouts.idle,
                half_close_timeout: l.timeouts.half_close,
                retries: l.retries,
                reset_linger: RESET_LINGER,
            },
            max_connections: if l.max_connections == 0 {
                cap
            } else {
                l.max_connections
            },
            within_fd_budget: l.max_connections == 0,
            on_max_connections: match l.on_max_connections {
                sluice_config::OnMaxConnections::Queue => OnMaxConnections::Queue,
                sluice_config::OnMaxConnections::Reject => OnMaxConnections::Reject,
            },
            sockets: socket_settings(l),
            backends_max: backends_max(l.backends.len()),
            udp: (l.protocol == sluice_config::Protocol::Udp).then_some(UdpPlan {
                max_sessions: l.udp.max_sessions,
                evict_lru: l.udp.on_max_sessions == sluice_config::OnMaxSessions::EvictLru,
                responses: l.udp.responses,
                requests: l.udp.requests,
                per_packet: l.udp.per_packet,
                idle_timeout: l.timeouts.idle,
            }),
        })
        .collect();
    for l in &config.listeners {
        if l.protocol == sluice_config::Protocol::Udp
            && !l.udp.per_packet
            && (l.udp.max_sessions as usize) < workers
        {
            tracing::warn!(
                listener = %l.name,
                max_sessions = l.udp.max_sessions,
                workers,
                "max_sessions is split across workers and is below their number: some workers \
                 get no session and drop their clients' datagrams; raise max_sessions"
            );
        }
    }
    let explicit: u64 = config
        .listeners
        .iter()
        .map(|l| u64::from(l.max_connections))
        .sum();
    if explicit > u64::from(cap) {
        tracing::warn!(
            max_connections = explicit,
            fd_budget_connections = cap,
            fd_limit,
            "max_connections exceeds what RLIMIT_NOFILE allows: accepts will meet EMFILE and \
             back off; raise the fd limit (LimitNOFILE=) or lower max_connections"
        );
    }
    PlaneConfig {
        workers,
        listeners,
        connections_max_total: cap,
        pin_workers: true,
        pipes_per_worker: sluice_dataplane::pipes_for_budget(budget, workers),
        events: None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(admin: &str) -> Config {
        let yaml = format!(
            "workers: 1\n{admin}listeners:\n  - name: a\n    bind: 127.0.0.1:1000\n    \
             backends: [127.0.0.1:1]\n"
        );
        sluice_config::parse(&yaml, Path::new("test.yaml")).unwrap()
    }

    #[test]
    fn the_admin_share_is_kept_out_of_the_data_plane_budget() {
        let without = plane(&config(""), 512);
        assert_eq!(
            without.connections_max_total,
            sluice_dataplane::connections_for_budget(512, 1, 1)
        );
        // The default cap of 64, the listening socket and one closed over the cap.
        let default = plane(&config("admin: { bind: 127.0.0.1:9900 }\n"), 512);
        assert_eq!(
            default.connections_max_total,
            sluice_dataplane::connections_for_budget(512 - 66, 1, 1)
        );
        assert_eq!(
            default.pipes_per_worker,
            sluice_dataplane::pipes_for_budget(512 - 66, 1)
        );
        let small = plane(
            &config("admin: { bind: 127.0.0.1:9900, max_connections: 2 }\n"),
            512,
        );
        assert_eq!(
            small.connections_max_total,
            sluice_dataplane::connections_for_budget(512 - 4, 1, 1)
        );
        assert!(small.connections_max_total > default.connections_max_total);
    }
}
