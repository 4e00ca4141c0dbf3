//! The connection state machine. See the crate documentation for what it decides.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::queue::{Chunk, ChunkQueue};

/// One end of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

/// A direction of bytes: `ToBackend` reads the client and writes the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    ToBackend,
    ToClient,
}

impl Dir {
    pub const BOTH: [Dir; 2] = [Dir::ToBackend, Dir::ToClient];

    /// The side bytes of this direction are read from.
    pub fn source(self) -> Side {
        match self {
            Dir::ToBackend => Side::Client,
            Dir::ToClient => Side::Backend,
        }
    }

    /// The side bytes of this direction are written to.
    pub fn sink(self) -> Side {
        self.source().other()
    }

    /// The direction whose bytes are read from `side`.
    pub fn from_source(side: Side) -> Dir {
        match side {
            Side::Client => Dir::ToBackend,
            Side::Backend => Dir::ToClient,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The timeouts and limits a connection runs under (from the listener's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Per connect attempt.
    pub connect_timeout: Duration,
    /// Inactivity (no byte either way) after which both sides are closed; zero = off.
    pub idle_timeout: Duration,
    /// Inactivity after one side's FIN after which both sides are closed; zero = off.
    pub half_close_timeout: Duration,
    /// Extra connect attempts, each on a backend not yet tried.
    pub retries: u32,
    /// How long to wait for bytes written toward a peer to be acknowledged before resetting it.
    pub reset_linger: Duration,
}

/// How often the unacknowledged byte count is re-read while carrying a reset.
const UNACKED_RECHECK: Duration = Duration::from_millis(5);

/// Why a connect attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    Refused,
    TimedOut,
    /// Unreachable, reset during the handshake, or any other OS error.
    Other,
    /// The balancer had no backend left that this connection has not tried.
    NoBackend,
}

/// The result of one receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvOutcome<B> {
    /// `len` bytes (> 0) were received into `buf`, starting at offset 0.
    Data { buf: B, len: u32 },
    /// The peer sent a FIN.
    Eof,
    /// The peer reset the connection.
    Reset,
    /// The shared buffer pool was empty; re-arm after [`Conn::handle_buffers_available`].
    NoBuffers,
    /// The receive was cancelled (the connection is closing).
    Cancelled,
    /// Nothing was received and the receive ended anyway (EAGAIN, which io_uring can report
    /// under load even on a waiting receive): arm it again.
    WouldBlock,
    /// Any other error: treated like a reset of that side.
    Error,
}

/// The result of one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// `n` bytes of the chunk were written (may be fewer than asked, even zero on EAGAIN:
    /// the rest is sent again).
    Sent(u32),
    /// The peer is gone (EPIPE, ECONNRESET): treated like a reset of that side.
    Reset,
    /// Cancelled because the connection is closing.
    Cancelled,
}

/// Why a connection closed: the label of the `closed_total` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseKind {
    /// Both sides finished cleanly (both FINs carried).
    Done,
    ClientReset,
    BackendReset,
    IdleTimeout,
    HalfCloseTimeout,
    ConnectFailed,
    /// No backend could take the connection (every one down, drained or weight 0): reset at
    /// once, without a connect attempt.
    NoBackend,
    /// Closed by the end of its backend's `drain_timeout` (the backend was removed or set to
    /// weight 0).
    Drained,
    /// Closed by the end of `shutdown_timeout`.
    Shutdown,
}

impl CloseKind {
    pub const ALL: [CloseKind; 9] = [
        CloseKind::Done,
        CloseKind::ClientReset,
        CloseKind::BackendReset,
        CloseKind::IdleTimeout,
        CloseKind::HalfCloseTimeout,
        CloseKind::ConnectFailed,
        CloseKind::NoBackend,
        CloseKind::Drained,
        CloseKind::Shutdown,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseKind::Done => "done",
            CloseKind::ClientReset => "client_reset",
            CloseKind::BackendReset => "backend_reset",
            CloseKind::IdleTimeout => "idle_timeout",
            CloseKind::HalfCloseTimeout => "half_close_timeout",
            CloseKind::ConnectFailed => "connect_failed",
            CloseKind::NoBackend => "no_backend",
            CloseKind::Drained => "drained",
            CloseKind::Shutdown => "shutdown",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// How to close: why, and whether to reset (SO_LINGER 0) each side rather than close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub kind: CloseKind,
    pub reset_client: bool,
    pub reset_backend: bool,
}

/// What the driver must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<B> {
    /// Pick a backend this connection has not tried and start connecting to it.
    Connect,
    /// The connect attempt timed out: cancel it; its completion comes back as a failure.
    CancelConnect,
    /// Arm one receive on `side` (into a buffer from the shared pool).
    Recv(Side),
    /// Write `buf[offset..offset + len]` to `to`.
    Send {
        to: Side,
        buf: B,
        offset: u32,
        len: u32,
    },
    /// The buffer is no longer referenced by this connection.
    Release(B),
    /// `shutdown(SHUT_WR)` toward `side`: carries a FIN.
    ShutdownWrite(Side),
    /// Report how many bytes written to `side` are not yet acknowledged (SIOCOUTQ).
    QueryUnacked(Side),
    /// Cancel every operation and close both sockets as `reason` says. Emitted once; buffers
    /// still in flight come back through later completions and are released then.
    Close(CloseReason),
}

