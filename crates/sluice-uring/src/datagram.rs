//! Datagrams: what a multishot `recvmsg` leaves in a provided buffer (source address, the local
//! address the datagram was sent to, payload), and the memory a `sendmsg` with a chosen source
//! address needs until it completes.
//!
//! Parsing is done on bytes, without `unsafe`: the kernel's layouts (`sockaddr_in`,
//! `sockaddr_in6`, `cmsghdr`, `in_pktinfo`, `in6_pktinfo`) are read field by field, so a
//! short or odd buffer gives `None`, never a bad read.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Room for a source address (`sockaddr_storage`).
pub(crate) const NAME_LEN: u32 = size_of::<libc::sockaddr_storage>() as u32;
/// Room for one `IP_PKTINFO` or `IPV6_PKTINFO` control message, with slack.
pub(crate) const CONTROL_LEN: usize = 64;

/// One datagram received on a socket with `recvmsg`.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'buf> {
    /// Who sent it.
    pub source: SocketAddr,
    /// The address it was sent to, from `IP_PKTINFO`/`IPV6_PKTINFO` (set on the socket by the
    /// caller); `None` when the socket reports none (bound to a specific address).
    pub local: Option<IpAddr>,
    pub payload: &'buf [u8],
    /// Where `payload` starts in its buffer, to send it on from there.
    pub payload_offset: u32,
    /// The datagram was longer than the buffer: `payload` is cut (the caller drops it).
    pub truncated: bool,
}

/// A `msghdr` with room for an address and one control message, as multishot `recvmsg`
/// reads its lengths from (the kernel lays out each received datagram in the buffer it picks).
pub(crate) fn recvmsg_template() -> Box<libc::msghdr> {
    // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid value (null
    // pointers, zero lengths).
    let mut msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
    msghdr.msg_namelen = NAME_LEN;
    msghdr.msg_controllen = CONTROL_LEN;
    msghdr
}

/// Parses the buffer of a multishot `recvmsg` completion (`len` bytes used).
pub(crate) fn parse_recvmsg<'b>(buffer: &'b [u8], msghdr: &libc::msghdr) -> Option<Datagram<'b>> {
    let out = io_uring::types::RecvMsgOut::parse(buffer, msghdr).ok()?;
    if out.is_name_data_truncated() {
        return None;
    }
    let source = parse_sockaddr(out.name_data())?;
    let local = parse_pktinfo(out.control_data());
    let truncated = out.is_payload_truncated();
    // The payload is a sub-slice of `buffer`: its distance from the start is its offset.
    let payload = out.payload_data();
    let offset = (payload.as_ptr() as usize).checked_sub(buffer.as_ptr() as usize)?;
    let payload = buffer.get(offset..offset + payload.len())?;
    Some(Datagram {
        source,
        local,
        payload,
        payload_offset: u32::try_from(offset).ok()?,
        truncated,
    })
}

fn u16_ne(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u16_be(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn i32_ne(bytes: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u32_ne(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn usize_ne(bytes: &[u8], at: usize) -> Option<usize> {
    const N: usize = size_of::<usize>();
    Some(usize::from_ne_bytes(
        bytes.get(at..at + N)?.try_into().ok()?,
    ))
}

fn ipv4(bytes: &[u8], at: usize) -> Option<Ipv4Addr> {
    let octets: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(octets))
}

fn ipv6(bytes: &[u8], at: usize) -> Option<Ipv6Addr> {
    let octets: [u8; 16] = bytes.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(octets))
}

/// A `sockaddr_in` or `sockaddr_in6` as bytes.
pub(crate) fn parse_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    match i32::from(u16_ne(name, 0)?) {
        libc::AF_INET => {
            let port = u16_be(name, 2)?;
            Some(SocketAddr::V4(SocketAddrV4::new(ipv4(name, 4)?, port)))
        }
        libc::AF_INET6 => {
            let port = u16_be(name, 2)?;
            let flowinfo = u32::from_be(u32_ne(name, 4)?);
            let scope = u32_ne(name, 24)?;
            Some(SocketAddr::V6(SocketAddrV6::new(
                ipv6(name, 8)?,
                port,
                flowinfo,
                scope,
            )))
        }
        _ => None,
    }
}

/// `CMSG_ALIGN`: control messages and their data are aligned to `size_t`.
fn cmsg_align(len: usize) -> usize {
    let align = size_of::<usize>();
    len.div_ceil(align) * align
}

/// The destination address of an `IP_PKTINFO` (`in_pktinfo.ipi_addr`) or `IPV6_PKTINFO`
/// (`in6_pktinfo.ipi6_addr`) control message, if `control` holds one.
pub(crate) fn parse_pktinfo(control: &[u8]) -> Option<IpAddr> {
    let header = cmsg_align(size_of::<libc::cmsghdr>());
    let mut at = 0;
    while at + header <= control.len() {
        let len = usize_ne(control, at)?;
        if len < header || at + len > control.len() {
            return None;
        }
        let level = i32_ne(control, at + size_of::<usize>())?;
        let kind = i32_ne(control, at + size_of::<usize>() + 4)?;
        let data = at + header;
        match (level, kind) {
            // in_pktinfo { ipi_ifindex: i32, ipi_spec_dst: in_addr, ipi_addr: in_addr }
            (libc::IPPROTO_IP, libc::IP_PKTINFO) => return ipv4(control, data + 8).map(IpAddr::V4),
            // in6_pktinfo { ipi6_addr: in6_addr, ipi6_ifindex: u32 }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                return ipv6(control, data).map(IpAddr::V6);
            }
            _ => at += cmsg_align(len),
        }
    }
    None
}

