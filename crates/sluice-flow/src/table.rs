//! [`FlowTable`]: a worker's bounded UDP session table for one listener, with O(1) lookup,
//! insert, remove and least-recently-active order.
//!
//! Layout: sessions live in a slab (`Vec` of entries, vacant ones chained in a free list), and an
//! intrusive doubly linked list through the entries orders them from the least recently active
//! (`oldest`, the next to expire or be evicted) to the most recently active (`newest`). A
//! `HashMap` from [`FlowKey`] to slot finds the open session of a key. Both are allocated at
//! their full size when the table is made, so nothing is allocated per datagram afterwards.

use std::collections::HashMap;
use std::fmt;
use std::hash::RandomState;
use std::time::{Duration, Instant};

use crate::key::{FlowId, FlowKey};
use crate::session::{Session, SessionState};

/// What [`FlowTable::insert`] does when the table is full: the listener's `on_max_sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMaxSessions {
    /// Refuse the new session; the datagram that would have started it is dropped.
    Drop,
    /// Remove the least recently active session to make room.
    EvictLru,
}

/// What [`FlowTable::insert`] did.
#[derive(Debug)]
#[must_use = "a session that was evicted or a payload that was refused must be closed"]
pub enum Insert<S> {
    /// The session is in the table under `id`.
    Inserted {
        /// The new session's handle.
        id: FlowId,
    },
    /// The table was full: the least recently active session was removed to make room, and is
    /// handed back so the caller can close its backend socket. The new session is in under `id`.
    Evicted {
        /// The new session's handle.
        id: FlowId,
        /// The session that made room; its id is stale from now on.
        evicted: Session<S>,
    },
    /// The table was full and the policy is [`OnMaxSessions::Drop`] (or the table's capacity is
    /// 0): nothing was inserted, and the payload is handed back so the caller can close or pool
    /// its socket.
    Full {
        /// The payload of the session that was refused.
        payload: S,
    },
}

/// A table's counters, for the driver to export (summed across workers). Every session that was
/// created is either still active or was expired, evicted or closed:
/// `created == active + expired + evicted + closed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Sessions in the table now, open or not.
    pub active: u64,
    /// Sessions ever inserted.
    pub created: u64,
    /// Sessions removed because they were idle for the idle timeout.
    pub expired: u64,
    /// Sessions removed to make room for a new one (`on_max_sessions: evict_lru`).
    pub evicted: u64,
    /// New sessions refused because the table was full (`on_max_sessions: drop`, or a table of
    /// capacity 0).
    pub dropped_full: u64,
    /// Sessions the caller removed ([`FlowTable::remove`], [`FlowTable::remove_id`],
    /// [`FlowTable::retain`]): finished by `requests`/`responses`, failed, drained, shut down.
    pub closed: u64,
}

/// The UDP sessions of one listener on one worker, at most `capacity` of them (the worker's
/// share of `max_sessions`, see [`worker_share`](crate::worker_share)).
///
/// Time comes in as `now` on every call that can change a session's activity. The table keeps
/// the latest `now` any call gave it and uses it in place of any earlier one it is given later, so
/// its least-recently-active order is also the order of [`Session::last_active`] whatever the
/// caller's clock does; expiry therefore looks only at the oldest end, and costs one step per
/// session it removes plus one.
pub struct FlowTable<S> {
    entries: Vec<Entry<S>>,
    index: HashMap<FlowKey, u32, IndexHasher>,
    capacity: u32,
    on_max_sessions: OnMaxSessions,
    /// The least recently active session, or `NIL` when the table is empty.
    oldest: u32,
    /// The most recently active session, or `NIL` when the table is empty.
    newest: u32,
    /// The first vacant entry, or `NIL`; vacant entries chain through `older`.
    free: u32,
    latest: Option<Instant>,
    counters: Counters,
    /// Entries that expiry looked at, to prove its cost in tests.
    #[cfg(test)]
    pub(crate) expiry_visits: u64,
}

/// One slot of the slab. Occupied: `older` and `newer` link the activity list. Vacant: `older`
/// is the next vacant slot.
struct Entry<S> {
    /// Bumped each time the slot is vacated, so that ids of sessions gone are stale.
    generation: u32,
    older: u32,
    newer: u32,
    session: Option<Session<S>>,
}

