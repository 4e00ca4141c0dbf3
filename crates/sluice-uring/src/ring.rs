//! The ring itself: setup with the best flags the kernel has, safe submission helpers and
//! completion reaping.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue};
use socket2::SockAddr;

use crate::datagram::{Datagram, SendMsg, parse_recvmsg, recvmsg_template};
use crate::pool::BufferPool;

/// Why a ring could not be set up. `Unavailable` maps to exit status 69.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// io_uring is blocked or missing: the message names the likely cause.
    #[error("io_uring is unavailable: {0}")]
    Unavailable(String),
    /// Any other OS error while setting up (memory, limits).
    #[error("io_uring setup failed: {0}")]
    Os(#[from] io::Error),
}

/// What the ring was set up with (logged once at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub single_issuer: bool,
    pub defer_taskrun: bool,
    pub coop_taskrun: bool,
}

/// The setup flags in force, in the kernel's words (`single_issuer defer_taskrun`), or `plain`
/// when there are none: for the start-up log, where `Debug` would print the struct.
impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = [
            (self.single_issuer, "single_issuer"),
            (self.defer_taskrun, "defer_taskrun"),
            (self.coop_taskrun, "coop_taskrun"),
        ];
        let mut on = names.iter().filter(|(set, _)| *set).map(|(_, name)| *name);
        match on.next() {
            None => f.write_str("plain"),
            Some(first) => {
                f.write_str(first)?;
                on.try_for_each(|name| write!(f, " {name}"))
            }
        }
    }
}

/// One completion, copied out of the completion queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// The pool buffer this completion filled, for buffer-select receives.
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }

    /// Whether the socket still had bytes to read after this receive (SOCK_NONEMPTY).
    pub fn socket_nonempty(&self) -> bool {
        cqueue::sock_nonempty(self.flags)
    }

    /// Whether a multishot operation stays armed after this completion.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// `IORING_RECVSEND_POLL_FIRST` from include/uapi/linux/io_uring.h (Linux 5.19); the io-uring
/// crate does not export its `sys` module.
const IORING_RECVSEND_POLL_FIRST: u16 = 1;

/// Set in the user data of every operation on the datagram pool (see
/// [`Uring::enable_datagrams`]); the caller encodes the rest of its user data below it.
pub const DATAGRAM_OP: u64 = 1 << 63;

/// The buffer group of the datagram pool (the stream pool is group 0).
const DATAGRAM_GROUP: u16 = 1;

/// Opcodes the data plane cannot work without.
const REQUIRED: [(u8, &str); 8] = [
    (opcode::AcceptMulti::CODE, "ACCEPT"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::Shutdown::CODE, "SHUTDOWN"),
    (opcode::Timeout::CODE, "TIMEOUT"),
];

/// A worker's ring plus the memory its operations use. Not `Send`: a ring belongs to the thread
/// that created it (SINGLE_ISSUER).
pub struct Uring {
    // Field order matters: the ring is dropped before the pool and the addresses it may
    // reference.
    ring: IoUring,
    pool: BufferPool,
    /// Large buffers for datagrams (group 1), once [`Uring::enable_datagrams`] was called.
    datagrams: Option<BufferPool>,
    /// What every multishot `recvmsg` reads its name and control lengths from.
    recvmsg: Box<libc::msghdr>,
    /// The `sendmsg` in flight from each datagram buffer (a buffer is in one send at a time).
    sendmsgs: Vec<Option<Box<SendMsg>>>,
    /// Boxed so that growing the vector never moves an address the kernel may be reading.
    connect_addrs: Vec<Option<Box<SockAddr>>>,
    /// Fds handed to [`Uring::close_after_submit`] while entries were queued: closed once the
    /// submission queue is empty.
    closing: Vec<OwnedFd>,
    /// Completions taken out of the completion queue by `push` to make room; [`Uring::reap`]
    /// hands them out first.
    early: Vec<Completion>,
    /// Why submitting failed for good; [`Uring::submit_and_wait`] reports it.
    failed: Option<io::Error>,
    features: Features,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("features", &self.features)
            .field("pool", &self.pool)
            .finish()
    }
}

