//! One worker: a ring, its listeners, its connection slab and the completion loop that turns
//! completions into `Conn` events and `Conn` actions into submissions.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use nix::sys::eventfd::EventFd;
use sluice_balance::{ActiveGuard, BackendId, ClientAddr, Picker, Snapshot};
use sluice_conn::{
    Action, Chunk, CloseKind, CloseReason, Conn, ConnectError, Dir, RecvOutcome, SendOutcome, Side,
};
use sluice_uring::{Completion, DATAGRAM_OP, Uring};
use socket2::{SockRef, Socket};

mod spill;
mod udp;

use crate::counters::WorkerCounters;
use crate::pipes::{PipeId, PipePool, Spliced};
use crate::timers::Timers;
use crate::{
    BackendEvent, CLOSING, DRAINING, OnMaxConnections, PlaneConfig, Shared, StartError, sockets,
};
use spill::{Spill, SpillId};

/// Connect addresses held from the start; the table grows as slots are added.
const CONNECT_SLOTS_INITIAL: usize = 1024;
/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 4096;
/// Buffers in the worker's pool and their size: 4096 x 16 KiB = 64 MiB of address space. A
/// connection holds at most 4 (2 per direction), so 1024 connections moving bytes both ways
/// at once never find the pool empty; directions stalled behind peers that do not read give
/// theirs back when it runs low (`reclaim_buffers`). Only `RING_LOW` of them start in the
/// kernel's ring; the rest are touched (and count in RSS) only when the load needs them.
const BUFFER_COUNT: u16 = 4096;
const BUFFER_SIZE: u32 = 16 * 1024;
/// The kernel's ring is topped up from the pool's reserve to this many free buffers after
/// every batch.
const RING_LOW: u32 = 256;
/// Capacity asked for each splice pipe.
const PIPE_SIZE: u32 = 256 * 1024;
/// A direction switches from copying to splicing when a receive fills a whole buffer (more
/// bytes are likely waiting), and back when a splice moves less than this (the burst is over).
const SPLICE_MIN: u32 = 8 * 1024;
/// Unsent bytes in a sink socket that mark it as not keeping up (no pipe is leased for it).
const SINK_BACKLOG: u32 = 128 * 1024;
/// How long accepting pauses after EMFILE/ENFILE or another accept error.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How often a listener paused by `max_connections` (queue) re-checks for room.
const CAP_RECHECK: Duration = Duration::from_millis(20);
/// The longest the loop sleeps without a deadline (to notice a phase change it was not woken
/// for; wake-ups normally arrive through the eventfd).
const MAX_SLEEP: Duration = Duration::from_millis(500);
/// Below this many free buffers (in the kernel's ring and in reserve) the pool runs low, and
/// the directions stalled behind peers that do not read give theirs back (`reclaim_buffers`).
const POOL_LOW: usize = BUFFER_COUNT as usize / 8;
/// A send (or a wait for POLLOUT) that lasts this long is stalled: its peer does not read.
const SEND_STALLED: Duration = Duration::from_millis(100);
/// How often the connections are scanned for stalled directions while the pool runs low.
const RECLAIM_EVERY: Duration = Duration::from_millis(50);
/// Bounded wait for a peer to acknowledge bytes before it is reset.
pub const RESET_LINGER: Duration = Duration::from_secs(2);

/// What a submission was, packed with its slot (connection or listener index) in `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Wake,
    RecvClient,
    RecvBackend,
    SendClient,
    SendBackend,
    Connect,
    /// Cancellations: their own completions carry nothing we need.
    Cancel,
    /// Readiness of a side to splice from (POLLIN) or to (POLLOUT).
    PollInClient,
    PollInBackend,
    PollOutClient,
    PollOutBackend,
    /// A one-shot poll for errors (a reset) on a side, armed once the connection is
    /// established and kept until it fires or the connection closes: see `watch_completed`.
    WatchClient,
    WatchBackend,
}

impl Op {
    /// Every operation a connection may have in flight (at most one of each).
    const CANCELLABLE: [Op; 11] = [
        Op::RecvClient,
        Op::RecvBackend,
        Op::SendClient,
        Op::SendBackend,
        Op::Connect,
        Op::PollInClient,
        Op::PollInBackend,
        Op::PollOutClient,
        Op::PollOutBackend,
        Op::WatchClient,
        Op::WatchBackend,
    ];

    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Accept,
            2 => Op::Wake,
            3 => Op::RecvClient,
            4 => Op::RecvBackend,
            5 => Op::SendClient,
            6 => Op::SendBackend,
            7 => Op::Connect,
            8 => Op::Cancel,
            9 => Op::PollInClient,
            10 => Op::PollInBackend,
            11 => Op::PollOutClient,
            12 => Op::PollOutBackend,
            13 => Op::WatchClient,
            14 => Op::WatchBackend,
            _ => return None,
        })
    }

    fn recv(side: Side) -> Op {
        match side {
            Side::Client => Op::RecvClient,
            Side::Backend => Op::RecvBackend,
        }
    }

    fn send(side: Side) -> Op {
        match side {
            Side::Client => Op::SendClient,
            Side::Backend => Op::SendBackend,
        }
    }

    fn poll_in(side: Side) -> Op {
        match side {
            Side::Client => Op::PollInClient,
            Side::Backend => Op::PollInBackend,
        }
    }

    fn poll_out(side: Side) -> Op {
        match side {
            Side::Client => Op::PollOutClient,
            Side::Backend => Op::PollOutBackend,
        }
    }

    fn watch(side: Side) -> Op {
        match side {
            Side::Client => Op::WatchClient,
            Side::Backend => Op::WatchBackend,
        }
    }
}

/// Where a chunk's bytes are: a pool buffer (copied through user space), a pipe (spliced), or
/// the connection's spill (a stalled direction's bytes, moved out of the pool: see `spill.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Buf {
    Pool(u16),
    Pipe(PipeId),
    Spill(SpillId),
}

fn user_data(op: Op, index: u32) -> u64 {
    (op as u64) | (u64::from(index) << 8)
}

fn decode(user_data: u64) -> (Option<Op>, u32) {
    (Op::from_u8(user_data as u8), (user_data >> 8) as u32)
}

pub(crate) struct WorkerArgs {
    pub index: usize,
    pub config: Arc<PlaneConfig>,
    pub shared: Arc<Shared>,
    pub waker: Arc<EventFd>,
    pub counters: Arc<WorkerCounters>,
}

/// One listener of this worker.
struct Listening {
    socket: Socket,
    /// The listener's readiness poll (multishot POLLIN) is armed.
    armed: bool,
    /// Not before this moment (EMFILE back-off).
    paused_until: Option<Instant>,
    /// Stopped because `max_connections` was reached (queue mode).
    capped: bool,
    /// A udp listener (served by `udp.rs`): never accepts.
    udp: bool,
}