/// The index's hasher: std's SipHash-1-3 with keys drawn at random per table. Client addresses
/// are chosen by whoever sends the datagrams (UDP sources are easily spoofed), so the hash must be
/// keyed and hard to invert, or crafted addresses could pile into a few probe sequences and slow
/// every lookup of a worker. A lookup by key costs one hash (about 25 ns more than with
/// `ahash`, measured with the `timing` test); a reply is found by `FlowId`, with no hash at all.
/// `ahash::RandomState`, which DESIGN.md allows for flow tables, is a drop-in replacement here
/// if profiles ever show the hash.
type IndexHasher = RandomState;

/// No slot: the end of a list.
const NIL: u32 = u32::MAX;

impl<S> FlowTable<S> {
    /// An empty table for at most `capacity` sessions, allocated in full now: `capacity` entries
    /// and an index sized so that it never grows (see `index_capacity`). `capacity` may be 0, for
    /// a worker whose share of `max_sessions` is 0: every insert is then refused. Memory is
    /// about `capacity` times (size of a [`Session<S>`] + 12) for the slab plus at most 4.6 times
    /// `capacity` times 69 bytes for the index, reserved now and touched as sessions arrive:
    /// config validation is what keeps `max_sessions` sensible.
    pub fn new(capacity: u32, on_max_sessions: OnMaxSessions) -> FlowTable<S> {
        FlowTable {
            entries: Vec::with_capacity(capacity as usize),
            index: HashMap::with_capacity_and_hasher(index_capacity(capacity), IndexHasher::new()),
            capacity,
            on_max_sessions,
            oldest: NIL,
            newest: NIL,
            free: NIL,
            latest: None,
            counters: Counters::default(),
            #[cfg(test)]
            expiry_visits: 0,
        }
    }

    /// The most sessions the table holds.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Sessions in the table, open or not.
    pub fn len(&self) -> usize {
        self.counters.active as usize
    }

    /// Whether the table holds no session.
    pub fn is_empty(&self) -> bool {
        self.counters.active == 0
    }

    /// What to do when the table is full.
    pub fn on_max_sessions(&self) -> OnMaxSessions {
        self.on_max_sessions
    }

    /// The table's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The open session of `key`, without touching it.
    pub fn get(&self, key: &FlowKey) -> Option<&Session<S>> {
        let slot = *self.index.get(key)?;
        self.entries[slot as usize]
            .session
            .as_ref()
            .filter(|s| s.state() == SessionState::Open)
    }

    /// The open session of `key`, touched: it becomes the most recently active, active at `now`.
    /// This is the lookup for a datagram from a client. A session of `key` that is no longer open
    /// ([`SessionState::Unbound`] or [`SessionState::Finished`]) is not found: the client's
    /// datagram starts a new session, and the old one stays reachable by its id.
    pub fn get_mut(&mut self, key: &FlowKey, now: Instant) -> Option<&mut Session<S>> {
        let now = self.observe(now);
        let slot = *self.index.get(key)?;
        let open = self.entries[slot as usize]
            .session
            .as_ref()
            .is_some_and(|s| s.state() == SessionState::Open);
        if !open {
            // The session stopped taking requests since it was indexed: forget its key now.
            self.index.remove(key);
            return None;
        }
        self.touch(slot, now);
        self.entries[slot as usize].session.as_mut()
    }

    /// The session `id` names, in whatever state, without touching it; `None` once it has left
    /// the table.
    pub fn get_id(&self, id: FlowId) -> Option<&Session<S>> {
        let slot = self.live_slot(id)?;
        self.entries[slot as usize].session.as_ref()
    }

    /// The session `id` names, in whatever state, touched: it becomes the most recently active,
    /// active at `now`. This is the lookup for a reply from the session's backend: `None` means
    /// the session is gone and the reply must be dropped.
    pub fn get_id_mut(&mut self, id: FlowId, now: Instant) -> Option<&mut Session<S>> {
        let now = self.observe(now);
        let slot = self.live_slot(id)?;
        self.touch(slot, now);
        self.entries[slot as usize].session.as_mut()
    }

