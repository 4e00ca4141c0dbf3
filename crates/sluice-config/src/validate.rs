//! Walks the YAML tree by hand, builds a [`Config`] and collects every error on the way.
//!
//! A derived `Deserialize` stops at the first problem; users fixing a file want all of
//! them at once (an unknown field *and* the missing one it was probably meant to be), so
//! each check here records its error and carries on with a placeholder value.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use sluice_balance::maglev;

mod binds;
mod health;
mod keepalive;
mod log;
mod udp;

use crate::tree::{Node, Value};
use crate::{
    Admin, Algorithm, BackendAddress, BackendSpec, Config, ConfigError, ConfigErrors, HashKey,
    Listener, Location, OnMaxConnections, Protocol, Timeouts, Workers, scalar,
};

/// Checks the whole document and returns the config, or every error found.
pub(crate) fn config(root: &Node, file: &Path) -> Result<Config, ConfigErrors> {
    let mut walker = Walker {
        file,
        errors: Vec::new(),
    };
    let config = walker.config(root);
    if walker.errors.is_empty() {
        return Ok(config);
    }
    walker.errors.sort_by_key(|e| (e.line, e.column));
    Err(ConfigErrors(walker.errors))
}

/// The keys a mapping may hold: those this crate implements, and those reserved for
/// capabilities not built yet, which are rejected as not yet supported at their own line.
pub(crate) struct Schema {
    pub(crate) supported: &'static [&'static str],
    pub(crate) unsupported: &'static [&'static str],
}

/// Every mapping a config may hold, by its place in the file (`[]`: each item of a list). It
/// is the one list of keys: [`crate::known_keys`] reads it, and `mapping` checks (in debug
/// builds) that each schema it applies is here, at the place it applies it.
pub(crate) const SCHEMAS: &[(&str, &Schema)] = &[
    ("", &TOP),
    ("admin", &ADMIN),
    ("log", &log::LOG),
    ("listeners[]", &LISTENER),
    ("listeners[].backends[]", &BACKEND),
    ("listeners[].timeouts", &TIMEOUTS),
    ("listeners[].keepalive", &keepalive::KEEPALIVE),
    ("listeners[].maglev", &MAGLEV),
    ("listeners[].ring_hash", &RING_HASH),
    ("listeners[].health", &health::HEALTH),
    ("listeners[].passive", &health::PASSIVE),
];

const TOP: Schema = Schema {
    supported: &["workers", "shutdown_timeout", "log", "admin", "listeners"],
    unsupported: &[
        "config_watch",
        "io_backend",
        "forwarding",
        "shutdown_delay",
        "access_log",
        "resolver",
    ],
};

const ADMIN: Schema = Schema {
    supported: &["bind", "max_connections"],
    unsupported: &["token_file"],
};

const LISTENER: Schema = Schema {
    supported: &[
        "name",
        "protocol",
        "bind",
        "algorithm",
        "backends",
        "timeouts",
        "keepalive",
        "max_connections",
        "on_max_connections",
        "retries",
        "hash_key",
        "maglev",
        "ring_hash",
        "health",
        "passive",
        "on_all_down",
        "slow_start",
        "drain_timeout",
        "max_sessions",
        "on_max_sessions",
        "responses",
        "requests",
        "per_packet",
    ],
    unsupported: &[
        "on_backend_down",
        "proxy_protocol",
        "send_proxy_protocol",
        "allow",
        "deny",
        "per_source",
        "tls",
    ],
};

const BACKEND: Schema = Schema {
    supported: &["address", "weight", "backup"],
    unsupported: &["name", "dns", "port", "refresh", "srv", "health"],
};

/// Backend keys that stand in for `address` (a backend found through DNS).
const BACKEND_DISCOVERY: &[&str] = &["dns", "srv"];

const TIMEOUTS: Schema = Schema {
    supported: &["connect", "idle", "half_close", "user_timeout"],
    unsupported: &[],
};

