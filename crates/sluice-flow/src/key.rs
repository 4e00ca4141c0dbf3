//! What names a flow: [`FlowKey`] (the client's address and the local address it sent to), and
//! what names one session of a flow inside a table: [`FlowId`].

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;

/// The key of a UDP flow within one listener of one worker: the client's address and port, and
/// the local address and port the client sent its datagram to.
///
/// The listener is implicit (each worker has one table per UDP listener), but the local address
/// is not: a listener bound to a wildcard address on a multi-homed host receives datagrams for
/// several local addresses, and a client that sends from one port to two of them (a DNS resolver
/// does) expects each reply from the address it asked. Keeping the local address in the key makes
/// those two separate flows, each replying from its own address; Envoy indexes its UDP sessions by
/// the same 4-tuple, and nginx compares the local address too when the listener is a wildcard.
/// When the listener is bound to one address, `local` is the same in every key and costs nothing
/// but a few bytes.
///
/// IPv6 flow labels are not part of the key ([`FlowKey::new`] clears `flowinfo`): a label may
/// change within one flow and must not split it. The scope id stays: two link-local clients with
/// the same address on different interfaces are different clients.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    client: SocketAddr,
    local: SocketAddr,
}

/// The handle of one session in one [`FlowTable`](crate::FlowTable): its slot and that slot's
/// generation. The driver puts it in the `user_data` of the session's operations (see
/// [`FlowId::to_bits`]) to find the session again when a reply arrives on the session's backend
/// socket. Once the session has left the table the id is stale: lookups by it answer `None`, even
/// after the slot holds another session, so a late reply never reaches the wrong client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    slot: u32,
    generation: u32,
}

impl FlowKey {
    /// The key of datagrams from `client` to `local` (the address the listener received them on,
    /// from `IP_PKTINFO`/`IPV6_RECVPKTINFO` when it is bound to a wildcard address).
    pub fn new(client: SocketAddr, local: SocketAddr) -> FlowKey {
        FlowKey {
            client: without_flowinfo(client),
            local: without_flowinfo(local),
        }
    }

    /// The client's address and port: where replies go.
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// The local address and port the client sent to: where replies leave from.
    pub fn local(&self) -> SocketAddr {
        self.local
    }
}

impl Hash for FlowKey {
    /// Feeds the hasher a few whole words rather than the derived field-by-field sequence (enum
    /// tags, array lengths, octets): the table hashes a key per datagram. Equal keys feed equal
    /// words, as `Eq` requires; an IPv4 and an IPv6 key may feed the same words, which only makes
    /// them collide, never compare equal.
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_addr(&self.client, state);
        hash_addr(&self.local, state);
    }
}

impl fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.client, self.local)
    }
}

impl FlowId {
    /// The id packed in 64 bits (slot in the high half, generation in the low half), for an
    /// io_uring `user_data` or any other place that holds one word.
    pub fn to_bits(self) -> u64 {
        (u64::from(self.slot) << 32) | u64::from(self.generation)
    }

    /// The id that [`FlowId::to_bits`] packed. Any value is accepted: one that names no live
    /// session is simply not found by the table.
    pub fn from_bits(bits: u64) -> FlowId {
        FlowId {
            slot: (bits >> 32) as u32,
            generation: bits as u32,
        }
    }

    /// The slot index in the table, below its capacity: for a driver that keeps per-session
    /// arrays of its own beside the table.
    pub fn slot(self) -> u32 {
        self.slot
    }

    pub(crate) fn new(slot: u32, generation: u32) -> FlowId {
        FlowId { slot, generation }
    }

    pub(crate) fn generation(self) -> u32 {
        self.generation
    }
}

impl fmt::Debug for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FlowId({}#{})", self.slot, self.generation)
    }
}

fn without_flowinfo(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => addr,
        SocketAddr::V6(mut v6) => {
            v6.set_flowinfo(0);
            SocketAddr::V6(v6)
        }
    }
}

fn hash_addr<H: Hasher>(addr: &SocketAddr, state: &mut H) {
    match addr {
        SocketAddr::V4(v4) => {
            state.write_u64((u64::from(v4.ip().to_bits()) << 16) | u64::from(v4.port()));
        }
        SocketAddr::V6(v6) => {
            state.write_u128(v6.ip().to_bits());
            state.write_u64((u64::from(v6.scope_id()) << 16) | u64::from(v6.port()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    use std::net::{Ipv6Addr, SocketAddrV6};

    use super::*;

    #[test]
    fn flow_label_does_not_split_a_flow_but_scope_does() {
        let local = SocketAddr::from(([0u16; 8], 53));
        let ip = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        let a = FlowKey::new(SocketAddrV6::new(ip, 5000, 0, 2).into(), local);
        let b = FlowKey::new(SocketAddrV6::new(ip, 5000, 0xbeef, 2).into(), local);
        let c = FlowKey::new(SocketAddrV6::new(ip, 5000, 0, 3).into(), local);
        let hasher = RandomState::new();
        assert_eq!(a, b);
        assert_eq!(hasher.hash_one(a), hasher.hash_one(b));
        assert_ne!(a, c);
    }

    #[test]
    fn local_address_is_part_of_the_key() {
        let client = SocketAddr::from(([192, 0, 2, 1], 5000));
        let a = FlowKey::new(client, SocketAddr::from(([198, 51, 100, 1], 53)));
        let b = FlowKey::new(client, SocketAddr::from(([198, 51, 100, 2], 53)));
        assert_ne!(a, b);
        assert_eq!(a.client(), b.client());
    }

    #[test]
    fn id_round_trips_through_bits() {
        let id = FlowId::new(0xdead_beef, 0x1234_5678);
        assert_eq!(FlowId::from_bits(id.to_bits()), id);
        assert_eq!(id.slot(), 0xdead_beef);
    }
}
