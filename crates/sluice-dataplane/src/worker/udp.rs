//! UDP listeners on a worker: one SO_REUSEPORT socket per listener (so the kernel keeps a flow
//! on one core), a multishot `recvmsg` into the datagram pool, and a `sluice-flow` session table
//! per listener. A session owns a udp socket connected to its backend, so the kernel sorts the
//! replies (and reports an ICMP error as a receive error); replies go back to the client with
//! `sendmsg` from the address the client sent to.
//!
//! A datagram is forwarded from the buffer it was received into: one receive, one send, the
//! buffer recycled when the send completes. Nothing is split or merged; a datagram longer than a
//! buffer is dropped and counted, never forwarded cut.
//!
//! Every operation here carries `DATAGRAM_OP` in its user data and names an entry of the worker's
//! [`UdpOps`] table, which says what the operation was and holds what must outlive it (a closed
//! session's socket stays open until its receive's last completion).
//!
//! No socket here is dropped directly: each goes to [`sluice_uring::Uring::close_after_submit`],
//! because a datagram queued for a session that then ended (an ICMP error in the same batch)
//! still names its fd, and a new session could take the number before the send is submitted
//! (`crates/sluice/tests/udp_hardening.rs`, `replies_reach_only_the_client_that_sent_the_request`).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use sluice_balance::{ActiveGuard, BackendId, ClientAddr};
use sluice_flow::{FlowId, FlowKey, FlowTable, Insert, Limits, Session, SessionState};
use sluice_uring::{Completion, DATAGRAM_OP};
use socket2::Socket;

use super::{Op, Worker, report, user_data};
use crate::counters::{UdpCounters, UdpDrop};
use crate::{BackendEvent, UdpPlan, sockets};

/// Datagram buffers per worker: each holds one datagram of up to 64 KiB and its recvmsg header.
/// Mapped, not touched: only the buffers traffic cycles through cost memory.
pub(super) const DATAGRAM_BUFFERS: u16 = 256;
/// A 65535-byte datagram, the recvmsg header, a sockaddr_storage and a control message.
pub(super) const DATAGRAM_BUFFER_SIZE: u32 = 65536 + 512;
/// Datagram buffers kept in the kernel's ring.
const DATAGRAM_RING_LOW: u32 = 64;
/// How long a listener receive that failed (other than for want of buffers) waits to re-arm.
const UDP_REARM_PAUSE: Duration = Duration::from_millis(100);

/// One udp listener of this worker.
pub(super) struct UdpListener {
    pub socket: Socket,
    /// The listener's `recvmsg` is armed.
    pub armed: bool,
    pub bind: SocketAddr,
    pub plan: UdpPlan,
    pub table: FlowTable<Peer>,
    /// `per_packet`: one socket per backend, shared by every datagram to it.
    pub shared: Vec<Option<SharedSocket>>,
    /// Receives that ended for want of datagram buffers, re-armed once some are back
    /// (`feed_udp`), oldest first. Re-armed at once, they fail at once for as long as the pool
    /// is empty: the worker would spin.
    starved: Vec<Starved>,
}

/// A receive of a udp listener's that waits for datagram buffers.
#[derive(Debug, Clone, Copy)]
enum Starved {
    Session(FlowId),
    Shared(BackendId),
}

/// A session's side toward its backend.
pub(super) struct Peer {
    socket: Socket,
    backend: BackendId,
    /// The snapshot generation the backend was picked in: when it changes, the backend is checked
    /// again on the session's next datagram.
    generation: u64,
    /// Counts the session in the backend's active count (least_connections, power_of_two).
    guard: ActiveGuard,
    /// The `UdpOps` entry of the session's armed receive.
    recv_op: Option<u32>,
}

/// A `per_packet` socket toward one backend.
pub(super) struct SharedSocket {
    socket: Socket,
    recv_op: Option<u32>,
}

/// A received datagram, as far as forwarding it needs: where it came from and went to, and where
/// its payload lies in its buffer.
struct Received {
    source: SocketAddr,
    local: Option<std::net::IpAddr>,
    offset: u32,
    len: u32,
}