impl Uring {
    /// Sets up a ring of `entries` submission entries, a pool of `buffer_count` buffers of
    /// `buffer_size` bytes of which `ring_initial` start in the kernel's ring (see
    /// [`BufferPool::top_up`]), and initial room for `connect_slots` connects in flight (one
    /// per connection slot; it grows as needed).
    pub fn new(
        entries: u32,
        buffer_count: u16,
        buffer_size: u32,
        ring_initial: u32,
        connect_slots: usize,
    ) -> Result<Uring, SetupError> {
        if buffer_size == 0 || buffer_count == 0 {
            return Err(SetupError::Os(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        let (ring, features) = build_ring(entries)?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(unavailable)?;
        for (code, name) in REQUIRED {
            if !probe.is_supported(code) {
                return Err(SetupError::Unavailable(format!(
                    "the kernel's io_uring lacks the {name} operation (Linux 6.0 or later needed)"
                )));
            }
        }
        let mut pool = BufferPool::new(buffer_count, buffer_size, 0);
        // SAFETY: the ring entries are page-aligned memory of `buffer_count` entries owned by
        // `pool`, which lives in the same `Uring` and is dropped after the ring.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                pool.ring_addr(),
                buffer_count,
                pool.group(),
                0,
            )
        }
        .map_err(|e| {
            SetupError::Unavailable(format!(
                "registering a provided-buffer ring failed ({e}): Linux 5.19 or later needed"
            ))
        })?;
        pool.top_up(ring_initial.clamp(1, u32::from(buffer_count)));
        Ok(Uring {
            ring,
            pool,
            datagrams: None,
            recvmsg: recvmsg_template(),
            sendmsgs: Vec::new(),
            connect_addrs: std::iter::repeat_with(|| None)
                .take(connect_slots)
                .collect(),
            closing: Vec::new(),
            early: Vec::new(),
            failed: None,
            features,
        })
    }

    pub fn features(&self) -> Features {
        self.features
    }

    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    /// Refills the kernel's ring from the reserve (see [`BufferPool::top_up`]).
    pub fn top_up(&mut self, low: u32) {
        self.pool.top_up(low);
    }

    /// Gives a buffer back to the kernel (see [`BufferPool::recycle`]).
    pub fn recycle(&mut self, id: u16) {
        self.pool.recycle(id);
    }

    /// Sets up the datagram pool: `count` buffers (a power of two) of `size` bytes, registered
    /// as buffer group 1, `ring_initial` of them in the kernel's ring at first. Operations on it
    /// must carry [`DATAGRAM_OP`] in their user data, so that completions are counted against
    /// the right pool.
    pub fn enable_datagrams(
        &mut self,
        count: u16,
        size: u32,
        ring_initial: u32,
    ) -> Result<(), SetupError> {
        if self.datagrams.is_some() {
            return Ok(());
        }
        if size == 0 || count == 0 || !count.is_power_of_two() {
            return Err(SetupError::Os(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        let mut pool = BufferPool::new(count, size, DATAGRAM_GROUP);
        // SAFETY: the ring entries are page-aligned memory of `count` entries owned by `pool`,
        // which is stored in `self` below and dropped after the ring.
        unsafe {
            self.ring.submitter().register_buf_ring_with_flags(
                pool.ring_addr(),
                count,
                pool.group(),
                0,
            )
        }
        .map_err(SetupError::Os)?;
        pool.top_up(ring_initial.clamp(1, u32::from(count)));
        self.sendmsgs = std::iter::repeat_with(|| None)
            .take(usize::from(count))
            .collect();
        self.datagrams = Some(pool);
        Ok(())
    }

    /// The datagram pool, if enabled.
    pub fn datagram_pool(&self) -> Option<&BufferPool> {
        self.datagrams.as_ref()
    }

    /// Refills the datagram pool's ring from its reserve.
    pub fn top_up_datagrams(&mut self, low: u32) {
        if let Some(pool) = &mut self.datagrams {
            pool.top_up(low);
        }
    }

    /// Gives a datagram buffer back to the kernel.
    pub fn recycle_datagram(&mut self, id: u16) {
        if let Some(slot) = self.sendmsgs.get_mut(usize::from(id)) {
            *slot = None;
        }
        if let Some(pool) = &mut self.datagrams {
            pool.recycle(id);
        }
    }

    /// Multishot `recvmsg` on a UDP socket (bound or connected) into the datagram pool: one
    /// completion per datagram, read with [`Uring::datagram`]. `user_data` must carry
    /// [`DATAGRAM_OP`]. (`recvmsg` rather than `recv` also for connected sockets: a multishot
    /// `recv` reports an empty datagram as a 0 result without a buffer and stops, while
    /// `recvmsg` puts its header in a buffer like any other.)
    pub fn recvmsg_multi(&mut self, fd: RawFd, user_data: u64) {
        debug_assert!(user_data & DATAGRAM_OP != 0);
        let msghdr: *const libc::msghdr = &*self.recvmsg;
        let entry = opcode::RecvMsgMulti::new(Fd(fd), msghdr, DATAGRAM_GROUP).build();
        self.push(entry.user_data(user_data));
    }

    /// The datagram a `recvmsg_multi` completion left in buffer `buf` (`len`, the result);
    /// `None` when the buffer does not hold a well-formed one.
    pub fn datagram(&self, buf: u16, len: u32) -> Option<Datagram<'_>> {
        let pool = self.datagrams.as_ref()?;
        parse_recvmsg(pool.bytes(buf, len), &self.recvmsg)
    }

    /// Sends `len` bytes of datagram buffer `buf` from `offset` on a connected UDP socket as one
    /// datagram. The caller keeps the buffer until this completes.
    pub fn send_datagram(&mut self, fd: RawFd, buf: u16, offset: u32, len: u32, user_data: u64) {
        debug_assert!(user_data & DATAGRAM_OP != 0);
        let Some(pool) = &self.datagrams else {
            return;
        };
        let len = len.min(pool.buffer_size().saturating_sub(offset));
        let entry = opcode::Send::new(Fd(fd), pool.addr(buf, offset), len)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.push(entry.user_data(user_data));
    }

    /// Sends `len` bytes of datagram buffer `buf` from `offset` to `dest` as one datagram, from
    /// the local address `source` when given (see [`Datagram::local`]). The caller keeps the
    /// buffer until this completes; recycling it frees the message too.
    #[allow(clippy::too_many_arguments)]
    pub fn sendmsg_datagram(
        &mut self,
        fd: RawFd,
        buf: u16,
        offset: u32,
        len: u32,
        dest: SocketAddr,
        source: Option<IpAddr>,
        user_data: u64,
    ) {
        debug_assert!(user_data & DATAGRAM_OP != 0);
        let Some(pool) = &self.datagrams else {
            return;
        };
        let len = len.min(pool.buffer_size().saturating_sub(offset));
        let message = SendMsg::new(pool.addr(buf, offset), len as usize, dest, source);
        let Some(slot) = self.sendmsgs.get_mut(usize::from(buf)) else {
            return;
        };
        let msghdr: *const libc::msghdr = &slot.insert(message).msghdr;
        let entry = opcode::SendMsg::new(Fd(fd), msghdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        self.push(entry.user_data(user_data));
    }

    /// One receive into a pool buffer chosen by the kernel when bytes arrive. With
    /// `poll_first`, the kernel waits for readiness before trying (IORING_RECVSEND_POLL_FIRST):
    /// cheaper when the socket is known to be empty, as after a receive that drained it.
    pub fn recv(&mut self, fd: RawFd, poll_first: bool, user_data: u64) {
        let ioprio = if poll_first {
            IORING_RECVSEND_POLL_FIRST
        } else {
            0
        };
        let entry = opcode::Recv::new(Fd(fd), std::ptr::null_mut(), self.pool.buffer_size())
            .ioprio(ioprio)
            .buf_group(self.pool.group())
            .build()
            .flags(squeue::Flags::BUFFER_SELECT);
        self.push(entry.user_data(user_data));
    }

    /// Sends `len` bytes of pool buffer `buf` from `offset`. The caller keeps the buffer
    /// (does not recycle it) until this send completes.
    pub fn send(&mut self, fd: RawFd, buf: u16, offset: u32, len: u32, user_data: u64) {
        let len = len.min(self.pool.buffer_size().saturating_sub(offset));
        let ptr = self.pool.addr(buf, offset);
        let entry = opcode::Send::new(Fd(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
            .build();
        self.push(entry.user_data(user_data));
    }

    /// Bytes `offset..offset + len` of pool buffer `buf` (cut to the buffer). Meant for a buffer
    /// the caller owns: a completion handed it over, and it was not recycled since (the kernel
    /// writes only buffers in its ring). Used to copy a chunk out before giving its buffer back.
    pub fn buffer(&self, buf: u16, offset: u32, len: u32) -> &[u8] {
        let bytes = self.pool.bytes(buf, offset.saturating_add(len));
        bytes.get(offset as usize..).unwrap_or(&[])
    }

    /// Connects `fd` to `addr`. The address is kept in `slot` until the connect completes;
    /// the caller must not start another connect on the same slot before that.
    pub fn connect(&mut self, fd: RawFd, slot: usize, addr: SockAddr, user_data: u64) {
        if slot >= self.connect_addrs.len() {
            self.connect_addrs.resize_with(slot + 1, || None);
        }
        let stored = self.connect_addrs[slot].insert(Box::new(addr));
        let entry = opcode::Connect::new(Fd(fd), stored.as_ptr().cast(), stored.len()).build();
        self.push(entry.user_data(user_data));
    }

    /// Cancels every operation on `fd`; each completes with `-ECANCELED` (or its own result).
    pub fn cancel_fd(&mut self, fd: RawFd, user_data: u64) {
        let entry = opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(fd)).all()).build();
        self.push(entry.user_data(user_data));
    }

    /// Cancels the operation submitted with `target` as user data.
    pub fn cancel(&mut self, target: u64, user_data: u64) {
        let entry = opcode::AsyncCancel::new(target).build();
        self.push(entry.user_data(user_data));
    }

    /// One readiness poll for `events` (`libc::POLLIN`, `libc::POLLOUT`) on `fd`; completes
    /// with the ready mask, or `-ECANCELED`.
    pub fn poll_once(&mut self, fd: RawFd, events: i16, user_data: u64) {
        let entry = opcode::PollAdd::new(Fd(fd), events as u16 as u32).build();
        self.push(entry.user_data(user_data));
    }

    /// Multishot readiness poll (`POLLIN`) on `fd`: used for the worker's wake-up eventfd.
    pub fn poll_in_multi(&mut self, fd: RawFd, user_data: u64) {
        let entry = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build();
        self.push(entry.user_data(user_data));
    }

    /// Closes `fd` once no entry still in the submission queue can name it: at once when the
    /// queue is empty, else after the submit that empties it. The kernel looks an entry's fd
    /// up only when the entry is submitted, so a number closed while an entry naming it is
    /// queued may already belong to a new socket by then, and the operation would run on that
    /// one (a UDP datagram left on another client's session socket that way). Operations
    /// already submitted hold the file itself and are not affected by the close.
    pub fn close_after_submit(&mut self, fd: impl Into<OwnedFd>) {
        let fd = fd.into();
        if self.ring.submission().is_empty() {
            drop(fd);
        } else {
            self.closing.push(fd);
        }
    }

    /// Submits what is queued and waits for at least one completion or `timeout`. An error
    /// that made an earlier queueing give up (see `push`) comes back here, once: the ring can no
    /// longer be trusted to run what was asked of it.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let result = match timeout {
            Some(t) => {
                let ts = Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        self.close_submitted();
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Moves every available completion into `out` (which is cleared first).
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        out.clear();
        out.append(&mut self.early);
        self.take_completions(out);
    }

    /// Copies the completion queue's entries into `out`, counting the buffers they took.
    fn take_completions(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            let completion = Completion {
                user_data: cqe.user_data(),
                result: cqe.result(),
                flags: cqe.flags(),
            };
            if completion.buffer().is_some() {
                match &mut self.datagrams {
                    Some(pool) if completion.user_data & DATAGRAM_OP != 0 => pool.taken(),
                    _ => self.pool.taken(),
                }
            }
            out.push(completion);
        }
    }

    /// Closes the fds waiting for the submission queue to empty, if it is empty now (a submit
    /// may take only part of the queue).
    fn close_submitted(&mut self) {
        if !self.closing.is_empty() && self.ring.submission().is_empty() {
            self.closing.clear();
        }
    }

    /// Queues `entry`, handing a full submission queue to the kernel first. Never loops
    /// forever: EINTR is retried, EBUSY (completions waiting for room in the completion queue)
    /// is retried after taking the completions out (for `reap`), and any other error, or a
    /// kernel that takes nothing [`PUSH_ATTEMPTS`] times, is kept for `submit_and_wait` to
    /// return, and this entry and every later one are dropped: the worker stops at the end of
    /// its batch.
    fn push(&mut self, entry: squeue::Entry) {
        if self.failed.is_some() {
            return;
        }
        for _ in 0..PUSH_ATTEMPTS {
            // SAFETY: every entry built by this type references only memory owned by `self`
            // (pool buffers, stored connect addresses, the recvmsg template, boxed sendmsg
            // messages kept until their buffer is recycled) or no memory at all, and `self`
            // keeps that memory alive until the ring is dropped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            match self.ring.submit() {
                Ok(_) => self.close_submitted(),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    let mut early = std::mem::take(&mut self.early);
                    self.take_completions(&mut early);
                    self.early = early;
                }
                Err(e) => {
                    self.failed = Some(e);
                    return;
                }
            }
        }
        self.failed = Some(io::Error::other(format!(
            "the submission queue stayed full after {PUSH_ATTEMPTS} submits"
        )));
    }
}

/// How many times `push` hands a full submission queue to the kernel before it gives up.
const PUSH_ATTEMPTS: u32 = 16;

fn build_ring(entries: u32) -> Result<(IoUring, Features), SetupError> {
    let mut builder = IoUring::builder();
    builder
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(entries * 4);
    match builder.build(entries) {
        Ok(ring) => {
            return Ok((
                ring,
                Features {
                    single_issuer: true,
                    defer_taskrun: true,
                    coop_taskrun: false,
                },
            ));
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(unavailable(e)),
    }
    let mut builder = IoUring::builder();
    builder.setup_coop_taskrun().setup_cqsize(entries * 4);
    match builder.build(entries) {
        Ok(ring) => Ok((
            ring,
            Features {
                single_issuer: false,
                defer_taskrun: false,
                coop_taskrun: true,
            },
        )),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
            .setup_cqsize(entries * 4)
            .build(entries)
            .map(|ring| {
                (
                    ring,
                    Features {
                        single_issuer: false,
                        defer_taskrun: false,
                        coop_taskrun: false,
                    },
                )
            })
            .map_err(unavailable),
        Err(e) => Err(unavailable(e)),
    }
}

/// Explains a setup failure in the terms an operator can act on.
fn unavailable(e: io::Error) -> SetupError {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => SetupError::Unavailable(
            "the kernel has no io_uring (ENOSYS): Linux 6.0 or later with CONFIG_IO_URING needed"
                .into(),
        ),
        Some(libc::EPERM) => SetupError::Unavailable(
            "io_uring_setup was refused (EPERM): blocked by a seccomp profile (Docker's default, \
             containerd 2) or by sysctl kernel.io_uring_disabled"
                .into(),
        ),
        Some(libc::EINVAL) => SetupError::Unavailable(format!(
            "io_uring_setup rejected the parameters ({e}): the kernel is too old (Linux 6.0 or \
             later needed)"
        )),
        _ => SetupError::Os(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{self, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn recv_into_pool_then_send_from_it() {
        let mut ring =
            Uring::new(64, 8, 4096, 8, 1).expect("io_uring available on the test machine");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"hello").unwrap();
        ring.recv(server.as_raw_fd(), false, 1);
        ring.submit_and_wait(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].result, 5);
        let buf = out[0].buffer().expect("buffer chosen");
        assert_eq!(ring.pool().free(), 7);
        // Echo it back from the pool buffer.
        ring.send(server.as_raw_fd(), buf, 1, 4, 2);
        ring.submit_and_wait(Some(Duration::from_secs(5))).unwrap();
        ring.reap(&mut out);
        assert_eq!(out[0].user_data, 2);
        assert_eq!(out[0].result, 4);
        ring.recycle(buf);
        assert_eq!(ring.pool().free(), 8);
        let mut got = [0u8; 4];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ello");
        assert_eq!(
            crate::unacked_bytes(std::os::fd::AsFd::as_fd(&server)).unwrap(),
            0
        );
    }

    /// The data plane stops a send that a peer does not take by cancelling it, and relies on
    /// what the kernel then reports (io_uring/net.c, `io_sendrecv_fail`): a MSG_WAITALL send that
    /// had written part of its bytes completes with that count, one that had written none with
    /// -ECANCELED; exactly that many bytes reach the peer.
    #[test]
    fn a_cancelled_waitall_send_reports_the_bytes_it_wrote() {
        const SEND: u32 = 60_000;
        let mut ring =
            Uring::new(64, 8, 65536, 8, 1).expect("io_uring available on the test machine");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        // One byte gives the test a pool buffer; the rest of it is zeroes.
        client.write_all(b"x").unwrap();
        ring.recv(server.as_raw_fd(), false, 1);
        let mut out = Vec::new();
        let recv = wait_one(&mut ring, &mut out);
        assert_eq!(recv.result, 1);
        let buf = recv.buffer().expect("buffer chosen");
        assert_eq!(ring.buffer(buf, 0, 4), b"x\0\0\0");
        // Fill the path with 0xaa bytes, so that the send of zeroes waits for room; small
        // buffers, so that the room a read makes is taken by part of the send.
        socket2::SockRef::from(&server)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(16 * 1024)
            .unwrap();
        server.set_nonblocking(true).unwrap();
        let fill = [0xaa_u8; 4096];
        let mut filled = 0;
        loop {
            match server.write(&fill) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("fill: {e}"),
            }
        }
        ring.send(server.as_raw_fd(), buf, 1, SEND, 2);
        ring.submit_and_wait(Some(Duration::from_millis(1)))
            .unwrap();
        // Make room until part of the send arrives (bounded), then cancel the rest.
        let mut received = Vec::new();
        let mut piece = [0u8; 4096];
        client
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !received.contains(&0) && std::time::Instant::now() < deadline {
            if let Ok(n) = client.read(&mut piece) {
                received.extend_from_slice(&piece[..n]);
            }
            // Under DEFER_TASKRUN the send moves on only while this thread waits on the ring.
            ring.submit_and_wait(Some(Duration::from_millis(1)))
                .unwrap();
            ring.reap(&mut out);
            assert!(out.iter().all(|c| c.user_data != 2), "the send completed");
        }
        let partial = received.contains(&0);
        ring.cancel(2, 3);
        let mut sent = None;
        while sent.is_none() {
            ring.submit_and_wait(Some(Duration::from_secs(5))).unwrap();
            ring.reap(&mut out);
            sent = out.iter().find(|c| c.user_data == 2).map(|c| c.result);
        }
        let sent = sent.unwrap();
        assert!(
            sent == -libc::ECANCELED || (0..=SEND as i32).contains(&sent),
            "result {sent}"
        );
        // Bytes of it had arrived: the cancelled send reports them, not -ECANCELED.
        assert!(
            !partial || sent > 0,
            "result {sent} after part of the send arrived"
        );
        ring.recycle(buf);
        server.shutdown(std::net::Shutdown::Write).unwrap();
        client.set_read_timeout(None).unwrap();
        client.read_to_end(&mut received).unwrap();
        let zeroes = received.iter().filter(|&&b| b == 0).count();
        assert_eq!(received.len() - zeroes, filled);
        assert_eq!(zeroes, sent.max(0) as usize, "result {sent}");
        eprintln!("filled {filled}, cancelled send of {SEND} reported {sent}");
    }

    /// Sets IP_PKTINFO (and IPV6_RECVPKTINFO) so that `recvmsg` reports each datagram's
    /// destination address.
    fn enable_pktinfo(fd: RawFd) {
        let on: libc::c_int = 1;
        for (level, name) in [
            (libc::IPPROTO_IP, libc::IP_PKTINFO),
            (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
        ] {
            // SAFETY: a valid fd and a pointer to a live c_int of the given length. The IPv6
            // option fails on an IPv4 socket, which is fine.
            unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    name,
                    (&on as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }

    fn wait_one(ring: &mut Uring, out: &mut Vec<Completion>) -> Completion {
        ring.submit_and_wait(Some(Duration::from_secs(5))).unwrap();
        ring.reap(out);
        assert!(!out.is_empty(), "no completion within 5 s");
        out[0]
    }

    #[test]
    fn datagrams_arrive_with_source_and_local_address_and_replies_leave_from_it() {
        let mut ring = Uring::new(64, 8, 4096, 8, 1).unwrap();
        ring.enable_datagrams(4, 65536 + 512, 4).unwrap();
        let server = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        enable_pktinfo(server.as_raw_fd());
        let port = server.local_addr().unwrap().port();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // Sent to 127.3.4.5, an address of the loopback block the wildcard socket covers.
        let target: SocketAddr = format!("127.3.4.5:{port}").parse().unwrap();
        let big: Vec<u8> = (0..65507u32).map(|i| (i * 7 % 251) as u8).collect();
        client.send_to(&big, target).unwrap();
        ring.recvmsg_multi(server.as_raw_fd(), DATAGRAM_OP | 1);
        let mut out = Vec::new();
        let c = wait_one(&mut ring, &mut out);
        assert!(c.result > 0, "recvmsg: {}", c.result);
        assert!(c.more(), "multishot stays armed");
        let buf = c.buffer().expect("a datagram buffer");
        let d = ring
            .datagram(buf, c.result as u32)
            .expect("a well-formed datagram");
        assert_eq!(d.source, client.local_addr().unwrap());
        assert_eq!(d.local, Some("127.3.4.5".parse().unwrap()));
        assert!(!d.truncated);
        assert_eq!(d.payload, &big[..], "a 64 KiB datagram arrives whole");
        let (offset, len) = (d.payload_offset, d.payload.len() as u32);
        ring.sendmsg_datagram(
            server.as_raw_fd(),
            buf,
            offset,
            len,
            d.source,
            d.local,
            DATAGRAM_OP | 2,
        );
        let c = wait_one(&mut ring, &mut out);
        assert_eq!(c.user_data, DATAGRAM_OP | 2);
        assert_eq!(c.result, 65507);
        ring.recycle_datagram(buf);
        let mut back = vec![0u8; 70000];
        let (n, from) = client.recv_from(&mut back).unwrap();
        assert_eq!(
            from, target,
            "the reply leaves from the address the client sent to"
        );
        assert_eq!(&back[..n], &big[..]);
        assert_eq!(ring.datagram_pool().unwrap().free(), 4);
    }

    #[test]
    fn connected_datagram_sockets_receive_and_send_from_the_datagram_pool() {
        let mut ring = Uring::new(64, 8, 4096, 8, 1).unwrap();
        ring.enable_datagrams(4, 2048, 4).unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let local = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        local.connect(peer.local_addr().unwrap()).unwrap();
        ring.recvmsg_multi(local.as_raw_fd(), DATAGRAM_OP | 3);
        for payload in [&b"one"[..], b"", b"two, longer", b""] {
            peer.send_to(payload, local.local_addr().unwrap()).unwrap();
            let mut out = Vec::new();
            let c = wait_one(&mut ring, &mut out);
            assert_eq!(c.user_data, DATAGRAM_OP | 3);
            // An empty datagram arrives, but it ends the multishot (the kernel treats a zero
            // payload like a stream's EOF): the caller re-arms, as for any completion without
            // IORING_CQE_F_MORE.
            assert_eq!(c.more(), !payload.is_empty(), "{c:?}");
            if !c.more() {
                ring.recvmsg_multi(local.as_raw_fd(), DATAGRAM_OP | 3);
            }
            let buf = c
                .buffer()
                .unwrap_or_else(|| panic!("no buffer: {c:?} for {payload:?}"));
            let d = ring.datagram(buf, c.result as u32).expect("a datagram");
            assert_eq!(d.payload, payload);
            assert_eq!(d.source, peer.local_addr().unwrap());
            let (offset, len) = (d.payload_offset, d.payload.len() as u32);
            ring.send_datagram(local.as_raw_fd(), buf, offset, len, DATAGRAM_OP | 4);
            let c = wait_one(&mut ring, &mut out);
            assert_eq!(c.result as usize, payload.len());
            ring.recycle_datagram(buf);
            let mut back = [0u8; 64];
            let n = peer.recv(&mut back).unwrap();
            assert_eq!(
                &back[..n],
                payload,
                "datagrams are neither split nor merged"
            );
        }
    }

    #[test]
    fn features_display_names_the_flags_in_force() {
        let features = Features {
            single_issuer: true,
            defer_taskrun: true,
            coop_taskrun: false,
        };
        assert_eq!(features.to_string(), "single_issuer defer_taskrun");
        let none = Features {
            single_issuer: false,
            defer_taskrun: false,
            coop_taskrun: false,
        };
        assert_eq!(none.to_string(), "plain");
    }

    /// The inode of the file `fd` refers to now, or `None` when it is closed.
    fn inode(fd: RawFd) -> Option<u64> {
        // SAFETY: `stat` is plain old data, valid when zeroed.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one `stat` through a pointer to a live value of that type; a
        // closed fd makes it fail with EBADF and write nothing.
        let rc = unsafe { libc::fstat(fd, &mut st) };
        (rc == 0).then_some(st.st_ino)
    }

    #[test]
    fn a_socket_named_by_a_queued_entry_stays_open_until_it_is_submitted() {
        let mut ring = Uring::new(64, 8, 4096, 8, 1).unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = socket.as_raw_fd();
        let ino = inode(fd).expect("an open socket");
        // Nothing queued: closed at once.
        let idle = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (idle_fd, idle_ino) = (idle.as_raw_fd(), inode(idle.as_raw_fd()));
        ring.close_after_submit(idle);
        assert_ne!(inode(idle_fd), idle_ino, "closed at once: nothing names it");
        // A poll naming it is queued: the number stays ours until the poll is submitted.
        ring.poll_once(fd, libc::POLLOUT, 7);
        ring.close_after_submit(socket);
        assert_eq!(
            inode(fd),
            Some(ino),
            "still open while a queued entry names it"
        );
        let mut out = Vec::new();
        let c = wait_one(&mut ring, &mut out);
        assert_eq!(c.user_data, 7);
        assert!(
            c.result > 0 && c.result & i32::from(libc::POLLOUT) != 0,
            "the poll ran on the socket it named: {c:?}"
        );
        // Another test may have taken the number since; it is no longer this socket.
        assert_ne!(inode(fd), Some(ino), "closed once submitted");
    }

    /// The ring with `unsafe impl Send`, to call it from a thread that did not create it.
    struct Moved(Uring);
    // SAFETY: the ring is used by one thread at a time (handed over whole, never shared); the
    // pool's raw pointers point to memory that the ring owns and that does not depend on the
    // thread.
    unsafe impl Send for Moved {}

    #[test]
    fn a_persistent_submit_error_surfaces_instead_of_spinning() {
        let mut ring = Uring::new(64, 8, 4096, 8, 1).unwrap();
        if !ring.features().single_issuer {
            eprintln!("skipped: the kernel has no IORING_SETUP_SINGLE_ISSUER");
            return;
        }
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Fill the submission queue without submitting (polls that never complete).
        for i in 0..64 {
            ring.poll_once(socket.as_raw_fd(), libc::POLLIN, 100 + i);
        }
        // From another thread, every submit fails with EEXIST (SINGLE_ISSUER): a persistent
        // error, which must reach the caller rather than be retried forever.
        let moved = Moved(ring);
        let fd = socket.as_raw_fd();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut moved = moved;
            moved.0.poll_once(fd, libc::POLLIN, 1);
            let result = moved.0.submit_and_wait(Some(Duration::from_millis(10)));
            let _ = tx.send(result.map_err(|e| e.raw_os_error()));
        });
        let result = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("push returned within 5 s on a persistent submit error (it spun)");
        assert_eq!(result, Err(Some(libc::EEXIST)));
        drop(socket);
    }
}
