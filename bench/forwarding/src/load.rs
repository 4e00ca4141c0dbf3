//! Load generators and the test backend: plain std sockets and a small epoll loop.
//!
//! The backend reads a one-byte header on every connection: `D` = discard everything and close
//! after EOF (bulk), `E` = echo everything back (ping-pong).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::time::{Duration, Instant};

fn epoll_ctl(ep: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call.
    unsafe {
        libc::epoll_ctl(ep, op, fd, &mut ev);
    }
}

fn epoll_create() -> RawFd {
    // SAFETY: plain syscall, result checked.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1: {}", io::Error::last_os_error());
    ep
}

fn epoll_wait(ep: RawFd, evs: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
    // SAFETY: `evs` is a valid, writable array of `evs.len()` events.
    let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), evs.len() as i32, timeout_ms) };
    if n < 0 { 0 } else { n as usize }
}

fn sys_read(fd: RawFd, buf: &mut [u8]) -> isize {
    // SAFETY: `buf` is valid and writable for `buf.len()` bytes.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }
}

fn sys_write(fd: RawFd, buf: &[u8]) -> isize {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) }
}

fn sys_close(fd: RawFd) {
    // SAFETY: closing an fd owned by the caller, once.
    unsafe {
        libc::close(fd);
    }
}

struct BConn {
    kind: u8,
    pending: Vec<u8>,
    out_armed: bool,
}

/// Runs the discard/echo backend forever on `listener` (call from a dedicated thread).
pub fn backend_server(listener: TcpListener) {
    listener.set_nonblocking(true).expect("nonblocking");
    let lfd = listener.into_raw_fd();
    let ep = epoll_create();
    const LTOKEN: u64 = u64::MAX;
    epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, libc::EPOLLIN as u32, LTOKEN);
    let mut conns: HashMap<RawFd, BConn> = HashMap::new();
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = epoll_wait(ep, &mut evs, -1);
        for ev in &evs[..n] {
            let (events, token) = (ev.events, ev.u64);
            if token == LTOKEN {
                loop {
                    // SAFETY: null address pointers are allowed by accept4.
                    let fd = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        )
                    };
                    if fd < 0 {
                        break;
                    }
                    crate::fwd::set_nodelay(fd);
                    conns.insert(
                        fd,
                        BConn {
                            kind: 0,
                            pending: Vec::new(),
                            out_armed: false,
                        },
                    );
                    epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, fd as u64);
                }
                continue;
            }
            let fd = token as RawFd;
            let Some(c) = conns.get_mut(&fd) else {
                continue;
            };
            let mut dead = false;
            if events & libc::EPOLLOUT as u32 != 0 && !c.pending.is_empty() {
                let w = sys_write(fd, &c.pending);
                if w > 0 {
                    c.pending.drain(..w as usize);
                } else if w < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
                    dead = true;
                }
                if c.pending.is_empty() && c.out_armed {
                    c.out_armed = false;
                    epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, libc::EPOLLIN as u32, fd as u64);
                }
            }
            if !dead && events & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                let r = sys_read(fd, &mut buf);
                if r == 0 {
                    dead = true;
                } else if r < 0 {
                    dead = io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock;
                } else {
                    let mut data = &buf[..r as usize];
                    if c.kind == 0 {
                        c.kind = data[0];
                        data = &data[1..];
                    }
                    if c.kind == b'E' && !data.is_empty() {
                        if c.pending.is_empty() {
                            let w = sys_write(fd, data);
                            let w = if w < 0 { 0 } else { w as usize };
                            c.pending.extend_from_slice(&data[w..]);
                        } else {
                            c.pending.extend_from_slice(data);
                        }
                        if !c.pending.is_empty() && !c.out_armed {
                            c.out_armed = true;
                            let evs = (libc::EPOLLIN | libc::EPOLLOUT) as u32;
                            epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, evs, fd as u64);
                        }
                    }
                }
            }
            if dead {
                epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, 0, 0);
                conns.remove(&fd);
                sys_close(fd);
            }
        }
    }
}

/// Bulk one-direction transfer: write `total` bytes in 128 KiB chunks, half-close, wait for the
/// EOF that the backend's close produces (so every byte reached the backend). Returns seconds.
pub fn bulk(addr: SocketAddr, total: u64, deadline: Duration) -> io::Result<f64> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(deadline))?;
    s.set_write_timeout(Some(deadline))?;
    let chunk = vec![0x5au8; 128 * 1024];
    s.write_all(b"D")?;
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])?;
        sent += n as u64;
        if start.elapsed() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "bulk deadline"));
        }
    }
    s.shutdown(Shutdown::Write)?;
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b)? {
            0 => break,
            _ => continue,
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// One connection, `count` round trips of `size` bytes after `warmup` unmeasured ones.
/// Returns the per-round-trip latencies in nanoseconds and the total measured time.
pub fn pingpong(
    addr: SocketAddr,
    size: usize,
    warmup: usize,
    count: usize,
    deadline: Duration,
) -> io::Result<(Vec<u64>, f64)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(deadline))?;
    s.write_all(b"E")?;
    let msg = vec![0x42u8; size];
    let mut rb = vec![0u8; size];
    let mut lat = Vec::with_capacity(count);
    let mut t_total = Instant::now();
    for i in 0..warmup + count {
        if i == warmup {
            t_total = Instant::now();
        }
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut rb)?;
        if i >= warmup {
            lat.push(t.elapsed().as_nanos() as u64);
        }
        if t_total.elapsed() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "pingpong deadline"));
        }
    }
    Ok((lat, t_total.elapsed().as_secs_f64()))
}

/// `conns` connections each doing `per_conn` round trips of `size` bytes concurrently, driven
/// by one epoll thread. Returns the elapsed seconds.
pub fn pingpong_many(
    addr: SocketAddr,
    conns: usize,
    size: usize,
    per_conn: usize,
    deadline: Duration,
) -> io::Result<f64> {
    let mut socks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        socks.push(s);
    }
    let msg = vec![0x42u8; size];
    let mut first = vec![b'E'];
    first.extend_from_slice(&msg);
    let ep = epoll_create();
    let mut got = vec![0usize; conns];
    let mut left = vec![per_conn; conns];
    let start = Instant::now();
    for (i, s) in socks.iter_mut().enumerate() {
        s.write_all(&first)?;
        s.set_nonblocking(true)?;
        epoll_ctl(
            ep,
            libc::EPOLL_CTL_ADD,
            s.as_raw_fd(),
            libc::EPOLLIN as u32,
            i as u64,
        );
    }
    let mut done = 0;
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    let mut result = Ok(());
    'outer: while done < conns {
        if start.elapsed() > deadline {
            result = Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "pingpong_many deadline",
            ));
            break;
        }
        let n = epoll_wait(ep, &mut evs, 100);
        for ev in &evs[..n] {
            let i = ev.u64 as usize;
            let fd = socks[i].as_raw_fd();
            let r = sys_read(fd, &mut buf);
            if r == 0 {
                result = Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed"));
                break 'outer;
            }
            if r < 0 {
                continue;
            }
            got[i] += r as usize;
            while got[i] >= size && left[i] > 0 {
                got[i] -= size;
                left[i] -= 1;
                if left[i] == 0 {
                    done += 1;
                } else if sys_write(fd, &msg) != size as isize {
                    result = Err(io::Error::other("short write"));
                    break 'outer;
                }
            }
        }
    }
    let el = start.elapsed().as_secs_f64();
    sys_close(ep);
    result.map(|()| el)
}
