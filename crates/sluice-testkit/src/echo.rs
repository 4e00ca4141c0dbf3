//! Backend servers: a TCP echo server and variants that misbehave on purpose.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::data::{Checksum, SeededStream, StreamSummary};
use crate::tcp;

/// How long a backend connection may wait on one read or write before it gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`Behavior::SendThenReset`] waits for its peer to acknowledge every byte.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What an [`EchoServer`] does with each connection it accepts.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Echoes every byte; on EOF from the peer, finishes echoing, then shuts down its write side.
    Echo,
    /// Sends the greeting at accept, then behaves as [`Behavior::Echo`].
    GreetThenEcho(Vec<u8>),
    /// Sends the seeded stream `(seed, bytes)`, waits (bounded) until the peer's kernel has
    /// acknowledged every byte, then closes with SO_LINGER 0, which sends a reset.
    SendThenReset {
        /// Length of the stream.
        bytes: u64,
        /// Seed of the stream.
        seed: u64,
    },
    /// Reads and records everything until the peer's EOF, and only then sends the seeded stream
    /// `(seed, bytes)` and FIN: a reply that exists only after the peer half-closed.
    ReadThenSend {
        /// Length of the stream.
        bytes: u64,
        /// Seed of the stream.
        seed: u64,
    },
    /// Sends the seeded stream `(seed, bytes)` then shuts down its write side (FIN), while it keeps
    /// reading and recording what the peer sends until the peer's EOF.
    SendThenFin {
        /// Length of the stream.
        bytes: u64,
        /// Seed of the stream.
        seed: u64,
    },
}

/// What one connection accepted by an [`EchoServer`] saw, recorded when it ended.
#[derive(Debug, Clone)]
pub struct ConnRecord {
    /// The peer's address (the proxy's side of the backend connection).
    pub peer: SocketAddr,
    /// Everything read from the peer.
    pub received: StreamSummary,
    /// Bytes written to the peer.
    pub sent: u64,
    /// The error that ended the connection, if one did.
    pub error: Option<io::ErrorKind>,
}

/// A TCP server on loopback with one thread per connection; stops accepting on drop.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    stopping: AtomicBool,
    accepted: AtomicU64,
    bytes_sent: AtomicU64,
    records: Mutex<Vec<ConnRecord>>,
}

impl EchoServer {
    /// An echo server on an ephemeral `127.0.0.1` port.
    pub fn echo() -> Self {
        Self::start(Behavior::Echo)
    }

    /// A server that sends `greeting` at accept, then echoes.
    pub fn greeting(greeting: &[u8]) -> Self {
        Self::start(Behavior::GreetThenEcho(greeting.to_vec()))
    }

    /// A server that sends the seeded stream `(seed, bytes)`, then resets the connection.
    pub fn send_then_reset(bytes: u64, seed: u64) -> Self {
        Self::start(Behavior::SendThenReset { bytes, seed })
    }

    /// A server that reads until EOF, then sends the seeded stream `(seed, bytes)` and FIN.
    pub fn read_then_send(bytes: u64, seed: u64) -> Self {
        Self::start(Behavior::ReadThenSend { bytes, seed })
    }

    /// A server that sends the seeded stream `(seed, bytes)`, then FIN, and keeps reading.
    pub fn send_then_fin(bytes: u64, seed: u64) -> Self {
        Self::start(Behavior::SendThenFin { bytes, seed })
    }

    /// A server with `behavior` on an ephemeral `127.0.0.1` port.
    pub fn start(behavior: Behavior) -> Self {
        let any_port: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        Self::start_on(any_port, behavior).expect("bind an echo server on 127.0.0.1")
    }

