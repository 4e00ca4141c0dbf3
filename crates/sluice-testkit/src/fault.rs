//! A fault-injecting TCP proxy to put between Sluice and a backend, or between a client and
//! Sluice.
//!
//! Each accepted connection gets its own connection to the target and two pump threads, one per
//! direction. What a pump does with the bytes it reads is its direction's [`Fault`], which the
//! test changes at any moment with [`FaultProxy::set`]; the change applies to every connection,
//! open and future, at its next read or write. [`FaultProxy::reset_all`] resets every open
//! connection on both sides.
//!
//! Both sockets of a proxied connection have TCP_NODELAY, so a sliced write leaves as its own
//! segment: the peer really receives one to 64 bytes at a time.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use socket2::SockRef;

use crate::client::CONNECT_TIMEOUT;

/// How often a stalled or blackholed pump looks at its fault again.
const POLL: Duration = Duration::from_millis(5);
/// The largest read of a pump.
const READ_MAX: usize = 64 * 1024;

/// One direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// From the side that connected to the proxy toward the target.
    Upstream,
    /// From the target back toward the side that connected.
    Downstream,
}

/// What a pump does with the bytes of its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwards every read as one write.
    Pass,
    /// Forwards in writes of 1 ..= `max` bytes (a seeded random size each), sleeping 0 ..= `gap`
    /// between writes.
    Slice {
        /// Largest write, in bytes (at least 1).
        max: usize,
        /// Longest pause between two writes.
        gap: Duration,
    },
    /// Forwards every read after holding it for this long.
    Delay(Duration),
    /// Stops reading (the sender's buffers fill and it blocks) until the fault changes.
    Stall,
    /// Reads and discards everything, forwards nothing and never passes an end of stream on:
    /// what a peer behind a dropped route looks like to the sender's application.
    Blackhole,
}

/// The proxy: listens on a loopback port, forwards to one target.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    faults: Mutex<[Fault; 2]>,
    open: Mutex<Vec<Arc<Conn>>>,
    next_id: AtomicU64,
    accepted: AtomicUsize,
    forwarded: [AtomicU64; 2],
    stopping: AtomicBool,
}

/// One proxied connection. Its sockets close when the last pump and the open list let go of it,
/// so a reset (SO_LINGER 0) set on them turns that close into an RST, with no FIN before it.
#[derive(Debug)]
struct Conn {
    id: u64,
    down: TcpStream,
    up: TcpStream,
    reset: AtomicBool,
    pumps_done: AtomicUsize,
}

impl Conn {
    fn reset(&self) {
        for stream in [&self.down, &self.up] {
            let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
        }
        self.reset.store(true, Ordering::Relaxed);
    }
}

impl FaultProxy {
    /// Starts a proxy toward `target` on a fresh loopback port, passing bytes unchanged.
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            target,
            faults: Mutex::new([Fault::Pass; 2]),
            open: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
            forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
            stopping: AtomicBool::new(false),
        });
        let accept = Arc::clone(&shared);
        thread::Builder::new()
            .name("fault-accept".into())
            .spawn(move || accept_loop(&listener, &accept))
            .expect("spawn the fault proxy");
        Self { addr, shared }
    }

    /// Where clients (or Sluice, as a backend address) connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the fault of one direction, for open and future connections.
    pub fn set(&self, leg: Leg, fault: Fault) {
        self.shared.faults.lock().expect("fault lock")[leg as usize] = fault;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.shared.open.lock().expect("open lock").len()
    }

    /// Bytes forwarded in one direction so far, over all connections.
    pub fn forwarded(&self, leg: Leg) -> u64 {
        self.shared.forwarded[leg as usize].load(Ordering::Relaxed)
    }

    /// Resets every open connection toward both of its peers (SO_LINGER 0, then close, within
    /// one pump tick, at most 50 ms). Returns how many it reset.
    pub fn reset_all(&self) -> usize {
        let open = std::mem::take(&mut *self.shared.open.lock().expect("open lock"));
        for conn in &open {
            conn.reset();
        }
        open.len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees `stopping`; the pumps see it within one tick.
        let _ = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT);
        self.shared.open.lock().expect("open lock").clear();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for incoming in listener.incoming() {
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        let Ok(down) = incoming else {
            thread::sleep(POLL);
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(up) = TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT) else {
            crate::tcp::reset(down);
            continue;
        };
        for stream in [&down, &up] {
            let _ = stream.set_nodelay(true);
            // Blocking calls wake up every tick to look at resets and the proxy's end.
            let _ = stream.set_read_timeout(Some(POLL * 10));
            let _ = stream.set_write_timeout(Some(POLL * 10));
        }
        let conn = Arc::new(Conn {
            id: shared.next_id.fetch_add(1, Ordering::Relaxed),
            down,
            up,
            reset: AtomicBool::new(false),
            pumps_done: AtomicUsize::new(0),
        });
        shared
            .open
            .lock()
            .expect("open lock")
            .push(Arc::clone(&conn));
        for leg in [Leg::Upstream, Leg::Downstream] {
            let shared = Arc::clone(shared);
            let pumped = Arc::clone(&conn);
            let spawned = thread::Builder::new()
                .name("fault-pump".into())
                .stack_size(128 * 1024)
                .spawn(move || {
                    pump(&shared, leg, &pumped);
                    if pumped.pumps_done.fetch_add(1, Ordering::AcqRel) == 1 {
                        let mut open = shared.open.lock().expect("open lock");
                        open.retain(|open| open.id != pumped.id);
                    }
                });
            if spawned.is_err() {
                conn.reset();
            }
        }
    }
}

