//! UDP echo server and bounded-window UDP load generator (used by `bench/udp.sh`).
//!
//!   udp-load echo --listen ADDR [--threads N]
//!       Echo every datagram back to its sender, unchanged. Each thread owns one SO_REUSEPORT
//!       socket and moves datagrams in batches (`recvmmsg` with MSG_WAITFORONE, then one
//!       `sendmmsg`), so the echo costs about two syscalls per batch, not per datagram.
//!       Prints "echo ADDR" once bound; runs until killed.
//!
//!   udp-load load --target ADDR --size BYTES [--sockets N] [--window W] [--duration SECS]
//!                 [--warmup SECS] [--loss-timeout-ms MS] [--threads T]
//!       N connected sockets (N flows, each its own source port), each keeping at most W
//!       datagrams in flight: a datagram is sent, and the next one only when an echo comes back
//!       (closed loop, so a slower target gets a lower rate, never a growing queue). Counts echoes
//!       received between the end of the warm-up and the end of the run. A flow whose
//!       outstanding datagrams see no echo for MS milliseconds counts them as lost and starts a
//!       new window (a new epoch: late echoes of the old one are counted apart, never as
//!       round trips). Every echo is checked: length, flow, epoch and the whole payload pattern.
//!       Prints one line of `key=value` pairs; `rt_per_s` is echoed datagrams (round trips) per
//!       second. Exits 1 if nothing came back.
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

const MAX_DGRAM: usize = 65536;
const HEADER: usize = 16;

fn usage() -> ! {
    eprintln!(
        "usage: udp-load echo --listen ADDR [--threads N]\n       udp-load load --target ADDR \
         --size BYTES [--sockets N] [--window W] [--duration SECS] [--warmup SECS] \
         [--loss-timeout-ms MS] [--threads T]"
    );
    std::process::exit(64);
}

struct Args(Vec<String>);

impl Args {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == key)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    fn parse<T: std::str::FromStr>(&self, key: &str, default: Option<T>) -> T {
        match self.get(key) {
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("bad value for {key}: {v}");
                usage()
            }),
            None => default.unwrap_or_else(|| {
                eprintln!("missing {key}");
                usage()
            }),
        }
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn set_int_opt(fd: RawFd, level: i32, name: i32, value: i32) {
    // SAFETY: `value` is a valid c_int for the duration of the call; failure is ignored (best
    // effort: larger socket buffers, capped by net.core.[rw]mem_max).
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

fn udp_socket(addr: &SocketAddr, reuseport: bool) -> io::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the fd is owned by the UdpSocket below.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    if reuseport {
        set_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1);
    }
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
    Ok(sock)
}

// ------------------------------------------------------------------------------------ echo