    /// A server with `behavior` on `addr` (port 0 picks an ephemeral port).
    pub fn start_on(addr: SocketAddr, behavior: Behavior) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("echo-accept-{addr}"))
                .spawn(move || accept_loop(&listener, &behavior, &shared))?
        };
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Bytes written to peers so far, over all connections (grows while a transfer runs).
    pub fn bytes_sent(&self) -> u64 {
        self.shared.bytes_sent.load(Ordering::SeqCst)
    }

    /// Records of the connections that have ended so far.
    pub fn records(&self) -> Vec<ConnRecord> {
        lock(&self.shared.records).clone()
    }

    /// Waits until at least `count` connections have ended and returns their records; `Err` with
    /// the records so far when `timeout` passes first.
    pub fn wait_records(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<ConnRecord>, Vec<ConnRecord>> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.records();
            if records.len() >= count {
                return Ok(records);
            }
            if Instant::now() >= deadline {
                return Err(records);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // The acceptor is blocked in accept: one connection wakes it to see the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, behavior: &Behavior, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok((stream, peer)) = accepted else {
            // EMFILE and friends: back off instead of spinning.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let behavior = behavior.clone();
        let shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("echo-conn-{peer}"))
            .spawn(move || {
                let record = serve(stream, peer, &behavior, &shared);
                lock(&shared.records).push(record);
            });
        if spawned.is_err() {
            // Out of threads: the stream was moved into the closure and is dropped with it.
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn serve(stream: TcpStream, peer: SocketAddr, behavior: &Behavior, shared: &Shared) -> ConnRecord {
    let mut record = ConnRecord {
        peer,
        received: Checksum::new().finish(),
        sent: 0,
        error: None,
    };
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let result = match behavior {
        Behavior::Echo => echo(&stream, shared, &mut record),
        Behavior::GreetThenEcho(greeting) => {
            send_counted(&stream, greeting, shared, &mut record.sent)
                .and_then(|()| echo(&stream, shared, &mut record))
        }
        Behavior::SendThenReset { bytes, seed } => {
            send_then_reset(&stream, *bytes, *seed, shared, &mut record)
        }
        Behavior::ReadThenSend { bytes, seed } => {
            read_then_send(&stream, *bytes, *seed, shared, &mut record)
        }
        Behavior::SendThenFin { bytes, seed } => {
            send_then_fin(&stream, *bytes, *seed, shared, &mut record)
        }
    };
    record.error = result.err().map(|error| error.kind());
    record
}

fn echo(stream: &TcpStream, shared: &Shared, record: &mut ConnRecord) -> io::Result<()> {
    let mut checksum = Checksum::new();
    let mut buffer = vec![0; 64 * 1024];
    let result = loop {
        let n = match (&*stream).read(&mut buffer) {
            Ok(0) => break stream.shutdown(Shutdown::Write),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => break Err(error),
        };
        checksum.update(&buffer[..n]);
        if let Err(error) = send_counted(stream, &buffer[..n], shared, &mut record.sent) {
            break Err(error);
        }
    };
    record.received = checksum.finish();
    result
}

fn send_then_reset(
    stream: &TcpStream,
    bytes: u64,
    seed: u64,
    shared: &Shared,
    record: &mut ConnRecord,
) -> io::Result<()> {
    send_stream(stream, bytes, seed, shared, &mut record.sent)?;
    // SO_LINGER 0 discards what the peer has not acknowledged yet; wait for the acknowledgement so
    // that the peer really holds every byte when the reset leaves.
    if !tcp::wait_acknowledged(stream, ACK_TIMEOUT) {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "peer did not acknowledge every byte before the reset",
        ));
    }
    SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

fn read_then_send(
    stream: &TcpStream,
    bytes: u64,
    seed: u64,
    shared: &Shared,
    record: &mut ConnRecord,
) -> io::Result<()> {
    let (received, result) = read_until_eof(stream);
    record.received = received;
    result?;
    send_stream(stream, bytes, seed, shared, &mut record.sent)?;
    stream.shutdown(Shutdown::Write)
}

fn send_then_fin(
    stream: &TcpStream,
    bytes: u64,
    seed: u64,
    shared: &Shared,
    record: &mut ConnRecord,
) -> io::Result<()> {
    thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut sent = 0;
            let result = send_stream(stream, bytes, seed, shared, &mut sent)
                .and_then(|()| stream.shutdown(Shutdown::Write));
            (sent, result)
        });
        let (received, read_result) = read_until_eof(stream);
        record.received = received;
        let (sent, write_result) = writer
            .join()
            .unwrap_or((0, Err(io::Error::other("writer panicked"))));
        record.sent = sent;
        write_result.and(read_result)
    })
}

fn read_until_eof(stream: &TcpStream) -> (StreamSummary, io::Result<()>) {
    let mut checksum = Checksum::new();
    let mut buffer = vec![0; 64 * 1024];
    let result = loop {
        match (&*stream).read(&mut buffer) {
            Ok(0) => break Ok(()),
            Ok(n) => checksum.update(&buffer[..n]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => break Err(error),
        }
    };
    (checksum.finish(), result)
}

fn send_stream(
    stream: &TcpStream,
    bytes: u64,
    seed: u64,
    shared: &Shared,
    sent: &mut u64,
) -> io::Result<()> {
    let mut source = SeededStream::new(seed, bytes);
    while let Some(chunk) = source.next_chunk() {
        send_counted(stream, chunk, shared, sent)?;
    }
    Ok(())
}

/// `write_all` that keeps the server-wide and per-connection counters current after every write.
fn send_counted(
    stream: &TcpStream,
    mut data: &[u8],
    shared: &Shared,
    sent: &mut u64,
) -> io::Result<()> {
    while !data.is_empty() {
        match (&*stream).write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                *sent += n as u64;
                shared.bytes_sent.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking connection thread must not hide the records of the others.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
