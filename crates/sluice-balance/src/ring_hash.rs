//! Ketama-style consistent hashing: each backend puts `weight x points_per_weight` points on a
//! 64-bit ring, and a key goes to the backend of the first point at or after the key's hash,
//! wrapping past the top. Removing a backend moves only the keys that were on its points.
//!
//! Point `i` of a backend hashes its identity (its canonical address, see [`crate::hash`]) followed
//! by `i` as a big-endian `u32`, so the ring depends only on the set of (address, weight) pairs:
//! every list order, every process and every version builds the same ring.

use crate::hash::{Identity, KEY_BACKEND, KEY_FINGERPRINT, SipHasher24};
use crate::{Backend, BackendId};

/// A built ring. Immutable once built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingHash {
    /// Sorted by hash, then by the owner's identity, so that even colliding points sort the same
    /// way on every instance.
    points: Vec<Point>,
    /// The backends with a weight; `Point::owner` indexes this.
    owners: Vec<Owner>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Point {
    hash: u64,
    owner: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    id: BackendId,
    identity: Identity,
}

impl RingHash {
    /// Places `weight x points_per_weight` points per backend; weight 0 places none. With no
    /// point at all the ring is empty and [`lookup`](Self::lookup) returns `None`. The ring holds
    /// 16 bytes per point: the caller bounds `points_per_weight` (Envoy's default ring of 1024
    /// to 8M points is a fair guide).
    pub fn build(backends: &[Backend], points_per_weight: u32) -> RingHash {
        let owners: Vec<Owner> = backends
            .iter()
            .filter(|b| b.weight > 0)
            .map(|b| Owner {
                id: b.id,
                identity: Identity::new(b.addr),
            })
            .collect();
        let total: usize = backends
            .iter()
            .filter(|b| b.weight > 0)
            .map(|b| usize::from(b.weight) * points_per_weight as usize)
            .sum();
        let mut points = Vec::with_capacity(total);
        for (owner, backend) in backends.iter().filter(|b| b.weight > 0).enumerate() {
            let count = u32::from(backend.weight).saturating_mul(points_per_weight);
            let identity = &owners[owner].identity;
            for index in 0..count {
                points.push(Point {
                    hash: point_hash(identity, index),
                    // One owner per backend; a listener's backends are numbered by u32 BackendIds.
                    owner: owner as u32,
                });
            }
        }
        points.sort_unstable_by(|a, b| {
            let (ia, ib) = (&owners[a.owner as usize], &owners[b.owner as usize]);
            (a.hash, ia.identity, ia.id).cmp(&(b.hash, ib.identity, ib.id))
        });
        RingHash { points, owners }
    }

    /// The backend of the first point at or after `key_hash`, wrapping; `None` for an empty ring.
    pub fn lookup(&self, key_hash: u64) -> Option<BackendId> {
        let at = self.points.partition_point(|p| p.hash < key_hash);
        let point = self.points.get(at).or_else(|| self.points.first())?;
        Some(self.owners[point.owner as usize].id)
    }

    /// The backend of the first point at or after `key_hash` whose owner is not in `exclude`
    /// (a retry walks on clockwise, as ketama clients do); `None` when every owner is excluded.
    pub fn pick(&self, key_hash: u64, exclude: &[BackendId]) -> Option<BackendId> {
        if self.points.is_empty() {
            return None;
        }
        if exclude.is_empty() {
            return self.lookup(key_hash);
        }
        if self.owners.iter().all(|o| exclude.contains(&o.id)) {
            return None;
        }
        let at = self.points.partition_point(|p| p.hash < key_hash);
        let n = self.points.len();
        (0..n)
            .map(|i| self.owners[self.points[(at + i) % n].owner as usize].id)
            .find(|id| !exclude.contains(id))
    }

    /// Points owned by each backend with a non-zero weight, sorted by `BackendId`.
    pub fn shares(&self) -> Vec<(BackendId, usize)> {
        let mut counts = vec![0usize; self.owners.len()];
        for p in &self.points {
            counts[p.owner as usize] += 1;
        }
        let mut shares: Vec<(BackendId, usize)> =
            self.owners.iter().map(|o| o.id).zip(counts).collect();
        shares.sort_unstable();
        shares
    }

    /// The number of points on the ring.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// True when no backend had a weight (or `points_per_weight` was 0).
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// A stable hash of the ring as (point hash, owner identity) pairs in ring order: equal on
    /// every instance that built the ring from the same backends, whatever their order or
    /// `BackendId`s.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = SipHasher24::new(KEY_FINGERPRINT);
        for point in &self.points {
            hasher.write_u64(point.hash);
            hasher.write(self.owners[point.owner as usize].identity.as_bytes());
        }
        hasher.finish()
    }
}

