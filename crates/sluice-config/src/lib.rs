//! Sluice's configuration: the YAML file users write, checked and turned into typed values.
//!
//! [`load`] reads a file and [`parse`] checks its text against the reference in
//! `docs/config.md`. The result is a [`Config`] (global settings and a list of
//! [`Listener`]s, each with its [`BackendSpec`]s, [`Timeouts`] and [`Keepalive`]), or [`ConfigErrors`]: every
//! problem found in the file, each a [`ConfigError`] naming file, line, column and field and
//! saying what was expected. Unknown fields are reported even when a required field is also
//! missing, because the file is checked by walking a position-carrying YAML tree by hand
//! rather than by a derived `Deserialize` that stops at the first error.
//!
//! Keys reserved for capabilities not built yet (TLS routing, PROXY protocol, DNS discovery,
//! access logs, ...) are recognised and rejected as "not yet supported" at their own line,
//! never as unknown fields. [`known_keys`] lists every key, built or reserved, from the same
//! schemas the checks use: the config reference, `docs/config.md`, is tested against it.
//!
//! What this crate deliberately does not do: no I/O beyond reading the file in [`load`]; no
//! DNS (a backend hostname stays a [`BackendAddress::Host`] for the binary to resolve); no
//! defaults that depend on the machine (`workers: auto` and `max_connections: 0` are kept
//! as written, and the binary derives them from the cores and the fd budget). It never
//! panics on any input, and an input budget bounds the memory and time spent on hostile
//! documents (alias bombs, deep nesting, huge files).

mod error;
mod keys;
mod log;
mod scalar;
mod tree;
mod validate;

use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

pub use error::{ConfigError, ConfigErrors};
pub use keys::{Key, Support, known_keys};
pub use log::{LOG_LEVELS, Log, LogFormat, log_directives};

/// The largest config file accepted, in bytes. Thousands of backends fit in far less.
pub const FILE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A checked configuration: everything the binary needs to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How many worker threads to run (`workers`).
    pub workers: Workers,
    /// How long SIGTERM/SIGINT waits for open connections before closing them
    /// (`shutdown_timeout`, default 30s; 0 closes them at once).
    pub shutdown_timeout: Duration,
    /// Sluice's own log (`log`): read at start only; SIGHUP does not change it.
    pub log: Log,
    /// The admin/metrics endpoint; `None` means nothing listens.
    pub admin: Option<Admin>,
    /// The listeners, in file order; at least one.
    pub listeners: Vec<Listener>,
}

/// Number of worker threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Workers {
    /// One per core (`auto`, the default); the binary counts the cores.
    #[default]
    Auto,
    /// Exactly this many, 1 to 1024.
    Count(NonZeroUsize),
}

/// The admin/metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Admin {
    /// Where it listens (`admin.bind`, required when `admin` is present).
    pub bind: SocketAddr,
    /// Connections served at once (`admin.max_connections`, 1 to 1024, default 64); one over
    /// it is closed at once. The data plane's fd budget leaves this many to the endpoint.
    pub max_connections: u32,
}

/// One address Sluice listens on and the backends it forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Unique among listeners: 1 to 64 letters, digits, `_`, `-` or `.`.
    pub name: String,
    /// Transport protocol (`protocol`, default tcp).
    pub protocol: Protocol,
    /// Listening address, an IP address and port (1 to 65535).
    pub bind: SocketAddr,
    /// How a backend is picked (`algorithm`, default round_robin).
    pub algorithm: Algorithm,
    /// At least one; no two with the same address.
    pub backends: Vec<BackendSpec>,
    /// Connection timeouts.
    pub timeouts: Timeouts,
    /// TCP keepalive on both sockets of every connection (`keepalive`).
    pub keepalive: Keepalive,
    /// Open connections allowed at once; 0 (the default) means "derive from the fd budget".
    pub max_connections: u32,
    /// What happens to connections beyond `max_connections` (default queue).
    pub on_max_connections: OnMaxConnections,
    /// Extra connect attempts, each on a backend not yet tried (default 2).
    pub retries: u32,
    /// The active check, if any; without one every backend is up unless passively ejected.
    pub health: Option<ActiveCheck>,
    /// Passive ejection (on by default; `consecutive_failures: 0` turns it off).
    pub passive: Passive,
    /// What new connections meet when no backend is up (default `reject`).
    pub on_all_down: OnAllDown,
    /// How long a backend that comes back ramps up to its weight (zero: off, the default).
    pub slow_start: Duration,
    /// How long a removed or weight-0 backend's connections may go on (default 30 s).
    pub drain_timeout: Duration,
    /// Sessions, for a `udp` listener (defaults for a `tcp` one, which has none).
    pub udp: UdpSettings,
    /// Where the listener's entry starts in the file.
    pub location: Location,
    /// Where `health.password_file` is written, if it is: the binary reads the file, and
    /// reports a file it cannot read at this position.
    pub password_file_location: Option<Location>,
}

