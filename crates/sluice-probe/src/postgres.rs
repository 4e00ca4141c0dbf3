//! `postgres`: authenticate with `tokio-postgres` (trust, md5, SCRAM-SHA-256; no TLS), then,
//! when a role is wanted, one query for `pg_is_in_recovery()` and, on a primary, the timeline
//! it writes WAL on.
//!
//! The timeline is the first 8 hex digits of `pg_walfile_name(pg_current_wal_lsn())`: the
//! current WAL insert timeline, which moves the moment `pg_ctl promote` ends recovery.
//! `pg_control_checkpoint()`'s `timeline_id` is the last *checkpoint's* timeline instead, and
//! the checkpoint after a promotion is spread like any other: on a standby with 100 MB of dirty
//! buffers it still said 1 three seconds after the promotion, while the WAL file name said 2
//! at once. Both functions refuse to run during recovery, hence the `CASE`.
//!
//! The connection is driven inside the probe's own future, never spawned: when the probe ends,
//! by answer or by timeout, the socket goes with it. The socket is wrapped in a
//! [`GuardedStream`], which bounds what is read and refuses to answer a request for the
//! password in cleartext (the connection has no TLS, so that would hand the password to anyone
//! at the address).

use std::error::Error as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use sluice_health::PostgresRole;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::conn::{READ_LIMIT, connect};
use crate::outcome::{Failure, Step, shown};
use crate::postgres_stream::{GuardedStream, Refusal};
use crate::secret::Secret;

/// The most bytes read from a PostgreSQL backend in one probe. A startup exchange and one
/// one-row result take about 1 KiB; the client library itself would buffer whatever a
/// misbehaving server sends (notices, announced lengths) for as long as the timeout allows.
const POSTGRES_READ_LIMIT: usize = 4 * READ_LIMIT;

#[derive(Debug)]
pub(crate) struct Postgres {
    user: String,
    database: String,
    password: Option<Secret>,
    role: Option<PostgresRole>,
}

impl Postgres {
    pub(crate) fn new(
        user: &str,
        database: &str,
        password: Option<Secret>,
        role: Option<PostgresRole>,
    ) -> Postgres {
        Postgres {
            user: user.to_owned(),
            database: database.to_owned(),
            password,
            role,
        }
    }

    /// Passes with the primary's timeline when the check wants `role: primary`.
    pub(crate) async fn run(
        &self,
        addr: SocketAddr,
        step: &mut Step,
    ) -> Result<Option<u64>, Failure> {
        let stream = GuardedStream::new(connect(addr, step).await?, POSTGRES_READ_LIMIT);
        let mut config = tokio_postgres::Config::new();
        config
            .user(&self.user)
            .dbname(&self.database)
            .application_name("sluice-health")
            .ssl_mode(SslMode::Disable);
        if let Some(password) = &self.password {
            config.password(password.expose());
        }
        *step = Step::Authenticating;
        let (client, mut connection) = config
            .connect_raw(stream, NoTls)
            .await
            .map_err(|error| failure(error, Step::Authenticating))?;
        let role = match self.role {
            None => None,
            Some(want) => {
                *step = Step::Querying;
                let query = client.simple_query(ROLE_QUERY);
                let messages = tokio::select! {
                    messages = query => messages.map_err(|error| failure(error, Step::Querying))?,
                    ended = &mut connection => {
                        return Err(match ended {
                            Ok(()) => Failure::Closed { received: None },
                            Err(error) => failure(error, Step::Querying),
                        });
                    }
                };
                Some((want, role_row(&messages)?))
            }
        };
        // Dropping the client makes the connection send Terminate and close its socket; the
        // probe's timeout bounds this wait too.
        drop(client);
        let _ = connection.await;
        match role {
            Some((PostgresRole::Primary, (true, _))) => Err(wrong_role("standby", "primary")),
            Some((PostgresRole::Standby, (false, _))) => Err(wrong_role("primary", "standby")),
            Some((PostgresRole::Primary, (false, timeline))) => Ok(timeline),
            _ => Ok(None),
        }
    }
}

/// `pg_is_in_recovery()`, and the WAL file's timeline part (8 hex digits) when not in recovery.
const ROLE_QUERY: &str = "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL \
                          ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END";

/// The role query's row: whether the server is in recovery, and the timeline when it is not
/// (`None` if it could not be read, which only loses a tie-break).
fn role_row(messages: &[SimpleQueryMessage]) -> Result<(bool, Option<u64>), Failure> {
    let row = messages.iter().find_map(|message| match message {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    let value = row.map(|row| row.get(0));
    let in_recovery = match value {
        Some(Some("t")) => true,
        Some(Some("f")) => false,
        other => {
            return Err(Failure::Unexpected {
                expected: "t or f from pg_is_in_recovery()".to_owned(),
                got: match other {
                    None => "no row".to_owned(),
                    Some(None) => "NULL".to_owned(),
                    Some(Some(text)) => shown(text.as_bytes()),
                },
            });
        }
    };
    let timeline = row
        .and_then(|row| row.try_get(1).ok().flatten())
        .and_then(timeline_of);
    Ok((in_recovery, timeline))
}

/// A WAL file name's timeline part: 8 hex digits.
fn timeline_of(hex: &str) -> Option<u64> {
    (hex.len() == 8)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

fn wrong_role(actual: &str, want: &'static str) -> Failure {
    Failure::WrongRole {
        actual: actual.to_owned(),
        want,
    }
}

/// A client library error as a [`Failure`]: the server's refusal of the credentials, another
/// server error, an I/O error, or a protocol violation.
fn failure(error: tokio_postgres::Error, during: Step) -> Failure {
    if let Some(db) = error.as_db_error() {
        let message = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        let message = shown(message.as_bytes());
        let code = db.code();
        return if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            Failure::Authentication { message }
        } else {
            Failure::Server { message }
        };
    }
    if let Some(io_error) = error.source().and_then(|s| s.downcast_ref::<io::Error>()) {
        match io_error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<Refusal>())
        {
            Some(Refusal::ReadLimit { limit }) => return Failure::TooLong { limit: *limit },
            Some(refusal @ Refusal::CleartextPassword) => {
                return Failure::Authentication {
                    message: refusal.to_string(),
                };
            }
            Some(refusal) => {
                return Failure::Protocol {
                    message: refusal.to_string(),
                };
            }
            None => {}
        }
        return Failure::Io {
            during,
            error: Arc::new(io::Error::new(io_error.kind(), io_error.to_string())),
        };
    }
    if error.is_closed() {
        return Failure::Closed { received: None };
    }
    let mut message = error.to_string();
    if let Some(source) = error.source() {
        message = format!("{message}: {source}");
    }
    if message.ends_with("password missing") {
        return Failure::Authentication {
            message: "the server asks for a password and no password_file is set".to_owned(),
        };
    }
    // "authentication error: unsupported SASL mechanism", "unexpected message from server".
    let message = shown(message.as_bytes());
    if message.starts_with("authentication") {
        Failure::Authentication { message }
    } else {
        Failure::Protocol { message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_without_a_row_is_named_in_words() {
        let failure = role_row(&[]).unwrap_err();
        assert_eq!(
            failure.to_string(),
            "expected t or f from pg_is_in_recovery(), got no row"
        );
    }

    #[test]
    fn timelines_are_read_from_the_wal_file_name() {
        assert_eq!(timeline_of("00000002"), Some(2));
        assert_eq!(timeline_of("0000001A"), Some(26));
        assert_eq!(timeline_of("2"), None);
        assert_eq!(timeline_of("zzzzzzzz"), None);
    }
}
