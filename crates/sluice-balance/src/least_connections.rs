//! Weighted least-connections: a new connection goes to the eligible backend with the fewest
//! active connections per unit of weight, counting itself: the smallest `(active + 1) / weight`.
//! Counting the new connection makes an idle heavy backend win over an idle light one.
//!
//! # Shared counts without a lock
//! Each backend's count of active connections is one `AtomicU32` on its own cache line
//! ([`BackendLoad`](crate::BackendLoad)), shared by every worker: incremented once when a
//! connection is assigned to the backend (before its connect) and decremented once when the
//! connection closes or moves to another backend on a retry ([`ActiveGuard`](crate::ActiveGuard)).
//! Nothing is touched per byte. A pick reads the counts with relaxed loads: `N` loads of lines
//! that change only when connections open or close, against HAProxy's global leastconn tree that
//! every thread locks on every connection (haproxy issue #1393).
//!
//! # Error bound
//! The counts themselves are exact (every increment has exactly one decrement); what can be stale
//! is a pick's view of them. Between one worker's loads and its increment, the other `W - 1`
//! workers can each make a pick that does not yet see it. So with `W` workers a burst can put at
//! most `W - 1` more connections on a backend than a single global lock would have, and the error
//! does not accumulate: the next picks see every count. On one worker the choice is exact.
//!
//! Ties (equal `(active + 1) / weight`) go to the first tied backend after the one this worker
//! chose last, so idle backends with equal weights take turns rather than the first one taking
//! every connection; each worker starts at its own index.

use crate::{Backend, BackendId, can_take};

/// Least-connections state of one worker for one listener: only the tie-break cursor.
#[derive(Debug, Clone)]
pub struct LeastConnections {
    cursor: usize,
}

impl LeastConnections {
    pub fn new(worker: usize) -> Self {
        LeastConnections { cursor: worker }
    }

    /// The eligible backend not in `exclude` with the smallest `(active + 1) / weight`.
    pub fn pick(&mut self, backends: &[Backend], exclude: &[BackendId]) -> Option<BackendId> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor % n;
        let mut best: Option<(&Backend, u64)> = None;
        for i in 0..n {
            let backend = &backends[(start + i) % n];
            if !can_take(backend, exclude) {
                continue;
            }
            let load = u64::from(backend.active()) + 1;
            match best {
                // load / weight < best_load / best_weight, without division.
                Some((b, best_load))
                    if load * b.effective_weight() >= best_load * backend.effective_weight() => {}
                _ => best = Some((backend, load)),
            }
        }
        let (chosen, _) = best?;
        self.cursor = chosen.id.index() + 1;
        Some(chosen.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{Algorithm, BackendState, ListenerBackends, test_backends as backends};

    #[test]
    fn fewer_active_connections_win_and_counts_follow_guards() {
        let b = backends(&[1, 1, 1]);
        let _a = [b[0].open(), b[0].open()];
        let _c = b[2].open();
        let mut lc = LeastConnections::new(0);
        assert_eq!(lc.pick(&b, &[]), Some(BackendId(1)));
        let guard = b[1].open();
        let _more = [b[1].open(), b[1].open()];
        // 2, 3, 1: backend 2.
        assert_eq!(lc.pick(&b, &[]), Some(BackendId(2)));
        drop(guard);
        drop(_a);
        // 0, 2, 1: backend 0.
        assert_eq!(lc.pick(&b, &[]), Some(BackendId(0)));
        assert_eq!(b[0].active(), 0);
        assert_eq!(b[1].active(), 2);
    }

    #[test]
    fn weights_scale_the_counts() {
        // Weight 3 with 2 active: (2+1)/3 = 1 beats weight 1 with 1 active: (1+1)/1 = 2.
        let b = backends(&[1, 3]);
        let _g = [b[0].open(), b[1].open(), b[1].open()];
        let mut lc = LeastConnections::new(0);
        assert_eq!(lc.pick(&b, &[]), Some(BackendId(1)));
        // Simulate many picks that each open a connection: the split follows the weights.
        let b = backends(&[1, 3]);
        let mut guards = Vec::new();
        for _ in 0..400 {
            let id = lc.pick(&b, &[]).unwrap();
            guards.push(b[id.index()].open());
        }
        assert_eq!((b[0].active(), b[1].active()), (100, 300));
    }

    #[test]
    fn ties_rotate_and_ineligible_or_excluded_backends_are_skipped() {
        let mut b = backends(&[1, 1, 0, 1]);
        b[3].state = BackendState::Down;
        let b = ListenerBackends::new(Algorithm::LeastConnections, b).backends;
        let mut lc = LeastConnections::new(0);
        let picks: Vec<u32> = (0..4).map(|_| lc.pick(&b, &[]).unwrap().0).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
        assert_eq!(lc.pick(&b, &[BackendId(0)]), Some(BackendId(1)));
        assert_eq!(lc.pick(&b, &[BackendId(0), BackendId(1)]), None);
        assert_eq!(LeastConnections::new(0).pick(&[], &[]), None);
    }
}
