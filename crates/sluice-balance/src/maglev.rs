//! Weighted Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016), weighted the way Envoy's `MaglevTable` does it.
//!
//! Each backend has a permutation of the `M` slots, `(offset + j * skip) mod M`, from two hashes of
//! its identity (its canonical address, see [`crate::hash`]). Backends take turns claiming their
//! next unclaimed slot until the table is full. With weights, a backend of weight `w` takes a turn
//! in round `r` only once `r * w` has caught up with the progress it has already made (each turn
//! adds the largest weight to its progress), so a backend of the largest weight claims a slot every
//! round and one of a third of it every third round.
//!
//! The table depends only on the set of (address, weight) pairs and on `M`: backends are sorted by
//! identity hash before filling, so every list order, every process and every version builds the
//! same table. Building keeps one cursor per backend, not the `N x M` permutation matrix.

use crate::hash::{
    Identity, KEY_CLIENT, KEY_FINGERPRINT, SipHasher24, backend_hash, backend_skip_hash,
};
use crate::{Backend, BackendId};

/// The smallest table size: 65537 is prime and is what Envoy and Katran default to.
pub const TABLE_SIZE_MIN: u32 = 65537;

/// Slots per backend below which weights stop being honoured to within 1%.
const SLOTS_PER_BACKEND_MIN: u64 = 100;

/// The largest prime below 2^32, the cap of [`default_table_size`].
const PRIME_U32_MAX: u32 = 4_294_967_291;

/// A filled Maglev lookup table. Immutable once built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevTable {
    /// Index into `entries` of the owner of each slot; empty when no backend has a weight.
    slots: Vec<u32>,
    /// The backends with a weight, in fill order (by identity hash).
    entries: Vec<Entry>,
    table_size: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    id: BackendId,
    identity: Identity,
}

impl MaglevTable {
    /// Fills a table of `table_size` slots (rounded up to a prime, at least 2, since the
    /// permutations cover every slot only when it is prime) from the backends with a non-zero
    /// weight. When every weight is 0 the table is empty and [`lookup`](Self::lookup) returns
    /// `None`.
    pub fn build(backends: &[Backend], table_size: u32) -> MaglevTable {
        let table_size = next_prime(table_size.max(2)).unwrap_or(PRIME_U32_MAX);
        let mut builders = fill_order(backends, table_size);
        let entries = builders
            .iter()
            .map(|b| Entry {
                id: b.id,
                identity: b.identity,
            })
            .collect();
        if builders.is_empty() {
            return MaglevTable {
                slots: Vec::new(),
                entries,
                table_size,
            };
        }
        MaglevTable {
            slots: fill(&mut builders, table_size),
            entries,
            table_size,
        }
    }

    /// The backend owning slot `key_hash mod M`; `None` for an empty table.
    pub fn lookup(&self, key_hash: u64) -> Option<BackendId> {
        if self.slots.is_empty() {
            return None;
        }
        let slot = (key_hash % u64::from(self.table_size)) as usize;
        Some(self.entries[self.slots[slot] as usize].id)
    }

    /// The backend for `key_hash`, skipping those in `exclude` (a retry): the first lookup not
    /// excluded among `key_hash`, then `retry_key(key_hash, 1)`, `retry_key(key_hash, 2)`, ...;
    /// after `2 x backends` such tries, the first backend in fill order not excluded. Every
    /// instance with the same table makes the same retries.
    pub fn pick(&self, key_hash: u64, exclude: &[BackendId]) -> Option<BackendId> {
        let first = self.lookup(key_hash)?;
        if !exclude.contains(&first) {
            return Some(first);
        }
        let tries = 2 * self.entries.len() as u32;
        for attempt in 1..=tries {
            let id = self.lookup(retry_key(key_hash, attempt))?;
            if !exclude.contains(&id) {
                return Some(id);
            }
        }
        self.entries
            .iter()
            .map(|e| e.id)
            .find(|id| !exclude.contains(id))
    }

    /// `M`, the number of slots (also when the table is empty).
    pub fn table_size(&self) -> u32 {
        self.table_size
    }

