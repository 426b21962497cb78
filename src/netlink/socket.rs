//! A netlink socket for requests: bound, with extended acks capped to the
//! request's header, a bounded wait for answers, and sequence numbers.

use super::Malformed;
use netlink_sys::{Socket, SocketAddr};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

/// Room for one datagram of answers (the kernel fills at most a page or two).
const RECV_BUFFER: usize = 64 * 1024;
const MAX_SOCKET_BUFFER: usize = 64 * 1024 * 1024;

/// How a [`RequestSocket`] waits for the kernel.
#[derive(Debug, Clone, Copy)]
pub enum Wait {
    /// At most this long per datagram (then `TimedOut`).
    Upto(Duration),
    /// Not at all: the kernel answers inside `send` for the families that do
    /// (sock_diag), and a caller on an event loop must never block.
    Never,
}

pub struct RequestSocket {
    socket: Socket,
    port: u32,
    seq: u32,
    wait: Wait,
}

impl RequestSocket {
    /// A socket of netlink `protocol` (`netlink_sys::protocols::*`).
    pub fn open(protocol: isize, wait: Wait) -> io::Result<RequestSocket> {
        let mut socket = Socket::new(protocol)?;
        let address = socket.bind_auto()?;
        // Errors echo only the request header, plus the kernel's explanation
        // (the refused attribute's offset).
        socket.set_cap_ack(true)?;
        socket.set_ext_ack(true)?;
        if let Wait::Upto(timeout) = wait {
            set_receive_timeout(socket.as_raw_fd(), timeout)?;
        }
        Ok(RequestSocket {
            socket,
            port: address.port_number(),
            seq: 0,
            wait,
        })
    }

    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    pub fn socket_mut(&mut self) -> &mut Socket {
        &mut self.socket
    }

    /// The port id the kernel gave this socket (it signs change notifications).
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The sequence number for the next request.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one datagram to the kernel, whole.
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let sent = self.socket.send_to(bytes, &SocketAddr::new(0, 0), 0)?;
        if sent != bytes.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of {} bytes",
                bytes.len()
            )));
        }
        Ok(())
    }

    /// Receives one datagram into `buf` (cleared first). Waiting past the bound
    /// is `TimedOut` (`WouldBlock` with [`Wait::Never`]); a datagram larger than
    /// the buffer is `InvalidData`, as its rest is lost.
    pub fn recv(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.clear();
        buf.reserve(RECV_BUFFER);
        let flags = match self.wait {
            Wait::Upto(_) => libc::MSG_TRUNC,
            Wait::Never => libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        };
        let len = self.socket.recv(buf, flags).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock && matches!(self.wait, Wait::Upto(_)) {
                io::Error::new(io::ErrorKind::TimedOut, "no answer from the kernel")
            } else {
                e
            }
        })?;
        if len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                Malformed(format!("netlink datagram of {len} bytes truncated")),
            ));
        }
        Ok(())
    }
}

impl AsRawFd for RequestSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Sets a socket buffer's size, best effort: first with the `force` option (past the
/// sysctl cap; needs CAP_NET_ADMIN), else `plain`.
pub fn set_buffer(socket: &Socket, force: libc::c_int, plain: libc::c_int, size: usize) {
    let value = size.min(MAX_SOCKET_BUFFER) as libc::c_int;
    let set = |option| {
        // SAFETY: fd is a valid socket owned by `socket`; the value is a c_int of the
        // length passed.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    // The default sizes still hold ordinary requests.
    if set(force) != 0 {
        set(plain);
    }
}

fn set_receive_timeout(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: fd is an open socket and tv is a live timeval of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
