//! Weighted random: each new connection goes to an eligible backend with probability
//! proportional to its weight. Also the source of the two draws of [`crate::power_of_two`].
//!
//! The cumulative weights are built once per snapshot ([`WeightTable`]); a pick is one draw from
//! the worker's own generator and a binary search. A retry (some backends excluded) draws over
//! the remaining weights in one linear pass, so excluded backends are never drawn again.

use crate::{Backend, BackendId, can_take};

/// SplitMix64 (Steele, Lea and Flood, 2014): one `u64` of state, full period, passes BigCrush.
/// Not cryptographic, and need not be: it spreads connections, it keeps no secret. Each worker
/// has its own, seeded by the caller.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound` > 0), by Lemire's multiply-shift: the bias is below
    /// `bound / 2^64`, far under anything a weight sum can show.
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

/// The eligible backends with their cumulative weights, built with the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightTable {
    /// `(sum of the weights up to and including this backend, its id)`, eligible backends only.
    cumulative: Vec<(u64, BackendId)>,
}

impl WeightTable {
    pub fn new(backends: &[Backend]) -> Self {
        let mut total = 0u64;
        let cumulative = backends
            .iter()
            .filter(|b| b.eligible())
            .map(|b| {
                total += b.effective_weight();
                (total, b.id)
            })
            .collect();
        WeightTable { cumulative }
    }

    /// The sum of the eligible weights.
    pub fn total(&self) -> u64 {
        self.cumulative.last().map_or(0, |&(total, _)| total)
    }

    /// The number of eligible backends.
    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    /// One weighted draw among the eligible backends not in `exclude`.
    pub fn draw(
        &self,
        rng: &mut Rng,
        backends: &[Backend],
        exclude: &[BackendId],
    ) -> Option<BackendId> {
        if exclude.is_empty() {
            let total = self.total();
            if total == 0 {
                return None;
            }
            let r = rng.below(total);
            let at = self.cumulative.partition_point(|&(sum, _)| sum <= r);
            return Some(self.cumulative[at].1);
        }
        let remaining = |id: BackendId| can_take(&backends[id.index()], exclude);
        let mut previous = 0u64;
        let mut total = 0u64;
        for &(sum, id) in &self.cumulative {
            if remaining(id) {
                total += sum - previous;
            }
            previous = sum;
        }
        if total == 0 {
            return None;
        }
        let mut r = rng.below(total);
        let mut previous = 0u64;
        for &(sum, id) in &self.cumulative {
            let weight = sum - previous;
            previous = sum;
            if !remaining(id) {
                continue;
            }
            if r < weight {
                return Some(id);
            }
            r -= weight;
        }
        None
    }
}

/// Weighted random state of one worker for one listener: its generator.
#[derive(Debug, Clone)]
pub struct Random {
    rng: Rng,
}

impl Random {
    pub fn new(rng: Rng) -> Self {
        Random { rng }
    }

    pub fn pick(
        &mut self,
        backends: &[Backend],
        table: &WeightTable,
        exclude: &[BackendId],
    ) -> Option<BackendId> {
        table.draw(&mut self.rng, backends, exclude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{Algorithm, BackendState, ListenerBackends, RAMP_FULL, test_backends as backends};

    #[test]
    fn draws_follow_the_weights() {
        let b = backends(&[1, 2, 0, 5]);
        let table = WeightTable::new(&b);
        assert_eq!((table.total(), table.len()), (8 * u64::from(RAMP_FULL), 3));
        let mut random = Random::new(Rng::new(7));
        let mut counts = [0u32; 4];
        for _ in 0..80_000 {
            counts[random.pick(&b, &table, &[]).unwrap().index()] += 1;
        }
        assert_eq!(counts[2], 0, "weight 0 was drawn: {counts:?}");
        for (i, w) in [(0, 1.0), (1, 2.0), (3, 5.0)] {
            let expected = 10_000.0 * w;
            let got = f64::from(counts[i]);
            assert!((got - expected).abs() < 0.05 * expected, "{counts:?}");
        }
    }

    #[test]
    fn excluded_and_down_backends_are_never_drawn() {
        let mut b = backends(&[1, 1, 1, 1]);
        b[1].state = BackendState::Down;
        let b = ListenerBackends::new(Algorithm::Random, b).backends;
        let table = WeightTable::new(&b);
        let mut random = Random::new(Rng::new(1));
        let exclude = [BackendId(0)];
        for _ in 0..1000 {
            let id = random.pick(&b, &table, &exclude).unwrap();
            assert!(id == BackendId(2) || id == BackendId(3), "{id:?}");
        }
        let all = [BackendId(0), BackendId(2), BackendId(3)];
        assert_eq!(random.pick(&b, &table, &all), None);
        let none = backends(&[0, 0]);
        assert_eq!(random.pick(&none, &WeightTable::new(&none), &[]), None);
    }

    #[test]
    fn below_stays_below_and_reaches_both_ends() {
        let mut rng = Rng::new(42);
        let mut seen = [false; 3];
        for _ in 0..1000 {
            let v = rng.below(3);
            assert!(v < 3);
            seen[v as usize] = true;
        }
        assert_eq!(seen, [true; 3]);
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }
}