    /// Starts a session of `key` with the driver's `payload`, active at `now`, as the most
    /// recently active. When the table is full, [`OnMaxSessions`] decides: the payload comes back
    /// in [`Insert::Full`], or the least recently active session is evicted and comes back in
    /// [`Insert::Evicted`].
    ///
    /// The driver inserts after [`FlowTable::get_mut`] found no session for `key`. If an open
    /// session of `key` exists all the same, it is unbound (as if it had taken its last request):
    /// the new session gets the key, and the old one relays its replies until it is finished or
    /// idle.
    pub fn insert(&mut self, key: FlowKey, payload: S, now: Instant) -> Insert<S> {
        let now = self.observe(now);
        let mut evicted = None;
        if self.counters.active == u64::from(self.capacity) {
            if self.on_max_sessions == OnMaxSessions::Drop || self.oldest == NIL {
                self.counters.dropped_full += 1;
                return Insert::Full { payload };
            }
            evicted = self.take(self.oldest);
            self.counters.evicted += u64::from(evicted.is_some());
        }
        let slot = self.vacant_slot();
        let entry = &mut self.entries[slot as usize];
        let id = FlowId::new(slot, entry.generation);
        entry.session = Some(Session::new(key, id, payload, now));
        self.link_newest(slot);
        // One hash for both: index the new session, and find the one the key was indexed to.
        if let Some(previous) = self.index.insert(key, slot)
            && let Some(old) = self.entries[previous as usize].session.as_mut()
        {
            old.unbind();
        }
        self.counters.created += 1;
        self.counters.active += 1;
        match evicted {
            Some(evicted) => Insert::Evicted { id, evicted },
            None => Insert::Inserted { id },
        }
    }

    /// Removes the open session of `key` (the one [`FlowTable::get`] finds) and hands it back;
    /// counted as closed. Sessions that are no longer open are removed by id.
    pub fn remove(&mut self, key: &FlowKey) -> Option<Session<S>> {
        let slot = *self.index.get(key)?;
        if self.entries[slot as usize]
            .session
            .as_ref()
            .is_none_or(|s| s.state() != SessionState::Open)
        {
            return None;
        }
        let session = self.take(slot)?;
        self.counters.closed += 1;
        Some(session)
    }

    /// Removes the session `id` names, in whatever state, and hands it back; counted as closed.
    /// `None` if it already left the table.
    pub fn remove_id(&mut self, id: FlowId) -> Option<Session<S>> {
        let slot = self.live_slot(id)?;
        let session = self.take(slot)?;
        self.counters.closed += 1;
        Some(session)
    }

    /// Removes and hands back the least recently active session if it has been idle for at least
    /// `idle_timeout` at `now`; `None` when there is none. A zero `idle_timeout` is the config's
    /// "off": nothing expires. For a driver that wants to bound the work of one pass; see
    /// [`FlowTable::expire`] for the whole pass.
    pub fn pop_expired(&mut self, now: Instant, idle_timeout: Duration) -> Option<Session<S>> {
        let now = self.observe(now);
        if idle_timeout.is_zero() || self.oldest == NIL {
            return None;
        }
        #[cfg(test)]
        {
            self.expiry_visits += 1;
        }
        let oldest = self.entries[self.oldest as usize].session.as_ref()?;
        if now.saturating_duration_since(oldest.last_active()) < idle_timeout {
            return None;
        }
        let session = self.take(self.oldest)?;
        self.counters.expired += 1;
        Some(session)
    }

    /// Removes every session idle for at least `idle_timeout` at `now`, least recently active
    /// first, appending them to `out` (so the driver closes their sockets), and answers how many.
    /// It looks at one session more than it removes. A zero `idle_timeout` expires nothing.
    /// `out` grows to the largest batch it is given; a driver that must not allocate gives it
    /// [`FlowTable::capacity`] room once.
    pub fn expire(
        &mut self,
        now: Instant,
        idle_timeout: Duration,
        out: &mut Vec<Session<S>>,
    ) -> usize {
        let before = out.len();
        while let Some(session) = self.pop_expired(now, idle_timeout) {
            out.push(session);
        }
        out.len() - before
    }

