//! Making the upstream socket: a non-blocking connect, with the socket options
//! that choose the way out (interface, routing mark) set before the SYN.

use mio::net::TcpStream;
use socket2::{Domain, Socket, Type};
use std::io;
use std::net::SocketAddr;

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
    let context = |what: String| {
        move |e: io::Error| io::Error::new(e.kind(), format!("dial {addr}: {what}: {e}"))
    };
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )
    .map_err(context("socket".into()))?;
    if let Some(mark) = opts.mark {
        socket
            .set_mark(mark)
            .map_err(context(format!("SO_MARK {mark}")))?;
    }
    if let Some(interface) = &opts.interface {
        bind_to_device(&socket, interface)
            .map_err(context(format!("SO_BINDTODEVICE {interface:?}")))?;
    }
    // We relay writes whose sizes the client chose: Nagle would only delay them.
    socket
        .set_tcp_nodelay(true)
        .map_err(context("TCP_NODELAY".into()))?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        // Non-blocking: the normal outcome.
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(context("connect".into())(e)),
    }
    Ok(TcpStream::from_std(socket.into()))
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

fn bind_to_device(socket: &Socket, interface: &str) -> io::Result<()> {
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
    socket.bind_device(Some(interface.as_bytes())).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENODEV) {
            io::Error::new(e.kind(), "no such network interface")
        } else {
            e
        }
    })
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