/// What one datagram operation is.
enum UdpOp {
    ListenerRecv {
        listener: usize,
    },
    SessionRecv {
        listener: usize,
        flow: FlowId,
        /// The session's socket once the session is closed: kept open until this receive's last
        /// completion, so that its fd cannot be reused under it.
        closed: Option<Socket>,
    },
    SharedRecv {
        listener: usize,
        backend: BackendId,
        /// As for `SessionRecv`: the socket, once its listener stopped.
        closed: Option<Socket>,
    },
    SendToBackend {
        listener: usize,
        buf: u16,
    },
    SendToClient {
        listener: usize,
        buf: u16,
    },
}

/// What a completion needs to know of its operation (without the socket it may hold).
#[derive(Clone, Copy)]
enum OpKind {
    ListenerRecv {
        listener: usize,
    },
    SessionRecv {
        listener: usize,
        flow: FlowId,
        closed: bool,
    },
    SharedRecv {
        listener: usize,
        backend: BackendId,
        closed: bool,
    },
    Send {
        listener: usize,
        buf: u16,
    },
}

impl UdpOp {
    fn kind(&self) -> OpKind {
        match self {
            UdpOp::ListenerRecv { listener } => OpKind::ListenerRecv {
                listener: *listener,
            },
            UdpOp::SessionRecv {
                listener,
                flow,
                closed,
            } => OpKind::SessionRecv {
                listener: *listener,
                flow: *flow,
                closed: closed.is_some(),
            },
            UdpOp::SharedRecv {
                listener,
                backend,
                closed,
            } => OpKind::SharedRecv {
                listener: *listener,
                backend: *backend,
                closed: closed.is_some(),
            },
            UdpOp::SendToBackend { listener, buf } | UdpOp::SendToClient { listener, buf } => {
                OpKind::Send {
                    listener: *listener,
                    buf: *buf,
                }
            }
        }
    }
}

/// The datagram operations in flight, by index (the index is the user data).
#[derive(Default)]
pub(super) struct UdpOps {
    ops: Vec<Option<UdpOp>>,
    free: Vec<u32>,
}

impl UdpOps {
    fn insert(&mut self, op: UdpOp) -> u64 {
        let index = match self.free.pop() {
            Some(index) => {
                self.ops[index as usize] = Some(op);
                index
            }
            None => {
                self.ops.push(Some(op));
                (self.ops.len() - 1) as u32
            }
        };
        DATAGRAM_OP | u64::from(index)
    }

    fn take(&mut self, index: u32) -> Option<UdpOp> {
        let op = self.ops.get_mut(index as usize)?.take();
        if op.is_some() {
            self.free.push(index);
        }
        op
    }

    fn get_mut(&mut self, index: u32) -> Option<&mut UdpOp> {
        self.ops.get_mut(index as usize)?.as_mut()
    }
}

/// The `UdpOps` index in a datagram operation's user data.
fn op_index(user_data: u64) -> u32 {
    (user_data & !DATAGRAM_OP) as u32
}

impl UdpListener {
    pub(super) fn new(socket: Socket, bind: SocketAddr, plan: UdpPlan, capacity: u32) -> Self {
        let policy = if plan.evict_lru {
            sluice_flow::OnMaxSessions::EvictLru
        } else {
            sluice_flow::OnMaxSessions::Drop
        };
        UdpListener {
            socket,
            armed: false,
            bind,
            plan,
            table: FlowTable::new(capacity, policy),
            shared: Vec::new(),
            starved: Vec::new(),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            requests: self.plan.requests,
            responses: self.plan.responses,
        }
    }

    /// The local address a datagram to this listener was sent to: the listener's own when it is
    /// bound to one, the one `IP_PKTINFO` reported when it is bound to a wildcard.
    fn local(&self, reported: Option<std::net::IpAddr>) -> SocketAddr {
        match reported {
            Some(ip) if self.bind.ip().is_unspecified() => SocketAddr::new(ip, self.bind.port()),
            _ => self.bind,
        }
    }
}

impl Worker {
    /// Arms the listener's multishot `recvmsg`.
    pub(super) fn arm_udp_listener(&mut self, listener: usize) {
        let Some(Some(l)) = self.udp.get_mut(listener) else {
            return;
        };
        if l.armed {
            return;
        }
        l.armed = true;
        let fd = l.socket.as_raw_fd();
        let ud = self.udp_ops.insert(UdpOp::ListenerRecv { listener });
        self.ring.recvmsg_multi(fd, ud);
    }

