//! Clients that push seeded bytes through a proxy and check what comes back.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::data::{Checksum, SeededStream, StreamSummary};

/// How long a connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one read may wait inside a bounded loop before the loop checks its deadline.
const READ_SLICE: Duration = Duration::from_millis(200);

/// What one echo round trip moved, both ways.
#[derive(Debug, Clone, Copy)]
pub struct VerifyReport {
    /// What the client wrote.
    pub sent: StreamSummary,
    /// What the client read back before EOF.
    pub received: StreamSummary,
    /// From connect to EOF.
    pub elapsed: Duration,
}

impl VerifyReport {
    /// Panics unless every byte sent came back, in order, and nothing else.
    pub fn assert_echoed(&self) {
        assert_eq!(
            self.sent, self.received,
            "echoed stream differs from the sent stream (left: sent, right: received)"
        );
    }
}

/// Why a client run failed, with how far it got.
#[derive(Debug)]
pub struct VerifyError {
    /// What the client was doing.
    pub stage: &'static str,
    /// The error.
    pub error: io::Error,
    /// Bytes written before the failure.
    pub sent: u64,
    /// Bytes read before the failure.
    pub received: u64,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (after sending {} and receiving {} bytes)",
            self.stage, self.error, self.sent, self.received
        )
    }
}

impl std::error::Error for VerifyError {}

/// How a stream that was read to its end ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// A clean EOF (FIN).
    Eof,
    /// `ECONNRESET`.
    Reset,
    /// The deadline passed with the stream still open.
    TimedOut,
    /// [`read_up_to`] read its limit with the stream still open.
    LimitReached,
    /// Another error.
    Error(io::ErrorKind),
}

/// What [`read_to_end`] read and how the stream ended.
#[derive(Debug, Clone, Copy)]
pub struct ReadOutcome {
    /// Everything read.
    pub received: StreamSummary,
    /// How reading stopped.
    pub end: StreamEnd,
}

/// Connects to `addr`, writes the seeded stream `(seed, bytes)` in writes of 1 B ..= 300 KB,
/// half-closes, and concurrently reads everything back until EOF; all within `timeout`.
pub fn verify_echo(
    addr: SocketAddr,
    bytes: u64,
    seed: u64,
    timeout: Duration,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let fail = |stage, error| VerifyError {
        stage,
        error,
        sent: 0,
        received: 0,
    };
    let stream =
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| fail("connect", e))?;
    stream
        .set_nodelay(true)
        .map_err(|e| fail("set_nodelay", e))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| fail("set_write_timeout", e))?;
    let (sent, read) = thread::scope(|scope| {
        let writer = scope.spawn(|| write_stream(&stream, bytes, seed, true));
        let read = read_to_end(&stream, deadline);
        if read.end != StreamEnd::Eof {
            // Unblock a writer stuck on a proxy that stopped reading.
            let _ = stream.shutdown(Shutdown::Both);
        }
        let sent = writer
            .join()
            .unwrap_or_else(|_| Err((0, io::Error::other("writer panicked"))));
        (sent, read)
    });
    let received = read.received.bytes;
    let sent = sent.map_err(|(sent, error)| VerifyError {
        stage: "write",
        error,
        sent,
        received,
    })?;
    match read.end {
        StreamEnd::Eof => Ok(VerifyReport {
            sent,
            received: read.received,
            elapsed: started.elapsed(),
        }),
        end => Err(VerifyError {
            stage: "read",
            error: io::Error::other(format!("stream ended with {end:?} instead of EOF")),
            sent: sent.bytes,
            received,
        }),
    }
}

/// [`verify_echo`] that panics with the details unless every byte came back.
pub fn assert_echo(addr: SocketAddr, bytes: u64, seed: u64, timeout: Duration) -> VerifyReport {
    let report = verify_echo(addr, bytes, seed, timeout).unwrap_or_else(|error| {
        panic!("echo of {bytes} bytes (seed {seed}) through {addr} failed: {error}")
    });
    report.assert_echoed();
    report
}

/// Runs `connections` [`verify_echo`] clients at once, seeds `seed_base + i`; returns each result.
pub fn verify_echo_many(
    addr: SocketAddr,
    connections: usize,
    bytes: u64,
    seed_base: u64,
    timeout: Duration,
) -> Vec<Result<VerifyReport, VerifyError>> {
    thread::scope(|scope| {
        let clients: Vec<_> = (0..connections)
            .map(|i| scope.spawn(move || verify_echo(addr, bytes, seed_base + i as u64, timeout)))
            .collect();
        clients
            .into_iter()
            .map(|client| {
                client.join().unwrap_or_else(|_| {
                    Err(VerifyError {
                        stage: "client",
                        error: io::Error::other("panicked"),
                        sent: 0,
                        received: 0,
                    })
                })
            })
            .collect()
    })
}

/// Writes the seeded stream `(seed, bytes)` to `stream`, then shuts down its write side when
/// `half_close`. On failure returns the bytes written so far with the error.
pub fn write_stream(
    stream: &TcpStream,
    bytes: u64,
    seed: u64,
    half_close: bool,
) -> Result<StreamSummary, (u64, io::Error)> {
    let mut source = SeededStream::new(seed, bytes);
    let mut checksum = Checksum::new();
    while let Some(chunk) = source.next_chunk() {
        (&*stream)
            .write_all(chunk)
            .map_err(|error| (checksum.bytes(), error))?;
        checksum.update(chunk);
    }
    if half_close {
        stream
            .shutdown(Shutdown::Write)
            .map_err(|error| (checksum.bytes(), error))?;
    }
    Ok(checksum.finish())
}

/// Reads `stream` until EOF, a reset, another error, or `deadline`.
pub fn read_to_end(stream: &TcpStream, deadline: Instant) -> ReadOutcome {
    read_up_to(stream, u64::MAX, deadline)
}

/// Reads `stream` until `limit` bytes have arrived, EOF, a reset, another error, or `deadline`.
pub fn read_up_to(stream: &TcpStream, limit: u64, deadline: Instant) -> ReadOutcome {
    let mut checksum = Checksum::new();
    let mut buffer = vec![0; 256 * 1024];
    let end = loop {
        let now = Instant::now();
        if checksum.bytes() >= limit {
            break StreamEnd::LimitReached;
        }
        if now >= deadline {
            break StreamEnd::TimedOut;
        }
        let _ = stream.set_read_timeout(Some(
            (deadline - now)
                .min(READ_SLICE)
                .max(Duration::from_millis(1)),
        ));
        let want = usize::try_from(limit - checksum.bytes())
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        match (&*stream).read(&mut buffer[..want]) {
            Ok(0) => break StreamEnd::Eof,
            Ok(n) => checksum.update(&buffer[..n]),
            Err(error) => match error.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => {}
                io::ErrorKind::ConnectionReset => break StreamEnd::Reset,
                kind => break StreamEnd::Error(kind),
            },
        }
    };
    ReadOutcome {
        received: checksum.finish(),
        end,
    }
}
