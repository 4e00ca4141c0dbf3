//! The connection state machine driven by event sequences that the fuzzer's bytes choose.
//!
//! The model and its checks are those of `crates/sluice-conn/tests/random_events.rs`, with the
//! fuzzer instead of a seeded RNG picking each event and its details (outcome, length, partial
//! send, time step), and with more events: late connect completions, `NoBackend`, receive
//! errors, delayed answers to `QueryUnacked`, buffers coming back at any moment, drain and
//! shutdown, time that jumps to exactly a deadline or far past it, and chunks moved to other
//! buffers (`rehome`, and sends the driver stops: `handle_sent_rehomed`), as the io_uring
//! driver does for a direction stalled behind a peer that does not read.
//!
//! Two modes, picked by the first byte:
//! - a faithful driver (most inputs): only events a real driver can deliver; every action is
//!   checked against the model (next byte in order, never twice, one receive per side and one
//!   send per direction in flight, at most two buffers per direction, nothing new after
//!   `Close`, each FIN once and after every byte), the machine is never stuck with nothing
//!   left to wake it, and at the end (shutdown, then every operation completing) it has closed
//!   exactly once and released every buffer exactly once;
//! - a lying driver: any call with any argument in any order (monotonic time only). A machine
//!   driven so owes nothing about bytes, but it must not panic, must close at most once, and
//!   must start nothing after closing.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use sluice_conn::{Action, Chunk, Conn, ConnectError, Dir, Limits, RecvOutcome, SendOutcome, Side};

/// Events per input: bounds the time one input takes.
const STEPS_MAX: usize = 5_000;

/// The longest duration the config accepts (8760h), for timeouts and time steps.
const DURATION_MAX: Duration = Duration::from_secs(8760 * 3600);

/// The largest receive the model hands the machine (the size of a pool buffer).
const RECV_MAX: u32 = 65_536;

const SIDES: [Side; 2] = [Side::Client, Side::Backend];

/// One input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let lying = u.arbitrary::<u8>().unwrap_or(0).is_multiple_of(4);
    let Ok(limits) = limits(&mut u) else {
        return;
    };
    if lying {
        lying_driver(&mut u, limits);
    } else {
        let mut sim = Sim::new(limits);
        let mut steps = 0;
        while !u.is_empty() && steps < STEPS_MAX {
            if sim.step(&mut u).is_err() {
                break;
            }
            steps += 1;
        }
        sim.finish();
    }
}

fn idx(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

/// Limits as the config allows them: durations up to 8760h, a connect timeout above zero,
/// any number of retries.
fn limits(u: &mut Unstructured<'_>) -> Result<Limits> {
    Ok(Limits {
        connect_timeout: duration(u)?.max(Duration::from_millis(1)),
        idle_timeout: duration(u)?,
        half_close_timeout: duration(u)?,
        retries: match u.int_in_range(0..=3u8)? {
            3 => u.arbitrary()?,
            n => u32::from(n),
        },
        reset_linger: duration(u)?,
    })
}

/// Mostly the values people write, sometimes any up to the maximum.
fn duration(u: &mut Unstructured<'_>) -> Result<Duration> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => Duration::ZERO,
        1 => Duration::from_millis(5),
        2 => Duration::from_secs(1),
        3 => Duration::from_secs(2),
        4 => Duration::from_secs(60),
        5 => DURATION_MAX,
        _ => Duration::from_millis(u.int_in_range(0..=DURATION_MAX.as_millis() as u64)?),
    })
}

/// How far time moves: not at all, a little, exactly to the machine's next deadline, just
/// short of it, or far.
fn time_step(u: &mut Unstructured<'_>, now: Instant, deadline: Option<Instant>) -> Result<Instant> {
    let until = deadline.map(|d| d.saturating_duration_since(now));
    Ok(match (u.int_in_range(0..=5u8)?, until) {
        (0, _) => now,
        (1, Some(until)) => now + until,
        (2, Some(until)) => now + until.saturating_sub(Duration::from_millis(1)),
        (3, _) => now + DURATION_MAX,
        _ => now + Duration::from_millis(u.int_in_range(1..=120_000)?),
    })
}