    /// One completion of a datagram operation.
    pub(super) fn udp_completed(&mut self, c: Completion, now: Instant) {
        let index = op_index(c.user_data);
        // A multishot receive keeps its entry while the kernel says more will come; the entry
        // (and a closed socket it holds) goes with the last completion.
        let ends = !c.more();
        let Some(op) = self.udp_ops.get_mut(index).map(|op| op.kind()) else {
            if let Some(buf) = c.buffer() {
                self.ring.recycle_datagram(buf);
            }
            return;
        };
        if ends && let Some(op) = self.udp_ops.take(index) {
            self.release_op(op);
        }
        match op {
            OpKind::ListenerRecv { listener } => {
                if ends && let Some(Some(l)) = self.udp.get_mut(listener) {
                    l.armed = false;
                }
                self.datagram_from_client(listener, c, now);
                if ends && self.phase < crate::DRAINING {
                    match c.result {
                        // The pool ran dry: re-armed once buffers are back (`feed_udp`).
                        r if r == -libc::ENOBUFS => self.udp_starved = true,
                        r if r >= 0 => self.arm_udp_listener(listener),
                        // Never re-armed in a loop on a persistent error: after a pause.
                        r => {
                            tracing::warn!(
                                errno = -r,
                                "udp listener receive failed; retrying in 100 ms"
                            );
                            self.udp_rearm_at = Some(now + UDP_REARM_PAUSE);
                        }
                    }
                }
            }
            OpKind::SessionRecv {
                listener,
                flow,
                closed,
            } => {
                if closed {
                    // The session is gone; this receive was its socket's last word.
                    if let Some(buf) = c.buffer() {
                        self.ring.recycle_datagram(buf);
                    }
                    return;
                }
                self.datagram_from_backend(listener, flow, c, ends, now);
            }
            OpKind::SharedRecv {
                listener,
                backend,
                closed,
            } => {
                // Replies on a per_packet socket belong to no session.
                if let Some(buf) = c.buffer() {
                    self.ring.recycle_datagram(buf);
                    self.udp_counters(listener).dropped[UdpDrop::Unclaimed.index()].add(1);
                }
                if ends && !closed {
                    if let Some(Some(l)) = self.udp.get_mut(listener)
                        && let Some(Some(shared)) = l.shared.get_mut(backend.index())
                    {
                        shared.recv_op = None;
                    }
                    match c.result {
                        r if r == -libc::ECANCELED => {}
                        r if r == -libc::ENOBUFS => {
                            self.starve(listener, Starved::Shared(backend));
                        }
                        _ => self.arm_shared(listener, backend),
                    }
                }
            }
            OpKind::Send { listener, buf } => {
                self.ring.recycle_datagram(buf);
                if c.result < 0 {
                    self.udp_counters(listener).dropped[UdpDrop::SendFailed.index()].add(1);
                }
            }
        }
    }

    /// The datagram a `recvmsg` left in `buf` (`len` bytes); `None` (the buffer recycled, a
    /// truncated datagram counted) when there is nothing to forward.
    fn received(&mut self, listener: usize, buf: u16, len: u32) -> Option<Received> {
        let parsed = self.ring.datagram(buf, len).map(|d| {
            let received = Received {
                source: d.source,
                local: d.local,
                offset: d.payload_offset,
                len: d.payload.len() as u32,
            };
            (received, d.truncated)
        });
        match parsed {
            Some((received, false)) => Some(received),
            Some((_, true)) => {
                self.ring.recycle_datagram(buf);
                self.udp_counters(listener).dropped[UdpDrop::Truncated.index()].add(1);
                None
            }
            None => {
                self.ring.recycle_datagram(buf);
                None
            }
        }
    }

    fn udp_counters(&self, listener: usize) -> &UdpCounters {
        &self.counters.listeners[listener].udp
    }

    /// A datagram from a client: find or make its session and send it to the backend.
    fn datagram_from_client(&mut self, listener: usize, c: Completion, now: Instant) {
        let Some(buf) = c.buffer() else {
            return;
        };
        let Some(received) = self.received(listener, buf, c.result.max(0) as u32) else {
            return;
        };
        let Received {
            source,
            local,
            offset,
            len,
        } = received;
        let Some(Some(l)) = self.udp.get(listener) else {
            self.ring.recycle_datagram(buf);
            return;
        };
        let key = FlowKey::new(source, l.local(local));
        let fd = if l.plan.per_packet {
            self.per_packet_socket(listener, source)
        } else {
            self.session_socket(listener, key, now)
        };
        let Some(fd) = fd else {
            self.ring.recycle_datagram(buf);
            return;
        };
        let counters = &self.counters.listeners[listener].udp;
        counters.datagrams_to_backend.add(1);
        counters.bytes_to_backend.add(u64::from(len));
        let ud = self.udp_ops.insert(UdpOp::SendToBackend { listener, buf });
        self.ring.send_datagram(fd, buf, offset, len, ud);
    }

