//! [`Prober`]: one check, prepared once, probed many times.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sluice_health::Check;
use tokio::time::Instant;

use crate::http::Http;
use crate::outcome::{Failure, Outcome, Step};
use crate::postgres::Postgres;
use crate::redis::Redis;
use crate::secret::read_password_file;
use crate::send_expect::SendExpect;

/// A check ready to run: its regex compiled, its request encoded, its password read.
///
/// Build one per listener (again on reload, which re-reads the password file) and call
/// [`Prober::probe`] for each backend; probes of one `Prober` may run concurrently.
#[derive(Debug)]
pub struct Prober {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Tcp,
    SendExpect(SendExpect),
    Http(Http),
    Redis(Redis),
    Postgres(Postgres),
}

/// Why a check cannot be prepared. The config reports it like any other bad setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeSetupError {
    /// `expect_regex` does not compile.
    #[error("expect_regex {pattern:?} does not compile: {source}")]
    Regex {
        pattern: String,
        #[source]
        source: Box<regex::Error>,
    },
    /// `password_file` cannot be read, is empty or is too large. `problem` never holds the
    /// file's content.
    #[error("password_file {}: {problem}", path.display())]
    PasswordFile { path: PathBuf, problem: String },
    /// An `http` path or host that would not survive the request line or header: a space, a
    /// control character, or a path that does not start with `/`.
    #[error(
        "http {field} {value:?} does not fit in a request: no space or control character, and \
         a path starts with /"
    )]
    HttpField { field: &'static str, value: String },
}

impl Prober {
    /// Prepares `check`: compiles its regex, reads its password file.
    pub fn new(check: &Check) -> Result<Prober, ProbeSetupError> {
        let kind = match check {
            Check::Tcp => Kind::Tcp,
            Check::SendExpect { send, expect } => Kind::SendExpect(SendExpect::new(send, expect)?),
            Check::Http {
                path,
                host,
                status,
                port,
            } => Kind::Http(Http::new(path, host, status, *port)?),
            Check::Redis {
                role,
                password_file,
            } => {
                let password = password_file
                    .as_deref()
                    .map(read_password_file)
                    .transpose()?;
                Kind::Redis(Redis::new(password, *role))
            }
            Check::Postgres {
                role,
                user,
                database,
                password_file,
            } => {
                let password = password_file
                    .as_deref()
                    .map(read_password_file)
                    .transpose()?;
                Kind::Postgres(Postgres::new(user, database, password, *role))
            }
        };
        Ok(Prober { kind })
    }

    /// Probes the backend at `addr` once, within `timeout` from the start of the connect.
    ///
    /// Never panics on what the backend sends, and leaves no socket open when it returns (or
    /// when the returned future is dropped).
    pub async fn probe(&self, addr: SocketAddr, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let mut step = Step::Connecting;
        let result = tokio::time::timeout(timeout, self.run(addr, &mut step)).await;
        let latency = start.elapsed();
        let reason = match result {
            Ok(Ok(timeline)) => return Outcome::Passed { latency, timeline },
            Ok(Err(reason)) => reason,
            Err(_elapsed) => Failure::TimedOut {
                after: timeout,
                during: step,
            },
        };
        Outcome::Failed { reason, latency }
    }

    /// Passes with the timeline a PostgreSQL primary reported, `None` for the other checks.
    async fn run(&self, addr: SocketAddr, step: &mut Step) -> Result<Option<u64>, Failure> {
        let passed = match &self.kind {
            Kind::Tcp => crate::conn::connect(addr, step).await.map(drop),
            Kind::SendExpect(check) => check.run(addr, step).await,
            Kind::Http(check) => check.run(addr, step).await,
            Kind::Redis(check) => check.run(addr, step).await,
            Kind::Postgres(check) => return check.run(addr, step).await,
        };
        passed.map(|()| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_futures_can_be_spawned() {
        fn assert_send<T: Send>(_: &T) {}
        let prober = Prober::new(&Check::Tcp).unwrap();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_send(&prober.probe(addr, Duration::from_secs(1)));
        fn assert_sync<T: Send + Sync>() {}
        assert_sync::<Prober>();
    }

    #[test]
    fn missing_password_file_is_a_setup_error() {
        let check = Check::Redis {
            role: None,
            password_file: Some(PathBuf::from("/nonexistent/sluice/redis.pass")),
        };
        let error = Prober::new(&check).unwrap_err().to_string();
        assert!(
            error.starts_with("password_file /nonexistent/sluice/redis.pass: "),
            "{error}"
        );
    }
}