/// One proxied connection: its state machine and its sockets.
struct Slot {
    conn: Conn<Buf>,
    listener: usize,
    client: Socket,
    client_addr: SocketAddr,
    backend: Option<Socket>,
    backend_id: Option<BackendId>,
    /// The address of `backend_id`, for the log.
    backend_addr: Option<SocketAddr>,
    /// Backends already tried (allocated only on a retry).
    tried: Vec<BackendId>,
    /// Operations submitted and not yet completed: the slot is freed only at zero.
    in_flight: u16,
    closing: Option<CloseReason>,
    /// Counted in the backend's active gauge.
    backend_counted: bool,
    /// A client byte was written to the backend. A reset after that may be the server's
    /// answer to what the client sent (servers reset when they close with unread input), so
    /// only a reset before it counts against the backend's passive health, and only from then
    /// on does the connection count as a success.
    client_bytes_forwarded: bool,
    /// Counted in the backend's shared count of active connections (which `least_connections`
    /// and `power_of_two` read) from the pick until the close begins.
    load: Option<ActiveGuard>,
    /// Per direction (`Dir as usize`): splicing rather than copying, the pipe leased while
    /// it holds bytes, and the length of a splice-out waiting for POLLOUT.
    splicing: [bool; 2],
    pipe: [Option<PipeId>; 2],
    pending_out: [u32; 2],
    /// Per direction: the last receive left bytes in the socket, so the next one should try
    /// at once rather than wait for readiness first.
    source_nonempty: [bool; 2],
    /// Per direction: since when its send has waited (a pool send submitted, or a splice or
    /// spill send waiting for POLLOUT), and whether the pool send was cancelled to move its
    /// bytes to `spill` (see `reclaim_buffers`).
    send_since: [Option<Instant>; 2],
    stopping: [bool; 2],
    spill: Spill,
}

struct Worker {
    index: usize,
    config: Arc<PlaneConfig>,
    shared: Arc<Shared>,
    counters: Arc<WorkerCounters>,
    ring: Uring,
    waker: Arc<EventFd>,
    listeners: Vec<Listening>,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    live: usize,
    timers: Timers,
    /// Connections whose receive found the pool empty, oldest first.
    buffer_waiters: VecDeque<u32>,
    /// Connections accepted while no fd was left for their backend socket (see `park`).
    queued: VecDeque<(usize, Socket)>,
    snapshot: Arc<Snapshot>,
    pickers: Vec<Picker>,
    pipes: PipePool,
    phase: u8,
    completions: Vec<Completion>,
    /// Per listener (config order): the udp listener's sessions, `None` for tcp listeners.
    udp: Vec<Option<udp::UdpListener>>,
    udp_ops: udp::UdpOps,
    /// A listener receive stopped because the datagram pool was empty.
    udp_starved: bool,
    /// A listener receive failed: re-arm at this time.
    udp_rearm_at: Option<Instant>,
    /// While the buffer pool runs low: the next scan for stalled directions.
    reclaim_at: Option<Instant>,
}

