//! What an active check does, as the config describes it: the probe crate runs it, this crate
//! only names it. Secrets are named by file, never held here.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

/// A listener's active health check: what to probe and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCheck {
    pub check: Check,
    /// Time between the starts of two probes of one backend (jittered by the prober).
    pub interval: Duration,
    /// How long one probe may take; may equal or exceed `interval` (the next probe then waits).
    pub timeout: Duration,
    /// Consecutive passing probes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failing probes that take an up backend down.
    pub fall: u32,
    /// At most one backend of the listener is up at a time (see
    /// [`crate::listener::Election`]); the config allows it only with a `master` / `primary`
    /// role, where it is the default.
    pub single_primary: bool,
}

/// One probe of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// A TCP connect that completes.
    Tcp,
    /// Send `send`, then read until the reply matches `expect` (or the timeout passes).
    SendExpect { send: Vec<u8>, expect: Expect },
    /// `GET path` with `Host: host`, on `port` (the backend's own port when `None`); passes when
    /// the status is within `status`.
    Http {
        path: String,
        host: String,
        status: RangeInclusive<u16>,
        port: Option<u16>,
    },
    /// `PING` answered by `PONG` (after `AUTH` with the password in `password_file`, if any), and
    /// the server's role is `role`, when set.
    Redis {
        role: Option<RedisRole>,
        password_file: Option<PathBuf>,
    },
    /// A connection that authenticates as `user` to `database` (password from `password_file`,
    /// if any), and `pg_is_in_recovery()` matching `role`, when set.
    Postgres {
        role: Option<PostgresRole>,
        user: String,
        database: String,
        password_file: Option<PathBuf>,
    },
}

impl Check {
    /// The name used in the config file.
    pub fn name(&self) -> &'static str {
        match self {
            Check::Tcp => "tcp",
            Check::SendExpect { .. } => "send_expect",
            Check::Http { .. } => "http",
            Check::Redis { .. } => "redis",
            Check::Postgres { .. } => "postgres",
        }
    }
}

/// What a `send_expect` reply must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The reply starts with these bytes.
    Prefix(Vec<u8>),
    /// The reply matches this regular expression (Rust `regex` syntax, over bytes); the config
    /// checks that it compiles.
    Regex(String),
}

/// The role a Redis backend must report (`ROLE`'s first element) to be up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisRole {
    Master,
    Replica,
}

/// The role a PostgreSQL backend must have to be up: `pg_is_in_recovery()` false (primary) or
/// true (standby).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostgresRole {
    Primary,
    Standby,
}

/// Passive ejection: what workers see on real traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passive {
    /// Connect failures or backend resets in a row (across workers) that eject a backend.
    pub consecutive_failures: u32,
    /// The first ejection's length; each repeat ejection doubles it, up to a cap.
    pub ejection_time: Duration,
    /// At most this share of a listener's backends is ejected at once (0 to 100).
    pub max_ejection_percent: u8,
}

impl Default for Passive {
    /// DESIGN.md's defaults: 5 failures, 10 s, 50%.
    fn default() -> Self {
        Passive {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(10),
            max_ejection_percent: 50,
        }
    }
}