/// SipHash-2-4 under `KEY_BACKEND` of the identity bytes followed by `index` big-endian.
fn point_hash(identity: &Identity, index: u32) -> u64 {
    let mut hasher = SipHasher24::new(KEY_BACKEND);
    hasher.write(identity.as_bytes());
    hasher.write(&index.to_be_bytes());
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    use crate::hash::hash_bytes;
    use crate::test_backends as backends;

    /// Spread-out key hashes without an RNG crate: the SipHash of a counter.
    fn keys(count: u64) -> impl Iterator<Item = u64> {
        (0..count).map(|i| hash_bytes(KEY_FINGERPRINT, &i.to_le_bytes()))
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let all = backends(&[1, 2, 1, 1, 3, 1, 1, 1]);
        let ring = RingHash::build(&all, 100);
        let mut fewer = all.clone();
        let gone = fewer.remove(4);
        // Renumber, as a new snapshot would: the ring follows addresses, not indices.
        for (i, b) in fewer.iter_mut().enumerate() {
            b.id = BackendId(i as u32);
        }
        let smaller = RingHash::build(&fewer, 100);
        let mut moved = 0;
        for key in keys(100_000) {
            let before = all[ring.lookup(key).unwrap().index()].addr;
            let after = fewer[smaller.lookup(key).unwrap().index()].addr;
            if before == gone.addr {
                moved += 1;
                assert_ne!(after, gone.addr);
            } else {
                assert_eq!(
                    before, after,
                    "key {key:#x} moved off a backend that stayed"
                );
            }
        }
        // The removed backend (weight 3 of 11) did own keys, so the check above had work to do.
        assert!(moved > 10_000, "{moved}");
    }

    #[test]
    fn spread_roughly_follows_the_weights() {
        let weights = [1u16, 2, 3, 4];
        let ring = RingHash::build(&backends(&weights), 1000);
        assert_eq!(ring.len(), 10_000);
        let mut counts = [0u32; 4];
        for key in keys(100_000) {
            counts[ring.lookup(key).unwrap().index()] += 1;
        }
        // A ring with finitely many points spreads only roughly; 15% catches a broken ring.
        for (i, &c) in counts.iter().enumerate() {
            let expected = 10_000.0 * f64::from(weights[i]);
            assert!(
                (f64::from(c) - expected).abs() < 0.15 * expected,
                "{counts:?}"
            );
        }
    }

    #[test]
    fn list_order_and_backend_ids_do_not_change_the_ring() {
        let list = backends(&[1, 2, 3, 1, 1]);
        let ring = RingHash::build(&list, 160);
        let mut reversed: Vec<Backend> = list.iter().rev().cloned().collect();
        for (i, b) in reversed.iter_mut().enumerate() {
            b.id = BackendId(i as u32);
        }
        let other = RingHash::build(&reversed, 160);
        assert_eq!(other.fingerprint(), ring.fingerprint());
        for key in keys(10_000) {
            let a = list[ring.lookup(key).unwrap().index()].addr;
            let b = reversed[other.lookup(key).unwrap().index()].addr;
            assert_eq!(a, b);
        }
    }

    #[test]
    fn lookup_wraps_past_the_last_point_and_empty_rings_return_none() {
        let list = backends(&[1, 1]);
        let ring = RingHash::build(&list, 10);
        let first = ring.points[0];
        let last = *ring.points.last().unwrap();
        let owner = |p: Point| ring.owners[p.owner as usize].id;
        assert_eq!(ring.lookup(0), Some(owner(first)));
        assert_eq!(ring.lookup(first.hash), Some(owner(first)));
        assert_eq!(ring.lookup(last.hash), Some(owner(last)));
        if last.hash < u64::MAX {
            assert_eq!(ring.lookup(last.hash + 1), Some(owner(first)));
        }
        assert_eq!(RingHash::build(&backends(&[0, 0]), 10).lookup(1), None);
        assert_eq!(RingHash::build(&list, 0).lookup(1), None);
    }

    /// FROZEN. Every deployed Sluice builds this ring for these backends; if the value changes,
    /// instances of the old and new versions send the same key to different backends during an
    /// upgrade. Fix the change rather than the value.
    #[test]
    fn golden_fingerprint_is_frozen() {
        let list: Vec<Backend> = (1..=10u8)
            .map(|i| {
                Backend::new(
                    BackendId(u32::from(i) - 1),
                    SocketAddr::from(([10, 0, 0, i], 6379)),
                    1,
                )
            })
            .collect();
        let ring = RingHash::build(&list, 160);
        assert_eq!(ring.fingerprint(), GOLDEN_FINGERPRINT);
    }

    const GOLDEN_FINGERPRINT: u64 = 0xe291_2dd5_49a4_13ba;
}