/// Transport protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// TCP: one backend connection per client connection.
    #[default]
    Tcp,
    /// UDP: one session (and backend socket) per client address, see [`UdpSettings`].
    Udp,
}

/// What a UDP listener does with sessions (flows): DESIGN.md's udp-only keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSettings {
    /// Sessions per listener, split evenly across workers (default 100000).
    pub max_sessions: u32,
    /// What a new flow meets when the worker's share is full (default `drop`).
    pub on_max_sessions: OnMaxSessions,
    /// End a session after this many replies (1 for DNS); 0 = unlimited.
    pub responses: u32,
    /// End a session after this many requests; 0 = unlimited.
    pub requests: u32,
    /// Balance every datagram on its own, without a session.
    pub per_packet: bool,
}

impl Default for UdpSettings {
    fn default() -> Self {
        UdpSettings {
            max_sessions: 100_000,
            on_max_sessions: OnMaxSessions::Drop,
            responses: 0,
            requests: 0,
            per_packet: false,
        }
    }
}

/// What a UDP listener does with a new flow when its session table is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnMaxSessions {
    /// Drop the datagram (counted); existing sessions go on.
    #[default]
    Drop,
    /// End the least recently active session to make room (counted).
    EvictLru,
}

/// Load-balancing algorithm with its parameters (`hash_key`, `maglev.table_size`,
/// `ring_hash.points_per_weight`): the balancing crate's own type, so that what the file says is
/// what the workers run.
pub use sluice_balance::{Algorithm, HashKey, OnAllDown};
/// Health checks and passive ejection, as the health crate names them.
pub use sluice_health::{ActiveCheck, Check, Expect, Passive, PostgresRole, RedisRole};

/// One backend of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Where to connect.
    pub address: BackendAddress,
    /// Share of new connections, 0 to 1000 (default 1); 0 takes no new connections.
    pub weight: u16,
    /// Takes connections only while no non-backup backend of the listener is up.
    pub backup: bool,
    /// Where the backend's entry starts in the file.
    pub location: Location,
}

/// A backend address as written. A hostname is resolved by the binary, not here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendAddress {
    /// An IP address and a non-zero port.
    Ip(SocketAddr),
    /// A DNS name (letters, digits, `-`, `_`, dots) and a non-zero port.
    Host {
        /// The name as written.
        host: String,
        /// The port, 1 to 65535.
        port: u16,
    },
}

/// Connection timeouts of a listener; zero means off where allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timeouts {
    /// Limit on each connect attempt to a backend; never zero (default 2s).
    pub connect: Duration,
    /// Close a connection with no bytes either way for this long; zero is off (the default).
    pub idle: Duration,
    /// Close a connection this long after one side's FIN without activity; zero is off
    /// (default 60s).
    pub half_close: Duration,
    /// How long bytes sent on either socket of a connection may stay unacknowledged before
    /// the kernel aborts the connection (TCP_USER_TIMEOUT, HAProxy's `tcp-ut`); zero keeps the
    /// kernel's default (retransmissions give up after about 15 minutes). Millisecond
    /// resolution, at most 2^31 - 1 ms.
    pub user_timeout: Duration,
}