const MAGLEV: Schema = Schema {
    supported: &["table_size"],
    unsupported: &[],
};

const RING_HASH: Schema = Schema {
    supported: &["points_per_weight"],
    unsupported: &[],
};

const ALGORITHMS: &[&str] = &[
    "round_robin",
    "least_connections",
    "random",
    "power_of_two",
    "ring_hash",
    "maglev",
];

/// Envoy's bound on a Maglev table (a prime): 20 MB of slots per listener and snapshot.
const TABLE_SIZE_MAX: u32 = 5_000_011;
/// Maglev slots per backend for weights to hold within 1% (the paper's bound).
const SLOTS_PER_BACKEND: u64 = 100;
const POINTS_PER_WEIGHT_DEFAULT: u32 = 160;
const POINTS_PER_WEIGHT_MAX: u32 = 10_000;
/// Envoy's default bound on a ring (8M points, 128 MiB at 16 bytes a point).
const RING_POINTS_MAX: u64 = 8 * 1024 * 1024;

const WORKERS_MAX: i128 = 1024;
/// `admin.max_connections`: scrapers and probes need a handful; each costs a descriptor taken
/// from the data plane's budget.
const ADMIN_MAX_CONNECTIONS_DEFAULT: u32 = 64;
const ADMIN_MAX_CONNECTIONS_MAX: i128 = 1024;
const WEIGHT_MAX: i128 = 1000;

/// Defaults, as documented in DESIGN.md's reference.
const TIMEOUTS_DEFAULT: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    idle: Duration::ZERO,
    half_close: Duration::from_secs(60),
    user_timeout: Duration::ZERO,
};
const SHUTDOWN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
const RETRIES_DEFAULT: u32 = 2;
const WEIGHT_DEFAULT: u16 = 1;

/// The protocol as written, including those not supported yet, so that duplicate binds
/// can tell a tcp listener from a udp one on the same address.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ProtocolName {
    Tcp,
    Udp,
}

/// What the cross-listener checks need to know about one listener.
struct Seen {
    start: Location,
    name: Option<(String, Location)>,
    bind: Option<(ProtocolName, SocketAddr, Location)>,
}

/// A mapping's entries, looked up by key.
struct Fields<'n> {
    entries: Vec<(&'n str, &'n Node)>,
    /// Keys written that are not yet supported (already reported).
    reserved: Vec<&'n str>,
    location: Location,
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, node)| *node)
    }
}

struct Walker<'f> {
    file: &'f Path,
    errors: Vec<ConfigError>,
}

