//! The one hash function of the balancing algorithms: SipHash-2-4 (Aumasson and Bernstein, 2012)
//! with fixed, documented 128-bit keys, written out here so that no dependency update can change it.
//!
//! Every Sluice instance in front of the same backends must build the same Maglev table and the
//! same ring, and send the same client to the same backend, whatever process, machine or version
//! it runs. That holds only while these functions return the same values for the same inputs.
//! **The outputs are frozen**: the golden tests below (and in `maglev.rs` and `ring_hash.rs`) fail
//! on any change to the algorithm, the keys or the canonical byte forms. Changing any of them
//! means every deployed instance disagrees with the new one about where connections go.
//!
//! Canonical byte forms (all integers big-endian):
//! - a backend's identity: family tag (`4` or `6`), the address (4 or 16 bytes), the port (2);
//!   it depends only on the backend's address, never on its position in a list or its
//!   [`BackendId`](crate::BackendId);
//! - a client key: family tag and address (`client_ip`), or family tag, address and port
//!   (`client_ip_port`).
//!
//! An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is written as the IPv4 address it maps, so a
//! client seen through a dual-stack socket hashes like the same client seen through an IPv4 one.

use std::net::{IpAddr, SocketAddr};

use crate::ClientAddr;

/// A 128-bit SipHash key as two little-endian 64-bit halves (`k0` holds key bytes 0..8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SipKey {
    pub k0: u64,
    pub k1: u64,
}

/// Key of the backend identity hash (`backend_hash`): the Maglev offset, the order in which
/// Maglev fills its table, and the ring's point hashes. The ASCII of `"sluice/b"`, `"ackend/1"`.
pub const KEY_BACKEND: SipKey = SipKey {
    k0: 0x736c_7569_6365_2f62,
    k1: 0x6163_6b65_6e64_2f31,
};

/// Key of the second backend hash, Maglev's skip (`backend_skip_hash`). The ASCII of
/// `"sluice/m"`, `"aglev/s1"`.
pub const KEY_SKIP: SipKey = SipKey {
    k0: 0x736c_7569_6365_2f6d,
    k1: 0x6167_6c65_762f_7331,
};

/// Key of the client key hashes. The ASCII of `"sluice/c"`, `"lient/01"`.
pub const KEY_CLIENT: SipKey = SipKey {
    k0: 0x736c_7569_6365_2f63,
    k1: 0x6c69_656e_742f_3031,
};

/// Key of table fingerprints. The ASCII of `"sluice/f"`, `"ingerpr1"`.
pub const KEY_FINGERPRINT: SipKey = SipKey {
    k0: 0x736c_7569_6365_2f66,
    k1: 0x696e_6765_7270_7231,
};

/// The longest canonical form: tag, 16 address bytes, 2 port bytes.
const IDENTITY_LEN_MAX: usize = 19;

/// A backend's address in canonical byte form (see the module documentation). Ordered by
/// length (IPv4 first), then bytes: the tie-break when two backends have the same identity hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    len: u8,
    bytes: [u8; IDENTITY_LEN_MAX],
}

impl Identity {
    /// The canonical form of `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let mut identity = Identity::ip(addr.ip());
        identity.push(&addr.port().to_be_bytes());
        identity
    }

    /// The canonical bytes: 7 for IPv4, 19 for IPv6.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Family tag and address, without a port.
    fn ip(ip: IpAddr) -> Self {
        let mut identity = Identity {
            len: 0,
            bytes: [0; IDENTITY_LEN_MAX],
        };
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                identity.push(&[4]);
                identity.push(&v4.octets());
            }
            IpAddr::V6(v6) => {
                identity.push(&[6]);
                identity.push(&v6.octets());
            }
        }
        identity
    }

    fn push(&mut self, data: &[u8]) {
        let start = usize::from(self.len);
        self.bytes[start..start + data.len()].copy_from_slice(data);
        // At most 19 bytes are ever pushed (tag, 16, port), so this fits a u8.
        self.len += data.len() as u8;
    }
}

/// SipHash-2-4 of `data` under `key`.
pub fn hash_bytes(key: SipKey, data: &[u8]) -> u64 {
    let mut hasher = SipHasher24::new(key);
    hasher.write(data);
    hasher.finish()
}

