//! The DNS handler's datagrams in and out, at addresses that are not ours.
//!
//! In: a transparent UDP socket (IP_TRANSPARENT) takes what the table's
//! TPROXY rule hands it, and IP_RECVORIGDSTADDR tells it where each datagram
//! was going. Out: the agent's socket takes an answer only from the address
//! and port it asked, which may be a resolver on this host (127.0.0.53:53,
//! bound by systemd-resolved) that no socket of ours can bind. So answers
//! leave through a send-only raw socket (IPPROTO_RAW, CAP_NET_RAW) that
//! writes the whole datagram, IP and UDP headers included, from any source
//! address (the socket is transparent). An IPPROTO_UDP raw socket would do
//! too, but the kernel hands such a socket a copy of every UDP datagram of
//! the namespace, the host's own traffic included, for its filter to drop.
//! nix carries the control messages, which std does not.

use nix::sys::socket::{
    self, recvmsg, sendmsg, setsockopt, sockopt, AddressFamily, ControlMessageOwned, MsgFlags,
    SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::proxy::listener::need_net_admin;
use socket2::SockRef;

const UDP_HEADER_LEN: usize = 8;
/// The listeners' receive queue, in bytes (the kernel counts each datagram's
/// buffer, about 1 KiB for a query): some 4,000 queries.
const LISTENER_RECEIVE_BUFFER: usize = 4 << 20;

/// A transparent UDP socket bound to `addr` whose datagrams carry their
/// original destination.
pub fn listener(addr: SocketAddr) -> io::Result<mio::net::UdpSocket> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::Udp,
    )
    .map_err(io::Error::from)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(io::Error::from)?;
    // Room for a burst of queries (a resolver asking A and AAAA for many
    // names at once): what overflows the queue is lost without a trace.
    if setsockopt(&fd, sockopt::RcvBufForce, &LISTENER_RECEIVE_BUFFER).is_err() {
        setsockopt(&fd, sockopt::RcvBuf, &LISTENER_RECEIVE_BUFFER).map_err(io::Error::from)?;
    }
    match addr {
        SocketAddr::V4(a) => {
            setsockopt(&fd, sockopt::IpTransparent, &true).map_err(errno_net_admin)?;
            setsockopt(&fd, sockopt::Ipv4OrigDstAddr, &true).map_err(io::Error::from)?;
            socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a))
        }
        SocketAddr::V6(a) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(io::Error::from)?;
            SockRef::from(&fd)
                .set_ip_transparent_v6(true)
                .map_err(need_net_admin)?;
            setsockopt(&fd, sockopt::Ipv6OrigDstAddr, &true).map_err(io::Error::from)?;
            socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a))
        }
    }
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("bind {addr}: {e}")))?;
    Ok(mio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd)))
}

/// One datagram: who sent it, and where it was going.
pub struct Datagram {
    pub len: usize,
    pub from: SocketAddr,
    pub to: SocketAddr,
}

/// The next datagram on `socket`; WouldBlock when none is waiting. A
/// datagram without its original destination, or longer than `buf`, is
/// `InvalidData` (it is consumed).
pub fn receive(socket: &mio::net::UdpSocket, buf: &mut [u8]) -> io::Result<Datagram> {
    let mut control = nix::cmsg_space!(libc::sockaddr_in6);
    let mut iov = [IoSliceMut::new(buf)];
    let message = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    if message.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(invalid("a datagram longer than any DNS query we take"));
    }
    let from = message
        .address
        .as_ref()
        .and_then(socket_addr)
        .ok_or_else(|| invalid("a datagram without its sender"))?;
    let mut to = None;
    for cmsg in message.cmsgs().map_err(io::Error::from)? {
        match cmsg {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                to = Some(SocketAddr::V4(SockaddrIn::from(a).into()));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                to = Some(SocketAddr::V6(SockaddrIn6::from(a).into()));
            }
            _ => {}
        }
    }
    let to = to.ok_or_else(|| invalid("a datagram without its original destination"))?;
    Ok(Datagram {
        len: message.bytes,
        from,
        to,
    })
}

