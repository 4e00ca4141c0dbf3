//! The health keys of a listener: `health` (the active check, its check-specific keys written
//! flat beside `check`), `passive`, `on_all_down`, `slow_start` and `drain_timeout`.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use sluice_balance::OnAllDown;
use sluice_health::{ActiveCheck, Check, Expect, Passive, PostgresRole, RedisRole};

use super::{Fields, Schema, Walker};
use crate::Listener;
use crate::tree::{Node, Value};

/// Every key `health` may hold; which ones apply depends on `check` (see `CHECK_KEYS`).
pub(super) const HEALTH: Schema = Schema {
    supported: &[
        "check",
        "interval",
        "timeout",
        "rise",
        "fall",
        "send",
        "send_hex",
        "expect",
        "expect_regex",
        "path",
        "host",
        "status",
        "port",
        "role",
        "password_file",
        "user",
        "database",
        "single_primary",
    ],
    unsupported: &["username", "tls", "ca_file", "sslmode"],
};

/// The check-specific keys of each check.
const CHECK_KEYS: &[(&str, &[&str])] = &[
    ("tcp", &[]),
    (
        "send_expect",
        &["send", "send_hex", "expect", "expect_regex"],
    ),
    ("http", &["path", "host", "status", "port"]),
    ("redis", &["role", "password_file", "single_primary"]),
    (
        "postgres",
        &[
            "role",
            "password_file",
            "user",
            "database",
            "single_primary",
        ],
    ),
];

const COMMON_KEYS: &[&str] = &["check", "interval", "timeout", "rise", "fall"];

pub(super) const PASSIVE: Schema = Schema {
    supported: &[
        "consecutive_failures",
        "ejection_time",
        "max_ejection_percent",
    ],
    unsupported: &[],
};

const INTERVAL_DEFAULT: Duration = Duration::from_secs(2);
const TIMEOUT_DEFAULT: Duration = Duration::from_secs(1);
const RISE_DEFAULT: u32 = 2;
const FALL_DEFAULT: u32 = 3;
const RISE_FALL_MAX: i128 = 1000;
/// Short enough to spot a typo (`1ms` meant as `1m`), long enough for a loopback probe.
const INTERVAL_MIN: Duration = Duration::from_millis(10);
/// What `send_expect` may send or expect, and how long a regex may be: a check, not a payload.
const PAYLOAD_BYTES_MAX: usize = 4096;
pub(super) const DRAIN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

