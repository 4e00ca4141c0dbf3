//! systemd's readiness protocol (`Type=notify`, sd_notify(3)): datagrams of `KEY=VALUE` lines to
//! the socket named by `$NOTIFY_SOCKET`, a path or, with a leading `@`, an abstract name.
//!
//! The variable is read once at start and the socket kept; without it every call does nothing.
//! A notification that cannot be sent is logged at debug and otherwise ignored: the service
//! manager is told what it can be told, and serving never depends on it.
//!
//! The variable stays in the environment: removing it (`std::env::remove_var`) is `unsafe` in
//! this edition and the crate forbids `unsafe`; Sluice starts no child process that could
//! inherit it.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use sd_notify::NotifyState;

/// Where notifications go; [`Notifier::none`] when Sluice does not run under `Type=notify`.
pub(crate) struct Notifier {
    /// An unbound socket and the manager's address. Each message is addressed anew (not a
    /// connected socket), so a manager that re-creates its socket (`systemctl daemon-reexec`)
    /// keeps receiving.
    socket: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET`, or one that does nothing when it is unset or unusable.
    pub(crate) fn from_env() -> Self {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self::none();
        };
        let name = name.to_string_lossy().into_owned();
        match open(&name) {
            Ok(socket) => Self {
                socket: Some(socket),
            },
            Err(e) => {
                tracing::debug!(notify_socket = %name, error = e.to_string(), "cannot use NOTIFY_SOCKET; not notifying");
                Self::none()
            }
        }
    }

    pub(crate) fn none() -> Self {
        Self { socket: None }
    }

    /// What Sluice is doing, for `systemctl status`.
    pub(crate) fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// Serving (start-up done, or a reload ended, applied or refused).
    pub(crate) fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A reload starts. systemd (253 and later) needs the monotonic clock in the same message
    /// to tell this reload from an earlier one.
    pub(crate) fn reloading(&self, status: &str) {
        if self.socket.is_none() {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, NotifyState::Status(status)]),
            Err(e) => {
                tracing::debug!(
                    error = e.to_string(),
                    "cannot read CLOCK_MONOTONIC; RELOADING=1 without it"
                );
                self.send(&[NotifyState::Reloading, NotifyState::Status(status)]);
            }
        }
    }

    /// Shutting down.
    pub(crate) fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    fn send(&self, states: &[NotifyState]) {
        let Some((socket, to)) = &self.socket else {
            return;
        };
        let mut message = String::new();
        for state in states {
            message.push_str(&state.to_string());
            message.push('\n');
        }
        // Non-blocking: a manager that does not read costs a debug line, never a stall.
        if let Err(e) = socket.send_to_addr(message.as_bytes(), to) {
            tracing::debug!(
                error = e.to_string(),
                message = message.trim_end(),
                "notification not sent"
            );
        }
    }
}

/// A non-blocking unbound datagram socket and the address `name` gives (`/path` or
/// `@abstract`).
fn open(name: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let to = match name.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
        None => SocketAddr::from_pathname(name)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, to))
}