    /// The socket of `key`'s session, made (or moved to a live backend) as needed; `None` when
    /// the datagram is dropped (counted).
    fn session_socket(&mut self, listener: usize, key: FlowKey, now: Instant) -> Option<i32> {
        let generation = self.snapshot.generation;
        let Some(Some(l)) = self.udp.get_mut(listener) else {
            return None;
        };
        let limits = l.limits();
        if let Some(session) = l.table.get_mut(&key, now) {
            let peer = &session.payload;
            let stale = peer.generation != generation || peer.guard.load().is_drained();
            let usable = !stale || {
                let backends = &self.snapshot.listeners[listener].backends;
                backends
                    .get(peer.backend.index())
                    .is_some_and(|b| b.eligible() && !b.load.is_drained())
            };
            if usable {
                session.payload.generation = generation;
                let fd = session.payload.socket.as_raw_fd();
                if session.record_request(limits) != SessionState::Open {
                    // It took its last request; replies still come back by its id.
                }
                return Some(fd);
            }
            // Its backend went down or is drained: end it; the datagram starts a new session.
            let id = session.id();
            self.close_session(listener, id);
        }
        // A full table under `drop` refuses the flow: find out before making a socket.
        if let Some(Some(l)) = self.udp.get(listener)
            && !l.plan.evict_lru
            && l.table.len() >= l.table.capacity()
        {
            self.udp_counters(listener).dropped[UdpDrop::SessionsFull.index()].add(1);
            return None;
        }
        let peer = self.new_peer(listener, key.client())?;
        let fd = peer.socket.as_raw_fd();
        let l = self.udp.get_mut(listener)?.as_mut()?;
        let (id, evicted) = match l.table.insert(key, peer, now) {
            Insert::Inserted { id } => (id, None),
            Insert::Evicted { id, evicted } => (id, Some(evicted)),
            Insert::Full { payload } => {
                self.release_peer(payload);
                self.udp_counters(listener).dropped[UdpDrop::SessionsFull.index()].add(1);
                return None;
            }
        };
        if let Some(session) = l.table.get_id_mut(id, now) {
            session.record_request(limits);
        }
        let counters = &self.counters.listeners[listener].udp;
        counters.sessions_created.add(1);
        counters.sessions_active.add(1);
        if let Some(evicted) = evicted {
            counters.sessions_evicted.add(1);
            counters.sessions_active.sub(1);
            self.release_peer(evicted.payload);
        }
        let ud = self.udp_ops.insert(UdpOp::SessionRecv {
            listener,
            flow: id,
            closed: None,
        });
        if let Some(Some(l)) = self.udp.get_mut(listener)
            && let Some(session) = l.table.get_id_mut(id, now)
        {
            session.payload.recv_op = Some(op_index(ud));
        }
        self.ring.recvmsg_multi(fd, ud);
        Some(fd)
    }

    /// A socket connected to the backend the listener's algorithm picks for `client`.
    fn new_peer(&mut self, listener: usize, client: SocketAddr) -> Option<Peer> {
        let backends = self.snapshot.listeners.get(listener)?;
        let Some(id) = self.pickers[listener].pick(backends, ClientAddr(client), &[]) else {
            self.udp_counters(listener).dropped[UdpDrop::NoBackend.index()].add(1);
            return None;
        };
        let backend = &backends.backends[id.index()];
        match sockets::udp_backend_socket(backend.addr) {
            Ok(socket) => Some(Peer {
                socket,
                backend: id,
                generation: self.snapshot.generation,
                guard: backend.open(),
                recv_op: None,
            }),
            Err(e) => {
                tracing::debug!(error = e.to_string(), backend = %backend.addr, "udp socket toward a backend");
                self.udp_counters(listener).dropped[UdpDrop::Socket.index()].add(1);
                None
            }
        }
    }

