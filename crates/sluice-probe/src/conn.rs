//! One probe connection: a TCP connect and bounded reads into one buffer, recording what the
//! probe is doing so that a timeout can say it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::outcome::{Failure, Step};

/// The most bytes a probe reads from a backend, over all its replies. A reply that needs more
/// to answer the check fails with [`Failure::TooLong`].
pub const READ_LIMIT: usize = 16 * 1024;

/// Connects to `addr`, turning a refusal into [`Failure::Refused`].
pub(crate) async fn connect(addr: SocketAddr, step: &mut Step) -> Result<TcpStream, Failure> {
    *step = Step::Connecting;
    let stream = TcpStream::connect(addr).await.map_err(|error| {
        if error.kind() == io::ErrorKind::ConnectionRefused {
            Failure::Refused
        } else {
            Failure::Connect(Arc::new(error))
        }
    })?;
    // Requests are written in one piece; Nagle would only delay the last segment.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A connected probe socket with the bytes received so far (never more than [`READ_LIMIT`]).
///
/// Dropping it closes the socket: every exit from a probe, a timeout included, releases the
/// file descriptor.
pub(crate) struct Conn<'s> {
    stream: TcpStream,
    received: Vec<u8>,
    step: &'s mut Step,
}

impl<'s> Conn<'s> {
    pub(crate) async fn open(addr: SocketAddr, step: &'s mut Step) -> Result<Conn<'s>, Failure> {
        let stream = connect(addr, step).await?;
        Ok(Conn {
            stream,
            received: Vec::new(),
            step,
        })
    }

    /// Writes all of `bytes`.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        *self.step = Step::Sending;
        self.stream
            .write_all(bytes)
            .await
            .map_err(|error| Failure::Io {
                during: Step::Sending,
                error: Arc::new(error),
            })
    }

    /// Everything received so far.
    pub(crate) fn received(&self) -> &[u8] {
        &self.received
    }

    /// Reads once more, appending to [`Conn::received`]; `what` names the awaited reply for a
    /// timeout's message. EOF fails with [`Failure::Closed`], a full buffer with
    /// [`Failure::TooLong`].
    pub(crate) async fn receive_more(&mut self, what: &'static str) -> Result<(), Failure> {
        let room = READ_LIMIT - self.received.len();
        if room == 0 {
            return Err(Failure::TooLong { limit: READ_LIMIT });
        }
        let during = Step::Receiving {
            what,
            received: self.received.len(),
        };
        *self.step = during;
        let mut chunk = [0u8; 4096];
        let want = room.min(chunk.len());
        let read = self
            .stream
            .read(&mut chunk[..want])
            .await
            .map_err(|error| Failure::Io {
                during,
                error: Arc::new(error),
            })?;
        if read == 0 {
            return Err(Failure::Closed {
                received: Some(self.received.len()),
            });
        }
        self.received.extend_from_slice(&chunk[..read]);
        Ok(())
    }
}