/// The identity hash of the backend at `addr`: SipHash-2-4 under [`KEY_BACKEND`] of its
/// canonical form. Independent of list order and of `BackendId`.
pub fn backend_hash(addr: SocketAddr) -> u64 {
    hash_bytes(KEY_BACKEND, Identity::new(addr).as_bytes())
}

/// A second, independent hash of the backend at `addr` (under [`KEY_SKIP`]), for Maglev's skip.
pub fn backend_skip_hash(addr: SocketAddr) -> u64 {
    hash_bytes(KEY_SKIP, Identity::new(addr).as_bytes())
}

/// The `client_ip` key: the client's address without its port, so that every connection from
/// one host goes to the same backend.
pub fn client_ip_hash(client: ClientAddr) -> u64 {
    hash_bytes(KEY_CLIENT, Identity::ip(client.0.ip()).as_bytes())
}

/// The `client_ip_port` key: the client's address and port, so that connections from one host
/// spread over backends but each one is stable.
pub fn client_ip_port_hash(client: ClientAddr) -> u64 {
    hash_bytes(KEY_CLIENT, Identity::new(client.0).as_bytes())
}

/// Incremental SipHash-2-4: `write` any number of times, then `finish`. The result depends only
/// on the concatenation of what was written, not on how it was split.
#[derive(Debug, Clone)]
pub struct SipHasher24 {
    v: [u64; 4],
    /// Bytes not yet compressed (fewer than 8), in the low bytes of `tail`, little-endian.
    tail: u64,
    tail_len: usize,
    /// Total bytes written; SipHash uses its low byte in the final block.
    length: u64,
}

impl SipHasher24 {
    pub fn new(key: SipKey) -> Self {
        SipHasher24 {
            v: [
                key.k0 ^ 0x736f_6d65_7073_6575,
                key.k1 ^ 0x646f_7261_6e64_6f6d,
                key.k0 ^ 0x6c79_6765_6e65_7261,
                key.k1 ^ 0x7465_6462_7974_6573,
            ],
            tail: 0,
            tail_len: 0,
            length: 0,
        }
    }

    pub fn write(&mut self, mut data: &[u8]) {
        self.length = self.length.wrapping_add(data.len() as u64);
        // Top up a partial word first.
        while self.tail_len != 0 && !data.is_empty() {
            self.tail |= u64::from(data[0]) << (8 * self.tail_len);
            self.tail_len += 1;
            data = &data[1..];
            if self.tail_len == 8 {
                self.compress(self.tail);
                self.tail = 0;
                self.tail_len = 0;
            }
        }
        let mut words = data.chunks_exact(8);
        for word in &mut words {
            // chunks_exact(8) yields exactly 8 bytes.
            self.compress(u64::from_le_bytes(word.try_into().unwrap()));
        }
        for (i, &byte) in words.remainder().iter().enumerate() {
            self.tail |= u64::from(byte) << (8 * i);
        }
        self.tail_len = words.remainder().len();
    }

    pub fn write_u64(&mut self, value: u64) {
        self.write(&value.to_le_bytes());
    }

    pub fn finish(&self) -> u64 {
        let mut state = self.clone();
        state.compress(((self.length & 0xff) << 56) | self.tail);
        state.v[2] ^= 0xff;
        for _ in 0..4 {
            state.round();
        }
        state.v[0] ^ state.v[1] ^ state.v[2] ^ state.v[3]
    }

    fn compress(&mut self, m: u64) {
        self.v[3] ^= m;
        self.round();
        self.round();
        self.v[0] ^= m;
    }

