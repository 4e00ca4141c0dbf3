//! TCP state read from /proc, without `unsafe`.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// Waits until the kernel's send queue of `stream` (bytes written but not yet acknowledged by the
/// peer, `tx_queue` in /proc/net/tcp) is empty. Returns false when `timeout` passes first or the
/// socket cannot be found.
pub fn wait_acknowledged(stream: &TcpStream, timeout: Duration) -> bool {
    let (Ok(local), Ok(remote)) = (stream.local_addr(), stream.peer_addr()) else {
        return false;
    };
    let deadline = Instant::now() + timeout;
    loop {
        if send_queue(local, remote) == Some(0) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The send queue in bytes of the TCP socket `local` -> `remote`, from /proc/net/tcp or tcp6.
pub fn send_queue(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let table = match local {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    let text = fs::read_to_string(table).ok()?;
    let (local, remote) = (proc_addr(local), proc_addr(remote));
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 4 && fields[1] == local && fields[2] == remote {
            let tx_queue = fields[4].split(':').next()?;
            u64::from_str_radix(tx_queue, 16).ok()
        } else {
            None
        }
    })
}

/// An address as /proc/net/tcp prints it: each 32-bit word of the address in host order, in hex.
fn proc_addr(addr: SocketAddr) -> String {
    let octets: Vec<u8> = match addr {
        SocketAddr::V4(v4) => v4.ip().octets().to_vec(),
        SocketAddr::V6(v6) => v6.ip().octets().to_vec(),
    };
    let mut out = String::new();
    for word in octets.chunks(4) {
        let word = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
        out.push_str(&format!("{word:08X}"));
    }
    out.push_str(&format!(":{:04X}", addr.port()));
    out
}

/// Closes `stream` with a reset (SO_LINGER 0) instead of a FIN.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn send_queue_is_found_and_drains() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        client.write_all(&[1; 1000]).unwrap();
        let queue = send_queue(client.local_addr().unwrap(), client.peer_addr().unwrap());
        assert!(queue.is_some(), "socket not found in /proc/net/tcp");
        assert!(wait_acknowledged(&client, Duration::from_secs(5)));
    }
}