/// The driver's view: what is in flight, which buffer holds which bytes of which stream.
struct Sim {
    conn: Conn<u32>,
    now: Instant,
    next_buf: u32,
    /// Buffer -> (source side, offset of its first byte in that side's stream, length).
    buffers: HashMap<u32, (Side, u64, u32)>,
    released: HashSet<u32>,
    /// Buffers holding bytes from each side and not yet released.
    held: [usize; 2],
    /// Bytes read so far from each side, and bytes written toward each side.
    read: [u64; 2],
    written: [u64; 2],
    recv_pending: [bool; 2],
    /// The send in flight toward each side: (buffer, offset, length).
    send_pending: [Option<(u32, u32, u32)>; 2],
    connecting: bool,
    cancel_sent: bool,
    unacked_query: Option<Side>,
    shut: [bool; 2],
    closed: bool,
    side_ended: [bool; 2],
}

/// One event a faithful driver can deliver now.
#[derive(Debug, Clone, Copy)]
enum Event {
    Connect,
    Recv(Side),
    Sent(Side),
    Unacked,
    BuffersAvailable,
    Time,
    Shutdown,
    Drained,
    /// The driver's error watch reports a reset on a side (no receive or send involved).
    PeerError(Side),
    /// The driver moves the chunks of a direction that no send uses to other buffers.
    Rehome(Dir),
}

impl Sim {
    fn new(limits: Limits) -> Self {
        let now = Instant::now();
        Sim {
            conn: Conn::new(limits, now),
            now,
            next_buf: 0,
            buffers: HashMap::new(),
            released: HashSet::new(),
            held: [0; 2],
            read: [0; 2],
            written: [0; 2],
            recv_pending: [false; 2],
            send_pending: [None; 2],
            connecting: false,
            cancel_sent: false,
            unacked_query: None,
            shut: [false; 2],
            closed: false,
            side_ended: [false; 2],
        }
    }

    /// Applies every action the machine has, checking each, then what must hold between
    /// events.
    fn drain_actions(&mut self) {
        while let Some(action) = self.conn.poll_action() {
            self.apply(action);
        }
        assert_eq!(self.conn.is_closed(), self.closed, "is_closed disagrees");
        // Backpressure: a direction holds at most two buffers, whatever the peers do.
        for side in SIDES {
            let held = self.held[idx(side)];
            assert!(held <= 2, "{held} buffers held for bytes from {side:?}");
        }
        // Never stuck: an open connection waits for a completion, for buffers or for a timer.
        let timer = self.conn.poll_timeout();
        if !self.closed {
            assert!(
                self.connecting
                    || self.recv_pending.iter().any(|&p| p)
                    || self.send_pending.iter().any(Option::is_some)
                    || self.unacked_query.is_some()
                    || self.conn.waits_for_buffers()
                    || timer.is_some(),
                "an open connection with nothing that can wake it"
            );
        }
    }

    fn apply(&mut self, action: Action<u32>) {
        if self.closed {
            assert!(
                matches!(action, Action::Release(_)),
                "{action:?} after Close"
            );
        }
        match action {
            Action::Connect => {
                assert!(!self.connecting, "two connects at once");
                self.connecting = true;
                self.cancel_sent = false;
            }
            Action::CancelConnect => {
                assert!(self.connecting, "cancel without a connect");
                assert!(!self.cancel_sent, "one connect cancelled twice");
                self.cancel_sent = true;
            }
            Action::Recv(side) => {
                assert!(!self.recv_pending[idx(side)], "two receives on one side");
                assert!(!self.side_ended[idx(side)], "receive on a side that ended");
                self.recv_pending[idx(side)] = true;
            }
            Action::Send {
                to,
                buf,
                offset,
                len,
            } => self.check_send(to, buf, offset, len),
            Action::Release(buf) => {
                let &(source, _, _) = self
                    .buffers
                    .get(&buf)
                    .expect("release of an unknown buffer");
                assert!(self.released.insert(buf), "buffer {buf} released twice");
                self.held[idx(source)] -= 1;
                assert!(
                    self.send_pending
                        .iter()
                        .all(|s| s.is_none_or(|(b, _, _)| b != buf)),
                    "buffer released while its send is in flight"
                );
            }
            Action::ShutdownWrite(side) => {
                assert!(!self.shut[idx(side)], "FIN carried twice");
                let from = side.other();
                assert!(
                    self.side_ended[idx(from)],
                    "FIN toward {side:?} before {from:?} ended"
                );
                assert_eq!(
                    self.written[idx(side)],
                    self.read[idx(from)],
                    "FIN before every byte"
                );
                assert!(self.send_pending[idx(side)].is_none(), "FIN during a send");
                self.shut[idx(side)] = true;
            }
            Action::QueryUnacked(side) => {
                assert!(self.unacked_query.is_none(), "two unacked queries at once");
                self.unacked_query = Some(side);
            }
            Action::Close(_) => {
                assert!(!self.closed, "closed twice");
                self.closed = true;
            }
        }
    }

