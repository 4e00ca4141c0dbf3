//! Binds that the start would refuse although each is valid on its own: the admin endpoint on
//! an address a tcp listener already holds. Its socket has no SO_REUSEPORT (the listeners'
//! have), so the kernel refuses it whenever the two overlap, wildcards included.

use std::net::{IpAddr, SocketAddr};

use super::Walker;
use crate::tree::Node;
use crate::{Listener, Protocol};

impl Walker<'_> {
    /// Reports `admin.bind` (written in `admin`) when it overlaps a tcp listener's bind.
    pub(super) fn check_admin_bind(
        &mut self,
        bind: SocketAddr,
        admin: &Node,
        listeners: &[Listener],
    ) {
        let Some(listener) = listeners
            .iter()
            .find(|l| l.protocol == Protocol::Tcp && overlap(bind, l.bind))
        else {
            return;
        };
        let at = admin
            .get("bind")
            .map_or(admin.location, |node| node.location);
        let owner = format!(
            "listener {:?} at line {}",
            listener.name, listener.location.line
        );
        let message = if bind == listener.bind {
            format!("tcp {bind} is already bound by {owner}; give the admin endpoint its own port")
        } else {
            format!(
                "tcp {bind} overlaps {}, the bind of {owner} (a wildcard address takes the \
                 port on every address); give the admin endpoint its own port",
                listener.bind
            )
        };
        self.error(at, "admin.bind", message);
    }
}

/// Whether two tcp sockets bound to `a` and `b` without SO_REUSEPORT on both would collide:
/// the same port, and the same address or a wildcard that covers the other. `[::]` covers
/// IPv4 too, as Linux binds it dual-stack by default (`net.ipv6.bindv6only = 0`).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let (x, y) = (canonical(a.ip()), canonical(b.ip()));
    a.port() == b.port() && (x == y || covers(x, y) || covers(y, x))
}

fn covers(wildcard: IpAddr, other: IpAddr) -> bool {
    match wildcard {
        IpAddr::V4(ip) => ip.is_unspecified() && other.is_ipv4(),
        IpAddr::V6(ip) => ip.is_unspecified(),
    }
}

/// An IPv4-mapped IPv6 address (`[::ffff:10.0.0.1]`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps(a: &str, b: &str) -> bool {
        overlap(a.parse().unwrap(), b.parse().unwrap())
    }

    #[test]
    fn wildcards_cover_their_family_and_ipv6_covers_both() {
        assert!(overlaps("127.0.0.1:80", "127.0.0.1:80"));
        assert!(overlaps("0.0.0.0:80", "127.0.0.1:80"));
        assert!(overlaps("127.0.0.1:80", "0.0.0.0:80"));
        assert!(overlaps("[::]:80", "10.0.0.1:80"));
        assert!(overlaps("[::]:80", "[::1]:80"));
        assert!(overlaps("[::ffff:127.0.0.1]:80", "127.0.0.1:80"));
        assert!(!overlaps("127.0.0.1:80", "127.0.0.1:81"));
        assert!(!overlaps("127.0.0.1:80", "127.0.0.2:80"));
        assert!(!overlaps("0.0.0.0:80", "[::1]:80"));
    }
}
