//! How the kernel notices a peer that vanished: `keepalive` (probes on idle connections) and
//! `timeouts.user_timeout` (a bound on unacknowledged bytes). Both are TCP socket options, so
//! their limits are the kernel's: keepalive counts whole seconds, TCP_USER_TIMEOUT milliseconds
//! in a signed int.

use std::time::Duration;

use super::{Schema, Walker};
use crate::Keepalive;
use crate::tree::Node;

pub(super) const KEEPALIVE: Schema = Schema {
    supported: &["time", "interval", "probes"],
    unsupported: &[],
};

/// TCP_KEEPIDLE and TCP_KEEPINTVL accept at most this many seconds (`MAX_TCP_KEEPIDLE`).
const KEEPALIVE_SECONDS_MAX: u64 = 32_767;
/// TCP_KEEPCNT accepts at most this many probes (`MAX_TCP_KEEPCNT`).
const PROBES_MAX: i128 = 127;
/// TCP_USER_TIMEOUT takes milliseconds in a signed int.
const USER_TIMEOUT_MAX: Duration = Duration::from_millis(i32::MAX as u64);

impl Walker<'_> {
    /// `keepalive: { time, interval, probes }`; the defaults for what is absent or wrong.
    pub(super) fn keepalive(&mut self, node: &Node, path: &str) -> Keepalive {
        let mut keepalive = Keepalive::default();
        let Some(fields) = self.mapping(node, path, &KEEPALIVE) else {
            return keepalive;
        };
        if let Some(node) = fields.get("time") {
            let field = format!("{path}.time");
            if let Some(time) = self.duration(node, &field) {
                if time.is_zero() {
                    keepalive.time = Duration::ZERO;
                } else if let Some(time) = self.keepalive_seconds(node, &field, time) {
                    keepalive.time = time;
                }
            }
        }
        if let Some(node) = fields.get("interval") {
            let field = format!("{path}.interval");
            if let Some(interval) = self.duration(node, &field) {
                if interval.is_zero() {
                    let message =
                        format!("must be at least 1s; to turn keepalive off, write {path}.time: 0");
                    self.error(node.location, field, message);
                } else if let Some(interval) = self.keepalive_seconds(node, &field, interval) {
                    keepalive.interval = interval;
                }
            }
        }
        if let Some(node) = fields.get("probes") {
            let field = format!("{path}.probes");
            if let Some(probes) = self.integer(node, &field, 1, PROBES_MAX) {
                keepalive.probes = probes as u32;
            }
        }
        keepalive
    }

    /// `timeouts.user_timeout`: zero (the kernel's default) or up to what the kernel takes.
    pub(super) fn user_timeout(&mut self, node: &Node, field: &str) -> Duration {
        let Some(timeout) = self.duration(node, field) else {
            return Duration::ZERO;
        };
        if timeout > USER_TIMEOUT_MAX {
            let message = format!(
                "must be at most {}h (TCP_USER_TIMEOUT takes at most 2^31 - 1 ms)",
                USER_TIMEOUT_MAX.as_secs() / 3600
            );
            self.error(node.location, field, message);
            return Duration::ZERO;
        }
        timeout
    }

    /// A keepalive duration that is not zero: whole seconds, 1s to 32767s.
    fn keepalive_seconds(
        &mut self,
        node: &Node,
        field: &str,
        duration: Duration,
    ) -> Option<Duration> {
        let message = if duration.subsec_nanos() != 0 {
            format!(
                "{duration:?} is not a whole number of seconds: the kernel counts keepalive \
                 in seconds (write e.g. 1s, or 0 for time to turn keepalive off)"
            )
        } else if duration.as_secs() > KEEPALIVE_SECONDS_MAX {
            format!(
                "must be at most {KEEPALIVE_SECONDS_MAX}s (the kernel's limit), found {}s",
                duration.as_secs()
            )
        } else {
            return Some(duration);
        };
        self.error(node.location, field, message);
        None
    }
}
