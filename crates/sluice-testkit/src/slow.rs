//! Slow peers at scale, each kind driven by one thread over non-blocking sockets (a thread per
//! connection would cost the test machine more than the proxy under test):
//! - [`SlowReader`]: reads at most `read` bytes from each of its sockets every `every`;
//! - [`SlowBackend`]: a listener whose connections are read by a [`SlowReader`] and never
//!   answered (a backend that drains 1 KiB per 100 ms);
//! - [`Pusher`]: writes to each of its sockets as much as they take, every `every` (clients
//!   that push as fast as they are let).
//!
//! All of them stop and close their sockets when dropped.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::SockRef;

/// The kernel buffer size of the slow peers' own sockets.
const PEER_BUFFER: usize = 64 * 1024;

/// Reads a little from many sockets, periodically.
#[derive(Debug)]
pub struct SlowReader {
    ticker: Ticker,
}

impl SlowReader {
    /// Reads at most `read` bytes from each socket every `every`.
    pub fn start(read: usize, every: Duration) -> Self {
        let mut buf = vec![0u8; read.max(1)];
        let ticker = Ticker::start("slow-reader", Vec::new(), every, move |mut stream| {
            // A read of 0 is the peer's EOF: the socket ended.
            stream.read(&mut buf).and_then(|n| match n {
                0 => Err(io::ErrorKind::UnexpectedEof.into()),
                n => Ok(n),
            })
        });
        Self { ticker }
    }

    /// Adds a socket (made non-blocking).
    pub fn add(&self, stream: TcpStream) {
        stream.set_nonblocking(true).expect("non-blocking");
        let _ = SockRef::from(&stream).set_recv_buffer_size(PEER_BUFFER);
        lock(&self.ticker.shared.streams).push(stream);
    }

    /// Sockets being read now.
    pub fn len(&self) -> usize {
        lock(&self.ticker.shared.streams).len()
    }

    /// True when it reads no socket.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes read so far, over all sockets.
    pub fn bytes(&self) -> u64 {
        self.ticker.bytes()
    }

    /// Sockets that ended (EOF or error) and were dropped.
    pub fn ended(&self) -> usize {
        self.ticker.ended()
    }
}

/// One thread that applies one non-blocking operation to each of many sockets every tick,
/// counting the bytes it moved and dropping the sockets whose operation failed.
#[derive(Debug)]
struct Ticker {
    shared: Arc<TickShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct TickShared {
    streams: Mutex<Vec<TcpStream>>,
    bytes: AtomicU64,
    ended: AtomicUsize,
    stopping: AtomicBool,
}

impl Ticker {
    /// `op` moves bytes on one socket: `Ok(n)` bytes moved, `WouldBlock` nothing this tick,
    /// any other error ends the socket.
    fn start(
        name: &str,
        streams: Vec<TcpStream>,
        every: Duration,
        mut op: impl FnMut(&TcpStream) -> io::Result<usize> + Send + 'static,
    ) -> Self {
        let shared = Arc::new(TickShared {
            streams: Mutex::new(streams),
            bytes: AtomicU64::new(0),
            ended: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        });
        let looped = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !looped.stopping.load(Ordering::Relaxed) {
                    let round = Instant::now();
                    lock(&looped.streams).retain(|stream| match op(stream) {
                        Ok(n) => {
                            looped.bytes.fetch_add(n as u64, Ordering::Relaxed);
                            true
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                        Err(_) => {
                            looped.ended.fetch_add(1, Ordering::Relaxed);
                            false
                        }
                    });
                    thread::sleep(every.saturating_sub(round.elapsed()));
                }
            })
            .expect("spawn a slow-peer thread");
        Self {
            shared,
            thread: Some(thread),
        }
    }

    fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    fn ended(&self) -> usize {
        self.shared.ended.load(Ordering::Relaxed)
    }

