//! UDP echo backends that say who they are: each answers a datagram with its name, a newline,
//! and the datagram's payload, from the address the datagram was sent to; counts what it
//! received; and can be killed (its socket closed, so the kernel answers ICMP port unreachable)
//! and restarted on the same address.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::addr::free_addr;

/// How often a backend's thread looks at its stop flag while no datagram comes.
const POLL: Duration = Duration::from_millis(20);
/// Payloads a backend keeps, in arrival order; beyond them it only counts (a flood test sends
/// hundreds of thousands of datagrams).
const RECORDED_MAX: usize = 4096;
/// The largest UDP payload over IPv4.
const DATAGRAM_MAX: usize = 65507;
/// How long a restart retries binding the address of the backend it replaces.
const RESTART_TIMEOUT: Duration = Duration::from_secs(5);

/// One UDP echo backend on its own thread; stops (closing its socket) on drop.
#[derive(Debug)]
pub struct UdpEcho {
    addr: SocketAddr,
    name: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    stopping: AtomicBool,
    received: AtomicU64,
    payloads: Mutex<Vec<Vec<u8>>>,
}

/// Several [`UdpEcho`] backends named `backend-0`, `backend-1`, ..., each on a loopback address
/// of its own (see [`free_addr`]), so that nothing takes a killed backend's port before it is
/// restarted there.
#[derive(Debug)]
pub struct UdpEchoPool {
    addrs: Vec<SocketAddr>,
    backends: Vec<Option<UdpEcho>>,
}

impl UdpEcho {
    /// A backend named `name` on a fresh loopback address.
    pub fn start(name: &str) -> Self {
        Self::start_on(free_addr(), name)
            .unwrap_or_else(|e| panic!("bind the udp echo {name}: {e}"))
    }

    /// A backend named `name` on `addr`.
    pub fn start_on(addr: SocketAddr, name: &str) -> io::Result<Self> {
        let socket = UdpSocket::bind(addr)?;
        socket.set_read_timeout(Some(POLL))?;
        let addr = socket.local_addr()?;
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            let prefix = format!("{name}\n").into_bytes();
            thread::Builder::new()
                .name(format!("udp-echo-{addr}"))
                .spawn(move || echo_loop(&socket, &prefix, &shared))?
        };
        Ok(Self {
            addr,
            name: name.to_owned(),
            shared,
            thread: Some(thread),
        })
    }

    /// The address it receives on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name its replies start with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.shared.received.load(Ordering::SeqCst)
    }

    /// The payloads of the first datagrams received (at most 4096), in arrival order.
    pub fn payloads(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.payloads).clone()
    }

    /// Waits until at least `count` datagrams have arrived; `Err` with the count so far when
    /// `timeout` passes first.
    pub fn wait_received(&self, count: u64, timeout: Duration) -> Result<u64, u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.received();
            if received >= count {
                return Ok(received);
            }
            if Instant::now() >= deadline {
                return Err(received);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // The thread sees the flag within one read timeout, then drops the socket.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl UdpEchoPool {
    /// `count` backends, `backend-0` to `backend-{count - 1}`.
    pub fn start(count: usize) -> Self {
        let backends: Vec<Option<UdpEcho>> = (0..count)
            .map(|i| Some(UdpEcho::start(&format!("backend-{i}"))))
            .collect();
        let addrs = backends.iter().flatten().map(UdpEcho::addr).collect();
        Self { addrs, backends }
    }

    /// Every backend's address, killed ones included, by index.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// Backend `index`, or `None` while it is killed.
    pub fn backend(&self, index: usize) -> Option<&UdpEcho> {
        self.backends.get(index)?.as_ref()
    }

    /// Datagrams backend `index` received since it last started (0 while it is killed).
    pub fn received(&self, index: usize) -> u64 {
        self.backend(index).map_or(0, UdpEcho::received)
    }

    /// Stops backend `index` and closes its socket: datagrams to its address now meet ICMP
    /// port unreachable.
    pub fn kill(&mut self, index: usize) {
        drop(self.backends[index].take());
    }

    /// Starts backend `index` again on its address (retrying for a moment if the address is
    /// still held).
    pub fn restart(&mut self, index: usize) {
        self.kill(index);
        let (addr, name) = (self.addrs[index], format!("backend-{index}"));
        let deadline = Instant::now() + RESTART_TIMEOUT;
        let backend = loop {
            match UdpEcho::start_on(addr, &name) {
                Ok(backend) => break backend,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart of {name} on {addr}: {e}; retrying");
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("restart {name} on {addr}: {e}"),
            }
        };
        self.backends[index] = Some(backend);
    }
}

/// Splits an echo reply into the name of the backend that sent it and the echoed payload;
/// `None` when the datagram has no name line.
pub fn split_echo_reply(reply: &[u8]) -> Option<(&str, &[u8])> {
    let newline = reply.iter().position(|&b| b == b'\n')?;
    let name = std::str::from_utf8(&reply[..newline]).ok()?;
    Some((name, &reply[newline + 1..]))
}

fn echo_loop(socket: &UdpSocket, prefix: &[u8], shared: &Shared) {
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::with_capacity(65536 + prefix.len());
    while !shared.stopping.load(Ordering::SeqCst) {
        let (len, peer) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            // A timeout (look at the flag again), or an error a datagram socket may report and
            // that a later datagram does not depend on.
            Err(_) => continue,
        };
        shared.received.fetch_add(1, Ordering::SeqCst);
        {
            let mut payloads = lock(&shared.payloads);
            if payloads.len() < RECORDED_MAX {
                payloads.push(buf[..len].to_vec());
            }
        }
        reply.clear();
        reply.extend_from_slice(prefix);
        reply.extend_from_slice(&buf[..len.min(DATAGRAM_MAX - prefix.len())]);
        // A peer gone meanwhile is not the backend's concern.
        let _ = socket.send_to(&reply, peer);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_with_its_name_and_stops_on_kill() {
        let mut pool = UdpEchoPool::start(2);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 256];
        for (index, payload) in [(0, &b"hello"[..]), (1, &b""[..])] {
            client.send_to(payload, pool.addrs()[index]).unwrap();
            let (len, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(from, pool.addrs()[index]);
            let (name, echoed) = split_echo_reply(&buf[..len]).unwrap();
            assert_eq!(name, format!("backend-{index}"));
            assert_eq!(echoed, payload);
            assert_eq!(pool.received(index), 1);
        }
        assert_eq!(pool.backend(0).unwrap().payloads(), vec![b"hello".to_vec()]);

        pool.kill(1);
        // Connected, the client sees the ICMP port unreachable as a refused receive.
        client.connect(pool.addrs()[1]).unwrap();
        client.send(b"anyone?").unwrap();
        let err = client.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);

        pool.restart(1);
        client.send(b"back").unwrap();
        let len = client.recv(&mut buf).unwrap();
        assert_eq!(
            split_echo_reply(&buf[..len]),
            Some(("backend-1", &b"back"[..]))
        );
        assert_eq!(pool.received(1), 1);
    }
}