    /// True when no backend had a weight.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A stable hash of the table as a sequence of backend identities: equal on every instance
    /// that built the table from the same backends, whatever their order or `BackendId`s.
    /// Compare it across instances to check that they agree.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = SipHasher24::new(KEY_FINGERPRINT);
        hasher.write(&self.table_size.to_le_bytes());
        for &slot in &self.slots {
            hasher.write(self.entries[slot as usize].identity.as_bytes());
        }
        hasher.finish()
    }

    /// Slots owned by each backend with a non-zero weight, sorted by `BackendId`.
    pub fn shares(&self) -> Vec<(BackendId, u32)> {
        let mut counts = vec![0u32; self.entries.len()];
        for &slot in &self.slots {
            counts[slot as usize] += 1;
        }
        let mut shares: Vec<(BackendId, u32)> = self
            .entries
            .iter()
            .zip(counts)
            .map(|(e, c)| (e.id, c))
            .collect();
        shares.sort_unstable();
        shares
    }
}

/// The key of retry `attempt` of a client whose key hash is `key_hash`: SipHash-2-4 under
/// [`KEY_CLIENT`] of both, little-endian.
fn retry_key(key_hash: u64, attempt: u32) -> u64 {
    let mut hasher = SipHasher24::new(KEY_CLIENT);
    hasher.write_u64(key_hash);
    hasher.write(&attempt.to_le_bytes());
    hasher.finish()
}

/// The table size for `backends` backends: the smallest prime at least 65537 and at least
/// 100 slots per backend (so that weights hold to within about 1%), capped at the largest
/// prime below 2^32.
pub fn default_table_size(backends: usize) -> u32 {
    let wanted = (backends as u64)
        .saturating_mul(SLOTS_PER_BACKEND_MIN)
        .max(u64::from(TABLE_SIZE_MIN));
    match u32::try_from(wanted) {
        Ok(wanted) => next_prime(wanted).unwrap_or(PRIME_U32_MAX),
        Err(_) => PRIME_U32_MAX,
    }
}

/// Whether `n` is prime (trial division; at most 2^16 steps).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// The smallest prime `>= n`, or `None` above the largest `u32` prime.
fn next_prime(n: u32) -> Option<u32> {
    (n..=u32::MAX).find(|&c| is_prime(c))
}

/// One backend while the table fills: its permutation and how far along it it is.
struct Builder {
    id: BackendId,
    identity: Identity,
    weight: u64,
    /// The slot of the permutation to try next: `(offset + next * skip) mod M`.
    position: u64,
    skip: u64,
    /// Envoy's `target_weight_`: the backend takes a turn in round `r` when `r * weight` has
    /// reached it, then adds the largest weight to it.
    progress: u64,
}

/// The slot after `position` in a permutation: `position + skip (mod m)`. Both are below `m`, so
/// one conditional subtraction replaces a division.
fn next_position(position: u64, skip: u64, m: u64) -> u64 {
    let next = position + skip;
    if next >= m { next - m } else { next }
}

/// The backends with a weight, with their permutations, sorted by identity hash then identity
/// bytes (then `BackendId`, which matters only for duplicate addresses).
fn fill_order(backends: &[Backend], table_size: u32) -> Vec<Builder> {
    let m = u64::from(table_size);
    let mut keyed: Vec<(u64, Builder)> = backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| {
            let hash = backend_hash(b.addr);
            let builder = Builder {
                id: b.id,
                identity: Identity::new(b.addr),
                weight: u64::from(b.weight),
                position: hash % m,
                skip: backend_skip_hash(b.addr) % (m - 1) + 1,
                progress: 0,
            };
            (hash, builder)
        })
        .collect();
    keyed.sort_unstable_by(|(ha, a), (hb, b)| (ha, a.identity, a.id).cmp(&(hb, b.identity, b.id)));
    keyed.into_iter().map(|(_, b)| b).collect()
}

