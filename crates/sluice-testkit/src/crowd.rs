//! Crowds of connections: an echo backend where one thread and one epoll set serve thousands
//! of connections ([`crate::EchoServer`] spends a thread and a 64 KiB buffer on each), a watch
//! that sees when each of thousands of client streams ends, and the fd limit they need.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use socket2::{Domain, Protocol, Socket, Type};

use crate::client::StreamEnd;

/// The accept backlog asked for (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;
/// The epoll token of the listener; connections take tokens from 1 up.
const LISTENER_TOKEN: u64 = 0;
/// How often the serving thread looks at the stop flag while nothing happens.
const STOP_CHECK_MS: u16 = 50;
/// Bytes read at once; what the socket does not take back at once waits in the connection's
/// queue, and nothing more is read from it until the queue is written.
const READ_SIZE: usize = 16 * 1024;
/// Readiness events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;
/// How long to back off after a failed accept (EMFILE): the listener stays readable, and
/// retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// A TCP echo server on loopback for many concurrent, mostly idle connections: echoes every
/// byte and answers the peer's FIN with its own once everything is echoed. Stops on drop.
#[derive(Debug)]
pub struct CrowdEcho {
    addr: SocketAddr,
    shared: Arc<CrowdShared>,
    server: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct CrowdShared {
    stopping: AtomicBool,
    accepted: AtomicU64,
    open: AtomicU64,
}

/// One connection: its stream and the echo bytes its peer has not taken yet.
struct Peer {
    stream: TcpStream,
    pending: Vec<u8>,
    /// The peer sent FIN: close once `pending` is written.
    read_closed: bool,
}

impl CrowdEcho {
    /// A crowd echo server on an ephemeral `127.0.0.1` port.
    pub fn start() -> Self {
        let listener = crowd_listener().expect("bind a crowd echo on 127.0.0.1");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let shared = Arc::new(CrowdShared::default());
        let server = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("crowd-echo-{addr}"))
                .spawn(move || serve(&listener, &shared))
                .expect("spawn the crowd echo thread")
        };
        Self {
            addr,
            shared,
            server: Some(server),
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.shared.open.load(Ordering::SeqCst)
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (a crowd needs more than the
/// usual 1024 descriptors) and returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// Waits until each of `streams` ends (EOF, reset or another error) or `deadline` passes, and
/// returns, per stream, when and how it ended (`None`: still open at the deadline). Bytes that
/// arrive meanwhile are read and discarded. One epoll set watches them all, so thousands cost
/// one thread; the streams are blocking again on return.
pub fn watch_ends(
    streams: &[TcpStream],
    deadline: Instant,
) -> io::Result<Vec<Option<(Instant, StreamEnd)>>> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (index, stream) in streams.iter().enumerate() {
        stream.set_nonblocking(true)?;
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        epoll.add(stream, EpollEvent::new(flags, index as u64))?;
    }
    let mut ends = vec![None; streams.len()];
    let mut open = streams.len();
    let mut buffer = vec![0u8; READ_SIZE];
    let mut events = vec![EpollEvent::empty(); EVENTS_PER_WAIT];
    while open > 0 {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wait_ms = deadline.duration_since(now).as_millis().clamp(1, 100) as u16;
        let ready = match epoll.wait(&mut events, wait_ms) {
            Ok(ready) => ready,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => return Err(error.into()),
        };
        for event in &events[..ready] {
            let index = event.data() as usize;
            if ends[index].is_some() {
                continue;
            }
            if let Some(end) = drain(&streams[index], &mut buffer) {
                ends[index] = Some((Instant::now(), end));
                open -= 1;
                let _ = epoll.delete(&streams[index]);
            }
        }
    }
    for stream in streams {
        stream.set_nonblocking(false)?;
    }
    Ok(ends)
}

impl Drop for CrowdEcho {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// A nonblocking listener on an ephemeral loopback port whose accept queue holds a whole
/// burst: std's default backlog (128) overflows when thousands connect at once, and each
/// dropped handshake then completes only after a 1 s SYN retransmission.
pub(crate) fn crowd_listener() -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn serve(listener: &TcpListener, shared: &CrowdShared) {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll_create");
    epoll
        .add(
            listener,
            EpollEvent::new(EpollFlags::EPOLLIN, LISTENER_TOKEN),
        )
        .expect("register the listener");
    let mut peers: HashMap<u64, Peer> = HashMap::new();
    let mut next_token = LISTENER_TOKEN + 1;
    let mut buffer = vec![0u8; READ_SIZE];
    let mut events = vec![EpollEvent::empty(); EVENTS_PER_WAIT];
    while !shared.stopping.load(Ordering::SeqCst) {
        let ready = match epoll.wait(&mut events, STOP_CHECK_MS) {
            Ok(ready) => ready,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => panic!("epoll_wait: {error}"),
        };
        for event in &events[..ready] {
            let token = event.data();
            if token == LISTENER_TOKEN {
                accept_all(listener, &epoll, &mut peers, &mut next_token, shared);
                continue;
            }
            let Some(peer) = peers.get_mut(&token) else {
                continue;
            };
            if !peer.advance(&mut buffer) {
                let peer = peers.remove(&token).expect("the peer was just found");
                let _ = epoll.delete(&peer.stream);
                shared.open.fetch_sub(1, Ordering::SeqCst);
            } else {
                // Wait for room to write while echo bytes are pending, for bytes otherwise.
                let flags = if peer.pending.is_empty() {
                    EpollFlags::EPOLLIN
                } else {
                    EpollFlags::EPOLLOUT
                };
                let _ = epoll.modify(&peer.stream, &mut EpollEvent::new(flags, token));
            }
        }
    }
}

/// Accepts until the backlog is empty; each connection is nonblocking and watched for bytes.
fn accept_all(
    listener: &TcpListener,
    epoll: &Epoll,
    peers: &mut HashMap<u64, Peer>,
    next_token: &mut u64,
    shared: &CrowdShared,
) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                thread::sleep(ACCEPT_BACKOFF);
                return;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        let _ = stream.set_nodelay(true);
        let token = *next_token;
        *next_token += 1;
        if epoll
            .add(&stream, EpollEvent::new(EpollFlags::EPOLLIN, token))
            .is_err()
        {
            continue;
        }
        shared.open.fetch_add(1, Ordering::SeqCst);
        peers.insert(
            token,
            Peer {
                stream,
                pending: Vec::new(),
                read_closed: false,
            },
        );
    }
}

impl Peer {
    /// Moves bytes as far as the socket allows; false once the connection is over (echoed
    /// up to the peer's FIN and answered with ours, or failed).
    fn advance(&mut self, buffer: &mut [u8]) -> bool {
        loop {
            if !self.flush() {
                return false;
            }
            if !self.pending.is_empty() {
                return true;
            }
            if self.read_closed {
                let _ = self.stream.shutdown(Shutdown::Write);
                return false;
            }
            match self.stream.read(buffer) {
                Ok(0) => self.read_closed = true,
                Ok(n) => self.pending.extend_from_slice(&buffer[..n]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return true,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Writes what is pending until done or the socket is full; false on an error.
    fn flush(&mut self) -> bool {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(0) => return false,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return true,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// Reads a nonblocking stream until it would block (`None`) or ends (how).
fn drain(mut stream: &TcpStream, buffer: &mut [u8]) -> Option<StreamEnd> {
    loop {
        match stream.read(buffer) {
            Ok(0) => return Some(StreamEnd::Eof),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return None,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {
                return Some(StreamEnd::Reset);
            }
            Err(error) => return Some(StreamEnd::Error(error.kind())),
        }
    }
}
