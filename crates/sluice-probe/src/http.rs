//! `http`: an HTTP/1.1 `GET` whose status must fall within a range. Only the status line is
//! read; headers and body are left unread.

use std::net::SocketAddr;
use std::ops::RangeInclusive;

use crate::ProbeSetupError;
use crate::conn::Conn;
use crate::outcome::{Failure, Step, shown};

/// The longest status line accepted; real ones are under 100 bytes.
const STATUS_LINE_MAX: usize = 1024;

#[derive(Debug)]
pub(crate) struct Http {
    path: String,
    /// `None`: the probed address, as `ip:port`.
    host: Option<String>,
    status: RangeInclusive<u16>,
    port: Option<u16>,
}

/// The status line, parsed from the start of a response.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StatusLine {
    /// The line is complete; its status code.
    Status(u16),
    /// A prefix of a valid status line: read more.
    Incomplete,
    /// Not an HTTP/1.x status line; says what is wrong.
    Invalid(&'static str),
}

impl Http {
    pub(crate) fn new(
        path: &str,
        host: &str,
        status: &RangeInclusive<u16>,
        port: Option<u16>,
    ) -> Result<Http, ProbeSetupError> {
        // Both go into the request verbatim: a space, CR or LF would change its meaning.
        for (field, value) in [("path", path), ("host", host)] {
            if value.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(ProbeSetupError::HttpField {
                    field,
                    value: value.to_owned(),
                });
            }
        }
        if !path.starts_with('/') {
            return Err(ProbeSetupError::HttpField {
                field: "path",
                value: path.to_owned(),
            });
        }
        Ok(Http {
            path: path.to_owned(),
            host: (!host.is_empty()).then(|| host.to_owned()),
            status: status.clone(),
            port,
        })
    }

    pub(crate) async fn run(&self, addr: SocketAddr, step: &mut Step) -> Result<(), Failure> {
        let addr = SocketAddr::new(addr.ip(), self.port.unwrap_or(addr.port()));
        let mut conn = Conn::open(addr, step).await?;
        conn.send(self.request(addr).as_bytes()).await?;
        let status = loop {
            match parse_status_line(conn.received()) {
                StatusLine::Status(status) => break status,
                StatusLine::Invalid(why) => {
                    return Err(Failure::Protocol {
                        message: format!("{why}: {}", shown(conn.received())),
                    });
                }
                StatusLine::Incomplete => conn.receive_more("the status line").await?,
            }
        };
        if self.status.contains(&status) {
            Ok(())
        } else {
            Err(Failure::HttpStatus {
                status,
                expected: self.status.clone(),
            })
        }
    }

    fn request(&self, addr: SocketAddr) -> String {
        let host = match &self.host {
            Some(host) => host.clone(),
            None => addr.to_string(),
        };
        format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: sluice-health\r\n\
             Accept: */*\r\n\r\n",
            self.path
        )
    }
}

/// Parses `HTTP/1.x SP 3DIGIT [SP reason] CRLF` from the start of `bytes`. Never panics; decides
/// as soon as the bytes stop being a prefix of a valid line.
pub(crate) fn parse_status_line(bytes: &[u8]) -> StatusLine {
    const VERSION: &[u8] = b"HTTP/1.";
    let head = &bytes[..bytes.len().min(VERSION.len())];
    if head != &VERSION[..head.len()] {
        return StatusLine::Invalid("not an HTTP/1.x response");
    }
    let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
        if bytes.len() > STATUS_LINE_MAX {
            return StatusLine::Invalid("status line too long");
        }
        return StatusLine::Incomplete;
    };
    let line = bytes[..end].strip_suffix(b"\r").unwrap_or(&bytes[..end]);
    // "HTTP/1.1 200 OK": minor version digit, space, three digits, then a space or the end.
    match line {
        [
            b'H',
            b'T',
            b'T',
            b'P',
            b'/',
            b'1',
            b'.',
            minor,
            b' ',
            a,
            b,
            c,
            rest @ ..,
        ] if minor.is_ascii_digit()
            && [a, b, c].iter().all(|d| d.is_ascii_digit())
            && (rest.is_empty() || rest[0] == b' ') =>
        {
            let digit = |d: &u8| u16::from(d - b'0');
            StatusLine::Status(digit(a) * 100 + digit(b) * 10 + digit(c))
        }
        _ => StatusLine::Invalid("malformed status line"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 200 OK\r\n"),
            StatusLine::Status(200)
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Service Unavailable\r\nServer: x\r\n"),
            StatusLine::Status(503)
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.1 204\r\n"),
            StatusLine::Status(204)
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.1 301 \n"),
            StatusLine::Status(301)
        );
        assert_eq!(parse_status_line(b""), StatusLine::Incomplete);
        assert_eq!(parse_status_line(b"HTTP/1.1 20"), StatusLine::Incomplete);
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n"[..],
            b"HTTP/2 200\r\n",
            b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/1.1 20x OK\r\n",
            b"HTTP/1.1  200 OK\r\n",
            b"HTTP/1.1\r\n",
            b"\x00\xff",
        ] {
            assert!(
                matches!(parse_status_line(bad), StatusLine::Invalid(_)),
                "{}",
                bad.escape_ascii()
            );
        }
        let mut endless = b"HTTP/1.1 200 ".to_vec();
        endless.resize(STATUS_LINE_MAX + 1, b'a');
        assert_eq!(
            parse_status_line(&endless),
            StatusLine::Invalid("status line too long")
        );
    }

    #[test]
    fn status_line_parser_never_panics() {
        // Every prefix of valid lines, and every one-byte change to them.
        let lines: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.0 999\n",
            b"HTTP/1.1 404 Not Found\r\nx",
        ];
        for line in lines {
            for len in 0..=line.len() {
                let _ = parse_status_line(&line[..len]);
                for at in 0..len {
                    for byte in [0u8, b'\n', b'\r', b' ', b'0', b'9', 0xff] {
                        let mut changed = line[..len].to_vec();
                        changed[at] = byte;
                        let _ = parse_status_line(&changed);
                    }
                }
            }
        }
    }

    #[test]
    fn request_carries_host_and_closes() {
        let http = Http::new("/readyz", "example.com", &(200..=399), None).unwrap();
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            http.request(addr),
            "GET /readyz HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\
             User-Agent: sluice-health\r\nAccept: */*\r\n\r\n"
        );
        let no_host = Http::new("/", "", &(200..=399), None).unwrap();
        assert!(
            no_host
                .request(addr)
                .contains("\r\nHost: 127.0.0.1:8080\r\n")
        );
    }

    #[test]
    fn header_injection_is_a_setup_error() {
        assert!(Http::new("/x\r\nEvil: 1", "h", &(200..=200), None).is_err());
        assert!(Http::new("/x", "h\r\nEvil: 1", &(200..=200), None).is_err());
        assert!(Http::new("/x y", "h", &(200..=200), None).is_err());
        assert!(Http::new("x", "h", &(200..=200), None).is_err());
    }
}
