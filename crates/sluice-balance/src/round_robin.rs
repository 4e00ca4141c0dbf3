//! Smooth weighted round-robin (nginx's algorithm): each pick adds every backend's weight to its
//! current score, takes the highest, and subtracts the total from the winner. With weights 5:1:1
//! this gives `a a b a c a a` rather than five `a` in a row.
//!
//! Each worker keeps its own scores (no shared state, nothing touched across cores); with W
//! workers the split over all of them still follows the weights, each worker's share of it
//! smoothly.

use crate::{Backend, BackendId, can_take};

/// Round-robin state of one worker for one listener.
#[derive(Debug, Clone)]
pub struct RoundRobin {
    current: Vec<i64>,
}

impl RoundRobin {
    /// `offset` rotates the starting point so that workers do not move in lockstep.
    pub fn new(backends: &[Backend], offset: usize) -> Self {
        let mut rr = RoundRobin {
            current: vec![0; backends.len()],
        };
        for _ in 0..offset % backends.len().max(1) {
            rr.pick(backends, &[]);
        }
        rr
    }

    /// The next backend, skipping those down, of weight 0 or in `exclude`. `None` when none is
    /// eligible.
    pub fn pick(&mut self, backends: &[Backend], exclude: &[BackendId]) -> Option<BackendId> {
        if self.current.len() != backends.len() {
            self.current = vec![0; backends.len()];
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, backend) in backends.iter().enumerate() {
            if !can_take(backend, exclude) {
                continue;
            }
            // At most 1000 x 1000: no overflow in i64 over any number of backends.
            let weight = backend.effective_weight() as i64;
            self.current[i] += weight;
            total += weight;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        self.current[best] -= total;
        Some(backends[best].id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_backends as backends;

    #[test]
    fn equal_weights_cycle_in_list_order() {
        let b = backends(&[1, 1, 1]);
        let mut rr = RoundRobin::new(&b, 0);
        let got: Vec<u32> = (0..6).map(|_| rr.pick(&b, &[]).unwrap().0).collect();
        assert_eq!(got, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn smooth_weights_5_1_1_match_nginx_sequence() {
        // nginx's documented sequence for weights 5, 1, 1: a a b a c a a.
        let b = backends(&[5, 1, 1]);
        let mut rr = RoundRobin::new(&b, 0);
        let got: Vec<u32> = (0..7).map(|_| rr.pick(&b, &[]).unwrap().0).collect();
        assert_eq!(got, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weight_zero_takes_nothing_and_offset_rotates() {
        let b = backends(&[1, 0, 1]);
        let mut rr = RoundRobin::new(&b, 1);
        let got: Vec<u32> = (0..4).map(|_| rr.pick(&b, &[]).unwrap().0).collect();
        assert_eq!(got, vec![2, 0, 2, 0]);
        assert_eq!(rr.pick(&backends(&[0, 0]), &[]), None);
    }
}