    /// `per_packet`: the shared socket toward the backend picked for this datagram.
    fn per_packet_socket(&mut self, listener: usize, client: SocketAddr) -> Option<i32> {
        let backends = self.snapshot.listeners.get(listener)?;
        let Some(id) = self.pickers[listener].pick(backends, ClientAddr(client), &[]) else {
            self.udp_counters(listener).dropped[UdpDrop::NoBackend.index()].add(1);
            return None;
        };
        let addr = backends.backends[id.index()].addr;
        let l = self.udp.get_mut(listener)?.as_mut()?;
        if l.shared.len() <= id.index() {
            l.shared.resize_with(id.index() + 1, || None);
        }
        if l.shared[id.index()].is_none() {
            match sockets::udp_backend_socket(addr) {
                Ok(socket) => {
                    l.shared[id.index()] = Some(SharedSocket {
                        socket,
                        recv_op: None,
                    });
                    self.arm_shared(listener, id);
                }
                Err(_) => {
                    self.udp_counters(listener).dropped[UdpDrop::Socket.index()].add(1);
                    return None;
                }
            }
        }
        let l = self.udp.get(listener)?.as_ref()?;
        l.shared[id.index()].as_ref().map(|s| s.socket.as_raw_fd())
    }

    /// Keeps a receive armed on a `per_packet` socket, so that replies are read and dropped
    /// rather than filling its receive queue.
    fn arm_shared(&mut self, listener: usize, backend: BackendId) {
        let Some(Some(l)) = self.udp.get_mut(listener) else {
            return;
        };
        let Some(Some(shared)) = l.shared.get_mut(backend.index()) else {
            return;
        };
        if shared.recv_op.is_some() {
            return;
        }
        let fd = shared.socket.as_raw_fd();
        let ud = self.udp_ops.insert(UdpOp::SharedRecv {
            listener,
            backend,
            closed: None,
        });
        if let Some(Some(l)) = self.udp.get_mut(listener)
            && let Some(Some(shared)) = l.shared.get_mut(backend.index())
        {
            shared.recv_op = Some(op_index(ud));
        }
        self.ring.recvmsg_multi(fd, ud);
    }

    /// A completion of a session's receive: a reply to relay, or the end of the receive.
    fn datagram_from_backend(
        &mut self,
        listener: usize,
        flow: FlowId,
        c: Completion,
        ends: bool,
        now: Instant,
    ) {
        let alive = self
            .udp
            .get(listener)
            .and_then(Option::as_ref)
            .is_some_and(|l| l.table.get_id(flow).is_some());
        if !alive {
            if let Some(buf) = c.buffer() {
                self.ring.recycle_datagram(buf);
            }
            return;
        }
        if c.result < 0 {
            if ends {
                self.session_recv_ended(listener, flow, c.result);
            }
            return;
        }
        if let Some(buf) = c.buffer() {
            self.relay_to_client(listener, flow, buf, c.result as u32, now);
        }
        if ends && self.session_alive(listener, flow) {
            // An empty datagram (or a full pool) ends a multishot receive: arm it again.
            self.rearm_session(listener, flow);
        }
    }

    fn session_alive(&self, listener: usize, flow: FlowId) -> bool {
        self.udp
            .get(listener)
            .and_then(Option::as_ref)
            .is_some_and(|l| l.table.get_id(flow).is_some())
    }

    /// A session's receive ended with an error: ICMP unreachable (the backend's port is closed,
    /// a passive health signal) ends the session; an empty pool re-arms once buffers are back.
    fn session_recv_ended(&mut self, listener: usize, flow: FlowId, result: i32) {
        if result == -libc::ENOBUFS {
            if let Some(Some(l)) = self.udp.get_mut(listener)
                && let Some(session) = l.table.get_id_mut(flow, Instant::now())
            {
                session.payload.recv_op = None;
            }
            self.starve(listener, Starved::Session(flow));
            return;
        }
        if let Some(Some(l)) = self.udp.get(listener)
            && let Some(session) = l.table.get_id(flow)
        {
            let guard = &session.payload.guard;
            if result == -libc::ECONNREFUSED || result == -libc::EHOSTUNREACH {
                guard.load().mark_failing();
                report(&self.config, listener, guard, BackendEvent::ConnectFailed);
            }
        }
        if let Some(Some(l)) = self.udp.get_mut(listener)
            && let Some(session) = l.table.get_id_mut(flow, Instant::now())
        {
            session.payload.recv_op = None;
        }
        self.close_session(listener, flow);
    }

