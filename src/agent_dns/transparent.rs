//! The DNS handler's datagrams in and out, at addresses that are not ours.
//!
//! In: a transparent UDP socket (IP_TRANSPARENT) takes what the table's
//! TPROXY rule hands it, and IP_RECVORIGDSTADDR tells it where each datagram
//! was going. Out: the agent's socket takes an answer only from the address
//! and port it asked, which may be a resolver on this host (127.0.0.53:53,
//! bound by systemd-resolved) that no socket of ours can bind. So answers
//! leave through a raw UDP socket (CAP_NET_RAW) that writes its own UDP header
//! and names its source address with IP_PKTINFO (any address: the socket is
//! transparent); it receives nothing (a filter drops every datagram). nix
//! carries the control messages, which std does not.

use nix::sys::socket::{
    self, recvmsg, sendmsg, setsockopt, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6,
    SockaddrStorage,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::proxy::listener::need_net_admin;
use socket2::{SockFilter, SockRef};

const UDP_HEADER_LEN: usize = 8;
/// The listeners' receive queue, in bytes (the kernel counts each datagram's
/// buffer, about 1 KiB for a query): some 4,000 queries.
const LISTENER_RECEIVE_BUFFER: usize = 4 << 20;
/// Where the UDP checksum sits in the header, for IPV6_CHECKSUM.
const UDP_CHECKSUM_OFFSET: i32 = 6;

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
        let v4 = raw_udp(AddressFamily::Inet)?;
        setsockopt(&v4, sockopt::IpTransparent, &true).map_err(errno_net_admin)?;
        let v6 = raw_udp(AddressFamily::Inet6)?;
        SockRef::from(&v6)
            .set_ip_transparent_v6(true)
            .map_err(need_net_admin)?;
        // The kernel fills in the checksum over the IPv6 pseudo-header.
        set_ipv6_checksum(&v6, UDP_CHECKSUM_OFFSET)?;
        Ok(Replier { v4, v6 })
    }

    /// `payload` to `to`, as if sent by a socket bound to `from`.
    pub fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        let length = u16::try_from(UDP_HEADER_LEN + payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "datagram too long"))?;
        let mut header = [0u8; UDP_HEADER_LEN];
        header[0..2].copy_from_slice(&from.port().to_be_bytes());
        header[2..4].copy_from_slice(&to.port().to_be_bytes());
        header[4..6].copy_from_slice(&length.to_be_bytes());
        // Raw sockets take no port in the destination: the header has it.
        let sent = match (from.ip().to_canonical(), to.ip().to_canonical()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let checksum = udp4_checksum(src.octets(), dst.octets(), &header, payload);
                header[6..8].copy_from_slice(&checksum.to_be_bytes());
                let iov = [IoSlice::new(&header), IoSlice::new(payload)];
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(src.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                send_raw(
                    self.v4.as_raw_fd(),
                    &iov,
                    &[ControlMessage::Ipv4PacketInfo(&info)],
                    &SockaddrIn::from(SocketAddrV4::new(dst, 0)),
                )
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let iov = [IoSlice::new(&header), IoSlice::new(payload)];
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: src.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                send_raw(
                    self.v6.as_raw_fd(),
                    &iov,
                    &[ControlMessage::Ipv6PacketInfo(&info)],
                    &SockaddrIn6::from(SocketAddrV6::new(dst, 0, 0, 0)),
                )
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot answer {to} from {from}: address families differ"),
                ))
            }
        }?;
        if sent == usize::from(length) {
            Ok(())
        } else {
            Err(io::Error::other(format!("answer to {to} sent short")))
        }
    }
}

fn send_raw<S: socket::SockaddrLike>(
    fd: RawFd,
    iov: &[IoSlice<'_>],
    control: &[ControlMessage<'_>],
    to: &S,
) -> io::Result<usize> {
    sendmsg(fd, iov, control, MsgFlags::MSG_DONTWAIT, Some(to)).map_err(io::Error::from)
}

/// A raw UDP socket that receives nothing: without the filter the kernel
/// would queue a copy of every UDP datagram this host receives.
fn raw_udp(family: AddressFamily) -> io::Result<OwnedFd> {
    let fd = socket::socket(
        family,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Udp,
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("raw UDP socket: {e} (answering agents' DNS needs CAP_NET_RAW)"),
        )
    })?;
    let drop_all = SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, 0);
    SockRef::from(&fd)
        .attach_filter(&[drop_all])
        .map_err(|e| io::Error::new(e.kind(), format!("SO_ATTACH_FILTER: {e}")))?;
    Ok(fd)
}

/// The UDP checksum over the IPv4 pseudo-header (RFC 768); never 0, which
/// would mean "none".
fn udp4_checksum(src: [u8; 4], dst: [u8; 4], header: &[u8], payload: &[u8]) -> u16 {
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
    add(&src);
    add(&dst);
    add(&[0, libc::IPPROTO_UDP as u8]);
    add(&(length as u16).to_be_bytes());
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

/// IPV6_CHECKSUM, which neither nix nor socket2 carries.
fn set_ipv6_checksum(fd: &OwnedFd, offset: i32) -> io::Result<()> {
    // SAFETY: fd is an open socket; offset lives for the call and its size is given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_CHECKSUM,
            (&offset as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(
            e.kind(),
            format!("setsockopt IPV6_CHECKSUM: {e}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            udp4_checksum([192, 0, 2, 1], [192, 0, 2, 2], &header, b"hi"),
            !(folded as u16)
        );
    }
}
