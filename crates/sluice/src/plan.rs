//! Turns a checked config into what the data plane runs: resolved backends, the first
//! snapshot, per-listener limits and the fd-derived connection cap.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;

use sluice_balance::{Backend, BackendId, ListenerBackends, Snapshot};
use sluice_config::{BackendAddress, Config, ConfigError, ConfigErrors, Workers};
use sluice_dataplane::{
    Keepalive, Limits, ListenerPlan, OnMaxConnections, PlaneConfig, RESET_LINGER, SocketSettings,
    UdpPlan,
};
use sluice_probe::{ProbeSetupError, Prober};

/// A config with every hostname resolved and every active check prepared: what `run` starts
/// with, and all that `check` must have seen work.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub config: Config,
    /// Per listener, per backend: the address to connect to.
    pub backends: Vec<Vec<SocketAddr>>,
    /// Per listener: its active check, ready to probe (password file read), if it has one.
    pub probers: Vec<Option<Arc<Prober>>>,
}

/// Does what the config needs from the system before anything starts, so that `check`, `run`
/// and a reload refuse the same files with the same messages: resolves every backend hostname
/// once (the first address the resolver returns) and prepares every active check (reads its
/// password file). A failure is a config error at the line of what caused it.
pub(crate) fn resolve(config: Config, file: &Path) -> Result<Resolved, ConfigErrors> {
    let mut errors = Vec::new();
    let mut backends = Vec::with_capacity(config.listeners.len());
    let mut probers = Vec::with_capacity(config.listeners.len());
    for (li, listener) in config.listeners.iter().enumerate() {
        probers.push(
            prober(listener, li, file)
                .map_err(|e| errors.push(e))
                .ok()
                .flatten(),
        );
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
        Ok(Resolved {
            config,
            backends,
            probers,
        })
    } else {
        errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(errors))
    }
}

/// The listener's active check, prepared; an error names `health.password_file` where the
/// file is the problem.
fn prober(
    listener: &sluice_config::Listener,
    index: usize,
    file: &Path,
) -> Result<Option<Arc<Prober>>, ConfigError> {
    let Some(active) = &listener.health else {
        return Ok(None);
    };
    match Prober::new(&active.check) {
        Ok(prober) => Ok(Some(Arc::new(prober))),
        Err(ProbeSetupError::PasswordFile { path, problem }) => Err(ConfigError::new(
            file,
            listener.password_file_location.unwrap_or(listener.location),
            format!("listeners[{index}].health.password_file"),
            format!("cannot read {}: {problem}", path.display()),
        )),
        Err(other) => Err(ConfigError::new(
            file,
            listener.location,
            format!("listeners[{index}].health"),
            other.to_string(),
        )),
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
    let shares = fd_shares(config, budget, workers);
    let cap = shares.connections;
    let max_sessions = sessions_within(config, shares.sessions, fd_limit);
    let listeners = config
        .listeners
        .iter()
        .zip(&max_sessions)
        .map(|(l, &max_sessions)| ListenerPlan {
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
                max_sessions,
                evict_lru: l.udp.on_max_sessions == sluice_config::OnMaxSessions::EvictLru,
                responses: l.udp.responses,
                requests: l.udp.requests,
                per_packet: l.udp.per_packet,
                idle_timeout: l.timeouts.idle,
            }),
        })
        .collect();
    for (l, &max_sessions) in config.listeners.iter().zip(&max_sessions) {
        if keeps_sessions(l) && (max_sessions as usize) < workers {
            tracing::warn!(
                listener = %l.name,
                max_sessions,
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

/// Whether a listener keeps udp sessions (one socket each): udp, not `per_packet`.
fn keeps_sessions(listener: &sluice_config::Listener) -> bool {
    listener.protocol == sluice_config::Protocol::Udp && !listener.udp.per_packet
}

/// The fd budget's shares for this config (see `sluice_dataplane::fd_shares`).
fn fd_shares(config: &Config, fd_limit: u64, workers: usize) -> sluice_dataplane::FdShares {
    let udp = |l: &&sluice_config::Listener| l.protocol == sluice_config::Protocol::Udp;
    let demand = sluice_dataplane::FdDemand {
        tcp_listeners: config.listeners.iter().filter(|l| !udp(l)).count(),
        udp_listeners: config.listeners.iter().filter(udp).count(),
        sessions_wanted: config
            .listeners
            .iter()
            .filter(|l| keeps_sessions(l))
            .map(|l| u64::from(l.udp.max_sessions))
            .sum(),
    };
    sluice_dataplane::fd_shares(fd_limit, workers, &demand)
}

/// Each listener's `max_sessions` as the data plane runs it (config order; 0 for tcp): as
/// configured while the udp listeners' sum fits their share of the fd budget, else scaled down
/// in proportion, with a warning, so that sessions never take the fds of tcp connections or
/// of the admin endpoint.
fn sessions_within(config: &Config, share: u32, fd_limit: u64) -> Vec<u32> {
    let wanted: u64 = config
        .listeners
        .iter()
        .filter(|l| keeps_sessions(l))
        .map(|l| u64::from(l.udp.max_sessions))
        .sum();
    config
        .listeners
        .iter()
        .map(|l| {
            if l.protocol != sluice_config::Protocol::Udp {
                return 0;
            }
            let configured = l.udp.max_sessions;
            if !keeps_sessions(l) || wanted <= u64::from(share) {
                return configured;
            }
            let capped = (u64::from(configured) * u64::from(share) / wanted).max(1) as u32;
            tracing::warn!(
                listener = %l.name,
                max_sessions = configured,
                capped,
                fd_limit,
                "max_sessions exceeds the udp sessions' share of what RLIMIT_NOFILE allows \
                 (one fd each): capped; datagrams of new flows beyond it are dropped \
                 (sessions_full); raise the fd limit (LimitNOFILE=) or lower max_sessions"
            );
            capped
        })
        .collect()
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