/// Why a pump stops.
fn ended(shared: &Shared, conn: &Conn) -> bool {
    conn.reset.load(Ordering::Relaxed) || shared.stopping.load(Ordering::Relaxed)
}

fn timed_out(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Moves one direction until its source ends, applying the direction's fault to every read.
fn pump(shared: &Shared, leg: Leg, conn: &Conn) {
    let (mut from, to) = match leg {
        Leg::Upstream => (&conn.down, &conn.up),
        Leg::Downstream => (&conn.up, &conn.down),
    };
    let mut rng = StdRng::seed_from_u64(conn.id.wrapping_mul(2).wrapping_add(leg as u64));
    let mut buf = vec![0u8; READ_MAX];
    while !ended(shared, conn) {
        if current(shared, leg) == Fault::Stall {
            thread::sleep(POLL);
            continue;
        }
        let read = match from.read(&mut buf) {
            Ok(0) => {
                // End of stream: pass it on, unless blackholed.
                if current(shared, leg) != Fault::Blackhole {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(read) => read,
            Err(error) if timed_out(&error) => continue,
            Err(_) => {
                // The source was reset: reset the other side too.
                conn.reset();
                return;
            }
        };
        if forward(shared, leg, conn, &buf[..read], to, &mut rng).is_err() {
            conn.reset();
            return;
        }
    }
}

fn current(shared: &Shared, leg: Leg) -> Fault {
    shared.faults.lock().expect("fault lock")[leg as usize]
}

/// Writes one read's bytes on under the direction's fault at the time of each write.
fn forward(
    shared: &Shared,
    leg: Leg,
    conn: &Conn,
    mut bytes: &[u8],
    mut to: &TcpStream,
    rng: &mut StdRng,
) -> io::Result<()> {
    while !bytes.is_empty() {
        if ended(shared, conn) {
            return Err(io::ErrorKind::ConnectionAborted.into());
        }
        let piece = match current(shared, leg) {
            Fault::Pass => bytes.len(),
            Fault::Slice { max, gap } => {
                let gap_us = u64::try_from(gap.as_micros()).unwrap_or(u64::MAX);
                if gap_us > 0 {
                    thread::sleep(Duration::from_micros(rng.random_range(0..=gap_us)));
                }
                rng.random_range(1..=max.max(1)).min(bytes.len())
            }
            Fault::Delay(delay) => {
                thread::sleep(delay);
                bytes.len()
            }
            // Held bytes wait; the pump reads nothing more meanwhile.
            Fault::Stall => {
                thread::sleep(POLL);
                continue;
            }
            Fault::Blackhole => return Ok(()),
        };
        match to.write(&bytes[..piece]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => {
                shared.forwarded[leg as usize].fetch_add(written as u64, Ordering::Relaxed);
                bytes = &bytes[written..];
            }
            Err(error) if timed_out(&error) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::verify_echo;
    use crate::echo::EchoServer;
    use std::time::Instant;

    #[test]
    fn sliced_both_ways_keeps_every_byte_in_order() {
        let backend = EchoServer::echo();
        let proxy = FaultProxy::start(backend.addr());
        let slice = Fault::Slice {
            max: 64,
            gap: Duration::from_micros(50),
        };
        proxy.set(Leg::Upstream, slice);
        proxy.set(Leg::Downstream, slice);
        let report = verify_echo(proxy.addr(), 64 * 1024, 3, Duration::from_secs(60)).unwrap();
        report.assert_echoed();
        assert_eq!(proxy.forwarded(Leg::Upstream), 64 * 1024);
        assert_eq!(proxy.forwarded(Leg::Downstream), 64 * 1024);
    }

    #[test]
    fn stall_holds_bytes_until_released_and_reset_reaches_the_client() {
        let backend = EchoServer::echo();
        let proxy = FaultProxy::start(backend.addr());
        proxy.set(Leg::Downstream, Fault::Stall);
        let mut client = TcpStream::connect(proxy.addr()).unwrap();
        client.write_all(b"ping").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 4];
        assert!(client.read(&mut buf).is_err(), "a stalled leg forwarded");
        proxy.set(Leg::Downstream, Fault::Pass);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        let start = Instant::now();
        assert_eq!(proxy.reset_all(), 1);
        let error = client.read(&mut buf).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn blackhole_swallows_bytes_and_the_end_of_stream() {
        let backend = EchoServer::echo();
        let proxy = FaultProxy::start(backend.addr());
        proxy.set(Leg::Upstream, Fault::Blackhole);
        let mut client = TcpStream::connect(proxy.addr()).unwrap();
        client.write_all(b"lost").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 4];
        let error = client.read(&mut buf).unwrap_err();
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{error}"
        );
        assert_eq!(proxy.forwarded(Leg::Upstream), 0);
    }
}
