//! The TPROXY listening sockets.
//!
//! IP_TRANSPARENT lets the socket accept connections addressed to any IP (the
//! agent's original destination); SO_REUSEPORT gives each worker thread its
//! own socket on the same port so the kernel spreads connections over them.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

const BACKLOG: i32 = 4096;

pub fn transparent_listener(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let family = match addr.ip() {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket creation; the fd is owned at once below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1, "SO_REUSEPORT")?;
    match addr.ip() {
        IpAddr::V4(_) => set_int(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1, "IP_TRANSPARENT")
            .map_err(need_net_admin)?,
        IpAddr::V6(_) => {
            set_int(fd, libc::SOL_IPV6, libc::IPV6_V6ONLY, 1, "IPV6_V6ONLY")?;
            set_int(
                fd,
                libc::SOL_IPV6,
                libc::IPV6_TRANSPARENT,
                1,
                "IPV6_TRANSPARENT",
            )
            .map_err(need_net_admin)?;
        }
    }
    let (storage, len) = crate::sockaddr::from_socket_addr(addr);
    // SAFETY: storage holds a valid sockaddr of `len` bytes for this family.
    let rc = unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("bind {addr}: {e}")));
    }
    // SAFETY: fd is a bound stream socket.
    if unsafe { libc::listen(fd, BACKLOG) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("listen on {addr}: {e}")));
    }
    Ok(mio::net::TcpListener::from_std(
        std::net::TcpListener::from(owned),
    ))
}

fn need_net_admin(e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("{e} (transparent sockets need CAP_NET_ADMIN or CAP_NET_RAW)"),
    )
}

pub fn set_int(fd: RawFd, level: i32, name: i32, value: i32, what: &str) -> io::Result<()> {
    // SAFETY: value lives for the call; its size is given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("setsockopt {what}: {e}")))
    }
}