    fn round(&mut self) {
        let [mut v0, mut v1, mut v2, mut v3] = self.v;
        v0 = v0.wrapping_add(v1);
        v1 = v1.rotate_left(13);
        v1 ^= v0;
        v0 = v0.rotate_left(32);
        v2 = v2.wrapping_add(v3);
        v3 = v3.rotate_left(16);
        v3 ^= v2;
        v0 = v0.wrapping_add(v3);
        v3 = v3.rotate_left(21);
        v3 ^= v0;
        v2 = v2.wrapping_add(v1);
        v1 = v1.rotate_left(17);
        v1 ^= v2;
        v2 = v2.rotate_left(32);
        self.v = [v0, v1, v2, v3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key of the reference test vectors: bytes 00..0f.
    const KEY_REFERENCE: SipKey = SipKey {
        k0: 0x0706_0504_0302_0100,
        k1: 0x0f0e_0d0c_0b0a_0908,
    };

    fn counting(len: usize) -> Vec<u8> {
        (0..len).map(|i| i as u8).collect()
    }

    #[test]
    fn siphash24_matches_published_test_vectors() {
        // Appendix A of the SipHash paper: key 00..0f, message 00..0e.
        assert_eq!(
            hash_bytes(KEY_REFERENCE, &counting(15)),
            0xa129_ca61_49be_45e5
        );
        // vectors.h of the reference implementation: the empty message and 00..3f.
        assert_eq!(hash_bytes(KEY_REFERENCE, &[]), 0x726f_db47_dd0e_0e31);
        assert_eq!(
            hash_bytes(KEY_REFERENCE, &counting(63)),
            u64::from_le_bytes([0x72, 0x45, 0x06, 0xeb, 0x4c, 0x32, 0x8a, 0x95])
        );
    }

    #[test]
    #[allow(deprecated)] // std's SipHasher is SipHash-2-4; it serves only as a second opinion.
    fn siphash24_agrees_with_std_for_every_length_and_split() {
        use std::hash::Hasher;
        for len in 0..80 {
            let data = counting(len);
            let mut reference = std::hash::SipHasher::new_with_keys(0x0123, 0x4567_89ab_cdef);
            reference.write(&data);
            let key = SipKey {
                k0: 0x0123,
                k1: 0x4567_89ab_cdef,
            };
            assert_eq!(hash_bytes(key, &data), reference.finish(), "length {len}");
            for split in 0..len {
                let mut hasher = SipHasher24::new(key);
                hasher.write(&data[..split]);
                hasher.write(&data[split..]);
                assert_eq!(
                    hasher.finish(),
                    reference.finish(),
                    "length {len} split {split}"
                );
            }
        }
    }

    #[test]
    fn canonical_forms_are_tag_address_port() {
        let v4: SocketAddr = "10.0.0.1:6379".parse().unwrap();
        assert_eq!(Identity::new(v4).as_bytes(), &[4, 10, 0, 0, 1, 0x18, 0xeb]);
        let v6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        let bytes = Identity::new(v6);
        assert_eq!(bytes.as_bytes().len(), 19);
        assert_eq!(bytes.as_bytes()[0], 6);
        assert_eq!(&bytes.as_bytes()[1..3], &[0x20, 0x01]);
        assert_eq!(&bytes.as_bytes()[17..], &[0, 80]);
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:6379".parse().unwrap();
        assert_eq!(Identity::new(mapped), Identity::new(v4));
    }

    #[test]
    fn client_keys_ignore_or_use_the_port() {
        let a = ClientAddr("192.0.2.7:40000".parse().unwrap());
        let b = ClientAddr("192.0.2.7:40001".parse().unwrap());
        assert_eq!(client_ip_hash(a), client_ip_hash(b));
        assert_ne!(client_ip_port_hash(a), client_ip_port_hash(b));
        assert_ne!(client_ip_hash(a), client_ip_port_hash(a));
    }

    /// FROZEN. These values are what every deployed Sluice computes; if this test fails, the hash,
    /// a key or a canonical form changed, and instances of the old and new versions will send the
    /// same client to different backends. Do not update the values to make it pass.
    #[test]
    fn golden_hashes_are_frozen() {
        let backend: SocketAddr = "10.0.0.1:6379".parse().unwrap();
        let backend6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        let client = ClientAddr("192.0.2.7:40000".parse().unwrap());
        let got = [
            hash_bytes(KEY_BACKEND, b"sluice"),
            backend_hash(backend),
            backend_skip_hash(backend),
            backend_hash(backend6),
            client_ip_hash(client),
            client_ip_port_hash(client),
        ];
        assert_eq!(got, GOLDEN);
    }

    const GOLDEN: [u64; 6] = [
        0x1ec3_27bf_eb98_e7c3, // hash_bytes(KEY_BACKEND, "sluice")
        0xef38_d997_c50e_8b8c, // backend_hash(10.0.0.1:6379)
        0x685f_49b6_ac27_2d29, // backend_skip_hash(10.0.0.1:6379)
        0xd7d5_728d_d6fd_3050, // backend_hash([2001:db8::1]:80)
        0x70ee_002a_0bec_e2ae, // client_ip_hash(192.0.2.7:40000)
        0xcde6_a247_9b7c_231b, // client_ip_port_hash(192.0.2.7:40000)
    ];
}
