//! A worker's bounded pool of pipes for splice forwarding.
//!
//! A direction of a connection that moves bulk data leases one pipe; bytes go socket -> pipe
//! -> socket with non-blocking `splice(2)` and never enter user space. The pipe returns to the
//! pool when it is empty again, so an idle connection holds none. A pipe returned with bytes
//! still in it (its connection was reset) is closed rather than reused.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl};

/// Identifies a leased pipe within its worker's pool.
pub(crate) type PipeId = u16;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes spliced in and not yet spliced out.
    held: u32,
}

pub(crate) struct PipePool {
    pipes: Vec<Option<Pipe>>,
    free: Vec<PipeId>,
    /// Pipe capacity asked for with F_SETPIPE_SZ.
    size: u32,
    leased: usize,
    /// Pipes the kernel gave less capacity than asked (fs.pipe-user-pages-soft exceeded).
    pub(crate) shrunk: u64,
}

/// What one splice did.
pub(crate) enum Spliced {
    /// `n` > 0 bytes moved.
    Moved(u32),
    /// The source reached end of file (socket -> pipe only).
    Eof,
    /// Would block: wait for readiness.
    WouldBlock,
    /// The peer is gone or another error: the errno.
    Failed(i32),
}

impl PipePool {
    /// A pool of at most `max` pipes of `size` bytes each, created on first use.
    pub(crate) fn new(max: usize, size: u32) -> Self {
        PipePool {
            pipes: (0..max).map(|_| None).collect(),
            free: (0..max as PipeId).rev().collect(),
            size,
            leased: 0,
            shrunk: 0,
        }
    }

    /// Leases an empty pipe; `None` when the pool is exhausted or a pipe cannot be made (the
    /// caller falls back to copying).
    pub(crate) fn lease(&mut self) -> Option<PipeId> {
        let id = self.free.pop()?;
        if self.pipes[id as usize].is_none() {
            match self.make() {
                Ok(pipe) => self.pipes[id as usize] = Some(pipe),
                Err(e) => {
                    tracing::debug!(
                        error = e.to_string(),
                        "cannot create a pipe; copying instead"
                    );
                    self.free.push(id);
                    return None;
                }
            }
        }
        self.leased += 1;
        Some(id)
    }

    /// Returns a leased pipe. A pipe still holding bytes is closed, never reused.
    pub(crate) fn give_back(&mut self, id: PipeId) {
        let slot = &mut self.pipes[id as usize];
        if slot.as_ref().is_some_and(|p| p.held > 0) {
            *slot = None;
        }
        self.leased -= 1;
        self.free.push(id);
    }

    /// Room left in a pipe.
    pub(crate) fn room(&self, id: PipeId) -> u32 {
        self.pipes[id as usize]
            .as_ref()
            .map_or(0, |p| self.size.saturating_sub(p.held))
    }

    pub(crate) fn held(&self, id: PipeId) -> u32 {
        self.pipes[id as usize].as_ref().map_or(0, |p| p.held)
    }

    /// The most pipes this pool hands out (0: splicing is off).
    pub(crate) fn capacity(&self) -> usize {
        self.pipes.len()
    }

    pub(crate) fn leased(&self) -> usize {
        self.leased
    }

    /// Moves up to the pipe's room, and at most `max` bytes, from `socket` into the pipe.
    pub(crate) fn fill(&mut self, id: PipeId, socket: BorrowedFd<'_>, max: u32) -> Spliced {
        let room = self.room(id).min(max);
        let Some(pipe) = self.pipes[id as usize].as_mut() else {
            return Spliced::Failed(libc::EBADF);
        };
        if room == 0 {
            return Spliced::WouldBlock;
        }
        match splice(socket, pipe.write.as_fd(), room) {
            Spliced::Moved(n) => {
                pipe.held += n;
                Spliced::Moved(n)
            }
            other => other,
        }
    }

    /// Moves up to `len` bytes from the pipe to `socket`.
    pub(crate) fn drain(&mut self, id: PipeId, socket: BorrowedFd<'_>, len: u32) -> Spliced {
        let Some(pipe) = self.pipes[id as usize].as_mut() else {
            return Spliced::Failed(libc::EBADF);
        };
        match splice(pipe.read.as_fd(), socket, len.min(pipe.held)) {
            Spliced::Moved(n) => {
                pipe.held -= n;
                Spliced::Moved(n)
            }
            // A pipe never reports end of file here: `len` > 0 bytes are in it.
            Spliced::Eof => Spliced::Failed(libc::EIO),
            other => other,
        }
    }

    fn make(&mut self) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let asked = self.size as i32;
        let got = fcntl(&write, FcntlArg::F_SETPIPE_SZ(asked))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))?;
        if got < asked {
            // Over the per-user pipe budget the kernel hands out one page: such a pipe would
            // cost a syscall per 4 KiB. Count it and let the caller copy instead.
            self.shrunk += 1;
            return Err(io::Error::other(format!(
                "pipe shrunk to {got} bytes (asked {asked})"
            )));
        }
        Ok(Pipe {
            read,
            write,
            held: 0,
        })
    }
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: u32) -> Spliced {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    match nix::fcntl::splice(from, None, to, None, len as usize, flags) {
        Ok(0) => Spliced::Eof,
        Ok(n) => Spliced::Moved(n as u32),
        Err(nix::errno::Errno::EAGAIN) => Spliced::WouldBlock,
        Err(e) => Spliced::Failed(e as i32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn splices_socket_to_socket_and_reuses_only_empty_pipes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut d, _) = listener.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        c.set_nonblocking(true).unwrap();
        let mut pool = PipePool::new(2, 64 * 1024);
        let id = pool.lease().unwrap();
        assert!(matches!(
            pool.fill(id, b.as_fd(), u32::MAX),
            Spliced::WouldBlock
        ));
        a.write_all(b"through a pipe").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(matches!(pool.fill(id, b.as_fd(), 8), Spliced::Moved(8)));
        assert!(matches!(
            pool.fill(id, b.as_fd(), u32::MAX),
            Spliced::Moved(6)
        ));
        assert_eq!(pool.held(id), 14);
        assert!(matches!(pool.drain(id, c.as_fd(), 4), Spliced::Moved(4)));
        assert!(matches!(pool.drain(id, c.as_fd(), 10), Spliced::Moved(10)));
        let mut got = [0u8; 14];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through a pipe");
        pool.give_back(id);
        assert_eq!(pool.leased(), 0);
        // A pipe given back with bytes in it is closed, and a fresh one replaces it.
        let id = pool.lease().unwrap();
        a.write_all(b"stale").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(matches!(
            pool.fill(id, b.as_fd(), u32::MAX),
            Spliced::Moved(5)
        ));
        pool.give_back(id);
        let again = pool.lease().unwrap();
        let other = pool.lease().unwrap();
        assert_eq!(pool.held(again) + pool.held(other), 0);
        assert!(pool.lease().is_none(), "the pool is bounded");
        drop(a);
        assert!(matches!(
            pool.fill(again, b.as_fd(), u32::MAX),
            Spliced::Eof
        ));
    }
}