    fn rearm_session(&mut self, listener: usize, flow: FlowId) {
        let Some(Some(l)) = self.udp.get(listener) else {
            return;
        };
        let Some(session) = l.table.get_id(flow) else {
            return;
        };
        let fd = session.payload.socket.as_raw_fd();
        let ud = self.udp_ops.insert(UdpOp::SessionRecv {
            listener,
            flow,
            closed: None,
        });
        if let Some(Some(l)) = self.udp.get_mut(listener)
            && let Some(session) = l.table.get_id_mut(flow, Instant::now())
        {
            session.payload.recv_op = Some(op_index(ud));
        }
        self.ring.recvmsg_multi(fd, ud);
    }

    /// Relays a backend's reply to the session's client, from the address the client sent to.
    fn relay_to_client(&mut self, listener: usize, flow: FlowId, buf: u16, len: u32, now: Instant) {
        let Some(Received {
            offset,
            len: payload_len,
            ..
        }) = self.received(listener, buf, len)
        else {
            return;
        };
        let Some(Some(l)) = self.udp.get_mut(listener) else {
            self.ring.recycle_datagram(buf);
            return;
        };
        let limits = l.limits();
        let wildcard = l.bind.ip().is_unspecified();
        let fd = l.socket.as_raw_fd();
        let Some(session) = l.table.get_id_mut(flow, now) else {
            self.ring.recycle_datagram(buf);
            return;
        };
        let key = session.key();
        let finished = session.record_response(limits) == SessionState::Finished;
        let source = wildcard.then_some(key.local().ip());
        let counters = &self.counters.listeners[listener].udp;
        counters.datagrams_to_client.add(1);
        counters.bytes_to_client.add(u64::from(payload_len));
        let ud = self.udp_ops.insert(UdpOp::SendToClient { listener, buf });
        self.ring
            .sendmsg_datagram(fd, buf, offset, payload_len, key.client(), source, ud);
        if finished {
            self.close_session(listener, flow);
        }
    }

    /// Removes a session from its table and closes its backend socket (after its receive's
    /// last completion).
    pub(super) fn close_session(&mut self, listener: usize, flow: FlowId) {
        let Some(Some(l)) = self.udp.get_mut(listener) else {
            return;
        };
        let Some(session) = l.table.remove_id(flow) else {
            return;
        };
        let counters = &self.counters.listeners[listener].udp;
        counters.sessions_closed.add(1);
        counters.sessions_active.sub(1);
        self.release_peer(session.payload);
    }

    /// Cancels a peer's receive and hands its socket to that receive's entry, which closes it
    /// at the last completion. The guard uncounts the backend now.
    fn release_peer(&mut self, peer: Peer) {
        let Peer {
            socket, recv_op, ..
        } = peer;
        match recv_op.and_then(|op| self.udp_ops.get_mut(op).map(|entry| (op, entry))) {
            Some((op, UdpOp::SessionRecv { closed, .. })) => {
                *closed = Some(socket);
                // By the receive's own user data, which the kernel finds directly: a cancel by
                // fd scans every armed request, which made each session end cost in proportion
                // to the sessions open (found by the 100k-flow eviction test).
                self.ring
                    .cancel(DATAGRAM_OP | u64::from(op), user_data(Op::Cancel, 0));
            }
            // No receive in flight; a send naming the fd may still be queued.
            _ => self.ring.close_after_submit(socket),
        }
    }

    /// What a finished operation held: a closed session's or `per_packet` socket.
    fn release_op(&mut self, op: UdpOp) {
        if let UdpOp::SessionRecv {
            closed: Some(socket),
            ..
        }
        | UdpOp::SharedRecv {
            closed: Some(socket),
            ..
        } = op
        {
            self.ring.close_after_submit(socket);
        }
    }

    /// Ends the sessions idle for their listener's `timeouts.idle`.
    pub(super) fn expire_udp(&mut self, now: Instant) {
        for listener in 0..self.udp.len() {
            while let Some(Some(l)) = self.udp.get_mut(listener) {
                let idle = l.plan.idle_timeout;
                if idle.is_zero() {
                    break;
                }
                let Some(session) = l.table.pop_expired(now, idle) else {
                    break;
                };
                let counters = &self.counters.listeners[listener].udp;
                counters.sessions_expired.add(1);
                counters.sessions_active.sub(1);
                self.release_peer(session.payload);
            }
        }
    }

