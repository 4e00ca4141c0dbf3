//! A worker's connection deadlines: one per slot at most, in a min-heap whose size is bounded
//! by the slots that have one.
//!
//! A deadline that moves later (activity pushed the idle timeout on) keeps its earlier entry:
//! that entry fires, the connection finds nothing due and registers its new deadline, which
//! costs one wake-up per idle period instead of one heap operation per byte. A deadline that
//! is cleared or moves earlier leaves its old entry behind, stale; stale entries are skipped
//! when they reach the top, and the heap is compacted when they outnumber the live ones, so
//! that churn under a long idle timeout (each closed connection leaves an entry due an hour
//! later) never grows it past twice the live deadlines.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Entries beyond twice the live deadlines that trigger a compaction (so that a small heap is
/// not rebuilt over and over).
const STALE_SLACK: usize = 1024;

/// Deadlines keyed by slot index.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u32)>>,
    /// Per slot: the deadline its live heap entry carries.
    registered: Vec<Option<Instant>>,
    /// Slots with a registered deadline.
    live: usize,
}

impl Timers {
    /// Asks for `slot` to be due at `at` (or never). A later deadline than the one registered
    /// keeps the registered one (see the module docs); the caller copes with an early call.
    pub(crate) fn set(&mut self, slot: u32, at: Option<Instant>) {
        let index = slot as usize;
        if index >= self.registered.len() {
            self.registered.resize(index + 1, None);
        }
        let current = self.registered[index];
        match at {
            None => self.clear(slot),
            Some(at) if current.is_none_or(|t| at < t) => {
                if current.is_none() {
                    self.live += 1;
                }
                self.registered[index] = Some(at);
                self.heap.push(Reverse((at, slot)));
                self.compact_if_stale();
            }
            Some(_) => {}
        }
    }

    /// Forgets `slot`'s deadline (its connection closed or has none any more).
    pub(crate) fn clear(&mut self, slot: u32) {
        if let Some(registered) = self.registered.get_mut(slot as usize)
            && registered.take().is_some()
        {
            self.live -= 1;
        }
    }

    /// The earliest live deadline; drops the stale entries above it.
    pub(crate) fn next(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, slot))) = self.heap.peek() {
            if self.is_live(at, slot) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// A slot whose deadline is due at `now`, which is cleared; `None` when none is.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<u32> {
        while let Some(&Reverse((at, slot))) = self.heap.peek() {
            if at > now {
                return None;
            }
            self.heap.pop();
            if self.is_live(at, slot) {
                self.clear(slot);
                return Some(slot);
            }
        }
        None
    }

    /// Entries in the heap, live and stale.
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.heap.len()
    }

    fn is_live(&self, at: Instant, slot: u32) -> bool {
        self.registered.get(slot as usize) == Some(&Some(at))
    }

    fn compact_if_stale(&mut self) {
        if self.heap.len() > 2 * self.live + STALE_SLACK {
            let registered = &self.registered;
            self.heap
                .retain(|&Reverse((at, slot))| registered[slot as usize] == Some(at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fires_in_order_and_skips_what_moved_or_cleared() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut timers = Timers::default();
        timers.set(0, Some(t0 + 3 * s));
        timers.set(1, Some(t0 + 2 * s));
        timers.set(2, Some(t0 + 5 * s));
        // Earlier: a new entry; the old one is stale.
        timers.set(0, Some(t0 + s));
        // Later: the registered (earlier) deadline stays.
        timers.set(1, Some(t0 + 4 * s));
        timers.clear(2);
        assert_eq!(timers.next(), Some(t0 + s));
        assert_eq!(timers.pop_due(t0), None);
        assert_eq!(timers.pop_due(t0 + 10 * s), Some(0));
        assert_eq!(timers.pop_due(t0 + 10 * s), Some(1));
        assert_eq!(timers.pop_due(t0 + 10 * s), None);
        assert_eq!(timers.next(), None);
    }

    /// Issue 11, item 8: under churn with a long idle timeout, every closed connection left
    /// its entry in the worker's heap until it came due (an hour later): the heap grew with
    /// churn x idle timeout. Here 100000 connections open and close while 10 stay open.
    #[test]
    fn churn_under_a_long_timeout_keeps_the_heap_bounded_by_live_deadlines() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(3600);
        let mut timers = Timers::default();
        for slot in 0..10 {
            timers.set(slot, Some(t0 + idle));
        }
        let mut most = 0;
        for i in 0..100_000u32 {
            let slot = 10 + i % 64;
            let now = t0 + Duration::from_micros(u64::from(i));
            timers.set(slot, Some(now + idle));
            timers.clear(slot);
            most = most.max(timers.entries());
        }
        assert!(
            most <= 2 * 74 + STALE_SLACK + 1,
            "{most} heap entries for at most 74 live deadlines"
        );
        assert_eq!(timers.next(), Some(t0 + idle));
    }
}
