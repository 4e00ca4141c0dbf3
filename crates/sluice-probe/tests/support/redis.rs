//! Real `redis-server` processes on loopback, killed on drop.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use sluice_testkit::free_addr;

use super::temp::TempDir;

/// A `redis-server` child on a fresh loopback address, with its own working directory (a
/// replica writes the RDB it receives there); killed and cleaned up on drop.
pub struct RedisServer {
    pub addr: SocketAddr,
    child: Child,
    _dir: TempDir,
}

impl RedisServer {
    /// Starts a master with `extra` arguments (`["--requirepass", "x"]`).
    pub fn start(extra: &[&str]) -> RedisServer {
        let addr = free_addr();
        let dir = TempDir::new("redis");
        let child = Command::new("redis-server")
            .args(["--bind", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                if error.kind() == io::ErrorKind::NotFound {
                    panic!(
                        "redis-server is not installed (not found in PATH); \
                         scripts/install-deps.sh installs it"
                    );
                }
                panic!("spawn redis-server: {error}");
            });
        let mut server = RedisServer {
            addr,
            child,
            _dir: dir,
        };
        server.wait_listening();
        server
    }

    /// Starts a replica of `master`.
    pub fn replica_of(master: &RedisServer) -> RedisServer {
        let ip = master.addr.ip().to_string();
        let port = master.addr.port().to_string();
        RedisServer::start(&["--replicaof", &ip, &port])
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("redis-server on {} exited at start: {status}", self.addr);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {} within 10 s",
                self.addr
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
