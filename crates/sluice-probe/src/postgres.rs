//! `postgres`: authenticate with `tokio-postgres` (trust, md5, SCRAM-SHA-256; no TLS), then
//! `SELECT pg_is_in_recovery()` when a role is wanted.
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

    pub(crate) async fn run(&self, addr: SocketAddr, step: &mut Step) -> Result<(), Failure> {
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
                let query = client.simple_query("SELECT pg_is_in_recovery()");
                let messages = tokio::select! {
                    messages = query => messages.map_err(|error| failure(error, Step::Querying))?,
                    ended = &mut connection => {
                        return Err(match ended {
                            Ok(()) => Failure::Closed { received: None },
                            Err(error) => failure(error, Step::Querying),
                        });
                    }
                };
                Some((want, in_recovery(&messages)?))
            }
        };
        // Dropping the client makes the connection send Terminate and close its socket; the
        // probe's timeout bounds this wait too.
        drop(client);
        let _ = connection.await;
        match role {
            Some((PostgresRole::Primary, true)) => Err(wrong_role("standby", "primary")),
            Some((PostgresRole::Standby, false)) => Err(wrong_role("primary", "standby")),
            _ => Ok(()),
        }
    }
}

fn in_recovery(messages: &[SimpleQueryMessage]) -> Result<bool, Failure> {
    let value = messages.iter().find_map(|message| match message {
        SimpleQueryMessage::Row(row) => Some(row.get(0)),
        _ => None,
    });
    match value {
        Some(Some("t")) => Ok(true),
        Some(Some("f")) => Ok(false),
        other => Err(Failure::Unexpected {
            expected: "t or f from pg_is_in_recovery()".to_owned(),
            got: match other {
                None => "no row".to_owned(),
                Some(None) => "NULL".to_owned(),
                Some(Some(text)) => shown(text.as_bytes()),
            },
        }),
    }
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
        let failure = in_recovery(&[]).unwrap_err();
        assert_eq!(
            failure.to_string(),
            "expected t or f from pg_is_in_recovery(), got no row"
        );
    }
}