fn socket_addr(storage: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = storage.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*a)));
    }
    storage
        .as_sockaddr_in6()
        .map(|a| SocketAddr::V6(SocketAddrV6::from(*a)))
}

/// Sends UDP datagrams from any address and port.
pub struct Replier {
    v4: OwnedFd,
    v6: OwnedFd,
}

impl Replier {
    pub fn new() -> io::Result<Replier> {
        let v4 = raw_send_only(AddressFamily::Inet)?;
        // Transparent, as the listeners are: the sources are not the host's.
        setsockopt(&v4, sockopt::IpTransparent, &true).map_err(errno_net_admin)?;
        let v6 = raw_send_only(AddressFamily::Inet6)?;
        SockRef::from(&v6)
            .set_ip_transparent_v6(true)
            .map_err(need_net_admin)?;
        Ok(Replier { v4, v6 })
    }

    /// `payload` to `to`, as if sent by a socket bound to `from`.
    pub fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        let udp_length = u16::try_from(UDP_HEADER_LEN + payload.len())
            .ok()
            .filter(|&l| usize::from(l) + IPV6_HEADER_LEN <= usize::from(u16::MAX))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "datagram too long"))?;
        let mut udp = [0u8; UDP_HEADER_LEN];
        udp[0..2].copy_from_slice(&from.port().to_be_bytes());
        udp[2..4].copy_from_slice(&to.port().to_be_bytes());
        udp[4..6].copy_from_slice(&udp_length.to_be_bytes());
        // Raw sockets take no port in the destination: the header has it.
        let (sent, header_len) = match (from.ip().to_canonical(), to.ip().to_canonical()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let (src, dst) = (src.octets(), dst.octets());
                let checksum = udp_checksum(&src, &dst, &udp, payload);
                udp[6..8].copy_from_slice(&checksum.to_be_bytes());
                let ip = ipv4_header(src, dst);
                let iov = [IoSlice::new(&ip), IoSlice::new(&udp), IoSlice::new(payload)];
                let to = SockaddrIn::from(SocketAddrV4::new(dst.into(), 0));
                (send_raw(self.v4.as_raw_fd(), &iov, &to)?, ip.len())
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let (src, dst) = (src.octets(), dst.octets());
                let checksum = udp_checksum(&src, &dst, &udp, payload);
                udp[6..8].copy_from_slice(&checksum.to_be_bytes());
                let ip = ipv6_header(src, dst, udp_length);
                let iov = [IoSlice::new(&ip), IoSlice::new(&udp), IoSlice::new(payload)];
                let to = SockaddrIn6::from(SocketAddrV6::new(dst.into(), 0, 0, 0));
                (send_raw(self.v6.as_raw_fd(), &iov, &to)?, ip.len())
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot answer {to} from {from}: address families differ"),
                ))
            }
        };
        if sent == header_len + usize::from(udp_length) {
            Ok(())
        } else {
            Err(io::Error::other(format!("answer to {to} sent short")))
        }
    }
}

const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const HOP_LIMIT: u8 = 64;

/// An IPv4 header without options; the kernel fills in the total length,
/// the id and the checksum of a header a raw socket sends (raw(7)).
fn ipv4_header(src: [u8; 4], dst: [u8; 4]) -> [u8; IPV4_HEADER_LEN] {
    let mut header = [0u8; IPV4_HEADER_LEN];
    header[0] = 0x45; // version 4, 5 words
    header[8] = HOP_LIMIT;
    header[9] = libc::IPPROTO_UDP as u8;
    header[12..16].copy_from_slice(&src);
    header[16..20].copy_from_slice(&dst);
    header
}

