//! The socket under `tokio-postgres`, watched: it follows the backend's message framing as bytes
//! arrive and fails the read (before the client library sees the bytes) when the backend sends
//! more than the probe's limit, announces an impossible message, is not PostgreSQL at all, or
//! asks for the password in cleartext.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Why the guarded stream stopped a read. It travels inside an `io::Error` through
/// `tokio-postgres` and is recognised on the way out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The backend sent more than the probe reads.
    #[error("backend sent more than {limit} bytes")]
    ReadLimit { limit: usize },
    /// The first byte of a message is not a PostgreSQL message type.
    #[error("not a PostgreSQL server: message type {0:#04x}")]
    MessageType(u8),
    /// A message length below 4 or above the read limit.
    #[error("message of {0} bytes announced")]
    MessageLength(u32),
    /// `AuthenticationCleartextPassword`: answering would send the password unencrypted.
    #[error("server asked for the password in cleartext; refused (use scram-sha-256 or md5)")]
    CleartextPassword,
}

/// A TCP stream whose reads stop at `limit` bytes in all and at the first [`Refusal`].
pub(crate) struct GuardedStream {
    inner: TcpStream,
    remaining: usize,
    framing: Framing,
}

impl GuardedStream {
    pub(crate) fn new(inner: TcpStream, limit: usize) -> GuardedStream {
        GuardedStream {
            inner,
            remaining: limit,
            framing: Framing::new(limit),
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.remaining == 0 {
            let limit = self.framing.limit;
            return Poll::Ready(Err(io::Error::other(Refusal::ReadLimit { limit })));
        }
        let want = buf.remaining().min(self.remaining);
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(want));
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut limited))?;
        let read = limited.filled().len();
        // The bytes become visible to the caller only once the framing accepts them.
        self.framing
            .scan(limited.filled())
            .map_err(io::Error::other)?;
        buf.advance(read);
        self.remaining -= read;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Backend messages are a type byte, a big-endian `u32` length that counts itself, and a body;
/// an authentication request (`R`) starts its body with a `u32` code (3: cleartext password).
/// The probe never sends an SSLRequest, so every byte from the backend is in a message.
#[derive(Debug)]
struct Framing {
    limit: usize,
    /// The current message's header so far: type, length, and for `R` the code.
    header: [u8; 9],
    header_len: usize,
    /// Body bytes of the current message still to pass over.
    skip: usize,
    /// Once refused, every later scan is refused the same way.
    refused: Option<Refusal>,
}

const AUTHENTICATION: u8 = b'R';
const CLEARTEXT_PASSWORD: u32 = 3;

impl Framing {
    fn new(limit: usize) -> Framing {
        Framing {
            limit,
            header: [0; 9],
            header_len: 0,
            skip: 0,
            refused: None,
        }
    }

    fn scan(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        if let Some(refusal) = &self.refused {
            return Err(refusal.clone());
        }
        let result = self.scan_bytes(bytes);
        if let Err(refusal) = &result {
            self.refused = Some(refusal.clone());
        }
        result
    }