/// Where the bytes of one direction stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Open,
    Eof,
    Gone,
}

#[derive(Debug)]
struct Flow<B> {
    queue: ChunkQueue<B>,
    source: Source,
    recv_in_flight: bool,
    waiting_buffers: bool,
    send_in_flight: bool,
    sink_shut: bool,
    /// The sink reset or failed: nothing more can be written to it.
    sink_dead: bool,
}

impl<B: Copy> Flow<B> {
    fn new() -> Self {
        Flow {
            queue: ChunkQueue::new(),
            source: Source::Open,
            recv_in_flight: false,
            waiting_buffers: false,
            send_in_flight: false,
            sink_shut: false,
            sink_dead: false,
        }
    }

    /// Every byte read from the source was written and the FIN carried.
    fn finished(&self) -> bool {
        self.source == Source::Eof && self.sink_shut
    }

    fn drained(&self) -> bool {
        self.queue.is_empty() && !self.send_in_flight
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting {
        attempt: u32,
        deadline: Instant,
        cancel_sent: bool,
    },
    Established,
    /// Carrying a reset of `gone` to the other side: draining, then waiting for the other side
    /// to acknowledge every byte, at most until `deadline`.
    Lingering {
        gone: Side,
        deadline: Instant,
        query: Query,
    },
    Closed,
}

/// Progress of the unacknowledged-bytes query while lingering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Query {
    /// Bytes from the gone side are still being written.
    Draining,
    /// [`Action::QueryUnacked`] was emitted; waiting for [`Conn::handle_unacked`].
    Asked,
    /// Bytes were still unacknowledged; ask again at this moment.
    RecheckAt(Instant),
}

/// One proxied connection. `B` is the driver's buffer token.
#[derive(Debug)]
pub struct Conn<B> {
    limits: Limits,
    state: State,
    flows: [Flow<B>; 2],
    last_activity: Instant,
    /// When the first FIN arrived; the half-close timeout runs from then.
    half_closed: bool,
    actions: VecDeque<Action<B>>,
}

impl<B: Copy> Conn<B> {
    /// A connection just accepted: its first action is [`Action::Connect`].
    pub fn new(limits: Limits, now: Instant) -> Self {
        let mut conn = Conn {
            limits,
            state: State::Closed,
            flows: [Flow::new(), Flow::new()],
            last_activity: now,
            half_closed: false,
            actions: VecDeque::with_capacity(8),
        };
        conn.start_attempt(0, now);
        conn
    }

    /// The next action for the driver, if any.
    pub fn poll_action(&mut self) -> Option<Action<B>> {
        self.actions.pop_front()
    }