/// An IPv6 header for `payload_len` bytes of UDP; the kernel sends it as it is.
fn ipv6_header(src: [u8; 16], dst: [u8; 16], payload_len: u16) -> [u8; IPV6_HEADER_LEN] {
    let mut header = [0u8; IPV6_HEADER_LEN];
    header[0] = 0x60; // version 6, no traffic class or flow label
    header[4..6].copy_from_slice(&payload_len.to_be_bytes());
    header[6] = libc::IPPROTO_UDP as u8;
    header[7] = HOP_LIMIT;
    header[8..24].copy_from_slice(&src);
    header[24..40].copy_from_slice(&dst);
    header
}

fn send_raw<S: socket::SockaddrLike>(fd: RawFd, iov: &[IoSlice<'_>], to: &S) -> io::Result<usize> {
    sendmsg(fd, iov, &[], MsgFlags::MSG_DONTWAIT, Some(to)).map_err(io::Error::from)
}

/// A raw socket that sends whole IP datagrams and receives none (no
/// datagram carries protocol 255).
fn raw_send_only(family: AddressFamily) -> io::Result<OwnedFd> {
    socket::socket(
        family,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Raw,
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("raw socket: {e} (answering agents' DNS needs CAP_NET_RAW)"),
        )
    })
}

/// The UDP checksum over the pseudo-header of either family (RFC 768, RFC
/// 8200 8.1: the addresses, the protocol and the UDP length); never 0, which
/// would mean "none" (and is not allowed over IPv6).
fn udp_checksum(src: &[u8], dst: &[u8], header: &[u8], payload: &[u8]) -> u16 {
    let length = (header.len() + payload.len()) as u32;
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = match pair {
                [hi, lo] => u16::from_be_bytes([*hi, *lo]),
                [hi] => u16::from_be_bytes([*hi, 0]),
                _ => 0,
            };
            sum += u32::from(word);
        }
    };
    add(src);
    add(dst);
    add(&[0, libc::IPPROTO_UDP as u8]);
    add(&length.to_be_bytes());
    add(header);
    // An odd-length header never happens (8 bytes): the payload pads itself.
    add(payload);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    match !(sum as u16) {
        0 => 0xffff,
        checksum => checksum,
    }
}

fn errno_net_admin(e: nix::errno::Errno) -> io::Error {
    need_net_admin(e.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root's, or a loud skip (a failure under CI).
    fn as_root() -> bool {
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "root is required under CI"
        );
        eprintln!("SKIPPED: raw sockets need root");
        false
    }

    #[test]
    fn answers_arrive_whole_from_the_address_asked_v4_and_v6() {
        if !as_root() {
            return;
        }
        let replier = Replier::new().unwrap();
        for (local, asked) in [
            ("127.0.0.1:0", "192.0.2.53:53"),
            ("[::1]:0", "[2001:db8::53]:53"),
        ] {
            let agent = std::net::UdpSocket::bind(local).unwrap();
            agent
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let asked: SocketAddr = asked.parse().unwrap();
            // Odd length: the checksum's padding is exercised too.
            let answer = b"an answer of odd length";
            replier
                .send(asked, agent.local_addr().unwrap(), answer)
                .unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = agent.recv_from(&mut buf).expect("the answer arrives");
            assert_eq!((&buf[..n], from), (&answer[..], asked));
        }
    }

    #[test]
    fn checksum_matches_a_known_datagram() {
        // 192.0.2.1:53 -> 192.0.2.2:40000, payload "hi": computed by hand
        // (one's complement of the 16-bit sum of pseudo-header, header, data).
        let mut header = [0u8; 8];
        header[0..2].copy_from_slice(&53u16.to_be_bytes());
        header[2..4].copy_from_slice(&40000u16.to_be_bytes());
        header[4..6].copy_from_slice(&10u16.to_be_bytes());
        let sum: u32 = 0xc000 + 0x0201 + 0xc000 + 0x0202 + 17 + 10 + 53 + 40000 + 10 + 0x6869;
        let folded = (sum & 0xffff) + (sum >> 16);
        assert_eq!(
            udp_checksum(&[192, 0, 2, 1], &[192, 0, 2, 2], &header, b"hi"),
            !(folded as u16)
        );
    }
}