    /// Stops the thread and hands back the sockets still open.
    fn stop(&mut self) -> Vec<TcpStream> {
        self.shared.stopping.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        std::mem::take(&mut *lock(&self.shared.streams))
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A backend that accepts and drains its connections through a [`SlowReader`], never replying.
#[derive(Debug)]
pub struct SlowBackend {
    addr: SocketAddr,
    reader: Arc<SlowReader>,
    stopping: Arc<AtomicBool>,
}

impl SlowBackend {
    /// Listens on a fresh loopback port; reads `read` bytes per connection every `every`.
    pub fn start(read: usize, every: Duration) -> Self {
        // A backlog for a whole burst of connects (std's 128 overflows: see `crowd_listener`).
        let listener = crate::crowd::crowd_listener().expect("bind the slow backend");
        listener.set_nonblocking(false).expect("blocking accepts");
        let addr = listener.local_addr().expect("local address");
        let reader = Arc::new(SlowReader::start(read, every));
        let stopping = Arc::new(AtomicBool::new(false));
        let (acceptor, stop) = (Arc::clone(&reader), Arc::clone(&stopping));
        thread::Builder::new()
            .name("slow-backend".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    match stream {
                        Ok(stream) => {
                            // Small kernel buffers: thousands of slow peers must not push the
                            // whole machine into TCP memory pressure (which slows every socket,
                            // the proxy's fast ones included) with bytes of the test's own.
                            let _ = SockRef::from(&stream).set_recv_buffer_size(PEER_BUFFER);
                            acceptor.add(stream);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .expect("spawn the slow backend");
        Self {
            addr,
            reader,
            stopping,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections it holds now.
    pub fn connections(&self) -> usize {
        self.reader.len()
    }

    /// Bytes it has read, over all connections.
    pub fn bytes(&self) -> u64 {
        self.reader.bytes()
    }
}

impl Drop for SlowBackend {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Writes to many sockets as much as each takes, periodically.
#[derive(Debug)]
pub struct Pusher {
    ticker: Ticker,
}

impl Pusher {
    /// Offers each socket up to 64 KiB every `every`.
    pub fn start(streams: Vec<TcpStream>, every: Duration) -> Self {
        for stream in &streams {
            stream.set_nonblocking(true).expect("non-blocking");
            // See `SlowBackend::start`: the test's own bytes stay out of kernel memory.
            let _ = SockRef::from(stream).set_send_buffer_size(PEER_BUFFER);
        }
        let chunk = vec![0x5a_u8; 64 * 1024];
        let ticker = Ticker::start("pusher", streams, every, move |mut stream| {
            stream.write(&chunk)
        });
        Self { ticker }
    }

    /// Bytes written so far, over all sockets.
    pub fn bytes(&self) -> u64 {
        self.ticker.bytes()
    }

    /// Sockets whose writes failed (reset, closed) and were dropped.
    pub fn ended(&self) -> usize {
        self.ticker.ended()
    }
}

impl Drop for Pusher {
    /// Stops pushing and resets every connection: a plain close would leave the unsent bytes
    /// (and the FIN behind them) queued for as long as the slow side takes to drain them.
    fn drop(&mut self) {
        for stream in self.ticker.stop() {
            crate::tcp::reset(stream);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_backend_drains_a_little_per_tick_and_pusher_fills() {
        let backend = SlowBackend::start(1024, Duration::from_millis(50));
        let streams: Vec<TcpStream> = (0..1000)
            .map(|_| TcpStream::connect(backend.addr()).unwrap())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while backend.connections() < 1000 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(backend.connections(), 1000);
        let pusher = Pusher::start(streams, Duration::from_millis(50));
        thread::sleep(Duration::from_millis(500));
        let read = backend.bytes();
        // About 10 ticks of 1 KiB for each of 20 connections: far below what was pushed.
        assert!(read > 0 && read <= 1000 * 1024 * 12, "read {read}");
        assert!(
            pusher.bytes() > read,
            "pushed {} read {read}",
            pusher.bytes()
        );
        assert_eq!(pusher.ended(), 0);
    }
}
