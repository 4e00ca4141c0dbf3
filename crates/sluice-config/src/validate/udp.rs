//! The keys that only a `udp` listener has (sessions), and the TCP-only keys a `udp` listener
//! must not carry: each misplaced key is an error at its own line.

use std::time::Duration;

use super::{Fields, Walker};
use crate::tree::Value;
use crate::{Listener, OnMaxSessions, Protocol, UdpSettings};

/// Keys of sessions, meaningful only for `protocol: udp`.
const UDP_KEYS: &[&str] = &[
    "max_sessions",
    "on_max_sessions",
    "responses",
    "requests",
    "per_packet",
];

/// Listener keys of connections, meaningful only for `protocol: tcp`.
const TCP_KEYS: &[&str] = &[
    "max_connections",
    "on_max_connections",
    "retries",
    "keepalive",
];

/// `timeouts` keys of connections, meaningful only for `protocol: tcp`.
const TCP_TIMEOUTS: &[&str] = &["connect", "half_close", "user_timeout"];

/// A UDP session that nobody configured an idle timeout for ends after this (DESIGN.md).
const UDP_IDLE_DEFAULT: Duration = Duration::from_secs(60);
const MAX_SESSIONS_MAX: i128 = 10_000_000;
const LIMIT_MAX: i128 = 1_000_000;

impl Walker<'_> {
    /// Reads the udp-only keys into a udp listener, and reports keys of the other protocol.
    pub(super) fn listener_protocol_keys(
        &mut self,
        fields: &Fields,
        path: &str,
        listener: &mut Listener,
    ) {
        match listener.protocol {
            Protocol::Tcp => self.foreign(fields, path, UDP_KEYS, "udp"),
            Protocol::Udp => {
                self.foreign(fields, path, TCP_KEYS, "tcp");
                self.foreign_timeouts(fields, path);
                if !self.idle_given(fields) {
                    listener.timeouts.idle = UDP_IDLE_DEFAULT;
                }
                listener.udp = self.udp(fields, path);
            }
        }
    }

    fn foreign(&mut self, fields: &Fields, path: &str, keys: &[&str], protocol: &str) {
        for (key, node) in &fields.entries {
            if keys.contains(key) {
                let message = format!("{key} applies only to protocol {protocol}");
                self.error(node.location, format!("{path}.{key}"), message);
            }
        }
    }

    fn foreign_timeouts(&mut self, fields: &Fields, path: &str) {
        let Some(Value::Map(entries)) = fields.get("timeouts").map(|n| &n.value) else {
            return;
        };
        for (key, _) in entries {
            if let Value::Str(name) = &key.value
                && TCP_TIMEOUTS.contains(&name.as_str())
            {
                let message = format!("timeouts.{name} applies only to protocol tcp");
                self.error(key.location, format!("{path}.timeouts.{name}"), message);
            }
        }
    }

    /// Whether `timeouts.idle` is written (a udp listener's default differs from tcp's).
    fn idle_given(&self, fields: &Fields) -> bool {
        let Some(Value::Map(entries)) = fields.get("timeouts").map(|n| &n.value) else {
            return false;
        };
        entries
            .iter()
            .any(|(key, _)| matches!(&key.value, Value::Str(name) if name == "idle"))
    }

    fn udp(&mut self, fields: &Fields, path: &str) -> UdpSettings {
        let mut udp = UdpSettings::default();
        if let Some(node) = fields.get("max_sessions") {
            let field = format!("{path}.max_sessions");
            if let Some(n) = self.integer(node, &field, 1, MAX_SESSIONS_MAX) {
                udp.max_sessions = n as u32;
            }
        }
        if let Some(node) = fields.get("on_max_sessions") {
            let field = format!("{path}.on_max_sessions");
            udp.on_max_sessions = match self.choice(node, &field, &["drop", "evict_lru"]) {
                Some("evict_lru") => OnMaxSessions::EvictLru,
                _ => OnMaxSessions::Drop,
            };
        }
        for (key, value) in [
            ("responses", &mut udp.responses),
            ("requests", &mut udp.requests),
        ] {
            if let Some(node) = fields.get(key)
                && let Some(n) = self.integer(node, &format!("{path}.{key}"), 0, LIMIT_MAX)
            {
                *value = n as u32;
            }
        }
        if let Some(node) = fields.get("per_packet") {
            udp.per_packet = self
                .boolean(node, &format!("{path}.per_packet"))
                .unwrap_or(false);
        }
        if udp.per_packet {
            for key in ["responses", "requests", "on_max_sessions", "max_sessions"] {
                if let Some(node) = fields.get(key) {
                    let message =
                        format!("{key} has no effect with per_packet: true (no sessions)");
                    self.error(node.location, format!("{path}.{key}"), message);
                }
            }
        }
        udp
    }
}
