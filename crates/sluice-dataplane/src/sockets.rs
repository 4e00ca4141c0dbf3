//! Sockets and process limits: listeners, backend sockets, the fd budget, CPU pinning.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

/// The accept backlog asked for; the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket of one worker: SO_REUSEPORT, so every worker binds its own and the
/// kernel spreads new connections across them. Non-blocking: the worker accepts from it
/// when a readiness poll says connections wait, until EAGAIN.
pub(crate) fn listener(bind: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(bind),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&bind.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

/// The receive buffer asked for each udp listener socket.
const UDP_RECV_BUFFER: usize = 4 * 1024 * 1024;

/// A worker's SO_REUSEPORT udp socket for a listener, non-blocking, reporting each datagram's
/// destination address (IP_PKTINFO / IPV6_RECVPKTINFO) so that replies leave from it.
pub(crate) fn udp_listener(bind: SocketAddr) -> io::Result<Socket> {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = Socket::new(
        Domain::for_address(bind),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if bind.is_ipv4() {
        setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
    } else {
        setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?;
    }
    // A burst of datagrams waits here while the worker is busy: the default (208 KiB with
    // net.core.rmem_max at its default) holds 150 datagrams of 1400 B, and the kernel drops the
    // rest unseen. Past rmem_max only with CAP_NET_ADMIN (SO_RCVBUFFORCE); memory is used only
    // while datagrams are queued.
    if setsockopt(&socket, sockopt::RcvBufForce, &UDP_RECV_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER);
    }
    socket.bind(&bind.into())?;
    Ok(socket)
}

/// A udp socket connected to a backend, non-blocking: the kernel then delivers only that
/// backend's replies to it, and an ICMP error comes back as a receive error.
pub(crate) fn udp_backend_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    socket.connect(&addr.into())?;
    Ok(socket)
}

/// How the kernel treats both sockets of every TCP connection of a listener: how a peer that
/// vanished (no FIN, no reset) is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketSettings {
    /// TCP_USER_TIMEOUT: how long sent bytes may stay unacknowledged before the kernel aborts
    /// the connection; zero keeps the kernel's default.
    pub user_timeout: Duration,
    /// TCP keepalive; `None` leaves it off.
    pub keepalive: Option<Keepalive>,
}

/// TCP keepalive probes (the kernel counts their times in whole seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (TCP_KEEPIDLE).
    pub time: Duration,
    /// Time between probes (TCP_KEEPINTVL).
    pub interval: Duration,
    /// Unanswered probes before the connection is aborted (TCP_KEEPCNT).
    pub probes: u32,
}

impl Default for SocketSettings {
    /// The config's defaults: keepalive after 60 s idle, every 10 s, 6 probes; the kernel's
    /// user timeout.
    fn default() -> Self {
        SocketSettings {
            user_timeout: Duration::ZERO,
            keepalive: Some(Keepalive {
                time: Duration::from_secs(60),
                interval: Duration::from_secs(10),
                probes: 6,
            }),
        }
    }
}

/// A socket toward a backend, not yet connected.
pub(crate) fn backend_socket(addr: SocketAddr, settings: &SocketSettings) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    tune(&SockRef::from(&socket), settings)?;
    Ok(socket)
}

/// Unsent bytes a proxied socket may hold (TCP_NOTSENT_LOWAT). Without a bound the kernel
/// autotunes the send buffer toward `tcp_wmem`'s maximum, and a thousand connections stalled
/// on slow peers held about 0.8 MiB each of unsent bytes in Sluice's sockets: enough kernel
/// memory to push the whole machine into TCP memory pressure, which slowed every other
/// connection by half and more (`crates/sluice/tests/fault_slow.rs`). One pipe's worth keeps a
/// splice burst whole. The price, on loopback where one segment is 64 KiB: about 5% of
/// 8-stream bulk throughput (`bench/ab.sh`, 16 rounds: 0.93 of the build without it).
pub(crate) const NOTSENT_LOWAT: u32 = 256 * 1024;

/// TCP_NODELAY (we forward what we get, when we get it), keepalive (dead peers are noticed
/// even on connections with `timeouts.idle: 0`) and the user timeout (bytes that a vanished
/// peer never acknowledges end the connection), and the unsent bound [`NOTSENT_LOWAT`].
pub(crate) fn tune(socket: &SockRef<'_>, settings: &SocketSettings) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    sluice_uring::set_notsent_lowat(socket.as_fd(), NOTSENT_LOWAT)?;
    if let Some(keepalive) = settings.keepalive {
        socket.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(keepalive.time)
                .with_interval(keepalive.interval)
                .with_retries(keepalive.probes),
        )?;
    }
    if !settings.user_timeout.is_zero() {
        socket.set_tcp_user_timeout(Some(settings.user_timeout))?;
    }
    Ok(())
}

/// The file-descriptor budget: raises the soft RLIMIT_NOFILE to the hard limit (tolerating
/// EPERM) and returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(
                    soft,
                    hard,
                    error = e.to_string(),
                    "could not raise RLIMIT_NOFILE"
                );
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// How many pipes each worker may lease for splice forwarding: at most 256, and never more
/// than a sixteenth of the fd budget (each pipe costs two descriptors).
pub fn pipes_for_budget(fd_limit: u64, workers: usize) -> usize {
    (fd_limit / 16 / workers.max(1) as u64).min(256) as usize
}