/// TCP keepalive of a listener's connections, set on the client's and the backend's socket:
/// a peer that vanished without a FIN or reset is noticed on an idle connection too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Keepalive {
    /// Idle time before the first probe (TCP_KEEPIDLE), whole seconds from 1s to 32767s;
    /// zero turns keepalive off (default 60s).
    pub time: Duration,
    /// Time between probes (TCP_KEEPINTVL), whole seconds from 1s to 32767s (default 10s).
    pub interval: Duration,
    /// Unanswered probes before the connection is aborted (TCP_KEEPCNT), 1 to 127 (default
    /// 6). With a `timeouts.user_timeout`, the kernel aborts once that has passed instead.
    pub probes: u32,
}

impl Keepalive {
    /// Whether keepalive is on (`time` is not zero).
    pub fn is_on(&self) -> bool {
        !self.time.is_zero()
    }
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            time: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            probes: 6,
        }
    }
}

/// What happens to new connections while a listener is at `max_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnMaxConnections {
    /// Leave them in the kernel's accept backlog until a slot frees (the default).
    #[default]
    Queue,
    /// Accept and reset them at once.
    Reject,
}

/// A position in the config file, both 1-based; the column counts characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

impl fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddress::Ip(address) => write!(f, "{address}"),
            BackendAddress::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Reads the config file at `path` and checks it with [`parse`].
///
/// A file that cannot be read, is larger than [`FILE_BYTES_MAX`] or is not UTF-8 gives one
/// error with line 0 (no position).
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file_error =
        |message: String| ConfigErrors::from(ConfigError::new(path, NO_LOCATION, "", message));
    let file = std::fs::File::open(path).map_err(|e| file_error(format!("cannot open: {e}")))?;
    // Read one byte past the limit so that a file that is too large is told apart from one
    // exactly at the limit, without ever holding more than that in memory.
    let mut bytes = Vec::new();
    file.take(FILE_BYTES_MAX as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_error(format!("cannot read: {e}")))?;
    if bytes.len() > FILE_BYTES_MAX {
        return Err(file_error(too_large()));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        file_error(format!(
            "not valid UTF-8 (first bad byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    parse(&text, path)
}

/// Checks the YAML `text` of a config file; `file` is only used to name it in errors.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigErrors> {
    if text.len() > FILE_BYTES_MAX {
        return Err(ConfigError::new(file, NO_LOCATION, "", too_large()).into());
    }
    let root = tree::parse(text, yaml_options()).map_err(|e| yaml_error(file, &e))?;
    validate::config(&root, file)
}

/// Nesting allowed in the YAML document. Real configs nest 5 deep; a low limit also bounds
/// the recursion that builds the tree.
const DEPTH_MAX: usize = 32;

/// serde-saphyr's input budget: far above any real config, low enough to stop hostile ones
/// early. The messages of [`budget_words`] name them.
const EVENTS_MAX: usize = 500_000;
const NODES_MAX: usize = 250_000;
const ALIASES_MAX: usize = 10_000;
const ANCHORS_MAX: usize = 10_000;
/// Elements of anchored values that aliases may repeat, all aliases together.
const ALIAS_REPLAYS_MAX: usize = 100_000;
const MERGE_KEYS_MAX: usize = 1_000;

/// Errors about the file as a whole have no position.
const NO_LOCATION: Location = Location { line: 0, column: 0 };

fn too_large() -> String {
    format!(
        "the file is larger than {} MiB",
        FILE_BYTES_MAX / (1024 * 1024)
    )
}

/// serde-saphyr's settings: strict YAML 1.2 booleans (so `y` or `on` stay strings), one
/// document, and a budget far above any real config that stops hostile ones early.
fn yaml_options() -> serde_saphyr::Options {
    let mut alias_limits = serde_saphyr::options::AliasLimits::default();
    alias_limits.max_total_replayed_events = 100_000;
    alias_limits.max_replay_stack_depth = 16;
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_events: EVENTS_MAX,
            max_aliases: ALIASES_MAX,
            max_anchors: ANCHORS_MAX,
            max_recorded_anchor_events: ALIAS_REPLAYS_MAX,
            max_recorded_anchor_bytes: FILE_BYTES_MAX,
            max_depth: DEPTH_MAX,
            flow_nesting_limit: DEPTH_MAX,
            max_documents: 1,
            max_nodes: NODES_MAX,
            max_total_scalar_bytes: FILE_BYTES_MAX,
            max_merge_keys: MERGE_KEYS_MAX,
        },
        alias_limits: alias_limits,
        strict_booleans: true,
    }
}