impl Walker<'_> {
    fn config(&mut self, root: &Node) -> Config {
        let mut config = Config {
            workers: Workers::Auto,
            shutdown_timeout: SHUTDOWN_TIMEOUT_DEFAULT,
            log: crate::Log::default(),
            admin: None,
            listeners: Vec::new(),
        };
        if root.value == Value::Null {
            self.error(
                root.location,
                "",
                "the file is empty; expected a mapping with at least `listeners`",
            );
            return config;
        }
        let Some(fields) = self.mapping(root, "", &TOP) else {
            return config;
        };
        if let Some(node) = fields.get("workers") {
            config.workers = self.workers(node).unwrap_or(Workers::Auto);
        }
        if let Some(node) = fields.get("shutdown_timeout") {
            config.shutdown_timeout = self.duration(node, "shutdown_timeout").unwrap_or_default();
        }
        if let Some(node) = fields.get("log") {
            config.log = self.log(node);
        }
        if let Some(node) = fields.get("admin") {
            config.admin = self.admin(node);
        }
        match fields.get("listeners") {
            Some(node) => config.listeners = self.listeners(node),
            None => self.missing(fields.location, "listeners", "a list of listeners"),
        }
        if let (Some(admin), Some(node)) = (&config.admin, fields.get("admin")) {
            self.check_admin_bind(admin.bind, node, &config.listeners);
        }
        config
    }

    fn workers(&mut self, node: &Node) -> Option<Workers> {
        let expected = format!("\"auto\" or an integer between 1 and {WORKERS_MAX}");
        match &node.value {
            Value::Str(s) if s == "auto" => Some(Workers::Auto),
            Value::Int(n) if (1..=WORKERS_MAX).contains(n) => usize::try_from(*n)
                .ok()
                .and_then(NonZeroUsize::new)
                .map(Workers::Count),
            Value::Int(n) => {
                self.error(
                    node.location,
                    "workers",
                    format!("expected {expected}, found {n}"),
                );
                None
            }
            Value::Str(s) => {
                let message = format!("expected {expected}, found {s:?}");
                self.error(node.location, "workers", message);
                None
            }
            _ => self.expected(node, "workers", &expected),
        }
    }

    fn admin(&mut self, node: &Node) -> Option<Admin> {
        let fields = self.mapping(node, "admin", &ADMIN)?;
        // Checked first, so that its error is reported even when `bind` is missing.
        let max_connections = match fields.get("max_connections") {
            Some(node) => self
                .integer(node, "admin.max_connections", 1, ADMIN_MAX_CONNECTIONS_MAX)
                .and_then(|n| u32::try_from(n).ok()),
            None => Some(ADMIN_MAX_CONNECTIONS_DEFAULT),
        };
        let Some(bind) = fields.get("bind") else {
            self.missing(
                fields.location,
                "admin.bind",
                "an address like \"127.0.0.1:9900\"",
            );
            return None;
        };
        let text = self.string(bind, "admin.bind")?;
        let bind = match scalar::bind(text) {
            Ok(bind) => bind,
            Err(message) => {
                self.error(bind.location, "admin.bind", message);
                return None;
            }
        };
        Some(Admin {
            bind,
            max_connections: max_connections?,
        })
    }

    fn listeners(&mut self, node: &Node) -> Vec<Listener> {
        let Value::Seq(items) = &node.value else {
            self.expected::<()>(node, "listeners", "a list of listeners");
            return Vec::new();
        };
        if items.is_empty() {
            self.error(
                node.location,
                "listeners",
                "at least one listener is required",
            );
        }
        let mut listeners = Vec::with_capacity(items.len());
        let mut seen: Vec<Seen> = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let path = format!("listeners[{index}]");
            let Some((listener, this)) = self.listener(item, &path) else {
                continue;
            };
            self.check_duplicates(&path, &this, &seen);
            listeners.push(listener);
            seen.push(this);
        }
        listeners
    }

    /// Reports a name or a bind already used by an earlier listener, at the later one.
    fn check_duplicates(&mut self, path: &str, this: &Seen, seen: &[Seen]) {
        if let Some((name, at)) = &this.name
            && let Some(first) = seen
                .iter()
                .find(|s| s.name.as_ref().is_some_and(|(n, _)| n == name))
        {
            let line = first
                .name
                .as_ref()
                .map_or(first.start.line, |(_, l)| l.line);
            let message = format!("duplicate listener name {name:?}, already used at line {line}");
            self.error(*at, format!("{path}.name"), message);
        }
        if let Some((protocol, address, at)) = this.bind
            && let Some(first) = seen.iter().find(|s| {
                s.bind
                    .is_some_and(|(p, a, _)| p == protocol && a == address)
            })
        {
            let owner = match &first.name {
                Some((name, _)) => format!("listener {name:?}"),
                None => "another listener".to_owned(),
            };
            let protocol = match protocol {
                ProtocolName::Tcp => "tcp",
                ProtocolName::Udp => "udp",
            };
            let message = format!(
                "{protocol} {address} is already bound by {owner} at line {}",
                first.start.line
            );
            self.error(at, format!("{path}.bind"), message);
        }
    }

    fn listener(&mut self, node: &Node, path: &str) -> Option<(Listener, Seen)> {
        let fields = self.mapping(node, path, &LISTENER)?;
        let mut listener = Listener {
            name: String::new(),
            protocol: Protocol::Tcp,
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            algorithm: Algorithm::RoundRobin,
            backends: Vec::new(),
            timeouts: TIMEOUTS_DEFAULT,
            keepalive: crate::Keepalive::default(),
            max_connections: 0,
            on_max_connections: OnMaxConnections::Queue,
            retries: RETRIES_DEFAULT,
            health: None,
            passive: sluice_health::Passive::default(),
            on_all_down: sluice_balance::OnAllDown::Reject,
            slow_start: Duration::ZERO,
            drain_timeout: health::DRAIN_TIMEOUT_DEFAULT,
            udp: crate::UdpSettings::default(),
            location: node.location,
            password_file_location: None,
        };
        let seen = self.listener_identity(&fields, path, &mut listener);
        self.listener_forwarding(&fields, path, &mut listener);
        self.listener_health(&fields, path, &mut listener);
        self.listener_protocol_keys(&fields, path, &mut listener);
        Some((listener, seen))
    }

    /// Reads what identifies a listener (name, protocol, bind), which must be unique.
    fn listener_identity(&mut self, fields: &Fields, path: &str, listener: &mut Listener) -> Seen {
        let mut seen = Seen {
            start: listener.location,
            name: None,
            bind: None,
        };
        match fields.get("name") {
            Some(name) => {
                if let Some(text) = self.name(name, &format!("{path}.name")) {
                    listener.name = text.to_owned();
                    seen.name = Some((listener.name.clone(), name.location));
                }
            }
            None => self.missing(fields.location, &format!("{path}.name"), "a unique name"),
        }
        let protocol = match fields.get("protocol") {
            Some(node) => self.protocol(node, &format!("{path}.protocol")),
            None => Some(ProtocolName::Tcp),
        };
        if protocol == Some(ProtocolName::Udp) {
            listener.protocol = Protocol::Udp;
        }
        let field = format!("{path}.bind");
        match fields.get("bind") {
            Some(bind) => {
                if let Some(address) = self.bind(bind, &field) {
                    listener.bind = address;
                    seen.bind = protocol.map(|p| (p, address, bind.location));
                }
            }
            None => self.missing(fields.location, &field, "an address like \"0.0.0.0:6379\""),
        }
        seen
    }

    /// Reads how a listener forwards: backends, algorithm, timeouts and limits.
    fn listener_forwarding(&mut self, fields: &Fields, path: &str, listener: &mut Listener) {
        let name = match fields.get("algorithm") {
            Some(node) => self.algorithm_name(node, &format!("{path}.algorithm")),
            None => Some("round_robin"),
        };
        let field = format!("{path}.backends");
        match fields.get("backends") {
            Some(node) => listener.backends = self.backends(node, &field),
            None => self.missing(fields.location, &field, "a list of backends"),
        }
        if let Some(name) = name {
            listener.algorithm = self.algorithm(fields, path, name, &listener.backends);
        }
        if let Some(node) = fields.get("timeouts") {
            listener.timeouts = self.timeouts(node, &format!("{path}.timeouts"));
        }
        if let Some(node) = fields.get("keepalive") {
            listener.keepalive = self.keepalive(node, &format!("{path}.keepalive"));
        }
        if let Some(node) = fields.get("max_connections") {
            let field = format!("{path}.max_connections");
            listener.max_connections = self.u32(node, &field).unwrap_or_default();
        }
        if let Some(node) = fields.get("on_max_connections") {
            let field = format!("{path}.on_max_connections");
            listener.on_max_connections = match self.choice(node, &field, &["queue", "reject"]) {
                Some("reject") => OnMaxConnections::Reject,
                _ => OnMaxConnections::Queue,
            };
        }
        if let Some(node) = fields.get("retries") {
            let field = format!("{path}.retries");
            listener.retries = self.u32(node, &field).unwrap_or_default();
        }
    }

    /// Names show up in logs, metrics and admin URLs, so they are kept to a plain alphabet.
    fn name<'n>(&mut self, node: &'n Node, field: &str) -> Option<&'n str> {
        let text = self.string(node, field)?;
        let valid = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            let message =
                format!("invalid name {text:?}: expected 1 to 64 letters, digits, '_', '-' or '.'");
            self.error(node.location, field, message);
            return None;
        }
        Some(text)
    }

    fn protocol(&mut self, node: &Node, field: &str) -> Option<ProtocolName> {
        match self.choice(node, field, &["tcp", "udp"])? {
            "tcp" => Some(ProtocolName::Tcp),
            _ => Some(ProtocolName::Udp),
        }
    }

    fn algorithm_name<'n>(&mut self, node: &'n Node, field: &str) -> Option<&'n str> {
        let text = self.string(node, field)?;
        if ALGORITHMS.contains(&text) {
            return Some(text);
        }
        let message = format!(
            "unknown algorithm {text:?}, expected one of: {}",
            ALGORITHMS.join(", ")
        );
        self.error(node.location, field, message);
        None
    }

    /// The algorithm `name` with its settings (`hash_key`, `maglev`, `ring_hash`), each checked
    /// against the algorithm and the backends it will balance.
    fn algorithm(
        &mut self,
        fields: &Fields,
        path: &str,
        name: &str,
        backends: &[BackendSpec],
    ) -> Algorithm {
        let hashing = matches!(name, "ring_hash" | "maglev");
        let mut hash_key = HashKey::ClientIp;
        if let Some(node) = fields.get("hash_key") {
            let field = format!("{path}.hash_key");
            match self.choice(node, &field, &["client_ip", "client_ip_port"]) {
                _ if !hashing => {
                    let message = format!(
                        "hash_key applies only to algorithm ring_hash or maglev, not {name}"
                    );
                    self.error(node.location, field, message);
                }
                Some("client_ip_port") => hash_key = HashKey::ClientIpPort,
                _ => {}
            }
        }
        for (key, wanted) in [("maglev", "maglev"), ("ring_hash", "ring_hash")] {
            if let Some(node) = fields.get(key)
                && name != wanted
            {
                let message =
                    format!("{key} settings apply only to algorithm {wanted}, not {name}");
                self.error(node.location, format!("{path}.{key}"), message);
            }
        }
        match name {
            "least_connections" => Algorithm::LeastConnections,
            "random" => Algorithm::Random,
            "power_of_two" => Algorithm::PowerOfTwo,
            "ring_hash" => Algorithm::RingHash {
                hash_key,
                points_per_weight: match fields.get("ring_hash") {
                    Some(node) => self.ring_hash(node, &format!("{path}.ring_hash"), backends),
                    None => POINTS_PER_WEIGHT_DEFAULT,
                },
            },
            "maglev" => Algorithm::Maglev {
                hash_key,
                table_size: fields
                    .get("maglev")
                    .and_then(|node| self.maglev(node, &format!("{path}.maglev"), backends)),
            },
            _ => Algorithm::RoundRobin,
        }
    }

    /// `maglev: { table_size }`: a prime, at least 100 slots per backend, at most
    /// `TABLE_SIZE_MAX`. `None` (the default size) when absent or wrong.
    fn maglev(&mut self, node: &Node, path: &str, backends: &[BackendSpec]) -> Option<u32> {
        let fields = self.mapping(node, path, &MAGLEV)?;
        let node = fields.get("table_size")?;
        let field = format!("{path}.table_size");
        let size = self.integer(node, &field, 2, TABLE_SIZE_MAX.into())?;
        let size = u32::try_from(size).ok()?;
        let wanted = backends.len() as u64 * SLOTS_PER_BACKEND;
        let message = if !maglev::is_prime(size) {
            format!(
                "{size} is not prime: a Maglev table's size must be prime for every backend's \
                 permutation to reach every slot (next prime: {})",
                next_prime(size)
            )
        } else if u64::from(size) < wanted {
            format!(
                "{size} is below 100 slots for each of the {} backends ({wanted}), the size at \
                 which weights hold within 1%; use a prime of at least {wanted}, such as {}, or \
                 leave table_size out for the default ({})",
                backends.len(),
                next_prime(u32::try_from(wanted).unwrap_or(TABLE_SIZE_MAX)),
                maglev::default_table_size(backends.len())
            )
        } else {
            return Some(size);
        };
        self.error(node.location, field, message);
        None
    }

    /// `ring_hash: { points_per_weight }`: 1 to `POINTS_PER_WEIGHT_MAX`, and the whole ring (the
    /// sum of the weights times it) at most `RING_POINTS_MAX` points.
    fn ring_hash(&mut self, node: &Node, path: &str, backends: &[BackendSpec]) -> u32 {
        let Some(fields) = self.mapping(node, path, &RING_HASH) else {
            return POINTS_PER_WEIGHT_DEFAULT;
        };
        let Some(node) = fields.get("points_per_weight") else {
            return POINTS_PER_WEIGHT_DEFAULT;
        };
        let field = format!("{path}.points_per_weight");
        let Some(points) = self.integer(node, &field, 1, POINTS_PER_WEIGHT_MAX.into()) else {
            return POINTS_PER_WEIGHT_DEFAULT;
        };
        let points = u32::try_from(points).unwrap_or(POINTS_PER_WEIGHT_DEFAULT);
        let weights: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
        let total = weights * u64::from(points);
        if total > RING_POINTS_MAX {
            let message = format!(
                "{points} points per weight over a total weight of {weights} make {total} points, \
                 more than the ring's limit of {RING_POINTS_MAX}"
            );
            self.error(node.location, field, message);
            return POINTS_PER_WEIGHT_DEFAULT;
        }
        points
    }

    fn bind(&mut self, node: &Node, field: &str) -> Option<SocketAddr> {
        let text = self.string(node, field)?;
        scalar::bind(text)
            .map_err(|message| self.error(node.location, field, message))
            .ok()
    }

    fn backends(&mut self, node: &Node, path: &str) -> Vec<BackendSpec> {
        let Value::Seq(items) = &node.value else {
            self.expected::<()>(node, path, "a list of backends");
            return Vec::new();
        };
        if items.is_empty() {
            self.error(node.location, path, "at least one backend is required");
        }
        let mut backends: Vec<BackendSpec> = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let field = format!("{path}[{index}]");
            let Some(backend) = self.backend(item, &field) else {
                continue;
            };
            if let Some(first) = backends.iter().find(|b| same_backend(b, &backend)) {
                let message = format!(
                    "duplicate backend {}, already listed at line {}; \
                     give one entry a higher weight instead",
                    backend.address, first.location.line
                );
                self.error(item.location, field, message);
                continue;
            }
            backends.push(backend);
        }
        backends
    }

    fn backend(&mut self, node: &Node, path: &str) -> Option<BackendSpec> {
        let (address_node, address_field, weight, backup) = match &node.value {
            Value::Str(_) => (node, path.to_owned(), WEIGHT_DEFAULT, false),
            Value::Map(_) => {
                let fields = self.mapping(node, path, &BACKEND)?;
                let weight = match fields.get("weight") {
                    Some(weight) => self.weight(weight, &format!("{path}.weight")),
                    None => Some(WEIGHT_DEFAULT),
                };
                let backup = match fields.get("backup") {
                    Some(node) => self.boolean(node, &format!("{path}.backup")),
                    None => Some(false),
                };
                let field = format!("{path}.address");
                let Some(address) = fields.get("address") else {
                    // A backend found through DNS has no address; its keys are reported already.
                    if !fields
                        .reserved
                        .iter()
                        .any(|k| BACKEND_DISCOVERY.contains(k))
                    {
                        self.missing(fields.location, &field, "an address like \"10.0.0.1:6379\"");
                    }
                    return None;
                };
                (address, field, weight?, backup?)
            }
            _ => {
                return self.expected(
                    node,
                    path,
                    "an address like \"10.0.0.1:6379\" or a mapping with `address` and `weight`",
                );
            }
        };
        let text = self.string(address_node, &address_field)?;
        match scalar::backend(text) {
            Ok(address) => Some(BackendSpec {
                address,
                weight,
                backup,
                location: node.location,
            }),
            Err(message) => {
                self.error(address_node.location, address_field, message);
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, field: &str) -> Option<bool> {
        match node.value {
            Value::Bool(value) => Some(value),
            _ => self.expected(node, field, "true or false"),
        }
    }

    fn weight(&mut self, node: &Node, field: &str) -> Option<u16> {
        let weight = self.integer(node, field, 0, WEIGHT_MAX)?;
        u16::try_from(weight).ok()
    }

    fn timeouts(&mut self, node: &Node, path: &str) -> Timeouts {
        let mut timeouts = TIMEOUTS_DEFAULT;
        let Some(fields) = self.mapping(node, path, &TIMEOUTS) else {
            return timeouts;
        };
        if let Some(node) = fields.get("connect") {
            let field = format!("{path}.connect");
            if let Some(connect) = self.duration(node, &field) {
                if connect.is_zero() {
                    let message = "must be greater than 0: every connect attempt needs a limit";
                    self.error(node.location, field, message);
                } else {
                    timeouts.connect = connect;
                }
            }
        }
        if let Some(node) = fields.get("idle") {
            timeouts.idle = self
                .duration(node, &format!("{path}.idle"))
                .unwrap_or_default();
        }
        if let Some(node) = fields.get("half_close") {
            timeouts.half_close = self
                .duration(node, &format!("{path}.half_close"))
                .unwrap_or_default();
        }
        if let Some(node) = fields.get("user_timeout") {
            timeouts.user_timeout = self.user_timeout(node, &format!("{path}.user_timeout"));
        }
        timeouts
    }

    // Generic checks. Each returns `None` after recording an error.

    /// Checks that `node` is a mapping with string keys from `schema`; reports unknown keys
    /// and keys that are not yet supported, each at its own position.
    fn mapping<'n>(&mut self, node: &'n Node, path: &str, schema: &Schema) -> Option<Fields<'n>> {
        debug_assert!(
            SCHEMAS.iter().any(|(place, s)| *place == place_of(path)
                && s.supported == schema.supported
                && s.unsupported == schema.unsupported),
            "the schema applied at {path:?} is not in SCHEMAS at {:?}",
            place_of(path)
        );
        let Value::Map(entries) = &node.value else {
            let what = if path.is_empty() {
                "a mapping of settings"
            } else {
                "a mapping"
            };
            return self.expected(node, path, what);
        };
        let mut fields = Fields {
            entries: Vec::with_capacity(entries.len()),
            reserved: Vec::new(),
            location: node.location,
        };
        for (key, value) in entries {
            let Value::Str(name) = &key.value else {
                let message = format!("expected a field name, found {}", key.value.kind());
                self.error(key.location, path, message);
                continue;
            };
            let field = join(path, &name.escape_debug().to_string());
            if schema.unsupported.contains(&name.as_str()) {
                self.error(key.location, field, format!("{name} is not yet supported"));
                fields.reserved.push(name);
            } else if schema.supported.contains(&name.as_str()) {
                fields.entries.push((name, value));
            } else {
                let expected: Vec<&str> = schema
                    .supported
                    .iter()
                    .chain(schema.unsupported)
                    .copied()
                    .collect();
                let message = format!(
                    "unknown field {name:?}, expected one of: {}",
                    expected.join(", ")
                );
                self.error(key.location, field, message);
            }
        }
        Some(fields)
    }

    fn string<'n>(&mut self, node: &'n Node, field: &str) -> Option<&'n str> {
        match &node.value {
            Value::Str(text) => Some(text),
            _ => self.expected(node, field, "a string"),
        }
    }

    fn integer(&mut self, node: &Node, field: &str, min: i128, max: i128) -> Option<i128> {
        let Value::Int(n) = node.value else {
            return self.expected(node, field, "an integer");
        };
        if !(min..=max).contains(&n) {
            let message = format!("must be between {min} and {max}, found {n}");
            self.error(node.location, field, message);
            return None;
        }
        Some(n)
    }

    fn u32(&mut self, node: &Node, field: &str) -> Option<u32> {
        let n = self.integer(node, field, 0, u32::MAX.into())?;
        u32::try_from(n).ok()
    }

    /// One of a fixed set of words.
    fn choice<'c>(&mut self, node: &Node, field: &str, choices: &[&'c str]) -> Option<&'c str> {
        let text = self.string(node, field)?;
        if let Some(choice) = choices.iter().find(|c| **c == text) {
            return Some(choice);
        }
        let message = format!(
            "unknown value {text:?}, expected one of: {}",
            choices.join(", ")
        );
        self.error(node.location, field, message);
        None
    }

    /// A bare `0` (integer or string) means off; anything else needs a unit.
    fn duration(&mut self, node: &Node, field: &str) -> Option<Duration> {
        let result = match &node.value {
            Value::Int(0) => Ok(Duration::ZERO),
            Value::Int(n) => Err(format!(
                "invalid duration {n}: a unit is required (ms, s, m, h), e.g. {n}s; \
                 only 0 may be written without one"
            )),
            Value::Str(text) => scalar::duration(text),
            _ => return self.expected(node, field, "a duration such as 2s or 250ms, or 0"),
        };
        result
            .map_err(|message| self.error(node.location, field, message))
            .ok()
    }

    fn missing(&mut self, at: Location, field: &str, what: &str) {
        self.error(
            at,
            field,
            format!("missing required field; expected {what}"),
        );
    }

    /// Records "expected X, found Y" and returns `None` so callers can `return` it.
    fn expected<T>(&mut self, node: &Node, field: &str, what: &str) -> Option<T> {
        let message = format!("expected {what}, found {}", node.value.kind());
        self.error(node.location, field, message);
        None
    }

    fn error(&mut self, at: Location, field: impl Into<String>, message: impl Into<String>) {
        self.errors
            .push(ConfigError::new(self.file, at, field, message));
    }
}

/// The place of a field path in [`SCHEMAS`]: `listeners[2].backends[0]` is
/// `listeners[].backends[]`.
fn place_of(path: &str) -> String {
    let mut place = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => in_index = true,
            ']' => {
                in_index = false;
                place.push_str("[]");
            }
            _ if in_index => {}
            _ => place.push(c),
        }
    }
    place
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Two entries for the same backend; hostnames compare without regard to case, as DNS does.
fn same_backend(a: &BackendSpec, b: &BackendSpec) -> bool {
    match (&a.address, &b.address) {
        (BackendAddress::Ip(a), BackendAddress::Ip(b)) => a == b,
        (
            BackendAddress::Host { host: a, port: pa },
            BackendAddress::Host { host: b, port: pb },
        ) => {
            pa == pb
                && a.trim_end_matches('.')
                    .eq_ignore_ascii_case(b.trim_end_matches('.'))
        }
        _ => false,
    }
}

/// The smallest prime at or above `n` (for error messages; `n` is at most `TABLE_SIZE_MAX`).
fn next_prime(n: u32) -> u32 {
    (n..)
        .find(|&c| maglev::is_prime(c))
        .unwrap_or(TABLE_SIZE_MAX)
}