/// How many proxied connections the fd budget allows when only tcp listeners share it (see
/// [`fd_shares`]). `fd_limit` is the data plane's share: the admin endpoint's descriptors are
/// taken off it before (`admin.max_connections`).
pub fn connections_for_budget(fd_limit: u64, workers: usize, listeners: usize) -> u32 {
    let demand = FdDemand {
        tcp_listeners: listeners,
        udp_listeners: 0,
        sessions_wanted: 0,
    };
    fd_shares(fd_limit, workers, &demand).connections
}

/// What draws on the fd budget besides the reserve: the listeners (one socket per tcp listener
/// per worker, two per udp listener per worker) and the udp sessions the config asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdDemand {
    pub tcp_listeners: usize,
    pub udp_listeners: usize,
    /// The sum of `max_sessions` of the udp listeners that keep sessions (not `per_packet`).
    pub sessions_wanted: u64,
}

/// The fd budget's parts: each kind of flow has its own, so that a flood of one never takes
/// the fds of another (DESIGN.md, pitfalls). The reserve holds the listeners, rings,
/// eventfds, the workers' pipes, the admin endpoint, logs and the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdShares {
    /// Proxied TCP connections (two sockets each), across workers.
    pub connections: u32,
    /// UDP sessions (one socket each), across udp listeners and workers.
    pub sessions: u32,
}

/// Splits the fd budget: udp sessions get what the config asks for, at most half of what the
/// reserve leaves when tcp listeners share the budget (all of it otherwise); tcp connections
/// get the rest, two fds each.
pub fn fd_shares(fd_limit: u64, workers: usize, demand: &FdDemand) -> FdShares {
    let workers = workers as u64;
    let pipes = if demand.tcp_listeners > 0 {
        2 * pipes_for_budget(fd_limit, workers as usize) as u64 * workers
    } else {
        0
    };
    let listener_fds = demand.tcp_listeners as u64 + 2 * demand.udp_listeners as u64;
    let reserve = 64 + workers * (listener_fds + 4) + pipes;
    let usable = fd_limit.saturating_sub(reserve);
    let sessions = match (demand.udp_listeners, demand.tcp_listeners) {
        (0, _) => 0,
        (_, 0) => usable.min(demand.sessions_wanted),
        _ => (usable / 2).min(demand.sessions_wanted),
    };
    let clamp = |n: u64| n.clamp(1, u64::from(u32::MAX)) as u32;
    FdShares {
        connections: clamp(usable.saturating_sub(sessions) / 2),
        sessions: if demand.udp_listeners == 0 {
            0
        } else {
            clamp(sessions)
        },
    }
}

/// Pins the calling thread to the `index`-th CPU it is allowed to run on (wrapping around).
pub(crate) fn pin_to_cpu(index: usize) -> nix::Result<usize> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let allowed = sched_getaffinity(Pid::from_raw(0))?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    if cpus.is_empty() {
        return Ok(0);
    }
    let cpu = cpus[index % cpus.len()];
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_leaves_a_reserve_and_counts_two_fds_per_connection() {
        // 1024 fds, 1 worker, 1 listener: 64 pipes (128 fds) and a reserve of 69.
        assert_eq!(pipes_for_budget(1024, 1), 64);
        assert_eq!(connections_for_budget(1024, 1, 1), (1024 - 69 - 128) / 2);
        assert_eq!(pipes_for_budget(1 << 20, 4), 256);
        assert_eq!(connections_for_budget(10, 2, 3), 1);
    }

    #[test]
    fn udp_sessions_take_at_most_half_and_leave_tcp_the_rest() {
        // 512 fds, 2 workers, one tcp and one udp listener: 16 pipes per worker (64 fds) and a
        // reserve of 64 + 2 * (1 + 2 + 4) = 78: 370 usable.
        let both = |wanted| FdDemand {
            tcp_listeners: 1,
            udp_listeners: 1,
            sessions_wanted: wanted,
        };
        let shares = fd_shares(512, 2, &both(100_000));
        assert_eq!(shares.sessions, 370 / 2);
        assert_eq!(shares.connections, (370 - 185) / 2);
        // What udp does not ask for stays with tcp.
        let shares = fd_shares(512, 2, &both(10));
        assert_eq!((shares.sessions, shares.connections), (10, 180));
        // Only udp listeners: no pipes, every usable fd for sessions.
        let udp_only = FdDemand {
            tcp_listeners: 0,
            udp_listeners: 1,
            sessions_wanted: 100_000,
        };
        assert_eq!(
            fd_shares(512, 2, &udp_only).sessions,
            512 - 64 - 2 * (2 + 4)
        );
        // Only tcp: as before (a reserve of 64 + 2 * (1 + 4) and 64 pipe fds).
        assert_eq!(connections_for_budget(512, 2, 1), (512 - 74 - 64) / 2);
    }

    #[test]
    fn tune_applies_keepalive_and_user_timeout() {
        let settings = SocketSettings {
            user_timeout: Duration::from_millis(2500),
            keepalive: Some(Keepalive {
                time: Duration::from_secs(7),
                interval: Duration::from_secs(3),
                probes: 4,
            }),
        };
        let socket = backend_socket("127.0.0.1:1".parse().unwrap(), &settings).unwrap();
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(2500))
        );

        let off = SocketSettings {
            user_timeout: Duration::ZERO,
            keepalive: None,
        };
        let socket = backend_socket("127.0.0.1:1".parse().unwrap(), &off).unwrap();
        assert!(!socket.keepalive().unwrap());
        assert_eq!(socket.tcp_user_timeout().unwrap(), None);
    }

    #[test]
    fn two_listeners_share_a_port_with_reuseport() {
        let a = listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = a.local_addr().unwrap().as_socket().unwrap().port();
        let b = listener(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
        assert_eq!(b.local_addr().unwrap().as_socket().unwrap().port(), port);
    }
}