    fn check_send(&mut self, to: Side, buf: u32, offset: u32, len: u32) {
        let dir = idx(to);
        assert!(
            self.send_pending[dir].is_none(),
            "two sends toward one side"
        );
        assert!(!self.shut[dir], "send after the FIN toward {to:?}");
        assert!(!self.released.contains(&buf), "send from a released buffer");
        let &(source, start, buf_len) = self.buffers.get(&buf).expect("send of an unknown buffer");
        assert_eq!(source, to.other(), "bytes sent back where they came from");
        assert!(
            len > 0 && u64::from(offset) + u64::from(len) <= u64::from(buf_len),
            "send outside its buffer"
        );
        assert_eq!(
            start + u64::from(offset),
            self.written[dir],
            "a send that is not the next byte toward {to:?}"
        );
        self.send_pending[dir] = Some((buf, offset, len));
    }

    /// The events a real driver could deliver now.
    fn events(&self) -> Vec<Event> {
        let mut events = vec![Event::Time, Event::Shutdown, Event::Drained];
        if self.connecting {
            events.push(Event::Connect);
        }
        for side in SIDES {
            if self.recv_pending[idx(side)] {
                events.push(Event::Recv(side));
            }
            if self.send_pending[idx(side)].is_some() {
                events.push(Event::Sent(side));
            }
        }
        if self.unacked_query.is_some() {
            events.push(Event::Unacked);
        }
        if self.conn.waits_for_buffers() {
            events.push(Event::BuffersAvailable);
        }
        if !self.closed {
            events.extend(SIDES.map(Event::PeerError));
        }
        events.extend([Event::Rehome(Dir::ToBackend), Event::Rehome(Dir::ToClient)]);
        events
    }

    /// One event chosen by the fuzzer.
    fn step(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        self.drain_actions();
        let events = self.events();
        match *u.choose(&events)? {
            Event::Connect => self.complete_connect(u)?,
            Event::Recv(side) => self.complete_recv(u, side)?,
            Event::Sent(side) => self.complete_send(u, side)?,
            Event::Unacked => {
                let side = self.unacked_query.take().expect("listed only when asked");
                let unacked = match u.int_in_range(0..=2u8)? {
                    0 => 0,
                    1 => 100,
                    _ => u.arbitrary()?,
                };
                self.conn.handle_unacked(side, unacked, self.now);
            }
            Event::BuffersAvailable => self.conn.handle_buffers_available(),
            Event::Time => {
                self.now = time_step(u, self.now, self.conn.poll_timeout())?;
                self.conn.handle_timeout(self.now);
            }
            Event::Shutdown => self.conn.handle_shutdown(),
            Event::Drained => self.conn.handle_drained(),
            Event::PeerError(side) => self.conn.handle_peer_error(side, self.now),
            Event::Rehome(dir) => {
                let Sim {
                    conn,
                    buffers,
                    held,
                    next_buf,
                    ..
                } = self;
                let mut result = Ok(());
                conn.rehome(dir, |chunk| {
                    rehome(u, buffers, held, next_buf, chunk, &mut result)
                });
                result?;
            }
        }
        self.drain_actions();
        Ok(())
    }

    fn complete_connect(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        self.connecting = false;
        let error = match u.int_in_range(0..=5u8)? {
            0 => ConnectError::Refused,
            1 => ConnectError::TimedOut,
            2 => ConnectError::Other,
            3 => ConnectError::NoBackend,
            // A connect can win the race against its cancel.
            _ => {
                self.conn.handle_connected(self.now);
                return Ok(());
            }
        };
        self.conn.handle_connect_failed(error, self.now);
        Ok(())
    }