    /// When the next session will have been idle for `idle_timeout` (the time to arm the
    /// worker's expiry timer for), or `None` if the table is empty, `idle_timeout` is zero (off),
    /// or the moment is beyond what `Instant` can hold. It may be in the past: the session is
    /// due.
    pub fn next_expiry(&self, idle_timeout: Duration) -> Option<Instant> {
        if idle_timeout.is_zero() || self.oldest == NIL {
            return None;
        }
        let oldest = self.entries[self.oldest as usize].session.as_ref()?;
        oldest.last_active().checked_add(idle_timeout)
    }

    /// Every session, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Session<S>> {
        self.entries.iter().filter_map(|e| e.session.as_ref())
    }

    /// Every session, mutably, in no particular order, without touching them: for a driver that
    /// updates its payloads in bulk (a new snapshot generation, say).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Session<S>> {
        self.entries.iter_mut().filter_map(|e| e.session.as_mut())
    }

    /// Keeps the sessions for which `keep` answers true and removes the others, appending them to
    /// `out` and counting them as closed; answers how many it removed. Costs one step per slot:
    /// for rare events (a backend drained past `drain_timeout`, shutdown), never per datagram.
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(&mut Session<S>) -> bool,
        out: &mut Vec<Session<S>>,
    ) -> usize {
        let before = out.len();
        for slot in 0..self.entries.len() as u32 {
            let Some(session) = self.entries[slot as usize].session.as_mut() else {
                continue;
            };
            if !keep(session)
                && let Some(session) = self.take(slot)
            {
                self.counters.closed += 1;
                out.push(session);
            }
        }
        out.len() - before
    }

    /// `now`, or the latest time already seen if `now` is earlier, so that activity times never
    /// go back and the activity list stays sorted by them.
    fn observe(&mut self, now: Instant) -> Instant {
        match self.latest {
            Some(latest) if latest >= now => latest,
            _ => {
                self.latest = Some(now);
                now
            }
        }
    }

    /// The slot `id` names if its session is still there.
    fn live_slot(&self, id: FlowId) -> Option<u32> {
        let entry = self.entries.get(id.slot() as usize)?;
        (entry.generation == id.generation() && entry.session.is_some()).then_some(id.slot())
    }

    /// Marks the session in `slot` active at `now` and makes it the most recently active.
    fn touch(&mut self, slot: u32, now: Instant) {
        if let Some(session) = self.entries[slot as usize].session.as_mut() {
            session.touch(now);
        }
        if self.newest != slot {
            self.unlink(slot);
            self.link_newest(slot);
        }
    }

    /// Takes the session out of `slot`: off the activity list, out of the index if the index
    /// still points here, and the slot onto the free list with a new generation.
    fn take(&mut self, slot: u32) -> Option<Session<S>> {
        let session = self.entries[slot as usize].session.take()?;
        self.unlink(slot);
        let key = session.key();
        if session.state() == SessionState::Open {
            // An open session is always the one its key is indexed to.
            self.index.remove(&key);
        } else if self.index.get(&key) == Some(&slot) {
            self.index.remove(&key);
        }
        let entry = &mut self.entries[slot as usize];
        entry.generation = entry.generation.wrapping_add(1);
        entry.older = self.free;
        entry.newer = NIL;
        self.free = slot;
        self.counters.active -= 1;
        Some(session)
    }

    /// A vacant slot: the head of the free list, or a new entry while the slab is below
    /// capacity. Called only when the table holds fewer than `capacity` sessions, so when the
    /// free list is empty every entry is occupied and the slab has room within what `new`
    /// reserved: it never reallocates.
    fn vacant_slot(&mut self) -> u32 {
        if self.free != NIL {
            let slot = self.free;
            self.free = self.entries[slot as usize].older;
            return slot;
        }
        let slot = self.entries.len() as u32;
        self.entries.push(Entry {
            generation: 0,
            older: NIL,
            newer: NIL,
            session: None,
        });
        slot
    }

    fn unlink(&mut self, slot: u32) {
        let Entry { older, newer, .. } = self.entries[slot as usize];
        match older {
            NIL => self.oldest = newer,
            older => self.entries[older as usize].newer = newer,
        }
        match newer {
            NIL => self.newest = older,
            newer => self.entries[newer as usize].older = older,
        }
    }

    fn link_newest(&mut self, slot: u32) {
        let previous = self.newest;
        let entry = &mut self.entries[slot as usize];
        entry.older = previous;
        entry.newer = NIL;
        match previous {
            NIL => self.oldest = slot,
            previous => self.entries[previous as usize].newer = slot,
        }
        self.newest = slot;
    }
}

