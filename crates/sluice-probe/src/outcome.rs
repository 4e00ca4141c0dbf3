//! What one probe tells the health state machine: passed or failed, how long it took, and why
//! it failed, in words an operator reads in a log line.

use std::fmt;
use std::io;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

/// The result of one probe of one backend.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The backend did what the check asks.
    Passed {
        /// From the start of the connect to the last byte the check needed.
        latency: Duration,
        /// The timeline a PostgreSQL primary writes on (`role: primary` checks only): between
        /// two backends that both claim the primary role, the higher one is the later
        /// promotion.
        timeline: Option<u64>,
    },
    /// The backend did not, or not within the timeout.
    Failed {
        reason: Failure,
        /// From the start of the connect to the failure (the timeout at most, plus scheduling).
        latency: Duration,
    },
}

impl Outcome {
    /// Whether the probe passed.
    pub fn is_passed(&self) -> bool {
        matches!(self, Outcome::Passed { .. })
    }

    /// How long the probe took, passed or failed.
    pub fn latency(&self) -> Duration {
        match self {
            Outcome::Passed { latency, .. } | Outcome::Failed { latency, .. } => *latency,
        }
    }

    /// The timeline a passing PostgreSQL primary reported; `None` otherwise.
    pub fn timeline(&self) -> Option<u64> {
        match self {
            Outcome::Passed { timeline, .. } => *timeline,
            Outcome::Failed { .. } => None,
        }
    }

    /// Why the probe failed; `None` when it passed.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Outcome::Passed { .. } => None,
            Outcome::Failed { reason, .. } => Some(reason),
        }
    }
}

/// Why a probe failed. Text that came from the backend is escaped and truncated; a password
/// never appears here.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// Nothing listens at the address: the connect was answered with a reset.
    #[error("connect refused")]
    Refused,
    /// The connect failed for another reason (unreachable network, no local port left, ...).
    #[error("connect failed: {0}")]
    Connect(#[source] Arc<io::Error>),
    /// The probe did not finish within its timeout; `during` says what it was waiting for.
    #[error("timed out after {} {during}", DisplayDuration(*after))]
    TimedOut { after: Duration, during: Step },
    /// Sending or receiving failed after the connect (reset by the backend, for instance).
    #[error("I/O error {during}: {error}")]
    Io {
        during: Step,
        #[source]
        error: Arc<io::Error>,
    },
    /// The backend closed the connection before the reply was complete; `received` counts the
    /// bytes it sent first, where the check knows it.
    #[error("connection closed by the backend{}", AfterBytes(*received))]
    Closed { received: Option<usize> },
    /// The reply was not the one expected; both are shown escaped and truncated.
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: String, got: String },
    /// The whole reply (cut at the read limit or at EOF) does not match the `expect_regex`.
    #[error("reply does not match /{pattern}/: got {got}")]
    NoMatch { pattern: String, got: String },
    /// The backend sent more than the probe reads without answering the question.
    #[error("reply longer than {limit} bytes without an answer")]
    TooLong { limit: usize },
    /// The HTTP status is outside the configured range.
    #[error("HTTP status {status} not in {}-{}", expected.start(), expected.end())]
    HttpStatus {
        status: u16,
        expected: RangeInclusive<u16>,
    },
    /// The backend refused the credentials; `message` is the server's own (never the password).
    #[error("authentication failed: {message}")]
    Authentication { message: String },
    /// The backend answers but has the wrong role (a replica where a master is wanted, ...).
    #[error("role is {actual}, want {want}")]
    WrongRole { actual: String, want: &'static str },
    /// The backend reported an error other than a refused password (PostgreSQL starting up,
    /// unknown database, ...).
    #[error("server error: {message}")]
    Server { message: String },
    /// The bytes do not follow the protocol the check speaks.
    #[error("protocol error: {message}")]
    Protocol { message: String },
}

/// What a probe was doing when it timed out or its I/O failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The TCP connect.
    Connecting,
    /// Writing the request.
    Sending,
    /// Reading a reply; `what` names it ("the reply", "the PING reply").
    Receiving { what: &'static str, received: usize },
    /// A PostgreSQL startup and authentication exchange.
    Authenticating,
    /// A PostgreSQL query and its result.
    Querying,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Connecting => f.write_str("while connecting"),
            Step::Sending => f.write_str("while sending the request"),
            Step::Receiving { what, received } => {
                write!(f, "waiting for {what} ({received} bytes received)")
            }
            Step::Authenticating => f.write_str("while authenticating"),
            Step::Querying => f.write_str("waiting for the query result"),
        }
    }
}

/// How many bytes of backend text a [`Failure`] shows at most.
pub(crate) const SHOWN_BYTES_MAX: usize = 120;

/// Backend bytes as printable text: printable ASCII as is (quotes included), the rest escaped
/// (`\r\n`, `\x00`, `\\`), cut at [`SHOWN_BYTES_MAX`] with an ellipsis.
pub(crate) fn shown(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(SHOWN_BYTES_MAX)];
    let mut text = String::with_capacity(cut.len());
    for &byte in cut {
        match byte {
            b'\\' => text.push_str("\\\\"),
            b' '..=b'~' => text.push(char::from(byte)),
            _ => text.extend(std::ascii::escape_default(byte).map(char::from)),
        }
    }
    if bytes.len() > SHOWN_BYTES_MAX {
        text.push_str("...");
    }
    text
}

/// ` after N bytes`, or nothing when the count is unknown.
struct AfterBytes(Option<usize>);

impl fmt::Display for AfterBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(received) => write!(f, " after {received} bytes"),
            None => Ok(()),
        }
    }
}

/// A duration the way the config writes it: `1s`, `250ms`, or Rust's debug form for the rest.
struct DisplayDuration(Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let duration = self.0;
        if duration.subsec_nanos() == 0 {
            write!(f, "{}s", duration.as_secs())
        } else if duration.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", duration.as_millis())
        } else {
            write!(f, "{duration:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_read_like_the_config() {
        let failure = |after| Failure::TimedOut {
            after,
            during: Step::Connecting,
        };
        assert_eq!(
            failure(Duration::from_secs(1)).to_string(),
            "timed out after 1s while connecting"
        );
        assert_eq!(
            failure(Duration::from_millis(1500)).to_string(),
            "timed out after 1500ms while connecting"
        );
        let waiting = Failure::TimedOut {
            after: Duration::from_millis(250),
            during: Step::Receiving {
                what: "the PING reply",
                received: 0,
            },
        };
        assert_eq!(
            waiting.to_string(),
            "timed out after 250ms waiting for the PING reply (0 bytes received)"
        );
    }

    #[test]
    fn backend_text_is_escaped_and_cut() {
        assert_eq!(shown(b"-ERR x\r\n\x00"), "-ERR x\\r\\n\\x00");
        assert_eq!(shown(b"'a' \"b\" \\ \xff"), "'a' \"b\" \\\\ \\xff");
        let long = vec![b'a'; 500];
        let text = shown(&long);
        assert!(text.ends_with("..."));
        assert_eq!(text.len(), SHOWN_BYTES_MAX + 3);
    }

    #[test]
    fn http_status_names_the_range() {
        let failure = Failure::HttpStatus {
            status: 503,
            expected: 200..=399,
        };
        assert_eq!(failure.to_string(), "HTTP status 503 not in 200-399");
    }
}