/// One error for YAML that could not be parsed (syntax, budget, duplicate key).
fn yaml_error(file: &Path, error: &serde_saphyr::Error) -> ConfigErrors {
    use serde_saphyr::budget::BudgetBreach;
    use serde_saphyr::{Error, MessageFormatter};

    let location = error
        .location()
        .map(|l| Location {
            line: usize::try_from(l.line()).unwrap_or(usize::MAX),
            column: usize::try_from(l.column()).unwrap_or(usize::MAX),
        })
        .filter(|l| l.line > 0)
        .unwrap_or(NO_LOCATION);
    // serde-saphyr's wording for these names its own API or types; say it in the user's
    // terms.
    let mut inner = error;
    while let Error::AliasError { error, .. } | Error::WithSnippet { error, .. } = inner {
        inner = error;
    }
    let message = match inner {
        Error::MultipleDocuments { .. }
        | Error::Budget {
            breach: BudgetBreach::Documents { .. },
            ..
        } => "expected one YAML document, found a second one".to_owned(),
        Error::Budget {
            breach: BudgetBreach::Depth { .. },
            ..
        } => format!("nested more than {DEPTH_MAX} levels deep"),
        Error::Budget { breach, .. } => budget_words(breach),
        Error::DuplicateMappingKey { key: Some(key), .. } => format!("duplicate key {key:?}"),
        Error::DuplicateMappingKey { key: None, .. } => "duplicate key".to_owned(),
        other => serde_saphyr::DefaultMessageFormatter
            .format_message(other)
            .into_owned(),
    };
    // The message may quote the input; keep each error on one line of plain text.
    let message: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    ConfigError::new(file, location, "", format!("invalid YAML: {message}")).into()
}

/// What a budget breach means for the file, in its own words (serde-saphyr's `Debug` of the
/// breach names its types, such as `RecordedAnchorEvents { .. }`).
fn budget_words(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach;

    const MIB: usize = 1024 * 1024;
    let expands = "the document expands too much through aliases";
    let large = "the document is too large";
    match breach {
        BudgetBreach::RecordedAnchorEvents { .. } => format!(
            "{expands}: they repeat more than {ALIAS_REPLAYS_MAX} elements of anchored values"
        ),
        BudgetBreach::RecordedAnchorBytes { .. } | BudgetBreach::ScalarBytes { .. } => format!(
            "{expands}: its values hold more than {} MiB of text",
            FILE_BYTES_MAX / MIB
        ),
        BudgetBreach::Aliases { .. } => {
            format!("{expands}: more than {ALIASES_MAX} aliases (*name)")
        }
        BudgetBreach::AliasAnchorRatio { .. } => {
            format!("{expands}: far more aliases (*name) than anchors (&name)")
        }
        BudgetBreach::Anchors { .. } => format!("{large}: more than {ANCHORS_MAX} anchors (&name)"),
        BudgetBreach::Events { .. } | BudgetBreach::Nodes { .. } => {
            format!("{large}: more than {NODES_MAX} values")
        }
        BudgetBreach::MergeKeys { .. } => {
            format!("{large}: more than {MERGE_KEYS_MAX} merge keys (<<)")
        }
        BudgetBreach::InputBytes { .. } => too_large(),
        BudgetBreach::SequenceUnbalanced => {
            "a list or mapping is closed but was never opened".to_owned()
        }
        _ => format!("{large}, or {expands}"),
    }
}