/// Everything one `sendmsg` references, boxed so that its address stays put until the
/// operation completes.
pub(crate) struct SendMsg {
    pub msghdr: libc::msghdr,
    pub iov: libc::iovec,
    pub name: libc::sockaddr_storage,
    /// `u64`s, so that the control message is aligned like `cmsghdr`.
    pub control: [u64; CONTROL_LEN / 8],
}

impl SendMsg {
    /// A `sendmsg` of `len` bytes at `data` to `dest`, from `source` when given (a
    /// `IP_PKTINFO`/`IPV6_PKTINFO` control message: the kernel then sends from that address,
    /// which the socket must be able to use, as a wildcard-bound one can).
    pub(crate) fn new(
        data: *const u8,
        len: usize,
        dest: SocketAddr,
        source: Option<IpAddr>,
    ) -> Box<SendMsg> {
        // SAFETY: all four are plain C structs (or integers) for which zero bytes are valid.
        let mut msg: Box<SendMsg> = Box::new(unsafe { std::mem::zeroed() });
        let dest = socket2::SockAddr::from(dest);
        let name_len = dest.len() as usize;
        // SAFETY: `dest.as_ptr()` points to `dest.len()` initialised bytes of a sockaddr, at
        // most the size of sockaddr_storage, and `msg.name` is a distinct sockaddr_storage.
        unsafe {
            std::ptr::copy_nonoverlapping(
                dest.as_ptr().cast::<u8>(),
                (&mut msg.name as *mut libc::sockaddr_storage).cast::<u8>(),
                name_len,
            );
        }
        let control_len = match source {
            Some(source) => write_pktinfo(&mut msg.control, source, dest_is_v6(&dest)),
            None => 0,
        };
        msg.iov = libc::iovec {
            iov_base: data as *mut libc::c_void,
            iov_len: len,
        };
        msg.msghdr.msg_name = (&mut msg.name as *mut libc::sockaddr_storage).cast();
        msg.msghdr.msg_namelen = name_len as libc::socklen_t;
        msg.msghdr.msg_iov = &mut msg.iov;
        msg.msghdr.msg_iovlen = 1;
        if control_len > 0 {
            msg.msghdr.msg_control = msg.control.as_mut_ptr().cast();
            msg.msghdr.msg_controllen = control_len;
        }
        msg
    }
}

fn dest_is_v6(dest: &socket2::SockAddr) -> bool {
    dest.is_ipv6()
}

/// Writes one `IP_PKTINFO` (source IPv4, on an IPv4 socket) or `IPV6_PKTINFO` control message
/// into `control` and returns its length; 0 when the families do not fit together (an IPv4
/// source through an IPv6 socket is written as its mapped IPv6 address).
fn write_pktinfo(control: &mut [u64; CONTROL_LEN / 8], source: IpAddr, v6_socket: bool) -> usize {
    let header = cmsg_align(size_of::<libc::cmsghdr>());
    let mut bytes = [0u8; CONTROL_LEN];
    let (level, kind, data): (i32, i32, Vec<u8>) = match (source, v6_socket) {
        (IpAddr::V4(v4), false) => {
            // in_pktinfo { ipi_ifindex: 0, ipi_spec_dst: source, ipi_addr: 0 }
            let mut data = vec![0u8; 12];
            data[4..8].copy_from_slice(&v4.octets());
            (libc::IPPROTO_IP, libc::IP_PKTINFO, data)
        }
        (ip, true) => {
            let v6 = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            // in6_pktinfo { ipi6_addr: source, ipi6_ifindex: 0 }
            let mut data = vec![0u8; 20];
            data[..16].copy_from_slice(&v6.octets());
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, data)
        }
        (IpAddr::V6(_), false) => return 0,
    };
    let len = header + data.len();
    let space = cmsg_align(len);
    bytes[..size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
    let at = size_of::<usize>();
    bytes[at..at + 4].copy_from_slice(&level.to_ne_bytes());
    bytes[at + 4..at + 8].copy_from_slice(&kind.to_ne_bytes());
    bytes[header..header + data.len()].copy_from_slice(&data);
    for (word, chunk) in control.iter_mut().zip(bytes.chunks_exact(8)) {
        *word = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8]));
    }
    space
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pktinfo_round_trips_through_the_writer_and_the_parser() {
        let mut control = [0u64; CONTROL_LEN / 8];
        let source: IpAddr = "127.9.8.7".parse().unwrap();
        let len = write_pktinfo(&mut control, source, false);
        assert!(len > 0);
        // The parser reads ipi_addr, the writer fills ipi_spec_dst: check the layout by hand.
        let bytes: Vec<u8> = control.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let header = cmsg_align(size_of::<libc::cmsghdr>());
        assert_eq!(&bytes[header + 4..header + 8], &[127, 9, 8, 7]);
        let v6 = write_pktinfo(&mut control, "::1".parse().unwrap(), true);
        let bytes: Vec<u8> = control.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(parse_pktinfo(&bytes[..v6]), Some("::1".parse().unwrap()));
    }

    #[test]
    fn odd_control_and_name_bytes_give_none() {
        assert_eq!(parse_pktinfo(&[]), None);
        assert_eq!(parse_pktinfo(&[0xff; 7]), None);
        assert_eq!(parse_pktinfo(&[0xff; 64]), None);
        assert_eq!(parse_sockaddr(&[]), None);
        assert_eq!(parse_sockaddr(&[0; 3]), None);
        let mut v4 = [0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&53u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(parse_sockaddr(&v4), Some("10.0.0.1:53".parse().unwrap()));
        assert_eq!(parse_sockaddr(&v4[..6]), None);
    }
}