    /// When the next udp session expires.
    pub(super) fn udp_next_expiry(&self) -> Option<Instant> {
        self.udp
            .iter()
            .flatten()
            .filter(|l| !l.plan.idle_timeout.is_zero())
            .filter_map(|l| l.table.next_expiry(l.plan.idle_timeout))
            .min()
    }

    /// Notes a receive that ended for want of datagram buffers (see `UdpListener::starved`).
    fn starve(&mut self, listener: usize, receive: Starved) {
        let Some(Some(l)) = self.udp.get_mut(listener) else {
            return;
        };
        // Each live receive is listed at most once; entries of sessions that ended meanwhile
        // are dropped here before they could outnumber the live ones.
        if l.starved.len() >= l.table.capacity() + l.shared.len() {
            let (table, shared) = (&l.table, &l.shared);
            l.starved.retain(|r| match r {
                Starved::Session(flow) => table.get_id(*flow).is_some(),
                Starved::Shared(backend) => {
                    shared.get(backend.index()).is_some_and(Option::is_some)
                }
            });
        }
        l.starved.push(receive);
    }

    /// Re-arms as many session and `per_packet` receives that wait for datagram buffers as
    /// there are buffers in the ring (each takes at least one to get anywhere), oldest first.
    /// A receive whose session or socket is gone meanwhile is passed over.
    fn feed_starved(&mut self) {
        let mut budget = self.ring.datagram_pool().map_or(0, |p| p.free()) as usize;
        for listener in 0..self.udp.len() {
            if budget == 0 {
                return;
            }
            let Some(Some(l)) = self.udp.get_mut(listener) else {
                continue;
            };
            let take = budget.min(l.starved.len());
            let fed: Vec<Starved> = l.starved.drain(..take).collect();
            budget -= take;
            for receive in fed {
                match receive {
                    Starved::Session(flow) => self.rearm_session(listener, flow),
                    Starved::Shared(backend) => self.arm_shared(listener, backend),
                }
            }
        }
    }

    /// Re-arms receives that stopped for want of datagram buffers, once some are back, and
    /// listener receives after an error's pause.
    pub(super) fn feed_udp(&mut self, now: Instant) {
        self.ring.top_up_datagrams(DATAGRAM_RING_LOW);
        if self.phase >= crate::DRAINING {
            return;
        }
        self.feed_starved();
        let starved = self.udp_starved && self.ring.datagram_pool().is_some_and(|p| p.free() > 0);
        let paused = self.udp_rearm_at.is_some_and(|at| at <= now);
        if !starved && !paused {
            return;
        }
        if starved {
            self.udp_starved = false;
        }
        if paused {
            self.udp_rearm_at = None;
        }
        for listener in 0..self.udp.len() {
            self.arm_udp_listener(listener);
        }
    }

    /// Shutdown: udp has no connections to wait for. Stops receiving and ends every session.
    pub(super) fn close_udp(&mut self) {
        for listener in 0..self.udp.len() {
            let Some(Some(l)) = self.udp.get_mut(listener) else {
                continue;
            };
            let fd = l.socket.as_raw_fd();
            let mut ended: Vec<Session<Peer>> = Vec::new();
            l.table.retain(|_| false, &mut ended);
            let shared: Vec<SharedSocket> = l.shared.drain(..).flatten().collect();
            let counters = &self.counters.listeners[listener].udp;
            counters.sessions_closed.add(ended.len() as u64);
            counters.sessions_active.set(0);
            self.ring.cancel_fd(fd, user_data(Op::Cancel, 0));
            for session in ended {
                self.release_peer(session.payload);
            }
            for s in shared {
                let SharedSocket { socket, recv_op } = s;
                match recv_op.and_then(|op| self.udp_ops.get_mut(op).map(|entry| (op, entry))) {
                    Some((op, UdpOp::SharedRecv { closed, .. })) => {
                        *closed = Some(socket);
                        self.ring
                            .cancel(DATAGRAM_OP | u64::from(op), user_data(Op::Cancel, 0));
                    }
                    _ => self.ring.close_after_submit(socket),
                }
            }
        }
    }
}

/// The worker's share of a listener's `max_sessions`.
pub(super) fn table_capacity(plan: &UdpPlan, workers: usize, worker: usize) -> u32 {
    sluice_flow::worker_share(plan.max_sessions, workers, worker)
}
