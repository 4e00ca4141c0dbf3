//! A small single-threaded io_uring TCP forwarder with three interchangeable byte-moving
//! mechanisms. It is deliberately self-contained (not the product data plane): its only job is to
//! let the driver compare the mechanisms on identical connection handling.
//!
//! * `copy`: multishot `IORING_OP_RECV` with buffer select from a registered buf_ring, then
//!   `IORING_OP_SEND`; at most one send in flight per direction, and a per-direction quota of
//!   queued buffers (the multishot receive is cancelled when the quota is reached and re-armed once
//!   the queue drains), so one connection cannot empty the shared ring.
//! * `splice-poll`: multishot `IORING_OP_POLL_ADD` (POLLIN) on the source, one-shot POLLOUT on the
//!   destination when it is full, and non-blocking `splice(2)` socket -> pipe -> socket done by this
//!   thread.
//! * `splice-uring`: `IORING_OP_SPLICE` socket -> pipe and pipe -> socket (the kernel punts these to
//!   io-wq worker threads, which block in splice). The two splices of one direction strictly
//!   alternate: a blocking socket -> pipe splice holds the pipe mutex while it waits for data, so
//!   an overlapping pipe -> socket splice would wait behind it (a deadlock for request/response).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::{BufRingEntry, Fd};
use io_uring::{IoUring, cqueue, opcode, squeue};

/// Forwarding mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Copy,
    SplicePoll,
    SpliceUring,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "copy" => Some(Mode::Copy),
            "splice-poll" => Some(Mode::SplicePoll),
            "splice-uring" => Some(Mode::SpliceUring),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Copy => "copy",
            Mode::SplicePoll => "splice-poll",
            Mode::SpliceUring => "splice-uring",
        }
    }
}

/// Tunables of the forwarder.
#[derive(Clone, Copy, Debug)]
pub struct FwdConfig {
    pub mode: Mode,
    /// Pipe size requested with F_SETPIPE_SZ (splice modes).
    pub pipe_size: usize,
    /// Size of one provided buffer (copy mode).
    pub buf_size: usize,
    /// Number of provided buffers in the ring (copy mode, power of two).
    pub bufs: u16,
    /// Max buffers queued per direction before the multishot receive is cancelled (copy mode).
    pub quota: usize,
}

const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_POLLIN: u64 = 4;
const OP_POLLOUT: u64 = 5;
const OP_SPLICE_IN: u64 = 6;
const OP_SPLICE_OUT: u64 = 7;
const OP_CANCEL: u64 = 8;
const BGID: u16 = 7;

fn ud(conn: usize, dir: usize, op: u64) -> u64 {
    ((conn as u64) << 8) | ((dir as u64) << 4) | op
}

#[derive(Default)]
struct Dir {
    // copy
    queue: VecDeque<(u16, u32, u32)>,
    recv_armed: bool,
    cancel_sent: bool,
    nobufs: bool,
    send_inflight: bool,
    // splice
    pipe: [RawFd; 2],
    inpipe: usize,
    poll_in_armed: bool,
    poll_out_armed: bool,
    readable: bool,
    in_flight: bool,
    out_flight: bool,
    // both
    eof: bool,
    shut: bool,
}

struct Pair {
    fd: [RawFd; 2],
    dir: [Dir; 2],
    inflight: u32,
    closing: bool,
}

/// Provided-buffer ring registered with the kernel (IORING_REGISTER_PBUF_RING).
struct BufRing {
    ring: *mut BufRingEntry,
    ring_bytes: usize,
    mask: u16,
    tail: u16,
    bufs: Vec<u8>,
    buf_size: usize,
}

