//! Loopback addresses for tests that run in parallel.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use socket2::{Domain, Socket, Type};

/// A loopback TCP port that was free a moment ago on `127.0.0.1`.
///
/// The kernel hands out ephemeral ports in turn, so a port just released is not handed out again
/// soon; the window between this call and the product binding the port is small.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A loopback address of its own, `127.X.Y.Z:PORT`, with a port that was free a moment ago.
///
/// Each call takes the next address of this process's own block of 127/8 (the whole block is
/// loopback on Linux), so a port taken meanwhile by a client's outgoing connection (those use
/// 127.0.0.1) or by another test cannot collide with it. Falls back to `127.0.0.1` where the
/// address cannot be bound.
pub fn free_addr() -> SocketAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    // Second octet from the pid (parallel test binaries differ), the last two from the counter.
    let second = 1 + (std::process::id() % 250) as u8;
    let ip = Ipv4Addr::new(127, second, (n / 250 % 250) as u8 + 1, (n % 250) as u8 + 1);
    TcpListener::bind((ip, 0))
        .or_else(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|listener| listener.local_addr())
        .expect("bind a loopback address")
}

/// `[::1]:PORT` with a port that was free a moment ago; `None` when `::1` is not configured.
pub fn free_addr_v6() -> Option<SocketAddr> {
    let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).ok()?;
    listener.local_addr().ok()
}

/// Whether the IPv6 loopback address `::1` can be bound on this machine.
pub fn ipv6_loopback_available() -> bool {
    free_addr_v6().is_some()
}

/// A loopback address where nothing listens: a connect to it is refused at once.
///
/// The port is held by a socket that is bound but never listens, kept open for the life of the
/// process, so no other test can start listening on it and a SYN to it is answered with a reset.
pub fn refusing_addr() -> SocketAddr {
    static HELD: Mutex<Vec<Socket>> = Mutex::new(Vec::new());
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let any_port: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    socket.bind(&any_port.into()).expect("bind 127.0.0.1:0");
    let addr = socket
        .local_addr()
        .expect("local_addr")
        .as_socket()
        .expect("inet address");
    HELD.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(socket);
    addr
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::time::Duration;

    #[test]
    fn refusing_addr_refuses() {
        let addr = refusing_addr();
        let err = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