/// The thread body: set up, report readiness, run until drained or closed. An error after
/// readiness (the ring failed) is returned: the control plane stops the process.
pub(crate) fn run(
    args: WorkerArgs,
    ready: mpsc::Sender<Result<usize, StartError>>,
) -> io::Result<()> {
    let index = args.index;
    let mut worker = match Worker::new(args) {
        Ok(w) => w,
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    let _ = ready.send(Ok(index));
    drop(ready);
    worker.run()
}

impl Worker {
    fn new(args: WorkerArgs) -> Result<Worker, StartError> {
        let WorkerArgs {
            index,
            config,
            shared,
            waker,
            counters,
        } = args;
        if config.pin_workers {
            match sockets::pin_to_cpu(index) {
                Ok(cpu) => tracing::debug!(worker = index, cpu, "pinned"),
                Err(e) => tracing::warn!(
                    worker = index,
                    error = e.to_string(),
                    "could not pin worker"
                ),
            }
        }
        let mut ring = Uring::new(
            RING_ENTRIES,
            BUFFER_COUNT,
            BUFFER_SIZE,
            RING_LOW,
            // Room for connects in flight grows with the slab; start small (a fd limit of a
            // million would otherwise cost megabytes per worker up front).
            CONNECT_SLOTS_INITIAL,
        )?;
        if index == 0 {
            tracing::info!(features = ring.features().to_string(), "io_uring ready");
        }
        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut udp = Vec::with_capacity(config.listeners.len());
        for (i, plan) in config.listeners.iter().enumerate() {
            let binding = |e| StartError::Os {
                context: format!("listener {:?}: binding {}", plan.name, plan.bind),
                source: e,
            };
            if let Some(udp_plan) = plan.udp {
                ring.enable_datagrams(
                    udp::DATAGRAM_BUFFERS,
                    udp::DATAGRAM_BUFFER_SIZE,
                    u32::from(udp::DATAGRAM_BUFFERS) / 4,
                )?;
                let socket = sockets::udp_listener(plan.bind).map_err(binding)?;
                let capacity = udp::table_capacity(&udp_plan, config.workers, index);
                let clone = socket.try_clone().map_err(binding)?;
                udp.push(Some(udp::UdpListener::new(
                    clone, plan.bind, udp_plan, capacity,
                )));
                listeners.push(Listening {
                    socket,
                    armed: false,
                    paused_until: None,
                    capped: false,
                    udp: true,
                });
                continue;
            }
            let socket = sockets::listener(plan.bind).map_err(binding)?;
            // Readiness, not a multishot accept: see `accept_waiting`.
            ring.poll_in_multi(socket.as_raw_fd(), user_data(Op::Accept, i as u32));
            udp.push(None);
            listeners.push(Listening {
                socket,
                armed: true,
                paused_until: None,
                capped: false,
                udp: false,
            });
        }
        ring.poll_in_multi(waker.as_fd().as_raw_fd(), user_data(Op::Wake, 0));
        let snapshot = shared.snapshots.load();
        let pickers = make_pickers(&snapshot, index);
        let pipes = PipePool::new(config.pipes_per_worker, PIPE_SIZE);
        Ok(Worker {
            index,
            config,
            shared,
            counters,
            ring,
            waker,
            listeners,
            slots: Vec::new(),
            free_slots: Vec::new(),
            live: 0,
            timers: Timers::default(),
            buffer_waiters: VecDeque::new(),
            queued: VecDeque::new(),
            snapshot,
            pickers,
            pipes,
            phase: crate::RUNNING,
            completions: Vec::with_capacity(RING_ENTRIES as usize),
            udp,
            udp_ops: udp::UdpOps::default(),
            udp_starved: false,
            udp_rearm_at: None,
            reclaim_at: None,
        })
        .map(|mut worker| {
            for listener in 0..worker.udp.len() {
                worker.arm_udp_listener(listener);
            }
            worker
        })
    }

    fn run(&mut self) -> io::Result<()> {
        #[cfg(debug_assertions)]
        let fault = crate::TestFault::from_env(self.index);
        loop {
            #[cfg(debug_assertions)]
            if let Some(fault) = &fault {
                fault.check()?;
            }
            let timeout = self.sleep_for(Instant::now());
            self.ring.submit_and_wait(Some(timeout))?;
            let mut completions = std::mem::take(&mut self.completions);
            self.ring.reap(&mut completions);
            let now = Instant::now();
            for completion in &completions {
                self.complete(*completion, now);
            }
            self.completions = completions;
            self.ring.top_up(RING_LOW);
            self.counters.pipes_leased.set(self.pipes.leased() as u64);
            self.counters.pipes_shrunk.set(self.pipes.shrunk);
            self.fire_timers(now);
            self.expire_udp(now);
            self.reclaim_buffers(now);
            self.feed_buffer_waiters(now);
            self.feed_udp(now);
            self.adopt_snapshot(now);
            self.follow_phase(now);
            self.serve_queued(now);
            self.resume_accepts(now);
            if self.phase >= DRAINING && self.live == 0 {
                return Ok(());
            }
        }
    }

    /// How long the next wait may last: until the earliest timer, capped.
    fn sleep_for(&mut self, now: Instant) -> Duration {
        let mut until = now + MAX_SLEEP;
        // Stale entries are dropped here, so that the sleep is not cut short for them.
        if let Some(at) = self.timers.next() {
            until = until.min(at);
        }
        for l in &self.listeners {
            if let Some(at) = l.paused_until {
                until = until.min(at);
            }
            if l.capped {
                until = until.min(now + CAP_RECHECK);
            }
        }
        if !self.queued.is_empty() {
            until = until.min(now + CAP_RECHECK);
        }
        if self.pool_low()
            && let Some(at) = self.reclaim_at
        {
            until = until.min(at);
        }
        for at in [self.udp_next_expiry(), self.udp_rearm_at]
            .into_iter()
            .flatten()
        {
            until = until.min(at);
        }
        until
            .saturating_duration_since(now)
            .max(Duration::from_micros(100))
    }

    fn complete(&mut self, c: Completion, now: Instant) {
        if c.user_data & DATAGRAM_OP != 0 {
            self.udp_completed(c, now);
            return;
        }
        let (op, index) = decode(c.user_data);
        match op {
            Some(Op::Accept) => self.accepted(index as usize, c, now),
            Some(Op::Wake) => {
                let _ = self.waker.read();
                if !c.more() {
                    self.ring
                        .poll_in_multi(self.waker.as_fd().as_raw_fd(), user_data(Op::Wake, 0));
                }
            }
            Some(Op::Cancel) | None => {}
            Some(op) => self.connection_completed(op, index, c, now),
        }
    }

    fn connection_completed(&mut self, op: Op, index: u32, c: Completion, now: Instant) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            // Every completion of a slot arrives before the slot is freed (in_flight).
            debug_assert!(false, "completion for a free slot");
            if let Some(buf) = c.buffer() {
                self.ring.recycle(buf);
            }
            return;
        };
        slot.in_flight -= 1;
        match op {
            Op::Connect => self.connect_completed(index, c.result, now),
            Op::RecvClient => self.recv_completed(index, Side::Client, c, now),
            Op::RecvBackend => self.recv_completed(index, Side::Backend, c, now),
            Op::SendClient => self.send_completed(index, Side::Client, c.result, now),
            Op::SendBackend => self.send_completed(index, Side::Backend, c.result, now),
            Op::PollInClient => self.poll_in_completed(index, Side::Client, c.result, now),
            Op::PollInBackend => self.poll_in_completed(index, Side::Backend, c.result, now),
            Op::PollOutClient => self.poll_out_completed(index, Side::Client, c.result, now),
            Op::PollOutBackend => self.poll_out_completed(index, Side::Backend, c.result, now),
            Op::WatchClient => self.watch_completed(index, Side::Client, c.result, now),
            Op::WatchBackend => self.watch_completed(index, Side::Backend, c.result, now),
            Op::Accept | Op::Wake | Op::Cancel => {}
        }
        self.drive(index, now);
    }

    fn connect_completed(&mut self, index: u32, result: i32, now: Instant) {
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("completion of a live slot");
        let counters = slot.backend_id.and_then(|b| {
            self.counters.listeners[slot.listener]
                .backends
                .get(b.index())
        });
        if slot.closing.is_some() {
            // The connection closed while connecting (drain, shutdown). Its connect either was
            // cancelled by the close, which says nothing about the backend, or completed
            // before the cancel reached it: then arm nothing more, since a watch armed now
            // would never be cancelled (the close's cancels went out before it existed) and
            // the slot would never be freed.
            return;
        }
        if result >= 0 {
            if let Some(counters) = counters {
                counters.connections.add(1);
                counters.connections_active.add(1);
                slot.backend_counted = true;
            }
            // Connected through io_uring on a blocking socket (a non-blocking one would make
            // the connect report EINPROGRESS); from now on it is non-blocking like the
            // client's, for splice(2).
            if let Some(backend) = &slot.backend {
                let _ = backend.set_nonblocking(true);
            }
            // Watch both sockets for a reset from now on (see `watch_completed`).
            for side in [Side::Client, Side::Backend] {
                let fd = side_fd(slot, side);
                slot.in_flight += 1;
                self.ring
                    .poll_once(fd, libc::POLLERR, user_data(Op::watch(side), index));
            }
            slot.conn.handle_connected(now);
            return;
        }
        if let Some(counters) = counters {
            counters.connect_failures.add(1);
        }
        if let Some(guard) = &slot.load {
            guard.load().mark_failing();
            report(
                &self.config,
                slot.listener,
                guard,
                BackendEvent::ConnectFailed,
            );
        }
        let error = match -result {
            libc::ECONNREFUSED => ConnectError::Refused,
            libc::ECANCELED | libc::ETIMEDOUT => ConnectError::TimedOut,
            _ => ConnectError::Other,
        };
        tracing::debug!(
            listener = %self.config.listeners[slot.listener].name,
            backend = %DisplayAddr(slot.backend_addr),
            error = io::Error::from_raw_os_error(-result).to_string(),
            "connect failed"
        );
        // The failed socket is closed now; a retry opens a new one.
        slot.backend = None;
        slot.conn.handle_connect_failed(error, now);
    }

    fn recv_completed(&mut self, index: u32, side: Side, c: Completion, now: Instant) {
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("completion of a live slot");
        slot.source_nonempty[Dir::from_source(side) as usize] = c.socket_nonempty();
        let outcome = match (c.result, c.buffer()) {
            (n, Some(buf)) if n > 0 => {
                // A full buffer: more is likely waiting; splice the rest of the burst.
                if n as u32 == BUFFER_SIZE && self.pipes.capacity() > 0 {
                    slot.splicing[Dir::from_source(side) as usize] = true;
                }
                RecvOutcome::Data {
                    buf: Buf::Pool(buf),
                    len: n as u32,
                }
            }
            (n, Some(buf)) => {
                // A buffer with no bytes: give it straight back.
                self.ring.recycle(buf);
                if n == 0 {
                    RecvOutcome::Eof
                } else {
                    RecvOutcome::Error
                }
            }
            (0, None) => RecvOutcome::Eof,
            (n, None) => match -n {
                libc::ENOBUFS => {
                    self.counters.buffer_waits.add(1);
                    self.buffer_waiters.push_back(index);
                    RecvOutcome::NoBuffers
                }
                libc::ECANCELED => RecvOutcome::Cancelled,
                libc::EAGAIN | libc::EINTR => RecvOutcome::WouldBlock,
                libc::ECONNRESET => RecvOutcome::Reset,
                _ => RecvOutcome::Error,
            },
        };
        slot.conn.handle_recv(side, outcome, now);
    }

    fn send_completed(&mut self, index: u32, to: Side, result: i32, now: Instant) {
        let outcome = match result {
            n if n >= 0 => {
                self.count_sent(index, to, n as u32);
                SendOutcome::Sent(n as u32)
            }
            n if -n == libc::ECANCELED => SendOutcome::Cancelled,
            n if -n == libc::EAGAIN || -n == libc::EINTR => SendOutcome::Sent(0),
            _ => SendOutcome::Reset,
        };
        let Worker {
            ring,
            slots,
            counters,
            ..
        } = self;
        let slot = slots[index as usize]
            .as_mut()
            .expect("completion of a live slot");
        let dir = Dir::from_source(to.other()) as usize;
        slot.send_since[dir] = None;
        if std::mem::take(&mut slot.stopping[dir]) {
            // `reclaim_buffers` cancelled this send: what it did not write moves to the spill.
            let spill = &mut slot.spill;
            slot.conn.handle_sent_rehomed(to, outcome, now, |chunk| {
                spill_chunk(ring, counters, spill, chunk)
            });
        } else {
            slot.conn.handle_sent(to, outcome, now);
        }
    }

    /// Bytes written toward `to`: in the backend's counters, and for passive health (see
    /// `client_bytes_forwarded`).
    fn count_sent(&mut self, index: u32, to: Side, n: u32) {
        let Some(slot) = self.slots[index as usize].as_mut() else {
            return;
        };
        if to == Side::Backend && n > 0 && !slot.client_bytes_forwarded {
            slot.client_bytes_forwarded = true;
            // The backend took a client byte: from now on this connection says the backend
            // works (a connect alone does not: a backend that resets every connection at once
            // would recover on each connect and never be ejected).
            if let Some(guard) = &slot.load
                && guard.load().clear_failing()
            {
                report(&self.config, slot.listener, guard, BackendEvent::Recovered);
            }
        }
        let listener = &self.counters.listeners[slot.listener];
        if let Some(b) = slot
            .backend_id
            .and_then(|b| listener.backends.get(b.index()))
        {
            match to {
                Side::Backend => b.bytes_to_backend.add(u64::from(n)),
                Side::Client => b.bytes_to_client.add(u64::from(n)),
            }
        }
    }

    /// `side` is readable for a splice: lease a pipe now and fill it.
    fn poll_in_completed(&mut self, index: u32, side: Side, result: i32, now: Instant) {
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("completion of a live slot");
        let dir = Dir::from_source(side) as usize;
        if result < 0 || slot.closing.is_some() {
            slot.conn.handle_recv(side, RecvOutcome::Cancelled, now);
            return;
        }
        let fd = side_fd(slot, side);
        // A sink that holds a backlog of unsent bytes is not keeping up: a pipe filled for it
        // would sit there until the slow peer drains it. Copy instead, and keep the pipes for
        // sinks that keep up. Without this, a thousand connections to a slow backend held
        // every pipe of the worker, and the fast connections beside them fell back to copying
        // (`tests/fault_slow.rs`: 64% of their throughput). The mark is half of
        // TCP_NOTSENT_LOWAT, below which a backed-up sink's unsent bytes never fall for long;
        // at 64 KiB fast bulk sinks crossed it often enough to cost 3-4% of 8-stream loopback
        // throughput, at 128 KiB nothing measurable (`bench/ab.sh`, 16 rounds).
        let sink_unsent = slot.pipe[dir]
            .is_none()
            .then(|| side_socket(slot, side.other()))
            .flatten()
            .and_then(|sink| sluice_uring::unsent_bytes(sink).ok());
        let sink_backed_up = sink_unsent.is_some_and(|n| n >= SINK_BACKLOG);
        // A fresh pipe takes no more than the sink takes at once (what TCP_NOTSENT_LOWAT leaves
        // it), so that the splice-out empties it and it goes back to the pool even if the
        // sink's peer stops reading right then. Filled to its size, a pipe kept what the sink
        // did not take for as long as that peer took: a peer that never reads, forever (400
        // such connections held 96 of the worker's 256 pipes, `tests/fault_stalled_readers.rs`).
        let fill_max = sink_unsent.map_or(u32::MAX, |n| sockets::NOTSENT_LOWAT.saturating_sub(n));
        // The pipe is leased only now that bytes are ready: a connection waiting for its peer
        // holds none.
        let leased = if sink_backed_up {
            None
        } else {
            slot.pipe[dir].or_else(|| self.pipes.lease())
        };
        let Some(pipe) = leased else {
            // Every pipe is in use, or the sink is backed up: copy this chunk.
            slot.splicing[dir] = false;
            slot.in_flight += 1;
            self.ring.recv(fd, false, user_data(Op::recv(side), index));
            return;
        };
        slot.pipe[dir] = Some(pipe);
        let filled = match side_socket(slot, side) {
            Some(socket) => self.pipes.fill(pipe, socket, fill_max),
            None => Spliced::Failed(libc::EBADF),
        };
        let outcome = match filled {
            Spliced::Moved(n) => {
                if n < SPLICE_MIN {
                    slot.splicing[dir] = false;
                }
                RecvOutcome::Data {
                    buf: Buf::Pipe(pipe),
                    len: n,
                }
            }
            Spliced::Eof => RecvOutcome::Eof,
            Spliced::WouldBlock => {
                slot.in_flight += 1;
                if self.pipes.held(pipe) > 0 {
                    // The pipe has no free slot left (a splice fills pipe slots with partial
                    // pages, so this happens before its byte room is used): copy this chunk
                    // instead of spinning on readiness.
                    self.ring.recv(fd, false, user_data(Op::recv(side), index));
                } else {
                    // Readiness without bytes (a spurious wake-up): wait again, without
                    // holding the empty pipe meanwhile.
                    self.ring
                        .poll_once(fd, libc::POLLIN, user_data(Op::poll_in(side), index));
                    self.return_idle_pipe(index, dir);
                }
                return;
            }
            Spliced::Failed(libc::ECONNRESET) => RecvOutcome::Reset,
            Spliced::Failed(_) => RecvOutcome::Error,
        };
        slot.conn.handle_recv(side, outcome, now);
        self.return_idle_pipe(index, dir);
    }

    /// `to` is writable again: retry the splice-out that would have blocked.
    fn poll_out_completed(&mut self, index: u32, to: Side, result: i32, now: Instant) {
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("completion of a live slot");
        let dir = Dir::from_source(to.other());
        slot.send_since[dir as usize] = None;
        if result < 0 || slot.closing.is_some() {
            slot.conn.handle_sent(to, SendOutcome::Cancelled, now);
            return;
        }
        if let Some(Chunk {
            buf: Buf::Spill(id),
            offset,
            len,
        }) = slot.conn.sending(dir)
        {
            self.spill_out(index, to, id, offset, len, now);
            return;
        }
        let len = slot.pending_out[dir as usize];
        self.splice_out(index, to, len, now);
    }

    /// The error watch on `side` fired. A direction stalled behind a slow peer has no receive
    /// armed on its source, so a reset there would be noticed only once the slow peer drained
    /// every queued byte, at its pace (a backend that never reads: never): 1000 clients that
    /// reset while pushing into a slow backend stayed open in Sluice for minutes
    /// (`tests/fault_slow.rs`). POLLERR is a reset; POLLHUP/POLLRDHUP alone is an orderly
    /// close that the receives see in order, and the watch ends there (re-arming a poll on a
    /// condition that stays would spin).
    fn watch_completed(&mut self, index: u32, side: Side, result: i32, now: Instant) {
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("completion of a live slot");
        if result > 0 && (result & i32::from(libc::POLLERR)) != 0 && slot.closing.is_none() {
            slot.conn.handle_peer_error(side, now);
        }
    }

    /// Runs a connection's actions until it has none, then registers its deadline.
    fn drive(&mut self, index: u32, now: Instant) {
        loop {
            let Some(slot) = self.slots[index as usize].as_mut() else {
                return;
            };
            let Some(action) = slot.conn.poll_action() else {
                break;
            };
            self.act(index, action, now);
        }
        let Some(slot) = self.slots[index as usize].as_mut() else {
            return;
        };
        if slot.closing.is_some() && slot.in_flight == 0 {
            self.free(index);
            return;
        }
        // No deadline any more (a connect that completed, on a listener without an idle
        // timeout) costs no wake-up; a later one (activity moved the idle timeout on) costs
        // one per idle period: see `timers.rs`.
        self.timers.set(index, slot.conn.poll_timeout());
    }

    fn act(&mut self, index: u32, action: Action<Buf>, now: Instant) {
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("drive checked the slot");
        match action {
            Action::Connect => self.connect(index, now),
            Action::CancelConnect => {
                self.ring
                    .cancel(user_data(Op::Connect, index), user_data(Op::Cancel, index));
            }
            Action::Recv(side) => {
                let fd = side_fd(slot, side);
                let dir = Dir::from_source(side) as usize;
                slot.in_flight += 1;
                if slot.splicing[dir] {
                    // A pipe is leased when readiness arrives, not while waiting for it.
                    if slot.pipe[dir].is_none_or(|p| self.pipes.room(p) > 0) {
                        let op = user_data(Op::poll_in(side), index);
                        self.ring.poll_once(fd, libc::POLLIN, op);
                        return;
                    }
                    // The pipe still holding the previous chunk is full: copy this one.
                    slot.splicing[dir] = false;
                }
                let poll_first = !slot.source_nonempty[dir];
                self.ring
                    .recv(fd, poll_first, user_data(Op::recv(side), index));
            }
            Action::Send {
                to,
                buf: Buf::Pool(buf),
                offset,
                len,
            } => {
                let fd = side_fd(slot, to);
                slot.in_flight += 1;
                slot.send_since[Dir::from_source(to.other()) as usize] = Some(now);
                self.ring
                    .send(fd, buf, offset, len, user_data(Op::send(to), index));
            }
            Action::Send {
                to,
                buf: Buf::Pipe(_),
                len,
                ..
            } => self.splice_out(index, to, len, now),
            Action::Send {
                to,
                buf: Buf::Spill(id),
                offset,
                len,
            } => self.spill_out(index, to, id, offset, len, now),
            Action::Release(Buf::Pool(buf)) => self.ring.recycle(buf),
            Action::Release(Buf::Spill(id)) => slot.spill.release(id),
            Action::Release(Buf::Pipe(pipe)) => {
                if let Some(dir) = slot.pipe.iter().position(|p| *p == Some(pipe)) {
                    self.return_idle_pipe(index, dir);
                }
            }
            Action::ShutdownWrite(side) => {
                let socket = match side {
                    Side::Client => Some(&slot.client),
                    Side::Backend => slot.backend.as_ref(),
                };
                // ENOTCONN when the peer is already gone: the reads will tell.
                let _ = socket.map(|s| s.shutdown(std::net::Shutdown::Write));
            }
            Action::QueryUnacked(side) => {
                let socket = match side {
                    Side::Client => Some(&slot.client),
                    Side::Backend => slot.backend.as_ref(),
                };
                let unacked = socket
                    .map(|s| sluice_uring::unacked_bytes(s.as_fd()).unwrap_or(0))
                    .unwrap_or(0);
                slot.conn.handle_unacked(side, unacked, now);
            }
            Action::Close(reason) => {
                // What a client can provoke says nothing about the backend: see
                // `client_bytes_forwarded` (`tests/passive_junk.rs`).
                if reason.kind == CloseKind::BackendReset
                    && !slot.client_bytes_forwarded
                    && let Some(guard) = &slot.load
                {
                    guard.load().mark_failing();
                    report(&self.config, slot.listener, guard, BackendEvent::Reset);
                }
                slot.load = None;
                self.counters.listeners[slot.listener].closed[reason.kind.index()].add(1);
                tracing::debug!(
                    listener = %self.config.listeners[slot.listener].name,
                    client = %slot.client_addr,
                    backend = %DisplayAddr(slot.backend_addr),
                    reason = reason.kind.as_str(),
                    "connection closed"
                );
                if reason.reset_client {
                    let _ = slot.client.set_linger(Some(Duration::ZERO));
                }
                if reason.reset_backend
                    && let Some(b) = &slot.backend
                {
                    let _ = b.set_linger(Some(Duration::ZERO));
                }
                slot.closing = Some(reason);
                if slot.in_flight > 0 {
                    // Each operation a connection can have in flight, by its own user data:
                    // the kernel finds it directly, where a cancel by fd scans every armed
                    // request of the ring (quadratic when thousands of connections close at
                    // once: 6000 idle timeouts cost 5 s of CPU). One that is not in flight
                    // completes with ENOENT, ignored like every cancel's own completion.
                    for op in Op::CANCELLABLE {
                        self.ring
                            .cancel(user_data(op, index), user_data(Op::Cancel, index));
                    }
                }
            }
        }
    }

    /// Splices up to `len` bytes from the direction's pipe toward `to`; on EAGAIN waits for
    /// POLLOUT (the send stays in flight for the `Conn`).
    fn splice_out(&mut self, index: u32, to: Side, len: u32, now: Instant) {
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("splice on a live slot");
        let dir = Dir::from_source(to.other()) as usize;
        let fd = side_fd(slot, to);
        let Some(pipe) = slot.pipe[dir] else {
            slot.conn.handle_sent(to, SendOutcome::Reset, now);
            return;
        };
        let drained = match side_socket(slot, to) {
            Some(socket) => self.pipes.drain(pipe, socket, len),
            None => Spliced::Failed(libc::EBADF),
        };
        match drained {
            Spliced::Moved(n) => {
                self.counters.bytes_spliced.add(u64::from(n));
                self.count_sent(index, to, n);
                let slot = self.slots[index as usize]
                    .as_mut()
                    .expect("splice on a live slot");
                slot.conn.handle_sent(to, SendOutcome::Sent(n), now);
            }
            Spliced::WouldBlock => {
                slot.pending_out[dir] = len;
                slot.send_since[dir] = Some(now);
                slot.in_flight += 1;
                self.ring
                    .poll_once(fd, libc::POLLOUT, user_data(Op::poll_out(to), index));
            }
            Spliced::Eof | Spliced::Failed(_) => slot.conn.handle_sent(to, SendOutcome::Reset, now),
        }
    }

    /// Writes up to `len` bytes of spilled chunk `id` from `offset` toward `to` with a
    /// non-blocking `send(2)`; when the socket is full, waits for POLLOUT (the send stays in
    /// flight for the `Conn`), as `splice_out` does for a pipe.
    fn spill_out(
        &mut self,
        index: u32,
        to: Side,
        id: SpillId,
        offset: u32,
        len: u32,
        now: Instant,
    ) {
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("send on a live slot");
        let dir = Dir::from_source(to.other()) as usize;
        let bytes = slot
            .spill
            .bytes(id)
            .get(offset as usize..)
            .and_then(|b| b.get(..len as usize));
        let written = match (side_socket(slot, to), bytes) {
            (Some(socket), Some(bytes)) => SockRef::from(&socket)
                .send_with_flags(bytes, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT),
            _ => Err(io::Error::from_raw_os_error(libc::EBADF)),
        };
        match written {
            Ok(n) if n > 0 => {
                self.count_sent(index, to, n as u32);
                let slot = self.slots[index as usize]
                    .as_mut()
                    .expect("send on a live slot");
                slot.conn.handle_sent(to, SendOutcome::Sent(n as u32), now);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                slot.send_since[dir] = Some(now);
                slot.in_flight += 1;
                let fd = side_fd(slot, to);
                self.ring
                    .poll_once(fd, libc::POLLOUT, user_data(Op::poll_out(to), index));
            }
            // Sent again at once.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                slot.conn.handle_sent(to, SendOutcome::Sent(0), now);
            }
            // EPIPE, ECONNRESET, or a chunk that is not where the `Conn` says (never).
            Ok(_) | Err(_) => slot.conn.handle_sent(to, SendOutcome::Reset, now),
        }
    }

    /// Whether the buffer pool runs low (see `POOL_LOW`).
    fn pool_low(&self) -> bool {
        let pool = self.ring.pool();
        pool.free() as usize + pool.reserve() < POOL_LOW
    }

    /// While the buffer pool runs low, takes the bytes of stalled directions out of it. A send
    /// toward a peer that does not read stays in flight until the peer takes every byte, and
    /// its buffer and the one queued behind it stay taken meanwhile: about 2048 such directions
    /// held the whole pool, and every other connection of the worker waited for a buffer,
    /// forever with the idle timeout off (`tests/fault_stalled_readers.rs`). A direction whose
    /// send has waited `SEND_STALLED` is stalled: its pool send is cancelled, and what it did
    /// not write moves to the connection's spill when the cancel completes (`send_completed`);
    /// pool chunks queued behind a pipe or spilled chunk that waits for POLLOUT move at once.
    /// A healthy send never waits that long, so fast connections keep their pool buffers.
    fn reclaim_buffers(&mut self, now: Instant) {
        if !self.pool_low() {
            self.reclaim_at = None;
            return;
        }
        if self.reclaim_at.is_some_and(|at| now < at) {
            return;
        }
        self.reclaim_at = Some(now + RECLAIM_EVERY);
        let mut moved = Vec::new();
        let Worker {
            ring,
            slots,
            counters,
            ..
        } = self;
        for (index, slot) in slots.iter_mut().enumerate() {
            let Some(slot) = slot.as_mut().filter(|s| s.closing.is_none()) else {
                continue;
            };
            for dir in Dir::BOTH {
                let d = dir as usize;
                let stalled = slot.send_since[d]
                    .is_some_and(|since| now.saturating_duration_since(since) >= SEND_STALLED);
                if !stalled || slot.stopping[d] {
                    continue;
                }
                if let Some(Chunk {
                    buf: Buf::Pool(_), ..
                }) = slot.conn.sending(dir)
                {
                    slot.stopping[d] = true;
                    ring.cancel(
                        user_data(Op::send(dir.sink()), index as u32),
                        user_data(Op::Cancel, index as u32),
                    );
                } else {
                    let (spill, mut any) = (&mut slot.spill, false);
                    slot.conn.rehome(dir, |chunk| {
                        let spilled = spill_chunk(ring, counters, spill, chunk);
                        any |= spilled.is_some();
                        spilled
                    });
                    if any {
                        moved.push(index as u32);
                    }
                }
            }
        }
        // The buffers given up are released by the `Conn`'s actions.
        for index in moved {
            self.drive(index, now);
        }
    }

    /// Gives a direction's pipe back to the pool once it is empty and nothing will splice
    /// into it: an idle connection holds no pipe.
    fn return_idle_pipe(&mut self, index: u32, dir: usize) {
        let Some(slot) = self.slots[index as usize].as_mut() else {
            return;
        };
        if let Some(pipe) = slot.pipe[dir]
            && self.pipes.held(pipe) == 0
        {
            slot.pipe[dir] = None;
            self.pipes.give_back(pipe);
        }
    }

    /// Picks a backend not yet tried and starts connecting to it.
    fn connect(&mut self, index: u32, now: Instant) {
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("connect on a live slot");
        let listener = slot.listener;
        let Some(backends) = self.snapshot.listeners.get(listener) else {
            slot.conn
                .handle_connect_failed(ConnectError::NoBackend, now);
            return;
        };
        if let Some(previous) = slot.backend_id {
            if slot.tried.is_empty() {
                slot.tried.reserve_exact(4);
            }
            slot.tried.push(previous);
        }
        let picked =
            self.pickers[listener].pick(backends, ClientAddr(slot.client_addr), &slot.tried);
        let Some(id) = picked else {
            slot.conn
                .handle_connect_failed(ConnectError::NoBackend, now);
            return;
        };
        let backend = &backends.backends[id.index()];
        let addr = backend.addr;
        // Replacing the guard uncounts the backend of the previous attempt.
        slot.load = Some(backend.open());
        slot.backend_id = Some(id);
        slot.backend_addr = Some(addr);
        match sockets::backend_socket(addr, &self.config.listeners[listener].sockets) {
            Ok(socket) => {
                let fd = socket.as_raw_fd();
                slot.backend = Some(socket);
                slot.in_flight += 1;
                self.ring.connect(
                    fd,
                    index as usize,
                    addr.into(),
                    user_data(Op::Connect, index),
                );
            }
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                    && slot.tried.is_empty()
                    && slot.in_flight == 0 =>
            {
                self.park(index, now);
            }
            Err(e) => {
                tracing::debug!(error = e.to_string(), "could not create a backend socket");
                slot.conn.handle_connect_failed(ConnectError::Other, now);
            }
        }
    }

    /// The listener's readiness poll completed: accept what waits in its backlog.
    fn accepted(&mut self, listener: usize, c: Completion, now: Instant) {
        // The last completion of a poll we cancelled may arrive after a new one was armed:
        // `cancel_accept` already marked it disarmed, and the new one stays.
        if c.result == -libc::ECANCELED {
            return;
        }
        if !c.more() {
            self.listeners[listener].armed = false;
        }
        if c.result < 0 {
            self.accept_failed(listener, -c.result, now);
            return;
        }
        self.accept_waiting(listener, now);
    }

    /// Accepts the connections waiting in `listener`'s backlog one at a time, each only after
    /// taking room for it. A multishot accept would take the whole backlog at once: past
    /// `max_connections` (the excess then had to be reset, queue mode or not) and past the fds
    /// left for backend sockets. Stops when the backlog is empty, at the cap (queue mode), on
    /// an error (EMFILE pauses accepting), or when draining.
    fn accept_waiting(&mut self, listener: usize, now: Instant) {
        let queue = self.config.listeners[listener].on_max_connections == OnMaxConnections::Queue;
        loop {
            let l = &self.listeners[listener];
            if self.phase >= DRAINING || l.capped || l.paused_until.is_some_and(|t| now < t) {
                return;
            }
            let admitted = self.admit(listener);
            if !admitted && queue {
                // Another worker took the last room: the connection stays in the backlog.
                self.cap_listener(listener);
                return;
            }
            match self.listeners[listener].socket.accept() {
                Ok((socket, _)) if admitted => self.serve(listener, socket, now),
                Ok((socket, _)) => {
                    // Reject mode, beyond the cap.
                    let _ = socket.set_linger(Some(Duration::ZERO));
                    self.counters.listeners[listener].rejected.add(1);
                }
                Err(e) => {
                    if admitted {
                        self.release(listener);
                    }
                    match e.raw_os_error() {
                        Some(libc::EINTR | libc::ECONNABORTED) => {}
                        Some(libc::EAGAIN) | None => return,
                        Some(errno) => {
                            self.accept_failed(listener, errno, now);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Gives back the room `admit` took, for a connection that was not accepted after all.
    fn release(&mut self, listener: usize) {
        self.shared.listener_active[listener].fetch_sub(1, Ordering::Relaxed);
        self.shared.total_active.fetch_sub(1, Ordering::Relaxed);
    }

    /// The first connect of a connection found no fd left for a backend socket (EMFILE
    /// between its accept and its connect): rather than reset a client nothing was forwarded
    /// for yet, undo its slot and put it back among the accepted-but-unserved ones, first in
    /// line, and pause accepting as for EMFILE at accept. It is served once fds free up.
    fn park(&mut self, index: u32, now: Instant) {
        let Some(slot) = self.slots[index as usize].take() else {
            return;
        };
        self.free_slots.push(index);
        self.live -= 1;
        self.timers.clear(index);
        let listener = slot.listener;
        let counters = &self.counters.listeners[listener];
        counters.accepted.sub(1);
        counters.active.sub(1);
        self.release(listener);
        self.queued.push_front((listener, slot.client));
        self.accept_failed(listener, libc::EMFILE, now);
    }

    /// Takes room for one connection of `listener` under its `max_connections` and the
    /// process cap (one shared atomic each); false, and nothing taken, when there is none. In
    /// queue mode, taking the last room stops this worker's accepts.
    fn admit(&mut self, listener: usize) -> bool {
        let plan = &self.config.listeners[listener];
        let active = self.shared.listener_active[listener].fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.shared.total_active.fetch_add(1, Ordering::Relaxed) + 1;
        let budget_full =
            |total: u32| plan.within_fd_budget && total >= self.config.connections_max_total;
        if active > plan.max_connections || budget_full(total - 1) {
            self.shared.listener_active[listener].fetch_sub(1, Ordering::Relaxed);
            self.shared.total_active.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        if plan.on_max_connections == OnMaxConnections::Queue
            && (active >= plan.max_connections || budget_full(total))
        {
            // The cap is reached with this one: stop accepting so the next ones wait in the
            // kernel backlog.
            self.cap_listener(listener);
        }
        true
    }

    /// Starts proxying an admitted connection: its slot, its state machine, its first connect.
    fn serve(&mut self, listener: usize, socket: Socket, now: Instant) {
        // accept(2) does not pass O_NONBLOCK on, and a splice to or from a blocking socket
        // blocks the whole worker (found by a slow client under a 1 GiB stream: the worker sat
        // in splice_to_socket while every other connection, and accept, waited).
        if let Err(error) = socket.set_nonblocking(true) {
            tracing::warn!(%error, "could not make an accepted socket non-blocking; dropped");
            self.release(listener);
            return;
        }
        self.counters.listeners[listener].accepted.add(1);
        self.counters.listeners[listener].active.add(1);
        let _ = sockets::tune(
            &SockRef::from(&socket),
            &self.config.listeners[listener].sockets,
        );
        let client_addr = socket
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let slot = Slot {
            conn: Conn::new(self.config.listeners[listener].limits, now),
            listener,
            client: socket,
            client_addr,
            backend: None,
            backend_id: None,
            backend_addr: None,
            tried: Vec::new(),
            in_flight: 0,
            closing: None,
            backend_counted: false,
            client_bytes_forwarded: false,
            load: None,
            splicing: [false; 2],
            pipe: [None; 2],
            pending_out: [0; 2],
            // The client may have sent with its SYN's ACK already: try at once.
            source_nonempty: [true; 2],
            send_since: [None; 2],
            stopping: [false; 2],
            spill: Spill::default(),
        };
        let index = self.insert(slot);
        self.drive(index, now);
    }

    /// Serves connections that were accepted while there were no fds for their backend
    /// sockets (`park`), oldest first, once the pause is over and before accepting resumes;
    /// on drain they are closed unserved.
    fn serve_queued(&mut self, now: Instant) {
        if self.phase >= DRAINING {
            self.queued.clear();
            return;
        }
        while let Some(&(listener, _)) = self.queued.front() {
            if self.listeners[listener]
                .paused_until
                .is_some_and(|t| now < t)
            {
                break;
            }
            if !self.admit(listener) {
                break;
            }
            let (_, socket) = self.queued.pop_front().expect("front was Some");
            self.serve(listener, socket, now);
        }
    }

    fn accept_failed(&mut self, listener: usize, errno: i32, now: Instant) {
        match errno {
            libc::ECANCELED => {}
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                self.counters.listeners[listener].accept_fd_exhausted.add(1);
                self.listeners[listener].paused_until = Some(now + ACCEPT_PAUSE);
                let ms = self.shared.started.elapsed().as_millis() as u64;
                let last = self.shared.emfile_logged_ms.load(Ordering::Relaxed);
                if (ms >= last + 1000 || last == 0)
                    && self
                        .shared
                        .emfile_logged_ms
                        .compare_exchange(last, ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        listener = %self.config.listeners[listener].name,
                        error = io::Error::from_raw_os_error(errno).to_string(),
                        "out of file descriptors: accepting paused for {ACCEPT_PAUSE:?}"
                    );
                }
            }
            _ => {
                tracing::warn!(
                    listener = %self.config.listeners[listener].name,
                    error = io::Error::from_raw_os_error(errno).to_string(),
                    "accept failed; retrying after {ACCEPT_PAUSE:?}"
                );
                self.listeners[listener].paused_until = Some(now + ACCEPT_PAUSE);
            }
        }
        if self.listeners[listener].armed {
            // The listener's readiness poll stays armed: stop it so that the pause holds (it
            // is re-armed by `resume_accepts`, and completes at once if connections wait).
            self.cancel_accept(listener);
        }
    }

    fn cap_listener(&mut self, listener: usize) {
        if !self.listeners[listener].capped {
            self.counters.listeners[listener].paused_at_cap.add(1);
        }
        self.listeners[listener].capped = true;
        if self.listeners[listener].armed {
            self.cancel_accept(listener);
        }
    }

    fn cancel_accept(&mut self, listener: usize) {
        self.ring.cancel(
            user_data(Op::Accept, listener as u32),
            user_data(Op::Cancel, 0),
        );
        self.listeners[listener].armed = false;
    }

    /// Re-arms accepts whose pause is over or whose listener has room again.
    fn resume_accepts(&mut self, now: Instant) {
        if self.phase >= DRAINING {
            return;
        }
        let total = self.shared.total_active.load(Ordering::Relaxed);
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if l.udp {
                continue;
            }
            if l.paused_until.is_some_and(|t| now >= t) {
                l.paused_until = None;
            }
            if l.capped {
                let plan = &self.config.listeners[i];
                let active = self.shared.listener_active[i].load(Ordering::Relaxed);
                let budget_full =
                    plan.within_fd_budget && total >= self.config.connections_max_total;
                if active < plan.max_connections && !budget_full {
                    l.capped = false;
                }
            }
            if !l.armed && !l.capped && l.paused_until.is_none() {
                // A poll armed on a listener with connections waiting completes at once.
                l.armed = true;
                self.ring
                    .poll_in_multi(l.socket.as_raw_fd(), user_data(Op::Accept, i as u32));
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(index) = self.timers.pop_due(now) {
            let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
                continue;
            };
            slot.conn.handle_timeout(now);
            self.drive(index, now);
        }
    }

    /// Re-arms receives that found the pool empty, as many as there are free buffers.
    fn feed_buffer_waiters(&mut self, now: Instant) {
        let mut budget = self.ring.pool().free() as usize / 2;
        while budget > 0 {
            let Some(index) = self.buffer_waiters.pop_front() else {
                break;
            };
            let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
                continue;
            };
            if !slot.conn.waits_for_buffers() {
                continue;
            }
            budget -= 1;
            slot.conn.handle_buffers_available();
            self.drive(index, now);
        }
    }

    fn adopt_snapshot(&mut self, now: Instant) {
        if self.shared.snapshots.generation() != self.snapshot.generation {
            self.snapshot = self.shared.snapshots.load();
            self.pickers = make_pickers(&self.snapshot, self.index);
            self.close_drained(now);
        }
    }

    /// Closes the connections whose backend's drain time is over. The control plane flags the
    /// backend, then publishes a snapshot (without it), so every worker passes here after the
    /// flag is set.
    fn close_drained(&mut self, now: Instant) {
        for index in 0..self.slots.len() {
            let Some(slot) = self.slots[index].as_mut() else {
                continue;
            };
            if slot.load.as_ref().is_some_and(|g| g.load().is_drained()) {
                slot.conn.handle_drained();
                self.drive(index as u32, now);
            }
        }
    }

    fn follow_phase(&mut self, now: Instant) {
        let phase = self.shared.phase.load(Ordering::SeqCst);
        if phase == self.phase {
            return;
        }
        if phase >= DRAINING && self.phase < DRAINING {
            for i in 0..self.listeners.len() {
                if self.listeners[i].armed && !self.listeners[i].udp {
                    self.cancel_accept(i);
                }
            }
            // UDP sessions never delay shutdown.
            self.phase = phase;
            self.close_udp();
        }
        if phase >= CLOSING {
            for index in 0..self.slots.len() as u32 {
                if let Some(slot) = self.slots[index as usize].as_mut() {
                    slot.conn.handle_shutdown();
                    self.drive(index, now);
                }
            }
        }
        self.phase = phase;
    }

    fn insert(&mut self, slot: Slot) -> u32 {
        self.live += 1;
        if let Some(index) = self.free_slots.pop() {
            self.slots[index as usize] = Some(slot);
            index
        } else {
            self.slots.push(Some(slot));
            (self.slots.len() - 1) as u32
        }
    }

    /// Frees a closed slot whose operations have all completed: closes its sockets (a reset
    /// where the close reason says so, SO_LINGER was set at close) and updates the gauges.
    fn free(&mut self, index: u32) {
        let Some(slot) = self.slots[index as usize].take() else {
            return;
        };
        self.free_slots.push(index);
        self.live -= 1;
        self.timers.clear(index);
        // A pipe still holding bytes (the connection closed while its sink was full: reset,
        // idle, drain, shutdown) goes back too; the pool closes it rather than reuse it. Kept,
        // it was a lease and two fds lost for the life of the process
        // (`tests/pipe_release.rs`).
        for pipe in slot.pipe.iter().flatten() {
            self.pipes.give_back(*pipe);
        }
        let counters = &self.counters.listeners[slot.listener];
        counters.active.sub(1);
        if slot.backend_counted
            && let Some(b) = slot
                .backend_id
                .and_then(|b| counters.backends.get(b.index()))
        {
            b.connections_active.sub(1);
        }
        self.shared.listener_active[slot.listener].fetch_sub(1, Ordering::Relaxed);
        self.shared.total_active.fetch_sub(1, Ordering::Relaxed);
        drop(slot);
    }
}

/// An address for the log, or `none` (a connection closed before any backend was picked).
struct DisplayAddr(Option<SocketAddr>);

impl std::fmt::Display for DisplayAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("none"),
        }
    }
}