    fn complete_recv(&mut self, u: &mut Unstructured<'_>, side: Side) -> Result<()> {
        self.recv_pending[idx(side)] = false;
        let choice = u.int_in_range(0..=9u8)?;
        let outcome = match choice {
            // Only the driver's cancel (on close) ends a receive this way.
            0 if self.closed => RecvOutcome::Cancelled,
            1 => RecvOutcome::Eof,
            2 => RecvOutcome::Reset,
            3 => RecvOutcome::Error,
            4 => RecvOutcome::NoBuffers,
            5 => RecvOutcome::WouldBlock,
            _ => {
                let len = match u.int_in_range(0..=2u8)? {
                    0 => 1,
                    1 => RECV_MAX,
                    _ => u.int_in_range(1..=RECV_MAX)?,
                };
                let buf = self.next_buf;
                self.next_buf += 1;
                self.buffers.insert(buf, (side, self.read[idx(side)], len));
                self.held[idx(side)] += 1;
                self.read[idx(side)] += u64::from(len);
                RecvOutcome::Data { buf, len }
            }
        };
        if matches!(
            outcome,
            RecvOutcome::Eof | RecvOutcome::Reset | RecvOutcome::Error
        ) {
            self.side_ended[idx(side)] = true;
        }
        self.conn.handle_recv(side, outcome, self.now);
        Ok(())
    }

    fn complete_send(&mut self, u: &mut Unstructured<'_>, to: Side) -> Result<()> {
        let (_, _, len) = self.send_pending[idx(to)]
            .take()
            .expect("listed only when sending");
        let outcome = match u.int_in_range(0..=5u8)? {
            0 if self.closed => SendOutcome::Cancelled,
            1 => SendOutcome::Reset,
            2 => SendOutcome::Sent(u.int_in_range(0..=len)?),
            _ => SendOutcome::Sent(len),
        };
        if let SendOutcome::Sent(n) = outcome {
            self.written[idx(to)] += u64::from(n);
        }
        if u.ratio(1, 8)? {
            // The driver stopped this send (a peer that does not read) and moves what is left.
            let Sim {
                conn,
                buffers,
                held,
                next_buf,
                now,
                ..
            } = self;
            let mut result = Ok(());
            conn.handle_sent_rehomed(to, outcome, *now, |chunk| {
                rehome(u, buffers, held, next_buf, chunk, &mut result)
            });
            return result;
        }
        self.conn.handle_sent(to, outcome, self.now);
        Ok(())
    }

    /// The input ran out: shut down (as `shutdown_timeout` would), let every operation in
    /// flight complete as cancelled, and check that everything was given back.
    fn finish(mut self) {
        self.drain_actions();
        self.conn.handle_shutdown();
        self.drain_actions();
        assert!(self.closed, "still open after shutdown");
        loop {
            if self.connecting {
                self.connecting = false;
                self.conn
                    .handle_connect_failed(ConnectError::TimedOut, self.now);
            } else if let Some(side) = SIDES.into_iter().find(|s| self.recv_pending[idx(*s)]) {
                self.recv_pending[idx(side)] = false;
                self.conn
                    .handle_recv(side, RecvOutcome::Cancelled, self.now);
            } else if let Some(to) = SIDES
                .into_iter()
                .find(|s| self.send_pending[idx(*s)].is_some())
            {
                self.send_pending[idx(to)] = None;
                self.conn.handle_sent(to, SendOutcome::Cancelled, self.now);
            } else {
                break;
            }
            self.drain_actions();
        }
        let leaked: Vec<_> = self
            .buffers
            .keys()
            .filter(|b| !self.released.contains(b))
            .collect();
        assert!(leaked.is_empty(), "buffers never released: {leaked:?}");
        for side in SIDES {
            assert!(
                self.written[idx(side)] <= self.read[idx(side.other())],
                "more bytes written toward {side:?} than read from the other side"
            );
        }
        if self.shut == [true, true] {
            for side in SIDES {
                assert_eq!(
                    self.written[idx(side)],
                    self.read[idx(side.other())],
                    "both FINs carried but bytes toward {side:?} missing"
                );
            }
        }
    }
}