/// Claims every slot; `builders` is non-empty and every weight is positive.
fn fill(builders: &mut [Builder], table_size: u32) -> Vec<u32> {
    let m = u64::from(table_size);
    let weight_max = builders.iter().map(|b| b.weight).max().unwrap_or(1);
    let mut slots = vec![0u32; table_size as usize];
    // Which slots are taken, one bit each: 8 KiB for M = 65537, so the probe loop (about
    // M ln M probes in all) reads L1 rather than the 256 KiB slot array.
    let mut claimed = vec![0u64; (table_size as usize).div_ceil(64)];
    let mut filled = 0u64;
    let mut round = 1u64;
    while filled < m {
        for (index, b) in builders.iter_mut().enumerate() {
            if filled == m {
                break;
            }
            if round * b.weight < b.progress {
                continue;
            }
            b.progress += weight_max;
            // Terminates: M is prime, so the permutation visits every slot, and one is free.
            // The position lives in a register while probing (the probe loop is the hot spot).
            let (mut position, skip) = (b.position, b.skip);
            while claimed[(position >> 6) as usize] & (1 << (position & 63)) != 0 {
                position = next_position(position, skip, m);
            }
            claimed[(position >> 6) as usize] |= 1 << (position & 63);
            // `index` < number of backends, which fits a u32 like every BackendId.
            slots[position as usize] = index as u32;
            b.position = next_position(position, skip, m);
            filled += 1;
        }
        round += 1;
    }
    slots
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    use crate::test_backends as backends;

    fn backends_10_0_0(count: u8, port: u16) -> Vec<Backend> {
        (1..=count)
            .map(|i| {
                Backend::new(
                    BackendId(u32::from(i) - 1),
                    SocketAddr::from(([10, 0, 0, i], port)),
                    1,
                )
            })
            .collect()
    }

    /// The address owning each slot: comparable across builds with different `BackendId`s.
    fn slot_owners(table: &MaglevTable) -> Vec<Identity> {
        table
            .slots
            .iter()
            .map(|&s| table.entries[s as usize].identity)
            .collect()
    }

    /// A deterministic shuffle (xorshift), so the test replays exactly without an RNG crate.
    fn shuffled(mut list: Vec<Backend>, mut seed: u64) -> Vec<Backend> {
        for i in (1..list.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            list.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        list
    }

    #[test]
    fn every_slot_is_filled_and_equal_weights_differ_by_at_most_one_slot() {
        for n in [3usize, 10, 100] {
            let table = MaglevTable::build(&backends(&vec![1; n]), 65537);
            assert_eq!(table.table_size(), 65537);
            assert_eq!(table.slots.len(), 65537);
            assert!(table.slots.iter().all(|&s| (s as usize) < n));
            let shares = table.shares();
            assert_eq!(shares.len(), n);
            let counts: Vec<u32> = shares.iter().map(|&(_, c)| c).collect();
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "n = {n}: {min}..{max}");
            assert_eq!(counts.iter().sum::<u32>(), 65537);
        }
    }

    #[test]
    fn weighted_shares_are_within_one_percent_of_the_weights() {
        let weights = [1u16, 2, 3, 4, 0];
        let table = MaglevTable::build(&backends(&weights), 65537);
        let total: u32 = weights.iter().map(|&w| u32::from(w)).sum();
        let shares = table.shares();
        assert_eq!(shares.len(), 4, "weight 0 gets no slot");
        for (id, count) in shares {
            let expected = 65537.0 * f64::from(weights[id.index()]) / f64::from(total);
            let error = (f64::from(count) - expected).abs() / expected;
            assert!(
                error < 0.01,
                "{id:?}: {count} slots, expected {expected:.0}"
            );
        }
    }

    #[test]
    fn weights_1_and_1000_still_fill_and_keep_the_ratio() {
        let table = MaglevTable::build(&backends(&[1, 1000]), 65537);
        let shares = table.shares();
        let expected_small = 65537.0 / 1001.0;
        let error = (f64::from(shares[0].1) - expected_small).abs() / expected_small;
        assert!(error < 0.02, "{shares:?}");
        assert_eq!(shares[0].1 + shares[1].1, 65537);
    }

    #[test]
    fn all_weights_zero_or_no_backends_give_an_empty_table() {
        for list in [backends(&[0, 0, 0]), Vec::new()] {
            let table = MaglevTable::build(&list, 65537);
            assert!(table.is_empty());
            assert_eq!(table.lookup(12345), None);
            assert!(table.shares().is_empty());
        }
    }

    #[test]
    fn removing_one_of_100_moves_its_slots_and_under_one_percent_of_the_rest() {
        let all = backends(&[1; 100]);
        let before = slot_owners(&MaglevTable::build(&all, 65537));
        let removed = Identity::new(all[37].addr);
        let mut fewer = all.clone();
        fewer.remove(37);
        let after = slot_owners(&MaglevTable::build(&fewer, 65537));
        assert!(!after.contains(&removed));
        let others = before.iter().filter(|&&o| o != removed).count();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|&(b, a)| *b != removed && b != a)
            .count();
        assert!(
            moved * 100 <= others,
            "{moved} of {others} slots of remaining backends moved"
        );
        // Adding it back restores the table slot for slot.
        let restored = slot_owners(&MaglevTable::build(&all, 65537));
        assert_eq!(restored, before);
    }

    #[test]
    fn list_order_and_backend_ids_do_not_change_the_table() {
        let list = backends(&[1, 2, 3, 1, 1, 5, 1, 1, 2, 1]);
        let table = MaglevTable::build(&list, 65537);
        for seed in [1u64, 7, 0x9e37_79b9] {
            let mut other = shuffled(list.clone(), seed);
            for (i, b) in other.iter_mut().enumerate() {
                b.id = BackendId(i as u32);
            }
            let rebuilt = MaglevTable::build(&other, 65537);
            assert_eq!(rebuilt.fingerprint(), table.fingerprint());
            assert_eq!(slot_owners(&rebuilt), slot_owners(&table));
            // The same key reaches the same address through each list's own BackendIds.
            for key in [0u64, 1, 65536, u64::MAX, 0xdead_beef] {
                let a = list[table.lookup(key).unwrap().index()].addr;
                let b = other[rebuilt.lookup(key).unwrap().index()].addr;
                assert_eq!(a, b);
            }
        }
        assert_ne!(
            MaglevTable::build(&backends(&[1, 1]), 65537).fingerprint(),
            MaglevTable::build(&backends(&[1, 2]), 65537).fingerprint()
        );
    }

    #[test]
    fn table_size_is_rounded_up_to_a_prime() {
        let table = MaglevTable::build(&backends(&[1, 1]), 65536);
        assert_eq!(table.table_size(), 65537);
        let tiny = MaglevTable::build(&backends(&[1, 1, 1]), 0);
        assert_eq!(tiny.table_size(), 2);
        assert!(tiny.lookup(0).is_some() && tiny.lookup(1).is_some());
    }

    /// FROZEN. Every deployed Sluice builds this table for these backends; if the value changes,
    /// instances of the old and new versions send the same key to different backends during an
    /// upgrade. A failure here means the hash, the permutation or the fill order changed: fix the
    /// change, do not update the value.
    #[test]
    fn golden_fingerprint_of_ten_backends_is_frozen() {
        let table = MaglevTable::build(&backends_10_0_0(10, 6379), 65537);
        assert_eq!(table.fingerprint(), GOLDEN_FINGERPRINT);
    }

    const GOLDEN_FINGERPRINT: u64 = 0xce82_c04b_b03e_becc;

    #[test]
    fn default_table_size_is_a_prime_with_100_slots_per_backend() {
        assert_eq!(default_table_size(0), 65537);
        assert_eq!(default_table_size(1), 65537);
        assert_eq!(default_table_size(1000), 100_003);
        assert_eq!(default_table_size(10_000), 1_000_003);
        assert_eq!(default_table_size(usize::MAX), PRIME_U32_MAX);
        assert!(is_prime(PRIME_U32_MAX));
    }

    #[test]
    fn is_prime_agrees_with_a_sieve() {
        let limit = 10_000usize;
        let mut composite = vec![false; limit];
        for i in 2..limit {
            if !composite[i] {
                for j in (i * i..limit).step_by(i) {
                    composite[j] = true;
                }
            }
        }
        for (n, &c) in composite.iter().enumerate() {
            assert_eq!(is_prime(n as u32), n >= 2 && !c, "{n}");
        }
        assert!(is_prime(65537) && is_prime(100_003) && is_prime(1_000_003));
        assert!(!is_prime(65535) && !is_prime(100_001) && !is_prime(u32::MAX));
    }
}
