//! Drives `Conn` with random but legal event sequences (seeded, replayable) and checks what
//! must hold whatever the peers and the kernel do: every byte sent toward a side is the next
//! byte read from the other side (in order, never twice), at most one receive per side and one
//! send per direction are in flight, nothing new starts after `Close`, at most two chunks wait
//! per direction, and every buffer is released exactly once. The driver also moves chunks to
//! other buffers now and then (`rehome`, and sends it stops: `handle_sent_rehomed`), as the
//! io_uring driver does for a direction stalled behind a peer that does not read.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_conn::{Action, Chunk, Conn, ConnectError, Dir, Limits, RecvOutcome, SendOutcome, Side};

const SIDES: [Side; 2] = [Side::Client, Side::Backend];

fn idx(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

/// The driver's view: what is in flight, which buffer holds which bytes of which stream.
struct Sim {
    conn: Conn<u32>,
    rng: StdRng,
    now: Instant,
    next_buf: u32,
    /// Buffer -> (source side, offset of its first byte in that side's stream, length).
    buffers: HashMap<u32, (Side, u64, u32)>,
    released: HashSet<u32>,
    /// Bytes read so far from each side, and bytes written toward each side.
    read: [u64; 2],
    written: [u64; 2],
    recv_pending: [bool; 2],
    send_pending: [Option<(u32, u32, u32)>; 2],
    connecting: bool,
    connect_attempts: u32,
    unacked_query: Option<Side>,
    shut: [bool; 2],
    closed: bool,
    side_ended: [bool; 2],
}

impl Sim {
    fn new(seed: u64) -> Self {
        let limits = Limits {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            half_close_timeout: Duration::from_secs(10),
            retries: 2,
            reset_linger: Duration::from_secs(1),
        };
        let now = Instant::now();
        Sim {
            conn: Conn::new(limits, now),
            rng: StdRng::seed_from_u64(seed),
            now,
            next_buf: 0,
            buffers: HashMap::new(),
            released: HashSet::new(),
            read: [0; 2],
            written: [0; 2],
            recv_pending: [false; 2],
            send_pending: [None; 2],
            connecting: false,
            connect_attempts: 0,
            unacked_query: None,
            shut: [false; 2],
            closed: false,
            side_ended: [false; 2],
        }
    }

    /// Applies every action the machine has, checking each.
    fn drain_actions(&mut self) {
        while let Some(action) = self.conn.poll_action() {
            match action {
                Action::Connect => {
                    assert!(!self.closed, "connect after close");
                    assert!(!self.connecting, "two connects at once");
                    self.connecting = true;
                    self.connect_attempts += 1;
                }
                Action::CancelConnect => assert!(self.connecting),
                Action::Recv(side) => {
                    assert!(!self.closed, "receive armed after close");
                    assert!(!self.recv_pending[idx(side)], "two receives on one side");
                    assert!(!self.side_ended[idx(side)], "receive on a side that ended");
                    self.recv_pending[idx(side)] = true;
                }
                Action::Send {
                    to,
                    buf,
                    offset,
                    len,
                } => {
                    assert!(!self.closed, "send after close");
                    let dir = idx(to);
                    assert!(
                        self.send_pending[dir].is_none(),
                        "two sends toward one side"
                    );
                    assert!(!self.released.contains(&buf), "send from a released buffer");
                    let (source, start, buf_len) = self.buffers[&buf];
                    assert_eq!(source, to.other(), "bytes sent back where they came from");
                    assert!(
                        len > 0 && offset + len <= buf_len,
                        "send outside its buffer"
                    );
                    assert_eq!(
                        start + u64::from(offset),
                        self.written[dir],
                        "a send that is not the next byte toward {to:?}"
                    );
                    self.send_pending[dir] = Some((buf, offset, len));
                }
                Action::Release(buf) => {
                    assert!(
                        self.buffers.contains_key(&buf),
                        "release of an unknown buffer"
                    );
                    assert!(self.released.insert(buf), "buffer {buf} released twice");
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
                    self.shut[idx(side)] = true;
                }
                Action::QueryUnacked(side) => self.unacked_query = Some(side),
                Action::Close(_) => {
                    assert!(!self.closed, "closed twice");
                    self.closed = true;
                }
            }
        }
        // Backpressure: a direction holds at most two buffers, whatever the peers do.
        for side in SIDES {
            let held = self
                .buffers
                .iter()
                .filter(|(b, (source, _, _))| *source == side && !self.released.contains(b))
                .count();
            assert!(held <= 2, "{held} buffers held for bytes from {side:?}");
        }
    }

    /// One random legal event; false when nothing can happen any more.
    fn step(&mut self) -> bool {
        self.drain_actions();
        if self.connecting {
            self.connecting = false;
            match self.rng.random_range(0..6) {
                0 => self
                    .conn
                    .handle_connect_failed(ConnectError::Refused, self.now),
                1 => self
                    .conn
                    .handle_connect_failed(ConnectError::TimedOut, self.now),
                _ => self.conn.handle_connected(self.now),
            }
            return true;
        }
        if let Some(side) = self.unacked_query.take() {
            let unacked = if self.rng.random_bool(0.5) { 0 } else { 100 };
            self.conn.handle_unacked(side, unacked, self.now);
            return true;
        }
        if self.rng.random_range(0..30) == 0 {
            // The driver moves the chunks no send uses (a direction stalled behind a pipe).
            let dir = [Dir::ToBackend, Dir::ToClient][self.rng.random_range(0..2)];
            let Sim {
                conn,
                rng,
                buffers,
                next_buf,
                ..
            } = self;
            conn.rehome(dir, |chunk| rehome(rng, buffers, next_buf, chunk));
            return true;
        }
        if !self.closed && self.rng.random_range(0..80) == 0 {
            // The driver's error watch reports a reset, outside any receive or send.
            let side = SIDES[self.rng.random_range(0..2)];
            self.conn.handle_peer_error(side, self.now);
            return true;
        }
        let mut choices = Vec::new();
        for side in SIDES {
            if self.recv_pending[idx(side)] {
                choices.push((0, side));
            }
            if self.send_pending[idx(side)].is_some() {
                choices.push((1, side));
            }
        }
        if choices.is_empty() {
            if self.closed {
                return false;
            }
            // Only time can move things on (timeouts, linger re-checks).
            self.now += Duration::from_millis(self.rng.random_range(1..20_000));
            self.conn.handle_timeout(self.now);
            return true;
        }
        let (kind, side) = choices[self.rng.random_range(0..choices.len())];
        if kind == 0 {
            self.complete_recv(side);
        } else {
            self.complete_send(side);
        }
        true
    }

    fn complete_recv(&mut self, side: Side) {
        self.recv_pending[idx(side)] = false;
        let outcome = if self.closed {
            RecvOutcome::Cancelled
        } else {
            match self.rng.random_range(0..20) {
                0 => {
                    self.side_ended[idx(side)] = true;
                    RecvOutcome::Eof
                }
                1 => {
                    self.side_ended[idx(side)] = true;
                    RecvOutcome::Reset
                }
                2 => RecvOutcome::NoBuffers,
                3 => RecvOutcome::WouldBlock,
                _ => {
                    let len = self.rng.random_range(1..=16_384);
                    let buf = self.next_buf;
                    self.next_buf += 1;
                    self.buffers.insert(buf, (side, self.read[idx(side)], len));
                    self.read[idx(side)] += u64::from(len);
                    RecvOutcome::Data { buf, len }
                }
            }
        };
        let waiting = matches!(outcome, RecvOutcome::NoBuffers);
        self.conn.handle_recv(side, outcome, self.now);
        if waiting {
            self.drain_actions();
            self.conn.handle_buffers_available();
        }
    }

    fn complete_send(&mut self, to: Side) {
        let (_, _, len) = self.send_pending[idx(to)].take().expect("checked");
        let outcome = if self.closed {
            SendOutcome::Cancelled
        } else if self.rng.random_range(0..40) == 0 {
            SendOutcome::Reset
        } else {
            let n = if self.rng.random_bool(0.7) {
                len
            } else {
                self.rng.random_range(0..=len)
            };
            self.written[idx(to)] += u64::from(n);
            SendOutcome::Sent(n)
        };
        if self.rng.random_range(0..8) == 0 {
            // The driver stopped this send (a peer that does not read) and moves what is left.
            let Sim {
                conn,
                rng,
                buffers,
                next_buf,
                now,
                ..
            } = self;
            conn.handle_sent_rehomed(to, outcome, *now, |chunk| {
                rehome(rng, buffers, next_buf, chunk)
            });
        } else {
            self.conn.handle_sent(to, outcome, self.now);
        }
    }
}

/// The driver's answer to an offered chunk: usually a new buffer holding its unsent bytes at a
/// random offset (recorded like a received one), sometimes none (the chunk stays).
fn rehome(
    rng: &mut StdRng,
    buffers: &mut HashMap<u32, (Side, u64, u32)>,
    next_buf: &mut u32,
    chunk: Chunk<u32>,
) -> Option<(u32, u32)> {
    if rng.random_range(0..4) == 0 {
        return None;
    }
    let (source, start, _) = buffers[&chunk.buf];
    let at = start + u64::from(chunk.offset);
    // The new buffer's first byte is the stream's byte `at - offset` (the model never goes
    // before the stream's start).
    let offset = rng.random_range(0..100_u64).min(at) as u32;
    let buf = *next_buf;
    *next_buf += 1;
    let first = at - u64::from(offset);
    buffers.insert(buf, (source, first, offset + chunk.len));
    Some((buf, offset))
}

#[test]
fn random_event_sequences_keep_every_invariant() {
    let mut closed_by = HashMap::new();
    for seed in 0..2000 {
        let mut sim = Sim::new(seed);
        let mut steps = 0;
        while sim.step() {
            steps += 1;
            assert!(steps < 100_000, "seed {seed}: no end after {steps} steps");
        }
        sim.drain_actions();
        assert!(sim.closed, "seed {seed}: stopped without closing");
        // Every buffer handed to the machine came back exactly once.
        let leaked: Vec<_> = sim
            .buffers
            .keys()
            .filter(|b| !sim.released.contains(b))
            .collect();
        assert!(
            leaked.is_empty(),
            "seed {seed}: buffers never released: {leaked:?}"
        );
        // Bytes written never exceed bytes read from the other side.
        for side in SIDES {
            assert!(
                sim.written[idx(side)] <= sim.read[idx(side.other())],
                "seed {seed}"
            );
        }
        *closed_by.entry(sim.connect_attempts.min(3)).or_insert(0) += 1;
    }
    // The sequences covered retries as well as first-attempt connections.
    assert!(closed_by.len() >= 3, "too little variety: {closed_by:?}");
}

#[test]
fn clean_half_closes_deliver_every_byte_both_ways() {
    // Seeds where neither side resets nor fails: everything read is written before the close.
    let mut checked = 0;
    for seed in 0..2000 {
        let mut sim = Sim::new(seed);
        while sim.step() {}
        sim.drain_actions();
        if sim.shut == [true, true] {
            for side in SIDES {
                assert_eq!(
                    sim.written[idx(side)],
                    sim.read[idx(side.other())],
                    "seed {seed}"
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked > 50,
        "only {checked} sequences ended with both FINs carried"
    );
}
