//! The lifecycle of one proxied TCP connection as a sans-IO state machine.
//!
//! A [`Conn`] is driven by events (`handle_*`, each given `now`) and answers with [`Action`]s
//! (`poll_action`) and a deadline (`poll_timeout`). It never touches a socket, a clock or a
//! buffer's bytes: buffers are opaque tokens `B` that the driver maps to memory. The io_uring
//! driver in `sluice-dataplane` runs it today; an epoll driver can run the same machine.
//!
//! What it decides: when to connect and retry, when to arm a receive on each side (at most one
//! in flight, and only while the other side's queue has room: that is the backpressure), what to
//! send next (at most one send in flight per direction, in order, never a byte twice), when to
//! carry a FIN as `shutdown(SHUT_WR)`, how to carry a reset (drain, wait for the acknowledgement,
//! then reset the other side), and the connect, idle, half-close and linger timeouts. When the
//! driver moves a direction's waiting bytes to other buffers (`rehome`, `handle_sent_rehomed`:
//! it takes a stalled direction out of its shared pool), the machine keeps their order and
//! releases each buffer it gave up.
//!
//! What it does not do: choose the backend (the driver asks `sluice-balance` on
//! [`Action::Connect`]), count metrics, or know about listeners.
//!
//! States: connecting -> established -> (half-closed) -> lingering (carrying a reset) -> closed.

#![forbid(unsafe_code)]

mod conn;
mod queue;

pub use conn::{
    Action, CloseKind, CloseReason, Conn, ConnectError, Dir, Limits, RecvOutcome, SendOutcome, Side,
};
pub use queue::Chunk;