impl BufRing {
    fn new(uring: &IoUring, entries: u16, buf_size: usize) -> io::Result<BufRing> {
        assert!(entries.is_power_of_two());
        let ring_bytes = entries as usize * std::mem::size_of::<BufRingEntry>();
        // SAFETY: anonymous private mapping with no address hint; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut br = BufRing {
            ring: p.cast(),
            ring_bytes,
            mask: entries - 1,
            tail: 0,
            bufs: vec![0u8; entries as usize * buf_size],
            buf_size,
        };
        // SAFETY: the mapping is page aligned, `ring_bytes` long and lives until `Drop`, which
        // runs after the IoUring is dropped (field order in `Forwarder`).
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(p as u64, entries, BGID, 0)?;
        }
        for bid in 0..entries {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    fn push(&mut self, bid: u16) {
        let idx = (self.tail & self.mask) as usize;
        // SAFETY: idx < entries, so the entry lies inside the mapping we own.
        let e = unsafe { &mut *self.ring.add(idx) };
        // SAFETY: bid < entries, so the offset is inside `bufs`.
        let addr = unsafe { self.bufs.as_mut_ptr().add(bid as usize * self.buf_size) };
        e.set_addr(addr as u64);
        e.set_len(self.buf_size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail lives in entry 0 of our mapping; the kernel reads it concurrently,
        // so it is written with an atomic release store (as liburing's io_uring_buf_ring_advance).
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    fn ptr(&self, bid: u16, off: u32) -> *const u8 {
        // SAFETY: bid < entries and off < buf_size, so the pointer stays inside `bufs`.
        unsafe {
            self.bufs
                .as_ptr()
                .add(bid as usize * self.buf_size + off as usize)
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmapping the region mapped in `new`, exactly once.
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_bytes);
        }
    }
}

/// The forwarder. Field order matters: `ring` must drop before `bufring`.
pub struct Forwarder {
    ring: IoUring,
    bufring: Option<BufRing>,
    cfg: FwdConfig,
    listen_fd: RawFd,
    backend: SocketAddr,
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
    waiting: Vec<(usize, usize)>,
    returned: bool,
    pipe_cap: usize,
    debug: bool,
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd we own; no pointers involved.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

pub(crate) fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: `one` outlives the call and its size is passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: shutdown on an fd we own; errors (ENOTCONN) are irrelevant here.
    unsafe {
        libc::shutdown(fd, how);
    }
}

fn close(fd: RawFd) {
    if fd > 0 {
        // SAFETY: closing an fd this forwarder owns, exactly once (slot is freed afterwards).
        unsafe {
            libc::close(fd);
        }
    }
}

/// Creates a pipe sized with F_SETPIPE_SZ; returns ([read, write], actual size).
fn make_pipe(size: usize, nonblock: bool) -> io::Result<([RawFd; 2], usize)> {
    let mut fds = [0 as RawFd; 2];
    let flags = libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl on the pipe just created.
    let got = unsafe {
        libc::fcntl(fds[1], libc::F_SETPIPE_SZ, size as libc::c_int);
        libc::fcntl(fds[1], libc::F_GETPIPE_SZ)
    };
    Ok((fds, got.max(4096) as usize))
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Forwarder {
    pub fn new(cfg: FwdConfig, listener: TcpListener, backend: SocketAddr) -> io::Result<Self> {
        let ring = IoUring::<squeue::Entry, cqueue::Entry>::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(1024)
            .or_else(|_| IoUring::new(1024))?;
        let bufring = if cfg.mode == Mode::Copy {
            Some(BufRing::new(&ring, cfg.bufs, cfg.buf_size)?)
        } else {
            None
        };
        // Probe the pipe size the kernel really grants (pipe-user-pages-soft may shrink it).
        let (p, cap) = make_pipe(cfg.pipe_size, false)?;
        close(p[0]);
        close(p[1]);
        if cfg.mode != Mode::Copy && cap < cfg.pipe_size {
            eprintln!("warning: pipe size {} < requested {}", cap, cfg.pipe_size);
        }
        Ok(Forwarder {
            ring,
            bufring,
            cfg,
            listen_fd: listener.into_raw_fd(),
            backend,
            pairs: Vec::new(),
            free: Vec::new(),
            waiting: Vec::new(),
            returned: false,
            pipe_cap: cap,
            debug: std::env::var_os("FWD_DEBUG").is_some(),
        })
    }

    fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: every buffer/fd referenced by the entry outlives the operation: buffers
            // live in `bufring` (dropped after the ring), fds are closed only once the pair's
            // in-flight count is zero.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    fn arm_accept(&mut self) {
        let e = opcode::Accept::new(
            Fd(self.listen_fd),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(ud(0, 0, OP_ACCEPT));
        self.push(e);
    }

    /// Runs forever (the process is killed by its driver or by the user).
    pub fn run(&mut self) -> io::Result<()> {
        self.arm_accept();
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(u, res, flags) in &cqes {
                self.complete(u, res, flags);
            }
            if self.returned {
                self.returned = false;
                if let Some(br) = &self.bufring {
                    br.publish();
                }
                let waiting = std::mem::take(&mut self.waiting);
                for (c, d) in waiting {
                    if let Some(Some(p)) = self.pairs.get_mut(c) {
                        p.dir[d].nobufs = false;
                        self.pump(c, d);
                    }
                }
            }
        }
    }

    fn accept(&mut self, fd: RawFd) {
        let b = match TcpStream::connect(self.backend) {
            Ok(s) => s.into_raw_fd(),
            Err(e) => {
                eprintln!("backend connect: {e}");
                close(fd);
                return;
            }
        };
        set_nodelay(fd);
        set_nodelay(b);
        let mut pair = Pair {
            fd: [fd, b],
            dir: [Dir::default(), Dir::default()],
            inflight: 0,
            closing: false,
        };
        if self.cfg.mode == Mode::SplicePoll {
            set_nonblocking(fd);
            set_nonblocking(b);
        }
        if self.cfg.mode != Mode::Copy {
            for d in 0..2 {
                match make_pipe(self.cfg.pipe_size, self.cfg.mode == Mode::SplicePoll) {
                    Ok((p, _)) => pair.dir[d].pipe = p,
                    Err(e) => {
                        eprintln!("pipe: {e}");
                        for dd in 0..d {
                            close(pair.dir[dd].pipe[0]);
                            close(pair.dir[dd].pipe[1]);
                        }
                        close(fd);
                        close(b);
                        return;
                    }
                }
            }
        }
        let c = match self.free.pop() {
            Some(c) => {
                self.pairs[c] = Some(pair);
                c
            }
            None => {
                self.pairs.push(Some(pair));
                self.pairs.len() - 1
            }
        };
        for d in 0..2 {
            // splice-poll: `pump` arms the multishot POLLIN and tries the socket once.
            self.pair(c).dir[d].readable = true;
            self.pump(c, d);
        }
    }

    fn pair(&mut self, c: usize) -> &mut Pair {
        self.pairs[c].as_mut().expect("live pair")
    }

    fn complete(&mut self, u: u64, res: i32, flags: u32) {
        let op = u & 0xf;
        if self.debug {
            eprintln!(
                "cqe conn={} dir={} op={op} res={res} flags={flags:#x}",
                u >> 8,
                (u >> 4) & 0xf
            );
        }
        if op == OP_CANCEL {
            return;
        }
        if op == OP_ACCEPT {
            if res >= 0 {
                self.accept(res);
            } else {
                eprintln!("accept: {}", io::Error::from_raw_os_error(-res));
            }
            self.arm_accept();
            return;
        }
        let c = (u >> 8) as usize;
        let d = ((u >> 4) & 0xf) as usize;
        let more = cqueue::more(flags);
        let mut bid_to_return = None;
        let mut fail = false;
        {
            let p = self.pairs[c].as_mut().expect("completion for live pair");
            let dir = &mut p.dir[d];
            match op {
                OP_RECV => {
                    if !more {
                        dir.recv_armed = false;
                        dir.cancel_sent = false;
                        p.inflight -= 1;
                    }
                    if res > 0 {
                        let bid = cqueue::buffer_select(flags).expect("buffer id");
                        if p.closing {
                            bid_to_return = Some(bid);
                        } else {
                            dir.queue.push_back((bid, res as u32, 0));
                        }
                    } else if res == 0 {
                        dir.eof = true;
                    } else if res == -libc::ENOBUFS {
                        dir.nobufs = true;
                        self.waiting.push((c, d));
                    } else if res != -libc::ECANCELED {
                        fail = true;
                    }
                }
                OP_SEND => {
                    p.inflight -= 1;
                    dir.send_inflight = false;
                    if res < 0 {
                        fail = true;
                    } else if let Some(front) = dir.queue.front_mut() {
                        front.2 += res as u32;
                        if front.2 >= front.1 {
                            bid_to_return = Some(front.0);
                            dir.queue.pop_front();
                        }
                    }
                }
                OP_POLLIN => {
                    if !more {
                        dir.poll_in_armed = false;
                        p.inflight -= 1;
                    }
                    if res < 0 && res != -libc::ECANCELED {
                        fail = true;
                    } else if res > 0 {
                        dir.readable = true;
                    }
                }
                OP_POLLOUT => {
                    dir.poll_out_armed = false;
                    p.inflight -= 1;
                    if res < 0 && res != -libc::ECANCELED {
                        fail = true;
                    }
                }
                OP_SPLICE_IN => {
                    dir.in_flight = false;
                    p.inflight -= 1;
                    if res > 0 {
                        dir.inpipe += res as usize;
                    } else if res == 0 {
                        dir.eof = true;
                    } else {
                        fail = true;
                    }
                }
                OP_SPLICE_OUT => {
                    dir.out_flight = false;
                    p.inflight -= 1;
                    if res > 0 {
                        dir.inpipe -= res as usize;
                    } else {
                        fail = true;
                    }
                }
                _ => unreachable!("unknown op {op}"),
            }
        }
        if let Some(bid) = bid_to_return {
            self.return_buf(bid);
        }
        if fail {
            self.close_pair(c);
        }
        let p = self.pair(c);
        if p.closing {
            if p.inflight == 0 {
                self.free_pair(c);
            }
            return;
        }
        self.pump(c, d);
        // A POLLIN/POLLOUT completion on a socket may unblock the other direction too.
        if matches!(op, OP_POLLOUT | OP_POLLIN) && !self.pair(c).closing {
            self.pump(c, 1 - d);
        }
        let p = self.pair(c);
        if !p.closing && p.dir[0].shut && p.dir[1].shut {
            self.close_pair(c);
            if self.pair(c).inflight == 0 {
                self.free_pair(c);
            }
        }
    }

    fn return_buf(&mut self, bid: u16) {
        if let Some(br) = &mut self.bufring {
            br.push(bid);
            self.returned = true;
        }
    }

    fn pump(&mut self, c: usize, d: usize) {
        if self.pair(c).closing {
            return;
        }
        match self.cfg.mode {
            Mode::Copy => self.pump_copy(c, d),
            Mode::SplicePoll => self.pump_splice_poll(c, d),
            Mode::SpliceUring => self.pump_splice_uring(c, d),
        }
    }

    fn pump_copy(&mut self, c: usize, d: usize) {
        let quota = self.cfg.quota;
        let (src, dst) = {
            let p = self.pair(c);
            (p.fd[d], p.fd[1 - d])
        };
        let mut sqes: [Option<squeue::Entry>; 3] = [None, None, None];
        let br = self.bufring.as_ref().expect("copy mode has a buffer ring");
        let p = self.pairs[c].as_mut().expect("live pair");
        let dir = &mut p.dir[d];
        if !dir.send_inflight
            && let Some(&(bid, len, off)) = dir.queue.front()
        {
            sqes[0] = Some(
                opcode::Send::new(Fd(dst), br.ptr(bid, off), len - off)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(ud(c, d, OP_SEND)),
            );
            dir.send_inflight = true;
            p.inflight += 1;
        }
        if !dir.eof && !dir.recv_armed && !dir.nobufs && dir.queue.len() < quota {
            sqes[1] = Some(
                opcode::RecvMulti::new(Fd(src), BGID)
                    .build()
                    .user_data(ud(c, d, OP_RECV)),
            );
            dir.recv_armed = true;
            p.inflight += 1;
        }
        if dir.recv_armed && dir.queue.len() >= quota && !dir.cancel_sent {
            sqes[2] = Some(
                opcode::AsyncCancel::new(ud(c, d, OP_RECV))
                    .build()
                    .user_data(ud(0, 0, OP_CANCEL)),
            );
            dir.cancel_sent = true;
        }
        if dir.eof && dir.queue.is_empty() && !dir.send_inflight && !dir.shut {
            shutdown(dst, libc::SHUT_WR);
            dir.shut = true;
        }
        for e in sqes.into_iter().flatten() {
            self.push(e);
        }
    }

    fn pump_splice_poll(&mut self, c: usize, d: usize) {
        let cap = self.pipe_cap;
        let mut arm_out = None;
        let mut arm_in = None;
        let mut cancel_in = false;
        let mut fail = false;
        {
            let p = self.pairs[c].as_mut().expect("live pair");
            let (src, dst) = (p.fd[d], p.fd[1 - d]);
            let dir = &mut p.dir[d];
            if !dir.poll_in_armed && !dir.eof {
                // The multishot poll ended (overflow or error): re-arm it.
                arm_in = Some(src);
                dir.poll_in_armed = true;
                p.inflight += 1;
            }
            let fl = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
            loop {
                let mut progress = false;
                if dir.inpipe > 0 && !dir.poll_out_armed {
                    // SAFETY: plain syscall on fds we own; null offsets (sockets/pipes).
                    let n = unsafe {
                        libc::splice(
                            dir.pipe[0],
                            std::ptr::null_mut(),
                            dst,
                            std::ptr::null_mut(),
                            dir.inpipe,
                            fl,
                        )
                    };
                    if n > 0 {
                        dir.inpipe -= n as usize;
                        dir.readable = true;
                        progress = true;
                    } else if n < 0 && errno() == libc::EAGAIN {
                        arm_out = Some(dst);
                        dir.poll_out_armed = true;
                        p.inflight += 1;
                    } else {
                        fail = true;
                        break;
                    }
                }
                if dir.readable && !dir.eof && dir.inpipe < cap {
                    // SAFETY: as above.
                    let n = unsafe {
                        libc::splice(
                            src,
                            std::ptr::null_mut(),
                            dir.pipe[1],
                            std::ptr::null_mut(),
                            cap - dir.inpipe,
                            fl,
                        )
                    };
                    if n > 0 {
                        dir.inpipe += n as usize;
                        progress = true;
                    } else if n == 0 {
                        dir.eof = true;
                    } else if errno() == libc::EAGAIN {
                        dir.readable = false;
                    } else {
                        fail = true;
                        break;
                    }
                }
                if !progress {
                    break;
                }
            }
            if !fail && dir.eof && dir.inpipe == 0 && !dir.shut {
                shutdown(dst, libc::SHUT_WR);
                dir.shut = true;
                cancel_in = dir.poll_in_armed;
            }
        }
        if let Some(src) = arm_in {
            let e = opcode::PollAdd::new(Fd(src), (libc::POLLIN | libc::POLLRDHUP) as u32)
                .multi(true)
                .build()
                .user_data(ud(c, d, OP_POLLIN));
            self.push(e);
        }
        if let Some(dst) = arm_out {
            let e = opcode::PollAdd::new(Fd(dst), libc::POLLOUT as u32)
                .build()
                .user_data(ud(c, d, OP_POLLOUT));
            self.push(e);
        }
        if cancel_in {
            let e = opcode::AsyncCancel::new(ud(c, d, OP_POLLIN))
                .build()
                .user_data(ud(0, 0, OP_CANCEL));
            self.push(e);
        }
        if fail {
            self.close_pair(c);
        }
    }

    fn pump_splice_uring(&mut self, c: usize, d: usize) {
        let cap = self.pipe_cap;
        let mut sqes: [Option<squeue::Entry>; 2] = [None, None];
        {
            let p = self.pairs[c].as_mut().expect("live pair");
            let (src, dst) = (p.fd[d], p.fd[1 - d]);
            let dir = &mut p.dir[d];
            // Strictly alternate in -> out -> in per direction: a blocking socket->pipe splice
            // holds the pipe mutex while it waits for data (splice_file_to_pipe), so an
            // out-splice on the same pipe would block behind it and ping-pong would deadlock.
            if !dir.in_flight && !dir.out_flight && !dir.eof && dir.inpipe == 0 {
                sqes[0] = Some(
                    opcode::Splice::new(
                        Fd(src),
                        -1,
                        Fd(dir.pipe[1]),
                        -1,
                        (cap - dir.inpipe) as u32,
                    )
                    .flags(libc::SPLICE_F_MOVE)
                    .build()
                    .user_data(ud(c, d, OP_SPLICE_IN)),
                );
                dir.in_flight = true;
                p.inflight += 1;
            }
            if !dir.out_flight && dir.inpipe > 0 {
                sqes[1] = Some(
                    opcode::Splice::new(Fd(dir.pipe[0]), -1, Fd(dst), -1, dir.inpipe as u32)
                        .flags(libc::SPLICE_F_MOVE)
                        .build()
                        .user_data(ud(c, d, OP_SPLICE_OUT)),
                );
                dir.out_flight = true;
                p.inflight += 1;
            }
            if dir.eof && dir.inpipe == 0 && !dir.out_flight && !dir.shut {
                shutdown(dst, libc::SHUT_WR);
                dir.shut = true;
            }
        }
        for e in sqes.into_iter().flatten() {
            self.push(e);
        }
    }

    /// Starts tearing a pair down: shutdown both sockets (wakes blocked ops) and cancel every
    /// operation that may still be armed; the slot is freed once nothing is in flight.
    fn close_pair(&mut self, c: usize) {
        let p = self.pair(c);
        if p.closing {
            return;
        }
        p.closing = true;
        shutdown(p.fd[0], libc::SHUT_RDWR);
        shutdown(p.fd[1], libc::SHUT_RDWR);
        let mut cancels = Vec::new();
        for d in 0..2 {
            let dir = &p.dir[d];
            let ops: &[(bool, u64)] = &[
                (dir.recv_armed, OP_RECV),
                (dir.poll_in_armed, OP_POLLIN),
                (dir.poll_out_armed, OP_POLLOUT),
                (dir.in_flight, OP_SPLICE_IN),
                (dir.out_flight, OP_SPLICE_OUT),
            ];
            for &(armed, op) in ops {
                if armed {
                    cancels.push(ud(c, d, op));
                }
            }
        }
        for u in cancels {
            let e = opcode::AsyncCancel::new(u)
                .build()
                .user_data(ud(0, 0, OP_CANCEL));
            self.push(e);
        }
    }

    fn free_pair(&mut self, c: usize) {
        let p = self.pairs[c].take().expect("live pair");
        for d in 0..2 {
            for &(bid, _, _) in &p.dir[d].queue {
                self.return_buf(bid);
            }
            close(p.dir[d].pipe[0]);
            close(p.dir[d].pipe[1]);
        }
        self.waiting.retain(|&(wc, _)| wc != c);
        close(p.fd[0]);
        close(p.fd[1]);
        self.free.push(c);
    }
}
