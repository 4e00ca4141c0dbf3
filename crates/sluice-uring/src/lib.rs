//! The only crate of Sluice that contains `unsafe`: a small io_uring wrapper for the workers.
//!
//! [`Uring`] owns one ring and one provided-buffer ring ([`BufferPool`]) and offers safe methods
//! that queue the operations the data plane needs (buffer-select receive, send from a pool
//! buffer, connect, cancel, one-shot and multishot poll, datagram receive and send). The memory the kernel reads or writes
//! (pool buffers, connect addresses) is owned by `Uring` and outlives the ring: the ring is
//! declared, and so dropped, first. [`unacked_bytes`] reads SIOCOUTQ,
//! [`unsent_bytes`] SIOCOUTQNSD; [`set_notsent_lowat`] bounds what a socket queues unsent.
//!
//! It does not decide anything: no state, no policy, no timers. Completions come back as plain
//! [`Completion`] values; the caller encodes what an operation was in its `user_data`.

mod datagram;
mod pool;
mod ring;

pub use datagram::Datagram;
pub use pool::BufferPool;
pub use ring::{Completion, DATAGRAM_OP, Features, SetupError, Uring};

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Bytes written to a TCP socket that its peer has not acknowledged yet, plus bytes not sent
/// yet (SIOCOUTQ). Zero means everything written has been acknowledged.
pub fn unacked_bytes(fd: BorrowedFd<'_>) -> io::Result<u32> {
    socket_queue(fd, libc::TIOCOUTQ)
}

/// Bytes written to a TCP socket that it has not sent yet (SIOCOUTQNSD): a sink whose peer
/// keeps up holds few for long; one backed up by a slow peer holds them until the peer reads.
pub fn unsent_bytes(fd: BorrowedFd<'_>) -> io::Result<u32> {
    socket_queue(fd, libc::SIOCOUTQNSD)
}

/// One of the socket queue ioctls that report a byte count as a c_int.
fn socket_queue(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (== TIOCOUTQ) and SIOCOUTQNSD write one c_int through the pointer,
    // which points to a live, properly aligned c_int on this stack frame; the fd is borrowed,
    // so it is open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut value as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.max(0) as u32)
}

/// Sets TCP_NOTSENT_LOWAT: the socket reports itself writable, and takes more bytes, only while
/// fewer than `bytes` of what was written to it are still unsent. Bytes in flight (sent, not
/// yet acknowledged) do not count, so throughput is unaffected; what a proxy piles up in a
/// socket toward a slow peer is bounded instead of growing with the autotuned send buffer.
pub fn set_notsent_lowat(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is borrowed, so open; the pointer is to a live c_int on this stack frame,
    // with its exact length.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