/// The answer to `Conn::rehome` for a stalled direction: a pool chunk's unsent bytes are copied
/// to the connection's spill (its buffer then goes back to the pool); other chunks stay.
fn spill_chunk(
    ring: &Uring,
    counters: &WorkerCounters,
    spill: &mut Spill,
    chunk: Chunk<Buf>,
) -> Option<(Buf, u32)> {
    let Buf::Pool(buf) = chunk.buf else {
        return None;
    };
    let bytes = ring.buffer(buf, chunk.offset, chunk.len);
    if bytes.len() != chunk.len as usize {
        return None;
    }
    let id = spill.store(bytes)?;
    counters.chunks_spilled.add(1);
    Some((Buf::Spill(id), 0))
}

fn side_fd(slot: &Slot, side: Side) -> RawFd {
    match side {
        Side::Client => slot.client.as_raw_fd(),
        // Actions toward the backend only come once it is connected.
        Side::Backend => slot.backend.as_ref().map_or(-1, AsRawFd::as_raw_fd),
    }
}

fn side_socket(slot: &Slot, side: Side) -> Option<std::os::fd::BorrowedFd<'_>> {
    match side {
        Side::Client => Some(slot.client.as_fd()),
        Side::Backend => slot.backend.as_ref().map(AsFd::as_fd),
    }
}

/// Hands `event` to the control plane, if it listens.
fn report(config: &PlaneConfig, listener: usize, guard: &ActiveGuard, event: BackendEvent) {
    if let Some(events) = &config.events {
        events.report(listener, guard.load(), event);
    }
}

/// One picker per listener. The random algorithms are seeded from the OS's randomness (through
/// std's `RandomState`), so that workers and instances draw different sequences.
fn make_pickers(snapshot: &Snapshot, worker: usize) -> Vec<Picker> {
    use std::hash::BuildHasher;
    let random = std::hash::RandomState::new();
    snapshot
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| Picker::new(l, worker, random.hash_one((worker, i))))
        .collect()
}