    /// The earliest moment [`Conn::handle_timeout`] must be called; `None` when no timer runs.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Connecting {
                deadline,
                cancel_sent: false,
                ..
            } => Some(deadline),
            State::Connecting { .. } | State::Closed => None,
            State::Lingering {
                deadline,
                query: Query::RecheckAt(r),
                ..
            } => Some(r.min(deadline)),
            State::Lingering { deadline, .. } => Some(deadline),
            State::Established => {
                let idle = nonzero(self.limits.idle_timeout).map(|t| self.last_activity + t);
                let half = if self.half_closed {
                    nonzero(self.limits.half_close_timeout).map(|t| self.last_activity + t)
                } else {
                    None
                };
                match (idle, half) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// True once [`Action::Close`] has been emitted.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The connect attempt succeeded: start moving bytes both ways.
    pub fn handle_connected(&mut self, now: Instant) {
        if !matches!(self.state, State::Connecting { .. }) {
            return;
        }
        self.state = State::Established;
        self.last_activity = now;
        self.pump();
    }

    /// The connect attempt failed: retry on another backend or give up and reset the client.
    pub fn handle_connect_failed(&mut self, error: ConnectError, now: Instant) {
        let State::Connecting { attempt, .. } = self.state else {
            return;
        };
        if error == ConnectError::NoBackend && attempt == 0 {
            self.close(CloseKind::NoBackend, true, false);
        } else if error != ConnectError::NoBackend && attempt < self.limits.retries {
            self.start_attempt(attempt + 1, now);
        } else {
            self.close(CloseKind::ConnectFailed, true, false);
        }
    }

    /// The socket of `side` reported an error (a reset) outside any receive or send: the
    /// driver watches each socket for errors, because a direction stalled behind a slow peer
    /// has no receive armed on its source and would otherwise notice a reset only once the
    /// slow peer drained everything queued. Handled as a reset seen by a receive.
    pub fn handle_peer_error(&mut self, side: Side, now: Instant) {
        if self.state == State::Established {
            self.side_gone(side, now);
            self.pump();
        }
    }

    /// A receive on `side` completed.
    pub fn handle_recv(&mut self, side: Side, outcome: RecvOutcome<B>, now: Instant) {
        let dir = Dir::from_source(side);
        let established = self.state == State::Established;
        let closed = self.state == State::Closed;
        let flow = &mut self.flows[dir.index()];
        flow.recv_in_flight = false;
        match outcome {
            RecvOutcome::Data { buf, len } => {
                if closed || flow.sink_dead {
                    // Nobody can take these bytes any more.
                    self.actions.push_back(Action::Release(buf));
                    return;
                }
                self.last_activity = now;
                // Bytes read before a reset was noticed are still carried (lingering state).
                if let Err(chunk) = flow.queue.push(Chunk {
                    buf,
                    offset: 0,
                    len,
                }) {
                    // Receives are armed only while the queue has room, so this cannot happen;
                    // if it did, dropping the bytes would corrupt the stream: close instead.
                    self.actions.push_back(Action::Release(chunk.buf));
                    self.close(reset_kind(side), true, true);
                    return;
                }
            }
            RecvOutcome::Eof if established && flow.source == Source::Open => {
                self.last_activity = now;
                flow.source = Source::Eof;
                self.half_closed = true;
            }
            RecvOutcome::NoBuffers if established && flow.source == Source::Open => {
                flow.waiting_buffers = true;
            }
            RecvOutcome::Reset | RecvOutcome::Error if established => self.side_gone(side, now),
            _ => {}
        }
        self.pump();
    }

    /// A send toward `to` completed.
    pub fn handle_sent(&mut self, to: Side, outcome: SendOutcome, now: Instant) {
        if self.finish_send(to, outcome, now) {
            self.pump();
        }
    }

    /// A send toward `to` that the driver stopped (cancelled) ended with `outcome`: `Sent(n)`
    /// for the bytes written before the cancel took effect (all of them if it came too late),
    /// `Cancelled` for none. Handled as [`Conn::handle_sent`], except that before the next send
    /// starts, every chunk left in the direction is offered to `rehome` (see [`Conn::rehome`]):
    /// the driver stops a send that a peer does not take, to move its bytes out of a shared
    /// buffer, and the next send then starts from where they are now.
    pub fn handle_sent_rehomed(
        &mut self,
        to: Side,
        outcome: SendOutcome,
        now: Instant,
        rehome: impl FnMut(Chunk<B>) -> Option<(B, u32)>,
    ) {
        if self.finish_send(to, outcome, now) {
            self.rehome(Dir::from_source(to.other()), rehome);
            self.pump();
        }
    }

    /// Moves the chunks of `dir` that no send in flight uses to other buffers. `rehome` is
    /// offered each one, front first, and answers with the buffer that now holds its unsent
    /// bytes (`chunk.len` of them) and their offset there, or `None` to leave it where it is;
    /// the buffer it replaced is released ([`Action::Release`]). Bytes, order and the two-chunk
    /// bound are unchanged: only where the bytes wait changes.
    pub fn rehome(&mut self, dir: Dir, mut rehome: impl FnMut(Chunk<B>) -> Option<(B, u32)>) {
        let flow = &mut self.flows[dir.index()];
        // The chunk of a send in flight is the kernel's until that send completes.
        let in_flight = usize::from(flow.send_in_flight);
        for chunk in flow.queue.iter_mut().skip(in_flight) {
            if let Some((buf, offset)) = rehome(*chunk) {
                self.actions.push_back(Action::Release(chunk.buf));
                chunk.buf = buf;
                chunk.offset = offset;
            }
        }
    }

    /// The chunk that the send in flight of `dir` writes, if one is in flight.
    pub fn sending(&self, dir: Dir) -> Option<Chunk<B>> {
        let flow = &self.flows[dir.index()];
        flow.send_in_flight.then(|| flow.queue.front()).flatten()
    }

    /// Takes a send's outcome into the direction's queue; false when nothing more may start
    /// (closed, or the sink is gone and the chunk was released).
    fn finish_send(&mut self, to: Side, outcome: SendOutcome, now: Instant) -> bool {
        let dir = Dir::from_source(to.other());
        let flow = &mut self.flows[dir.index()];
        flow.send_in_flight = false;
        if self.state == State::Closed || flow.sink_dead {
            // The chunk being sent is released once its send is over, never before.
            if let Some(chunk) = flow.queue.pop() {
                self.actions.push_back(Action::Release(chunk.buf));
            }
            return false;
        }
        match outcome {
            SendOutcome::Sent(n) => {
                self.last_activity = now;
                let Some(front) = flow.queue.front_mut() else {
                    return false;
                };
                let n = n.min(front.len);
                front.offset += n;
                front.len -= n;
                if front.len == 0 {
                    let buf = front.buf;
                    flow.queue.pop();
                    self.actions.push_back(Action::Release(buf));
                }
            }
            SendOutcome::Reset => match self.state {
                State::Lingering { gone, .. } => {
                    // Both sides are gone now: nothing is left to carry.
                    if let Some(chunk) = self.flows[dir.index()].queue.pop() {
                        self.actions.push_back(Action::Release(chunk.buf));
                    }
                    self.finish_linger(gone);
                    return false;
                }
                _ => self.side_gone(to, now),
            },
            SendOutcome::Cancelled => {}
        }
        true
    }

    /// Buffers were returned to the shared pool: re-arm receives that found it empty.
    pub fn handle_buffers_available(&mut self) {
        for flow in &mut self.flows {
            flow.waiting_buffers = false;
        }
        self.pump();
    }

    /// Whether this connection waits for buffers (the driver keeps a list of such connections).
    pub fn waits_for_buffers(&self) -> bool {
        self.flows.iter().any(|f| f.waiting_buffers)
    }

    /// The answer to [`Action::QueryUnacked`]: `unacked` bytes written to `side` are not yet
    /// acknowledged by its peer.
    pub fn handle_unacked(&mut self, side: Side, unacked: u32, now: Instant) {
        let State::Lingering { gone, deadline, .. } = self.state else {
            return;
        };
        if side != gone.other() {
            return;
        }
        if unacked == 0 || now >= deadline {
            self.finish_linger(gone);
        } else {
            let query = Query::RecheckAt(now + UNACKED_RECHECK);
            self.state = State::Lingering {
                gone,
                deadline,
                query,
            };
        }
    }

    /// Time passed: fire whichever deadline is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Connecting {
                attempt,
                deadline,
                cancel_sent: false,
            } if now >= deadline => {
                self.state = State::Connecting {
                    attempt,
                    deadline,
                    cancel_sent: true,
                };
                self.actions.push_back(Action::CancelConnect);
            }
            State::Lingering { gone, deadline, .. } if now >= deadline => self.finish_linger(gone),
            State::Lingering {
                gone,
                deadline,
                query: Query::RecheckAt(r),
            } if now >= r => {
                self.state = State::Lingering {
                    gone,
                    deadline,
                    query: Query::Asked,
                };
                self.actions.push_back(Action::QueryUnacked(gone.other()));
            }
            State::Established => {
                let idle = nonzero(self.limits.idle_timeout);
                let half = nonzero(self.limits.half_close_timeout).filter(|_| self.half_closed);
                let quiet = now.saturating_duration_since(self.last_activity);
                if half.is_some_and(|t| quiet >= t) {
                    self.close(CloseKind::HalfCloseTimeout, false, false);
                } else if idle.is_some_and(|t| quiet >= t) {
                    self.close(CloseKind::IdleTimeout, false, false);
                }
            }
            _ => {}
        }
    }

    /// `shutdown_timeout` ran out: close now, whatever is pending.
    pub fn handle_shutdown(&mut self) {
        if self.state != State::Closed {
            self.close(CloseKind::Shutdown, false, false);
        }
    }

    /// The backend's drain time is over: close both sides (FIN, or a reset where the kernel
    /// still holds unread bytes), as at the end of `shutdown_timeout`.
    pub fn handle_drained(&mut self) {
        if self.state != State::Closed {
            self.close(CloseKind::Drained, false, false);
        }
    }

    fn start_attempt(&mut self, attempt: u32, now: Instant) {
        self.state = State::Connecting {
            attempt,
            deadline: now + self.limits.connect_timeout,
            cancel_sent: false,
        };
        self.actions.push_back(Action::Connect);
    }

    /// `side` reset (or failed): stop reading it, drop what was meant for it, and carry the
    /// reset to the other side once the other side has every byte already read from `side`.
    fn side_gone(&mut self, side: Side, now: Instant) {
        self.flows[Dir::from_source(side).index()].source = Source::Gone;
        let toward_gone = &mut self.flows[Dir::from_source(side.other()).index()];
        toward_gone.source = Source::Gone;
        toward_gone.sink_dead = true;
        toward_gone.waiting_buffers = false;
        // Chunks not yet handed to the kernel for the dead side are dropped now; the one in
        // flight (if any) is released by its completion.
        let keep = usize::from(toward_gone.send_in_flight);
        while toward_gone.queue.len() > keep {
            let Some(chunk) = pop_back(&mut toward_gone.queue) else {
                break;
            };
            self.actions.push_back(Action::Release(chunk.buf));
        }
        let deadline = now + self.limits.reset_linger;
        self.state = State::Lingering {
            gone: side,
            deadline,
            query: Query::Draining,
        };
    }

    fn finish_linger(&mut self, gone: Side) {
        let (kind, reset_client, reset_backend) = match gone {
            Side::Client => (CloseKind::ClientReset, false, true),
            Side::Backend => (CloseKind::BackendReset, true, false),
        };
        self.close(kind, reset_client, reset_backend);
    }

    fn close(&mut self, kind: CloseKind, reset_client: bool, reset_backend: bool) {
        self.state = State::Closed;
        for flow in &mut self.flows {
            let keep = usize::from(flow.send_in_flight);
            while flow.queue.len() > keep {
                let Some(chunk) = pop_back(&mut flow.queue) else {
                    break;
                };
                self.actions.push_back(Action::Release(chunk.buf));
            }
            flow.waiting_buffers = false;
        }
        self.actions.push_back(Action::Close(CloseReason {
            kind,
            reset_client,
            reset_backend,
        }));
    }

    /// Emits every receive and send the current state allows, and notices completion.
    fn pump(&mut self) {
        match self.state {
            State::Established => {}
            State::Lingering {
                gone,
                deadline,
                query,
            } => {
                let dir = Dir::from_source(gone);
                self.sends(dir);
                if query == Query::Draining && self.flows[dir.index()].drained() {
                    self.state = State::Lingering {
                        gone,
                        deadline,
                        query: Query::Asked,
                    };
                    self.actions.push_back(Action::QueryUnacked(gone.other()));
                }
                return;
            }
            State::Connecting { .. } | State::Closed => return,
        }
        for dir in Dir::BOTH {
            self.sends(dir);
            let flow = &mut self.flows[dir.index()];
            if flow.source == Source::Open
                && !flow.sink_dead
                && !flow.recv_in_flight
                && !flow.waiting_buffers
                && !flow.queue.is_full()
            {
                flow.recv_in_flight = true;
                self.actions.push_back(Action::Recv(dir.source()));
            }
        }
        if self.flows.iter().all(Flow::finished) {
            self.close(CloseKind::Done, false, false);
        }
    }

    /// Emits the next send of `dir`, or its FIN once drained after an EOF.
    fn sends(&mut self, dir: Dir) {
        let flow = &mut self.flows[dir.index()];
        if flow.send_in_flight {
            return;
        }
        if let Some(chunk) = flow.queue.front() {
            flow.send_in_flight = true;
            self.actions.push_back(Action::Send {
                to: dir.sink(),
                buf: chunk.buf,
                offset: chunk.offset,
                len: chunk.len,
            });
        } else if flow.source == Source::Eof && !flow.sink_shut {
            flow.sink_shut = true;
            self.actions.push_back(Action::ShutdownWrite(dir.sink()));
        }
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn reset_kind(side: Side) -> CloseKind {
    match side {
        Side::Client => CloseKind::ClientReset,
        Side::Backend => CloseKind::BackendReset,
    }
}

/// Removes the newest chunk (one never handed to the kernel).
fn pop_back<B: Copy>(queue: &mut ChunkQueue<B>) -> Option<Chunk<B>> {
    let n = queue.len();
    if n == 0 {
        return None;
    }
    // Rotate: pop everything, push back all but the last. The queue holds at most two chunks.
    let mut kept = [None; crate::queue::QUEUE_CAPACITY];
    for slot in kept.iter_mut().take(n) {
        *slot = queue.pop();
    }
    let last = kept[n - 1].take();
    for chunk in kept.into_iter().flatten() {
        let _ = queue.push(chunk);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    type A = Action<u16>;

    fn limits() -> Limits {
        Limits {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::ZERO,
            half_close_timeout: Duration::from_secs(60),
            retries: 2,
            reset_linger: Duration::from_secs(1),
        }
    }

    fn drain(conn: &mut Conn<u16>) -> Vec<A> {
        std::iter::from_fn(|| conn.poll_action()).collect()
    }

    fn established(t0: Instant) -> Conn<u16> {
        let mut c = Conn::new(limits(), t0);
        assert_eq!(drain(&mut c), vec![A::Connect]);
        c.handle_connected(t0);
        assert_eq!(
            drain(&mut c),
            vec![A::Recv(Side::Client), A::Recv(Side::Backend)]
        );
        c
    }

    fn send(to: Side, buf: u16, offset: u32, len: u32) -> A {
        A::Send {
            to,
            buf,
            offset,
            len,
        }
    }

    #[test]
    fn bytes_flow_in_order_with_partial_sends_and_backpressure() {
        let t = Instant::now();
        let mut c = established(t);
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 1, len: 100 }, t);
        assert_eq!(
            drain(&mut c),
            vec![send(Side::Backend, 1, 0, 100), A::Recv(Side::Client)]
        );
        // A second chunk fills the queue: no further receive until a chunk is sent.
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 2, len: 50 }, t);
        assert_eq!(drain(&mut c), vec![]);
        c.handle_sent(Side::Backend, SendOutcome::Sent(30), t);
        assert_eq!(drain(&mut c), vec![send(Side::Backend, 1, 30, 70)]);
        c.handle_sent(Side::Backend, SendOutcome::Sent(70), t);
        assert_eq!(
            drain(&mut c),
            vec![
                A::Release(1),
                send(Side::Backend, 2, 0, 50),
                A::Recv(Side::Client)
            ]
        );
    }

    #[test]
    fn connect_failures_retry_then_reset_the_client() {
        let t = Instant::now();
        let mut c: Conn<u16> = Conn::new(limits(), t);
        assert_eq!(drain(&mut c), vec![A::Connect]);
        c.handle_connect_failed(ConnectError::Refused, t);
        assert_eq!(drain(&mut c), vec![A::Connect]);
        c.handle_connect_failed(ConnectError::TimedOut, t);
        assert_eq!(drain(&mut c), vec![A::Connect]);
        c.handle_connect_failed(ConnectError::Refused, t);
        let reason = CloseReason {
            kind: CloseKind::ConnectFailed,
            reset_client: true,
            reset_backend: false,
        };
        assert_eq!(drain(&mut c), vec![A::Close(reason)]);
        assert!(c.is_closed());
    }

    #[test]
    fn no_backend_left_gives_up_at_once() {
        let t = Instant::now();
        let mut c: Conn<u16> = Conn::new(limits(), t);
        drain(&mut c);
        c.handle_connect_failed(ConnectError::NoBackend, t);
        assert!(matches!(
            drain(&mut c)[..],
            [A::Close(CloseReason {
                kind: CloseKind::NoBackend,
                reset_client: true,
                ..
            })]
        ));
    }

    #[test]
    fn connect_timeout_cancels_the_attempt() {
        let t = Instant::now();
        let mut c: Conn<u16> = Conn::new(limits(), t);
        drain(&mut c);
        assert_eq!(c.poll_timeout(), Some(t + Duration::from_secs(2)));
        c.handle_timeout(t + Duration::from_secs(1));
        assert_eq!(drain(&mut c), vec![]);
        c.handle_timeout(t + Duration::from_secs(2));
        assert_eq!(drain(&mut c), vec![A::CancelConnect]);
        assert_eq!(c.poll_timeout(), None);
        c.handle_connect_failed(ConnectError::TimedOut, t + Duration::from_secs(2));
        assert_eq!(drain(&mut c), vec![A::Connect]);
    }

    #[test]
    fn half_close_both_ways_ends_done() {
        let t = Instant::now();
        let mut c = established(t);
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 1, len: 10 }, t);
        drain(&mut c);
        // Client FIN while its last chunk is still being sent: FIN waits for the send.
        c.handle_recv(Side::Client, RecvOutcome::Eof, t);
        assert_eq!(drain(&mut c), vec![]);
        c.handle_sent(Side::Backend, SendOutcome::Sent(10), t);
        assert_eq!(
            drain(&mut c),
            vec![A::Release(1), A::ShutdownWrite(Side::Backend)]
        );
        // The other direction keeps flowing.
        c.handle_recv(Side::Backend, RecvOutcome::Data { buf: 2, len: 5 }, t);
        assert_eq!(
            drain(&mut c),
            vec![send(Side::Client, 2, 0, 5), A::Recv(Side::Backend)]
        );
        c.handle_sent(Side::Client, SendOutcome::Sent(5), t);
        assert_eq!(drain(&mut c), vec![A::Release(2)]);
        c.handle_recv(Side::Backend, RecvOutcome::Eof, t);
        let done = CloseReason {
            kind: CloseKind::Done,
            reset_client: false,
            reset_backend: false,
        };
        assert_eq!(
            drain(&mut c),
            vec![A::ShutdownWrite(Side::Client), A::Close(done)]
        );
    }

    #[test]
    fn backend_reset_is_carried_after_bytes_are_acknowledged() {
        let t = Instant::now();
        let mut c = established(t);
        c.handle_recv(Side::Backend, RecvOutcome::Data { buf: 7, len: 1000 }, t);
        assert_eq!(
            drain(&mut c),
            vec![send(Side::Client, 7, 0, 1000), A::Recv(Side::Backend)]
        );
        c.handle_recv(Side::Backend, RecvOutcome::Reset, t);
        assert_eq!(drain(&mut c), vec![]);
        c.handle_sent(Side::Client, SendOutcome::Sent(1000), t);
        assert_eq!(
            drain(&mut c),
            vec![A::Release(7), A::QueryUnacked(Side::Client)]
        );
        c.handle_unacked(Side::Client, 400, t);
        assert_eq!(drain(&mut c), vec![]);
        assert_eq!(c.poll_timeout(), Some(t + UNACKED_RECHECK));
        c.handle_timeout(t + UNACKED_RECHECK);
        assert_eq!(drain(&mut c), vec![A::QueryUnacked(Side::Client)]);
        c.handle_unacked(Side::Client, 0, t + UNACKED_RECHECK);
        let reason = CloseReason {
            kind: CloseKind::BackendReset,
            reset_client: true,
            reset_backend: false,
        };
        assert_eq!(drain(&mut c), vec![A::Close(reason)]);
        // The client recv still in flight completes late: its buffer is released.
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 9, len: 3 }, t);
        assert_eq!(drain(&mut c), vec![A::Release(9)]);
    }

    #[test]
    fn reset_linger_is_bounded() {
        let t = Instant::now();
        let mut c = established(t);
        c.handle_recv(Side::Client, RecvOutcome::Reset, t);
        assert_eq!(drain(&mut c), vec![A::QueryUnacked(Side::Backend)]);
        c.handle_unacked(Side::Backend, 10, t);
        c.handle_timeout(t + Duration::from_secs(1));
        let reason = CloseReason {
            kind: CloseKind::ClientReset,
            reset_client: false,
            reset_backend: true,
        };
        assert_eq!(drain(&mut c), vec![A::Close(reason)]);
    }

    #[test]
    fn peer_error_behind_a_stalled_direction_ends_within_the_linger() {
        let t = Instant::now();
        let mut c = established(t);
        // Two chunks from the client fill its direction; the first is being sent to a
        // backend that does not read, so no receive is armed on the client any more.
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 1, len: 10 }, t);
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 2, len: 10 }, t);
        drain(&mut c);
        // The driver's error watch reports the client's reset.
        c.handle_peer_error(Side::Client, t);
        drain(&mut c);
        c.handle_timeout(t + Duration::from_secs(1));
        let reason = CloseReason {
            kind: CloseKind::ClientReset,
            reset_client: false,
            reset_backend: true,
        };
        let actions = drain(&mut c);
        assert_eq!(actions.last(), Some(&A::Close(reason)), "{actions:?}");
        // A late error report changes nothing.
        c.handle_peer_error(Side::Backend, t + Duration::from_secs(2));
        assert_eq!(drain(&mut c), vec![]);
    }

    #[test]
    fn close_releases_in_flight_buffer_only_on_completion() {
        let t = Instant::now();
        let mut c = established(t);
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 1, len: 10 }, t);
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 2, len: 10 }, t);
        drain(&mut c);
        c.handle_shutdown();
        let reason = CloseReason {
            kind: CloseKind::Shutdown,
            reset_client: false,
            reset_backend: false,
        };
        assert_eq!(drain(&mut c), vec![A::Release(2), A::Close(reason)]);
        c.handle_sent(Side::Backend, SendOutcome::Cancelled, t);
        assert_eq!(drain(&mut c), vec![A::Release(1)]);
    }

    #[test]
    fn idle_and_half_close_timeouts() {
        let t = Instant::now();
        let mut l = limits();
        l.idle_timeout = Duration::from_secs(10);
        l.half_close_timeout = Duration::from_secs(3);
        let mut c: Conn<u16> = Conn::new(l, t);
        c.handle_connected(t);
        drain(&mut c);
        assert_eq!(c.poll_timeout(), Some(t + Duration::from_secs(10)));
        c.handle_recv(Side::Client, RecvOutcome::Eof, t + Duration::from_secs(1));
        drain(&mut c);
        assert_eq!(c.poll_timeout(), Some(t + Duration::from_secs(4)));
        c.handle_timeout(t + Duration::from_secs(4));
        assert!(matches!(
            drain(&mut c)[..],
            [A::Close(CloseReason {
                kind: CloseKind::HalfCloseTimeout,
                ..
            })]
        ));

        let mut c: Conn<u16> = Conn::new(l, t);
        c.handle_connected(t);
        drain(&mut c);
        c.handle_timeout(t + Duration::from_secs(10));
        assert!(matches!(
            drain(&mut c)[..],
            [A::Close(CloseReason {
                kind: CloseKind::IdleTimeout,
                ..
            })]
        ));
    }

    #[test]
    fn a_stalled_direction_moves_its_bytes_to_other_buffers_in_order() {
        let t = Instant::now();
        let mut c = established(t);
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 1, len: 100 }, t);
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 2, len: 50 }, t);
        assert_eq!(
            drain(&mut c),
            vec![send(Side::Backend, 1, 0, 100), A::Recv(Side::Client)]
        );
        // While its send is in flight, only the chunk queued behind it may move.
        let sending = Chunk {
            buf: 1,
            offset: 0,
            len: 100,
        };
        assert_eq!(c.sending(Dir::ToBackend), Some(sending));
        let mut offered = Vec::new();
        c.rehome(Dir::ToBackend, |chunk| {
            offered.push(chunk);
            Some((20, 0))
        });
        assert_eq!(
            offered,
            vec![Chunk {
                buf: 2,
                offset: 0,
                len: 50
            }]
        );
        assert_eq!(drain(&mut c), vec![A::Release(2)]);
        assert_eq!(c.sending(Dir::ToBackend), Some(sending));
        // The driver stopped the send after 30 bytes: the other 70 move (to offset 4 of
        // buffer 10), chunk 20 stays, and sending resumes from the new place, in order.
        let mut offered = Vec::new();
        c.handle_sent_rehomed(Side::Backend, SendOutcome::Sent(30), t, |chunk| {
            offered.push(chunk);
            (chunk.buf == 1).then_some((10, 4))
        });
        let rest = Chunk {
            buf: 1,
            offset: 30,
            len: 70,
        };
        assert_eq!(
            offered,
            vec![
                rest,
                Chunk {
                    buf: 20,
                    offset: 0,
                    len: 50
                }
            ]
        );
        assert_eq!(
            drain(&mut c),
            vec![A::Release(1), send(Side::Backend, 10, 4, 70)]
        );
        c.handle_sent(Side::Backend, SendOutcome::Sent(70), t);
        assert_eq!(
            drain(&mut c),
            vec![
                A::Release(10),
                send(Side::Backend, 20, 0, 50),
                A::Recv(Side::Client)
            ]
        );
        // A cancel that took effect before any byte went moves the whole chunk.
        c.handle_sent_rehomed(Side::Backend, SendOutcome::Cancelled, t, |chunk| {
            assert_eq!(
                chunk,
                Chunk {
                    buf: 20,
                    offset: 0,
                    len: 50
                }
            );
            Some((30, 0))
        });
        assert_eq!(
            drain(&mut c),
            vec![A::Release(20), send(Side::Backend, 30, 0, 50)]
        );
        assert_eq!(c.sending(Dir::ToClient), None);
    }

    #[test]
    fn a_stopped_send_after_close_only_releases_its_buffer() {
        let t = Instant::now();
        let mut c = established(t);
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 1, len: 10 }, t);
        c.handle_recv(Side::Client, RecvOutcome::Data { buf: 2, len: 10 }, t);
        drain(&mut c);
        c.handle_shutdown();
        drain(&mut c);
        // Nothing is left to move once closed: the queued chunk was released at the close.
        c.rehome(Dir::ToBackend, |_| {
            panic!("a chunk offered after the close")
        });
        c.handle_sent_rehomed(Side::Backend, SendOutcome::Sent(4), t, |_| {
            panic!("a chunk offered after the close")
        });
        assert_eq!(drain(&mut c), vec![A::Release(1)]);
    }

    #[test]
    fn no_buffers_waits_then_rearms() {
        let t = Instant::now();
        let mut c = established(t);
        c.handle_recv(Side::Client, RecvOutcome::NoBuffers, t);
        assert_eq!(drain(&mut c), vec![]);
        assert!(c.waits_for_buffers());
        c.handle_buffers_available();
        assert_eq!(drain(&mut c), vec![A::Recv(Side::Client)]);
        assert!(!c.waits_for_buffers());
    }
}