impl Walker<'_> {
    /// Reads the health keys of a listener into it.
    pub(super) fn listener_health(&mut self, fields: &Fields, path: &str, listener: &mut Listener) {
        if let Some(node) = fields.get("health") {
            listener.health = self.health(node, &format!("{path}.health"));
            listener.password_file_location = node.get("password_file").map(|n| n.location);
        }
        if let Some(node) = fields.get("passive") {
            listener.passive = self.passive(node, &format!("{path}.passive"));
        }
        if let Some(node) = fields.get("on_all_down") {
            let field = format!("{path}.on_all_down");
            listener.on_all_down = match self.choice(node, &field, &["reject", "use_all"]) {
                Some("use_all") => OnAllDown::UseAll,
                _ => OnAllDown::Reject,
            };
        }
        if let Some(node) = fields.get("slow_start") {
            let field = format!("{path}.slow_start");
            listener.slow_start = self.duration(node, &field).unwrap_or_default();
        }
        if let Some(node) = fields.get("drain_timeout") {
            let field = format!("{path}.drain_timeout");
            listener.drain_timeout = self.duration(node, &field).unwrap_or(DRAIN_TIMEOUT_DEFAULT);
        }
    }

    fn health(&mut self, node: &Node, path: &str) -> Option<ActiveCheck> {
        let fields = self.mapping(node, path, &HEALTH)?;
        let name = match fields.get("check") {
            Some(node) => {
                let names: Vec<&str> = CHECK_KEYS.iter().map(|(n, _)| *n).collect();
                self.choice(node, &format!("{path}.check"), &names)
            }
            None => Some("tcp"),
        };
        let interval = self.positive(&fields, path, "interval", INTERVAL_DEFAULT);
        let timeout = self.positive(&fields, path, "timeout", TIMEOUT_DEFAULT);
        let rise = self.count(&fields, path, "rise", RISE_DEFAULT);
        let fall = self.count(&fields, path, "fall", FALL_DEFAULT);
        let name = name?;
        self.foreign_keys(&fields, path, name);
        let check = match name {
            "send_expect" => self.send_expect(&fields, path)?,
            "http" => self.http(&fields, path)?,
            "redis" => Check::Redis {
                role: self
                    .role(&fields, path, &["master", "replica"])?
                    .map(|r| match r {
                        "master" => RedisRole::Master,
                        _ => RedisRole::Replica,
                    }),
                password_file: self.path(&fields, path, "password_file")?,
            },
            "postgres" => Check::Postgres {
                role: self
                    .role(&fields, path, &["primary", "standby"])?
                    .map(|r| match r {
                        "primary" => PostgresRole::Primary,
                        _ => PostgresRole::Standby,
                    }),
                user: self.text(&fields, path, "user", "postgres")?,
                database: self.text(&fields, path, "database", "postgres")?,
                password_file: self.path(&fields, path, "password_file")?,
            },
            _ => Check::Tcp,
        };
        let single_primary = self.single_primary(&fields, path, &check)?;
        Some(ActiveCheck {
            check,
            interval: interval?,
            timeout: timeout?,
            rise: rise?,
            fall: fall?,
            single_primary,
        })
    }

    /// `single_primary`: true by default with `role: master` / `role: primary`, and only
    /// allowed to be true there (among replicas or without a role there is no primary to keep
    /// single); `false` is always allowed.
    fn single_primary(&mut self, fields: &Fields, path: &str, check: &Check) -> Option<bool> {
        let primary_role = matches!(
            check,
            Check::Redis {
                role: Some(RedisRole::Master),
                ..
            } | Check::Postgres {
                role: Some(PostgresRole::Primary),
                ..
            }
        );
        let Some(node) = fields.get("single_primary") else {
            return Some(primary_role);
        };
        let field = format!("{path}.single_primary");
        let value = self.boolean(node, &field)?;
        if value && !primary_role {
            let message = "single_primary needs role: master (redis) or role: primary (postgres)";
            self.error(node.location, field, message);
            return None;
        }
        Some(value)
    }

    /// Reports each key that belongs to another check than `name`.
    fn foreign_keys(&mut self, fields: &Fields, path: &str, name: &str) {
        let own = CHECK_KEYS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(&[][..], |(_, keys)| *keys);
        for (key, node) in &fields.entries {
            if COMMON_KEYS.contains(key) || own.contains(key) {
                continue;
            }
            let owners: Vec<&str> = CHECK_KEYS
                .iter()
                .filter(|(_, keys)| keys.contains(key))
                .map(|(n, _)| *n)
                .collect();
            let message = format!(
                "{key} applies only to check {}, not {name}",
                owners.join(" or ")
            );
            self.error(node.location, format!("{path}.{key}"), message);
        }
    }

    fn send_expect(&mut self, fields: &Fields, path: &str) -> Option<Check> {
        let send = match (fields.get("send"), fields.get("send_hex")) {
            (Some(text), None) => self.payload(text, &format!("{path}.send"))?,
            (None, Some(hex)) => self.hex(hex, &format!("{path}.send_hex"))?,
            (Some(_), Some(hex)) => {
                let message = "give send or send_hex, not both";
                self.error(hex.location, format!("{path}.send_hex"), message);
                return None;
            }
            (None, None) => {
                let what = "send (text) or send_hex (hex bytes)";
                self.missing(fields.location, &format!("{path}.send"), what);
                return None;
            }
        };
        let expect = match (fields.get("expect"), fields.get("expect_regex")) {
            (Some(text), None) => Expect::Prefix(self.payload(text, &format!("{path}.expect"))?),
            (None, Some(regex)) => {
                Expect::Regex(self.regex(regex, &format!("{path}.expect_regex"))?)
            }
            (Some(_), Some(regex)) => {
                let message = "give expect or expect_regex, not both";
                self.error(regex.location, format!("{path}.expect_regex"), message);
                return None;
            }
            (None, None) => {
                let what = "expect (a reply prefix) or expect_regex";
                self.missing(fields.location, &format!("{path}.expect"), what);
                return None;
            }
        };
        Some(Check::SendExpect { send, expect })
    }

    fn http(&mut self, fields: &Fields, path: &str) -> Option<Check> {
        let url_path = self.text(fields, path, "path", "/")?;
        if !url_path.starts_with('/')
            || url_path
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            let node = fields.get("path")?;
            let message = format!(
                "invalid path {url_path:?}: expected an absolute path like /readyz, without spaces"
            );
            self.error(node.location, format!("{path}.path"), message);
            return None;
        }
        let host = self.text(fields, path, "host", "localhost")?;
        if host.is_empty()
            || host
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            let node = fields.get("host")?;
            let message = format!("invalid host {host:?}: expected a name like example.com");
            self.error(node.location, format!("{path}.host"), message);
            return None;
        }
        let status = match fields.get("status") {
            Some(node) => self.status(node, &format!("{path}.status"))?,
            None => 200..=399,
        };
        let port = match fields.get("port") {
            Some(node) => {
                let port = self.integer(node, &format!("{path}.port"), 1, 65535)?;
                Some(u16::try_from(port).ok()?)
            }
            None => None,
        };
        Some(Check::Http {
            path: url_path,
            host,
            status,
            port,
        })
    }

    /// `status: 200` or `status: "200-399"`, within 100..=599.
    fn status(&mut self, node: &Node, field: &str) -> Option<RangeInclusive<u16>> {
        let parsed = match &node.value {
            Value::Int(n) => u16::try_from(*n).ok().map(|n| n..=n),
            Value::Str(text) => match text.split_once('-') {
                Some((low, high)) => match (low.trim().parse(), high.trim().parse()) {
                    (Ok(low), Ok(high)) => Some(low..=high),
                    _ => None,
                },
                None => text.trim().parse().ok().map(|n: u16| n..=n),
            },
            _ => None,
        };
        match parsed {
            Some(range) if *range.start() >= 100 && *range.end() <= 599 && !range.is_empty() => {
                Some(range)
            }
            _ => {
                let message =
                    "expected a status like 200 or a range like \"200-399\", within 100-599";
                self.error(node.location, field, message);
                None
            }
        }
    }

    fn passive(&mut self, node: &Node, path: &str) -> Passive {
        let mut passive = Passive::default();
        let Some(fields) = self.mapping(node, path, &PASSIVE) else {
            return passive;
        };
        if let Some(node) = fields.get("consecutive_failures") {
            let field = format!("{path}.consecutive_failures");
            // 0 turns passive ejection off.
            if let Some(n) = self.integer(node, &field, 0, 1_000_000) {
                passive.consecutive_failures = n as u32;
            }
        }
        if let Some(node) = fields.get("ejection_time") {
            let field = format!("{path}.ejection_time");
            match self.duration(node, &field) {
                Some(time) if time.is_zero() => {
                    let message = "must be greater than 0 (set consecutive_failures: 0 to turn passive ejection off)";
                    self.error(node.location, field, message);
                }
                Some(time) => passive.ejection_time = time,
                None => {}
            }
        }
        if let Some(node) = fields.get("max_ejection_percent") {
            let field = format!("{path}.max_ejection_percent");
            if let Some(n) = self.integer(node, &field, 0, 100) {
                passive.max_ejection_percent = n as u8;
            }
        }
        passive
    }

    /// A duration key that must be at least `INTERVAL_MIN`, or its default when absent.
    fn positive(
        &mut self,
        fields: &Fields,
        path: &str,
        key: &str,
        default: Duration,
    ) -> Option<Duration> {
        let Some(node) = fields.get(key) else {
            return Some(default);
        };
        let field = format!("{path}.{key}");
        let value = self.duration(node, &field)?;
        if value < INTERVAL_MIN {
            let message = format!("must be at least {}ms", INTERVAL_MIN.as_millis());
            self.error(node.location, field, message);
            return None;
        }
        Some(value)
    }

    /// `rise` or `fall`: 1 to 1000, or the default when absent.
    fn count(&mut self, fields: &Fields, path: &str, key: &str, default: u32) -> Option<u32> {
        match fields.get(key) {
            Some(node) => {
                let n = self.integer(node, &format!("{path}.{key}"), 1, RISE_FALL_MAX)?;
                u32::try_from(n).ok()
            }
            None => Some(default),
        }
    }

    /// `Some(None)` when `role` is absent, `None` after an error.
    fn role<'c>(
        &mut self,
        fields: &Fields,
        path: &str,
        roles: &[&'c str],
    ) -> Option<Option<&'c str>> {
        match fields.get("role") {
            Some(node) => self.choice(node, &format!("{path}.role"), roles).map(Some),
            None => Some(None),
        }
    }

    fn text(&mut self, fields: &Fields, path: &str, key: &str, default: &str) -> Option<String> {
        match fields.get(key) {
            Some(node) => self
                .string(node, &format!("{path}.{key}"))
                .map(str::to_owned),
            None => Some(default.to_owned()),
        }
    }

    /// `Some(None)` when absent; the file is read when the probe is set up, not here.
    fn path(&mut self, fields: &Fields, path: &str, key: &str) -> Option<Option<PathBuf>> {
        match fields.get(key) {
            Some(node) => {
                let field = format!("{path}.{key}");
                let text = self.string(node, &field)?;
                if text.is_empty() {
                    self.error(
                        node.location,
                        field,
                        "expected a file path, found an empty string",
                    );
                    return None;
                }
                Some(Some(PathBuf::from(text)))
            }
            None => Some(None),
        }
    }

    /// Text to send or expect: non-empty, at most `PAYLOAD_BYTES_MAX` bytes. YAML escapes such
    /// as `"\r\n"` in double quotes are already decoded.
    fn payload(&mut self, node: &Node, field: &str) -> Option<Vec<u8>> {
        let text = self.string(node, field)?;
        self.bounded(node, field, text.as_bytes().to_vec())
    }

    fn hex(&mut self, node: &Node, field: &str) -> Option<Vec<u8>> {
        let text = self.string(node, field)?;
        let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        let bytes: Option<Vec<u8>> = if digits.len().is_multiple_of(2) {
            digits
                .chunks(2)
                .map(|pair| {
                    let pair = std::str::from_utf8(pair).ok()?;
                    u8::from_str_radix(pair, 16).ok()
                })
                .collect()
        } else {
            None
        };
        match bytes {
            Some(bytes) => self.bounded(node, field, bytes),
            None => {
                let message =
                    format!("invalid hex {text:?}: expected pairs of hex digits like \"2a310d0a\"");
                self.error(node.location, field, message);
                None
            }
        }
    }

    fn bounded(&mut self, node: &Node, field: &str, bytes: Vec<u8>) -> Option<Vec<u8>> {
        if bytes.is_empty() || bytes.len() > PAYLOAD_BYTES_MAX {
            let message = format!(
                "expected 1 to {PAYLOAD_BYTES_MAX} bytes, found {}",
                bytes.len()
            );
            self.error(node.location, field, message);
            return None;
        }
        Some(bytes)
    }

    fn regex(&mut self, node: &Node, field: &str) -> Option<String> {
        let text = self.string(node, field)?;
        if text.len() > PAYLOAD_BYTES_MAX {
            let message = format!(
                "expected at most {PAYLOAD_BYTES_MAX} bytes, found {}",
                text.len()
            );
            self.error(node.location, field, message);
            return None;
        }
        match regex::bytes::RegexBuilder::new(text)
            .size_limit(1 << 20)
            .build()
        {
            Ok(_) => Some(text.to_owned()),
            Err(e) => {
                // The regex crate's message spans several lines; the first names the problem.
                let reason = e.to_string();
                let reason = reason.lines().last().unwrap_or("invalid").trim();
                let reason = reason.strip_prefix("error: ").unwrap_or(reason).to_owned();
                self.error(node.location, field, format!("invalid regex: {reason}"));
                None
            }
        }
    }
}