    fn scan_bytes(&mut self, mut bytes: &[u8]) -> Result<(), Refusal> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            self.header_done()?;
        }
        Ok(())
    }

    /// Checks the header once it is long enough to decide; starts the body when it is whole.
    fn header_done(&mut self) -> Result<(), Refusal> {
        let kind = self.header[0];
        if self.header_len == 1 && !(kind.is_ascii_alphabetic() || (b'1'..=b'3').contains(&kind)) {
            return Err(Refusal::MessageType(kind));
        }
        if self.header_len < 5 {
            return Ok(());
        }
        let length = u32::from_be_bytes([
            self.header[1],
            self.header[2],
            self.header[3],
            self.header[4],
        ]);
        let min_length = if kind == AUTHENTICATION { 8 } else { 4 };
        if length < min_length || length as usize > self.limit {
            return Err(Refusal::MessageLength(length));
        }
        let header_whole = if kind == AUTHENTICATION { 9 } else { 5 };
        if self.header_len < header_whole {
            return Ok(());
        }
        if kind == AUTHENTICATION {
            let code = u32::from_be_bytes([
                self.header[5],
                self.header[6],
                self.header[7],
                self.header[8],
            ]);
            if code == CLEARTEXT_PASSWORD {
                return Err(Refusal::CleartextPassword);
            }
        }
        // The length counts itself (4 bytes) and, for `R`, the code already read.
        self.skip = length as usize - (header_whole - 1);
        self.header_len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend message: type, length, body.
    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn startup_reply() -> Vec<u8> {
        [
            message(b'R', &10u32.to_be_bytes()), // SASL, mechanisms follow
            message(b'R', &[0, 0, 0, 12, b'v', b'=', b'x']),
            message(b'R', &0u32.to_be_bytes()),
            message(b'S', b"server_version\x0015.8\x00"),
            message(b'K', &[0; 8]),
            message(b'Z', b"I"),
            message(b'T', &[0; 30]),
            message(b'D', &[0, 1, 0, 0, 0, 1, b'f']),
            message(b'C', b"SELECT 1\x00"),
            message(b'Z', b"I"),
        ]
        .concat()
    }

    #[test]
    fn a_real_exchange_passes_in_any_split() {
        let bytes = startup_reply();
        for split in 0..=bytes.len() {
            let mut framing = Framing::new(65536);
            framing.scan(&bytes[..split]).unwrap();
            framing.scan(&bytes[split..]).unwrap();
            assert_eq!(
                (framing.header_len, framing.skip),
                (0, 0),
                "split at {split}"
            );
        }
        let mut byte_by_byte = Framing::new(65536);
        for byte in &bytes {
            byte_by_byte.scan(std::slice::from_ref(byte)).unwrap();
        }
    }

    #[test]
    fn cleartext_password_request_is_refused_in_any_split() {
        let bytes = [
            message(b'N', b"notice"),
            message(b'R', &CLEARTEXT_PASSWORD.to_be_bytes()),
        ]
        .concat();
        for split in 0..=bytes.len() {
            let mut framing = Framing::new(65536);
            let result = framing
                .scan(&bytes[..split])
                .and_then(|()| framing.scan(&bytes[split..]));
            assert_eq!(result, Err(Refusal::CleartextPassword), "split at {split}");
        }
    }

    #[test]
    fn garbage_and_impossible_lengths_are_refused() {
        assert_eq!(
            Framing::new(65536).scan(b"\x00\x01garbage"),
            Err(Refusal::MessageType(0))
        );
        assert_eq!(
            Framing::new(65536).scan(b"HTTP/1.1 400 Bad Request\r\n"),
            Err(Refusal::MessageLength(0x5454_502f))
        );
        assert_eq!(
            Framing::new(65536).scan(b"Z\x00\x00\x00\x03"),
            Err(Refusal::MessageLength(3))
        );
        assert_eq!(
            Framing::new(65536).scan(b"R\x00\x00\x00\x04"),
            Err(Refusal::MessageLength(4))
        );
    }

    #[test]
    fn never_panics_and_a_refusal_sticks() {
        let bytes = startup_reply();
        for at in 0..bytes.len() {
            for byte in [0u8, 3, 4, 0xff, b'R', b'Z'] {
                let mut changed = bytes.clone();
                changed[at] = byte;
                // Scanned in pieces, and again after a refusal.
                let mut framing = Framing::new(65536);
                let mut first_refusal = None;
                for piece in changed.chunks(7).chain(changed.chunks(3)) {
                    let result = framing.scan(piece);
                    match (&first_refusal, result) {
                        (None, Err(refusal)) => first_refusal = Some(refusal),
                        (Some(first), result) => assert_eq!(result.as_ref(), Err(first)),
                        (None, Ok(())) => {}
                    }
                }
            }
        }
    }
}