/// Any call, any argument, any order; time only moves forward.
/// The driver's answer to an offered chunk, as the fuzzer picks it: a new buffer holding the
/// chunk's unsent bytes at some offset (recorded like a received one), or none (the chunk
/// stays). The first input error is kept in `result` (the closure cannot return it).
fn rehome(
    u: &mut Unstructured<'_>,
    buffers: &mut HashMap<u32, (Side, u64, u32)>,
    held: &mut [usize; 2],
    next_buf: &mut u32,
    chunk: Chunk<u32>,
    result: &mut Result<()>,
) -> Option<(u32, u32)> {
    if result.is_err() {
        return None;
    }
    let offset = match (u.ratio(1, 4), u.int_in_range(0..=100u32)) {
        (Ok(false), Ok(offset)) => offset,
        (Ok(true), Ok(_)) => return None,
        (Err(e), _) | (_, Err(e)) => {
            *result = Err(e);
            return None;
        }
    };
    let (source, start, _) = buffers[&chunk.buf];
    let at = start + u64::from(chunk.offset);
    // The new buffer's first byte is the stream's byte `at - offset` (never before its start).
    let offset = u64::from(offset).min(at) as u32;
    let buf = *next_buf;
    *next_buf += 1;
    buffers.insert(buf, (source, at - u64::from(offset), offset + chunk.len));
    held[idx(source)] += 1;
    Some((buf, offset))
}

fn lying_driver(u: &mut Unstructured<'_>, limits: Limits) {
    let mut now = Instant::now();
    let mut conn: Conn<u32> = Conn::new(limits, now);
    let mut closes = 0;
    for _ in 0..STEPS_MAX {
        if u.is_empty() {
            break;
        }
        if lying_step(u, &mut conn, &mut now).is_err() {
            break;
        }
        let mut after_close = false;
        while let Some(action) = conn.poll_action() {
            if after_close {
                assert!(
                    matches!(action, Action::Release(_)),
                    "{action:?} after Close"
                );
            }
            if let Action::Close(_) = action {
                closes += 1;
                after_close = true;
                assert_eq!(closes, 1, "closed twice");
            }
        }
        if closes > 0 {
            assert!(conn.is_closed(), "Close emitted but not closed");
            assert_eq!(conn.poll_timeout(), None, "a timer after Close");
        }
    }
}

fn lying_step(u: &mut Unstructured<'_>, conn: &mut Conn<u32>, now: &mut Instant) -> Result<()> {
    let side = if u.arbitrary()? {
        Side::Client
    } else {
        Side::Backend
    };
    // A few tokens, so that the same buffer comes back in several roles.
    let buf = u.int_in_range(0..=3u32)?;
    match u.int_in_range(0..=10u8)? {
        0 => conn.handle_connected(*now),
        1 => {
            let error = *u.choose(&[
                ConnectError::Refused,
                ConnectError::TimedOut,
                ConnectError::Other,
                ConnectError::NoBackend,
            ])?;
            conn.handle_connect_failed(error, *now);
        }
        2 => {
            let outcome = match u.int_in_range(0..=6u8)? {
                0 => RecvOutcome::Eof,
                1 => RecvOutcome::Reset,
                2 => RecvOutcome::NoBuffers,
                3 => RecvOutcome::Cancelled,
                4 => RecvOutcome::WouldBlock,
                5 => RecvOutcome::Error,
                _ => RecvOutcome::Data {
                    buf,
                    len: u.arbitrary()?,
                },
            };
            conn.handle_recv(side, outcome, *now);
        }
        3 => {
            let outcome = match u.int_in_range(0..=2u8)? {
                0 => SendOutcome::Reset,
                1 => SendOutcome::Cancelled,
                _ => SendOutcome::Sent(u.arbitrary()?),
            };
            conn.handle_sent(side, outcome, *now);
        }
        4 => conn.handle_unacked(side, u.arbitrary()?, *now),
        5 => conn.handle_buffers_available(),
        6 => conn.handle_shutdown(),
        7 => conn.handle_drained(),
        _ => {
            *now = time_step(u, *now, conn.poll_timeout())?;
            conn.handle_timeout(*now);
        }
    }
    let _ = conn.waits_for_buffers();
    Ok(())
}
