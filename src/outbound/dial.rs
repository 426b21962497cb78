//! Making the upstream socket: a non-blocking connect, with the socket options
//! that choose the way out (interface, routing mark) set before the SYN.

use mio::net::TcpStream;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// How a direct connection leaves the machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DialOptions {
    /// SO_BINDTODEVICE: leave through this interface only.
    pub interface: Option<String>,
    /// SO_MARK: the fwmark policy routing sees. It must not be the
    /// interception mark, or the connection would be captured again.
    pub mark: Option<u32>,
}

/// Starts connecting to `addr` (TCP_NODELAY set). The connection is usually still in progress
/// when this returns: wait for the stream to be writable, then ask
/// `connect_outcome`. Errors name the address and what failed.
pub fn dial(addr: SocketAddr, opts: &DialOptions) -> io::Result<TcpStream> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    let context = |what: String| {
        move |e: io::Error| io::Error::new(e.kind(), format!("dial {addr}: {what}: {e}"))
    };
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(context("socket".into())(io::Error::last_os_error()));
    }
    // SAFETY: fd is a socket we just made and own alone.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(mark) = opts.mark {
        setsockopt(socket.as_raw_fd(), libc::SO_MARK, &mark.to_ne_bytes())
            .map_err(context(format!("SO_MARK {mark}")))?;
    }
    if let Some(interface) = &opts.interface {
        bind_to_device(socket.as_raw_fd(), interface)
            .map_err(context(format!("SO_BINDTODEVICE {interface:?}")))?;
    }
    connect(socket.as_raw_fd(), addr).map_err(context("connect".into()))?;
    let stream = std::net::TcpStream::from(socket);
    // We relay writes whose sizes the client chose: Nagle would only delay them.
    stream
        .set_nodelay(true)
        .map_err(context("TCP_NODELAY".into()))?;
    Ok(TcpStream::from_std(stream))
}

/// After a writable event on a dialed stream: Ok(true) once connected,
/// Ok(false) while still connecting, Err with the reason it failed (e.g.
/// ConnectionRefused).
pub fn connect_outcome(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e)
            if e.kind() == io::ErrorKind::NotConnected
                || e.raw_os_error() == Some(libc::EINPROGRESS) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn bind_to_device(fd: RawFd, interface: &str) -> io::Result<()> {
    if interface.is_empty() || interface.len() >= libc::IFNAMSIZ || interface.contains(['\0', '/'])
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "not an interface name (1 to {} bytes, no '/' or NUL)",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    setsockopt(fd, libc::SO_BINDTODEVICE, interface.as_bytes()).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENODEV) {
            io::Error::new(e.kind(), "no such network interface")
        } else {
            e
        }
    })
}

fn setsockopt(fd: RawFd, option: libc::c_int, value: &[u8]) -> io::Result<()> {
    let len = libc::socklen_t::try_from(value.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option value too long"))?;
    // SAFETY: value points to len readable bytes for the whole call.
    let rc = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, option, value.as_ptr().cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A non-blocking connect: EINPROGRESS is the normal outcome.
fn connect(fd: RawFd, addr: SocketAddr) -> io::Result<()> {
    let (storage, len) = crate::sockaddr::from_socket_addr(addr);
    // SAFETY: storage holds a sockaddr of len bytes for the whole call.
    let rc = unsafe { libc::connect(fd, (&raw const storage).cast(), len) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(())
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked_before_the_kernel_sees_them() {
        for bad in ["", "a-very-long-interface-name", "a/b", "a\0b"] {
            let opts = DialOptions {
                interface: Some(bad.into()),
                mark: None,
            };
            let err = dial("127.0.0.1:9".parse().unwrap(), &opts).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}: {err}");
            assert!(err.to_string().contains("not an interface name"), "{err}");
        }
    }
}
