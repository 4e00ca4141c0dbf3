//! Power of two choices (Mitzenmacher, 2001): draw two distinct backends at random by weight and
//! send the connection to the one with fewer active connections per unit of weight. Nearly as
//! even as least-connections while reading two counts instead of all of them, and far less prone
//! to herding when several workers (or instances) choose at once on slightly stale counts.
//!
//! The counts are the shared [`BackendLoad`](crate::BackendLoad)s described in
//! [`crate::least_connections`], with the same error bound. The two draws are distinct whenever two
//! backends can take the connection; on a tie the first draw wins.

use crate::random::{Rng, WeightTable};
use crate::{Backend, BackendId};

/// Redraws of the second choice when it equals the first, before drawing among the others.
const SECOND_DRAWS: usize = 4;

/// P2C state of one worker for one listener: its generator.
#[derive(Debug, Clone)]
pub struct PowerOfTwo {
    rng: Rng,
}

impl PowerOfTwo {
    pub fn new(rng: Rng) -> Self {
        PowerOfTwo { rng }
    }

    pub fn pick(
        &mut self,
        backends: &[Backend],
        table: &WeightTable,
        exclude: &[BackendId],
    ) -> Option<BackendId> {
        let first = table.draw(&mut self.rng, backends, exclude)?;
        let mut second = first;
        for _ in 0..SECOND_DRAWS {
            second = table.draw(&mut self.rng, backends, exclude)?;
            if second != first {
                break;
            }
        }
        if second == first {
            // Few backends, or one far heavier: draw among the others exactly (linear; a
            // retry's exclusion list is short and rare, so its copy is too).
            let mut others = exclude.to_vec();
            others.push(first);
            second = table
                .draw(&mut self.rng, backends, &others)
                .unwrap_or(first);
        }
        let (a, b) = (&backends[first.index()], &backends[second.index()]);
        // (active_b + 1) / weight_b < (active_a + 1) / weight_a, without division.
        let load = |x: &Backend| u64::from(x.active()) + 1;
        if load(b) * a.effective_weight() < load(a) * b.effective_weight() {
            Some(second)
        } else {
            Some(first)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_backends as backends;

    #[test]
    fn the_less_loaded_of_two_wins() {
        // Two backends: both are always drawn, so the emptier one always wins.
        let b = backends(&[1, 1]);
        let table = WeightTable::new(&b);
        let _busy = [b[0].open(), b[0].open()];
        let mut p2c = PowerOfTwo::new(Rng::new(3));
        for _ in 0..100 {
            assert_eq!(p2c.pick(&b, &table, &[]), Some(BackendId(1)));
        }
    }

    #[test]
    fn opening_on_every_pick_keeps_backends_even() {
        let b = backends(&[1; 8]);
        let table = WeightTable::new(&b);
        let mut p2c = PowerOfTwo::new(Rng::new(11));
        let mut guards = Vec::new();
        for _ in 0..8000 {
            let id = p2c.pick(&b, &table, &[]).unwrap();
            guards.push(b[id.index()].open());
        }
        let counts: Vec<u32> = b.iter().map(Backend::active).collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        // Pure random would spread about +-3%; P2C keeps max - min to a handful.
        assert!(max - min <= 10, "{counts:?}");
    }

    #[test]
    fn a_single_remaining_backend_is_chosen_and_none_when_all_are_excluded() {
        let b = backends(&[1, 1]);
        let table = WeightTable::new(&b);
        let mut p2c = PowerOfTwo::new(Rng::new(5));
        assert_eq!(p2c.pick(&b, &table, &[BackendId(1)]), Some(BackendId(0)));
        assert_eq!(p2c.pick(&b, &table, &[BackendId(0), BackendId(1)]), None);
    }
}
