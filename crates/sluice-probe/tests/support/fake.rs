//! Loopback TCP backends written for the tests: they answer right, answer wrong, or misbehave
//! (never answer, close at once, send forever), and record what probes send them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What a [`FakeServer`] does with each connection.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Reads until EOF; never writes.
    Silent,
    /// Reads once, writes the bytes, then reads until EOF.
    Reply(Vec<u8>),
    /// Reads once, writes the bytes, then closes.
    ReplyAndClose(Vec<u8>),
    /// Writes the bytes at once, then reads until EOF.
    Greet(Vec<u8>),
    /// Closes the connection as soon as it is accepted.
    CloseAtOnce,
    /// Writes the bytes over and over until the peer goes away.
    Endless(Vec<u8>),
    /// Writes the first bytes once, then the second over and over until the peer goes away.
    EndlessAfter(Vec<u8>, Vec<u8>),
    /// Reads once, then writes each part 20 ms after the previous one, then reads until EOF.
    Parts(Vec<Vec<u8>>),
}

/// What one connection sent, and whether it is over.
#[derive(Debug, Clone, Default)]
struct Record {
    received: Vec<u8>,
    ended: bool,
}

/// A backend on `127.0.0.1`, served by tasks of the current tokio runtime; stops accepting on
/// drop (connections already accepted end with the runtime or at the peer's EOF).
pub struct FakeServer {
    pub addr: SocketAddr,
    records: Arc<Mutex<Vec<Record>>>,
    accept: JoinHandle<()>,
}

impl FakeServer {
    pub async fn start(behavior: Behavior) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let records = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&records);
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = {
                    let mut records = shared.lock().unwrap();
                    records.push(Record::default());
                    records.len() - 1
                };
                let conn = Connection {
                    stream,
                    records: Arc::clone(&shared),
                    index,
                };
                tokio::spawn(conn.serve(behavior.clone()));
            }
        });
        FakeServer {
            addr,
            records,
            accept,
        }
    }

    /// What each connection sent so far, in order of accept.
    pub fn received(&self) -> Vec<Vec<u8>> {
        let records = self.records.lock().unwrap();
        records.iter().map(|r| r.received.clone()).collect()
    }

    /// Connections accepted and not yet ended: each holds one descriptor of this process.
    /// Exact between polls on a current-thread runtime (a connection's record is made in the
    /// poll that accepts it and ended in the poll that drops it).
    pub fn open(&self) -> usize {
        let records = self.records.lock().unwrap();
        records.iter().filter(|r| !r.ended).count()
    }

    /// What each connection sent, once all of them have ended (waits at most 5 s).
    pub async fn received_when_closed(&self) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            {
                let records = self.records.lock().unwrap();
                if records.iter().all(|r| r.ended) {
                    return records.iter().map(|r| r.received.clone()).collect();
                }
            }
            assert!(
                Instant::now() < deadline,
                "connections still open after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

struct Connection {
    stream: TcpStream,
    records: Arc<Mutex<Vec<Record>>>,
    index: usize,
}

impl Connection {
    async fn serve(mut self, behavior: Behavior) {
        match behavior {
            Behavior::Silent => {}
            Behavior::Reply(reply) => {
                self.read_once().await;
                let _ = self.stream.write_all(&reply).await;
            }
            Behavior::ReplyAndClose(reply) => {
                self.read_once().await;
                let _ = self.stream.write_all(&reply).await;
                return self.end();
            }
            Behavior::Greet(greeting) => {
                let _ = self.stream.write_all(&greeting).await;
            }
            Behavior::CloseAtOnce => return self.end(),
            Behavior::Endless(pattern) => {
                while self.stream.write_all(&pattern).await.is_ok() {}
                return self.end();
            }
            Behavior::EndlessAfter(first, pattern) => {
                if self.stream.write_all(&first).await.is_ok() {
                    while self.stream.write_all(&pattern).await.is_ok() {}
                }
                return self.end();
            }
            Behavior::Parts(parts) => {
                self.read_once().await;
                for part in parts {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let _ = self.stream.write_all(&part).await;
                }
            }
        }
        // Hold the connection until the probe closes it.
        while self.read_once().await {}
        self.end();
    }

    /// Reads once and records it; false at EOF or on an error.
    async fn read_once(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        match self.stream.read(&mut buf).await {
            Ok(n) if n > 0 => {
                let mut records = self.records.lock().unwrap();
                records[self.index].received.extend_from_slice(&buf[..n]);
                true
            }
            _ => false,
        }
    }

    fn end(self) {
        self.records.lock().unwrap()[self.index].ended = true;
    }
}
