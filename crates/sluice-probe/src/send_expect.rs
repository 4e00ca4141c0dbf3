//! `send_expect`: send bytes, read until the reply starts with a prefix or matches a regex.

use std::net::SocketAddr;

use regex::bytes::Regex;
use sluice_health::Expect;

use crate::ProbeSetupError;
use crate::conn::{Conn, READ_LIMIT};
use crate::outcome::{Failure, Step, shown};

#[derive(Debug)]
pub(crate) struct SendExpect {
    send: Vec<u8>,
    expect: Matcher,
}

#[derive(Debug)]
enum Matcher {
    Prefix(Vec<u8>),
    Regex(Regex),
}

/// Whether the bytes received so far settle the check.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail,
    /// More bytes could still pass.
    Undecided,
}

impl SendExpect {
    pub(crate) fn new(send: &[u8], expect: &Expect) -> Result<SendExpect, ProbeSetupError> {
        let expect = match expect {
            Expect::Prefix(prefix) => Matcher::Prefix(prefix.clone()),
            Expect::Regex(pattern) => {
                let regex = Regex::new(pattern).map_err(|source| ProbeSetupError::Regex {
                    pattern: pattern.clone(),
                    source: Box::new(source),
                })?;
                Matcher::Regex(regex)
            }
        };
        Ok(SendExpect {
            send: send.to_vec(),
            expect,
        })
    }

    pub(crate) async fn run(&self, addr: SocketAddr, step: &mut Step) -> Result<(), Failure> {
        let mut conn = Conn::open(addr, step).await?;
        // An empty `send` waits for a banner (SMTP, SSH) instead.
        if !self.send.is_empty() {
            conn.send(&self.send).await?;
        }
        loop {
            match self.expect.verdict(conn.received()) {
                Verdict::Pass => return Ok(()),
                Verdict::Fail => return Err(self.expect.failure(conn.received())),
                Verdict::Undecided => {}
            }
            match conn.receive_more("the reply").await {
                Ok(()) => {}
                // At EOF or at the read limit the bytes received are the whole reply.
                Err(Failure::Closed {
                    received: Some(received),
                }) if received > 0 => {
                    return Err(self.expect.failure(conn.received()));
                }
                Err(Failure::TooLong { .. }) if matches!(self.expect, Matcher::Regex(_)) => {
                    return Err(self.expect.failure(conn.received()));
                }
                Err(failure) => return Err(failure),
            }
        }
    }
}

impl Matcher {
    fn verdict(&self, received: &[u8]) -> Verdict {
        match self {
            Matcher::Prefix(prefix) => {
                let common = received.len().min(prefix.len());
                if received[..common] != prefix[..common] {
                    Verdict::Fail
                } else if common == prefix.len() {
                    Verdict::Pass
                } else {
                    Verdict::Undecided
                }
            }
            Matcher::Regex(regex) if regex.is_match(received) => Verdict::Pass,
            Matcher::Regex(_) if received.len() >= READ_LIMIT => Verdict::Fail,
            Matcher::Regex(_) => Verdict::Undecided,
        }
    }

    fn failure(&self, received: &[u8]) -> Failure {
        match self {
            Matcher::Prefix(prefix) => Failure::Unexpected {
                expected: shown(prefix),
                got: shown(received),
            },
            Matcher::Regex(_) if received.len() >= READ_LIMIT => {
                Failure::TooLong { limit: READ_LIMIT }
            }
            Matcher::Regex(regex) => Failure::NoMatch {
                pattern: regex.as_str().to_owned(),
                got: shown(received),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_decided_as_soon_as_the_bytes_differ() {
        let prefix = Matcher::Prefix(b"+PONG".to_vec());
        assert_eq!(prefix.verdict(b""), Verdict::Undecided);
        assert_eq!(prefix.verdict(b"+PO"), Verdict::Undecided);
        assert_eq!(prefix.verdict(b"+PONG\r\n"), Verdict::Pass);
        assert_eq!(prefix.verdict(b"-E"), Verdict::Fail);
        assert_eq!(prefix.verdict(b"+PONX"), Verdict::Fail);
    }

    #[test]
    fn a_regex_waits_for_more_bytes_until_the_limit() {
        let regex = Matcher::Regex(Regex::new(r"ready\r?\n").unwrap());
        assert_eq!(regex.verdict(b"status: rea"), Verdict::Undecided);
        assert_eq!(regex.verdict(b"status: ready\n"), Verdict::Pass);
        assert_eq!(regex.verdict(&vec![b'x'; READ_LIMIT]), Verdict::Fail);
    }

    #[test]
    fn a_bad_regex_is_a_setup_error() {
        let error = SendExpect::new(b"", &Expect::Regex("(unclosed".to_owned())).unwrap_err();
        assert!(error.to_string().contains("(unclosed"), "{error}");
    }
}