fn bind_echo(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = udp_socket(&addr, true)?;
    let (storage, len) = sockaddr_of(&addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Echo loop of one thread: receive a batch, send it back to where each datagram came from.
fn echo_loop(sock: UdpSocket) -> ! {
    const BATCH: usize = 64;
    let fd = sock.as_raw_fd();
    let mut bufs = vec![0u8; BATCH * MAX_DGRAM];
    // SAFETY: all-zero is valid for these plain C structs.
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut iovs: Vec<libc::iovec> = (0..BATCH)
        .map(|i| libc::iovec {
            iov_base: bufs[i * MAX_DGRAM..].as_mut_ptr().cast(),
            iov_len: MAX_DGRAM,
        })
        .collect();
    // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
    let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    loop {
        for i in 0..BATCH {
            iovs[i].iov_len = MAX_DGRAM;
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at live buffers (`bufs`, `names`, `iovs`) of the stated
        // sizes, which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            let e = errno();
            if e != libc::EINTR && e != libc::EAGAIN {
                eprintln!("recvmmsg: {}", io::Error::from_raw_os_error(e));
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }
        let n = n as usize;
        for i in 0..n {
            iovs[i].iov_len = hdrs[i].msg_len as usize;
        }
        let mut done = 0;
        while done < n {
            // SAFETY: as above; headers `done..n` are filled by the receive, with the sender's
            // address as destination and the received length as payload length.
            let s = unsafe { libc::sendmmsg(fd, hdrs[done..].as_mut_ptr(), (n - done) as u32, 0) };
            if s > 0 {
                done += s as usize;
            } else {
                let e = errno();
                if e != libc::EINTR {
                    // The first datagram of the rest failed (e.g. its sender is gone): skip it.
                    done += 1;
                }
            }
        }
    }
}

fn run_echo(args: &Args) -> ! {
    let addr: SocketAddr = args.parse("--listen", None);
    let threads: usize = args.parse("--threads", Some(1));
    let mut socks = Vec::new();
    for _ in 0..threads.max(1) {
        socks.push(bind_echo(addr).unwrap_or_else(|e| {
            eprintln!("bind {addr}: {e}");
            std::process::exit(71)
        }));
    }
    println!("echo {}", socks[0].local_addr().expect("local addr"));
    let mut handles = Vec::new();
    for s in socks {
        handles.push(std::thread::spawn(move || echo_loop(s)));
    }
    for h in handles {
        let _ = h.join();
    }
    std::process::exit(1)
}

// ------------------------------------------------------------------------------------ load

#[derive(Default, Clone, Copy)]
struct Stats {
    /// Echoes received within the measured interval (the result).
    round_trips: u64,
    sent: u64,
    received: u64,
    lost: u64,
    late: u64,
    bad: u64,
    refused: u64,
    errors: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.round_trips += o.round_trips;
        self.sent += o.sent;
        self.received += o.received;
        self.lost += o.lost;
        self.late += o.late;
        self.bad += o.bad;
        self.refused += o.refused;
        self.errors += o.errors;
    }
}

struct Flow {
    sock: UdpSocket,
    id: u32,
    in_flight: u32,
    epoch: u32,
    seq: u64,
    last: Instant,
    /// The payload: header (flow id, epoch, sequence) then a pattern particular to the flow.
    payload: Vec<u8>,
}

impl Flow {
    /// Sends until `window` datagrams are outstanding (or the socket refuses more for now).
    fn refill(&mut self, window: u32, st: &mut Stats) {
        let mut refusals = 0;
        while self.in_flight < window {
            self.payload[0..4].copy_from_slice(&self.id.to_le_bytes());
            self.payload[4..8].copy_from_slice(&self.epoch.to_le_bytes());
            self.payload[8..16].copy_from_slice(&self.seq.to_le_bytes());
            // SAFETY: `payload` is valid for its length; the socket is connected.
            let r = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    self.payload.as_ptr().cast(),
                    self.payload.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                match errno() {
                    libc::EINTR => continue,
                    // An ICMP port unreachable from an earlier datagram, reported once: retry.
                    libc::ECONNREFUSED if refusals < 4 => {
                        refusals += 1;
                        st.refused += 1;
                        continue;
                    }
                    // Socket buffer full: the loss scan retries this flow later.
                    libc::EAGAIN | libc::ENOBUFS => return,
                    _ => {
                        st.errors += 1;
                        return;
                    }
                }
            }
            self.in_flight += 1;
            self.seq += 1;
            st.sent += 1;
        }
    }

    fn valid(&self, reply: &[u8]) -> bool {
        reply.len() == self.payload.len()
            && reply[0..4] == self.id.to_le_bytes()
            && reply[HEADER..] == self.payload[HEADER..]
    }
}

struct LoadCfg {
    target: SocketAddr,
    size: usize,
    window: u32,
    warmup: Duration,
    duration: Duration,
    loss_timeout: Duration,
}

fn load_thread(cfg: &LoadCfg, first_id: u32, count: u32, start: Instant) -> io::Result<Stats> {
    let mut st = Stats::default();
    let mut flows = Vec::new();
    let local: SocketAddr = if cfg.target.is_ipv4() {
        "0.0.0.0:0".parse().expect("addr")
    } else {
        "[::]:0".parse().expect("addr")
    };
    for id in first_id..first_id + count {
        let sock = udp_socket(&local, false)?;
        sock.connect(cfg.target)?;
        let mut payload = vec![0u8; cfg.size];
        for (i, b) in payload.iter_mut().enumerate().skip(HEADER) {
            *b = (i as u32).wrapping_mul(31).wrapping_add(id.wrapping_mul(7)) as u8;
        }
        flows.push(Flow {
            sock,
            id,
            in_flight: 0,
            epoch: 0,
            seq: 0,
            last: start,
            payload,
        });
    }
    // SAFETY: plain syscall, result checked.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    for (i, f) in flows.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the call; `ep` and the fd are open.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, f.sock.as_raw_fd(), &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let measure_from = start + cfg.warmup;
    let end = measure_from + cfg.duration;
    let now = Instant::now();
    for f in &mut flows {
        f.last = now;
        f.refill(cfg.window, &mut st);
    }
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; flows.len().max(1)];
    let mut buf = vec![0u8; MAX_DGRAM];
    let mut last_scan = now;
    loop {
        // SAFETY: `evs` is a valid writable array of `evs.len()` events.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), evs.len() as i32, 5) };
        let now = Instant::now();
        if now >= end {
            break;
        }
        let measuring = now >= measure_from;
        for ev in evs.iter().take(n.max(0) as usize) {
            let f = &mut flows[ev.u64 as usize];
            loop {
                // SAFETY: `buf` is valid and writable for its length.
                let r = unsafe {
                    libc::recv(
                        f.sock.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if r < 0 {
                    match errno() {
                        libc::EAGAIN | libc::EINTR => break,
                        libc::ECONNREFUSED => {
                            st.refused += 1;
                            continue;
                        }
                        _ => {
                            st.errors += 1;
                            break;
                        }
                    }
                }
                let reply = &buf[..r as usize];
                if !f.valid(reply) {
                    st.bad += 1;
                    continue;
                }
                st.received += 1;
                let epoch = u32::from_le_bytes(reply[4..8].try_into().expect("4 bytes"));
                if epoch != f.epoch || f.in_flight == 0 {
                    st.late += 1;
                    continue;
                }
                f.in_flight -= 1;
                f.last = now;
                if measuring {
                    st.round_trips += 1;
                }
            }
            f.refill(cfg.window, &mut st);
        }
        if now.duration_since(last_scan) >= Duration::from_millis(10) {
            last_scan = now;
            for f in &mut flows {
                if f.in_flight > 0 && now.duration_since(f.last) >= cfg.loss_timeout {
                    st.lost += u64::from(f.in_flight);
                    f.in_flight = 0;
                    f.epoch = f.epoch.wrapping_add(1);
                    f.last = now;
                }
                if f.in_flight < cfg.window {
                    f.refill(cfg.window, &mut st);
                }
            }
        }
    }
    // SAFETY: closing the epoll fd we created, once.
    unsafe { libc::close(ep) };
    Ok(st)
}

fn run_load(args: &Args) -> ! {
    let cfg = LoadCfg {
        target: args.parse("--target", None),
        size: args.parse("--size", None),
        window: args.parse("--window", Some(4u32)).max(1),
        warmup: Duration::from_secs_f64(args.parse("--warmup", Some(0.5f64))),
        duration: Duration::from_secs_f64(args.parse("--duration", Some(4.0f64))),
        loss_timeout: Duration::from_millis(args.parse("--loss-timeout-ms", Some(100u64))),
    };
    let sockets: u32 = args.parse("--sockets", Some(16u32)).max(1);
    let threads: u32 = args.parse("--threads", Some(1u32)).clamp(1, sockets);
    if !(HEADER..=MAX_DGRAM - 1).contains(&cfg.size) {
        eprintln!("--size must be {HEADER}..{}", MAX_DGRAM - 1);
        usage();
    }
    let start = Instant::now();
    let cfg = &cfg;
    let results: Vec<io::Result<Stats>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let first = sockets * t / threads;
                let count = sockets * (t + 1) / threads - first;
                s.spawn(move || load_thread(cfg, first, count, start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("thread panicked")))
            })
            .collect()
    });
    let mut st = Stats::default();
    for r in results {
        match r {
            Ok(s) => st.add(&s),
            Err(e) => {
                eprintln!("load: {e}");
                std::process::exit(71);
            }
        }
    }
    let secs = cfg.duration.as_secs_f64();
    let rate = st.round_trips as f64 / secs;
    println!(
        "rt_per_s={rate:.1} mbit_per_s={:.1} size={} sockets={sockets} window={} seconds={secs} \
         sent={} received={} lost={} late={} bad={} refused={} errors={}",
        rate * cfg.size as f64 * 8.0 / 1e6,
        cfg.size,
        cfg.window,
        st.sent,
        st.received,
        st.lost,
        st.late,
        st.bad,
        st.refused,
        st.errors
    );
    std::process::exit(if st.round_trips > 0 { 0 } else { 1 })
}

fn main() {
    let args = Args(std::env::args().skip(1).collect());
    match args.0.first().map(String::as_str) {
        Some("echo") => run_echo(&args),
        Some("load") => run_load(&args),
        _ => usage(),
    }
}