impl<S> fmt::Debug for FlowTable<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowTable")
            .field("capacity", &self.capacity)
            .field("on_max_sessions", &self.on_max_sessions)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// The index's size, in entries, for a table of `capacity` sessions: twice the capacity, plus
/// two.
///
/// The index never holds more than `capacity` keys, but removals leave tombstones in a swiss
/// table, and when tombstones have used up its free room an insert rehashes it: in place if it is
/// at most half full, otherwise into a table twice the size, an allocation on the data path and
/// double the memory. Room for `2 * capacity + 2` keys keeps `capacity + 1` within half, so a
/// full table under churn only ever rehashes in place (the memory-bound test checks it).
fn index_capacity(capacity: u32) -> usize {
    (capacity as usize).saturating_mul(2).saturating_add(2)
}

#[cfg(test)]
impl<S> FlowTable<S> {
    /// Checks every structural invariant; panics with the first one broken.
    pub(crate) fn check_invariants(&self) {
        // The activity list, both ways, covers exactly the occupied slots, sorted by activity.
        let mut order = Vec::new();
        let mut slot = self.oldest;
        let mut previous = NIL;
        while slot != NIL {
            let entry = &self.entries[slot as usize];
            assert_eq!(entry.older, previous, "back link of slot {slot}");
            let session = entry.session.as_ref().expect("listed slot is occupied");
            assert_eq!(session.id(), FlowId::new(slot, entry.generation));
            if let Some(&older) = order.last() {
                let older: &Session<S> = self.entries[older as usize].session.as_ref().unwrap();
                assert!(
                    older.last_active() <= session.last_active(),
                    "activity order"
                );
            }
            order.push(slot);
            assert!(
                order.len() <= self.entries.len(),
                "cycle in the activity list"
            );
            previous = slot;
            slot = entry.newer;
        }
        assert_eq!(self.newest, previous);
        assert_eq!(order.len() as u64, self.counters.active);
        let occupied = self.entries.iter().filter(|e| e.session.is_some()).count();
        assert_eq!(occupied, order.len());

        // The free list covers exactly the vacant slots.
        let mut vacant = 0;
        let mut slot = self.free;
        while slot != NIL {
            let entry = &self.entries[slot as usize];
            assert!(entry.session.is_none(), "free slot {slot} is occupied");
            vacant += 1;
            assert!(vacant <= self.entries.len(), "cycle in the free list");
            slot = entry.older;
        }
        assert_eq!(vacant + occupied, self.entries.len());

        // The index points at occupied slots of the same key; every open session is indexed.
        for (key, &slot) in &self.index {
            let session = self.entries[slot as usize].session.as_ref();
            assert_eq!(session.map(|s| s.key()), Some(*key), "index entry {key:?}");
        }
        for session in self.iter() {
            if session.state() == SessionState::Open {
                assert_eq!(self.index.get(&session.key()), Some(&session.id().slot()));
            }
        }

        // Bounds and counters.
        assert!(self.counters.active <= u64::from(self.capacity));
        assert!(self.entries.len() <= self.capacity as usize);
        let c = self.counters;
        assert_eq!(c.created, c.active + c.expired + c.evicted + c.closed);
    }

    /// The sessions' ids from the least to the most recently active.
    pub(crate) fn activity_order(&self) -> Vec<FlowId> {
        let mut order = Vec::new();
        let mut slot = self.oldest;
        while slot != NIL {
            let entry = &self.entries[slot as usize];
            order.push(FlowId::new(slot, entry.generation));
            slot = entry.newer;
        }
        order
    }

    /// Entries in the slab, occupied or vacant.
    pub(crate) fn slab_len(&self) -> usize {
        self.entries.len()
    }

    /// The slab's and the index's allocated sizes, to check that they never grow.
    pub(crate) fn allocated(&self) -> (usize, usize) {
        (self.entries.capacity(), self.index.capacity())
    }
}
