//! A multicast netlink subscription, drained without blocking.
//!
//! Events are only a hint that something may have changed: the reader is told
//! "maybe" whenever it cannot be sure (the kernel dropped events for want of
//! buffer, ENOBUFS; a datagram was truncated; more are queued than one drain
//! reads), and re-reads the real state.

use netlink_sys::Socket;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

const RECV_BUFFER: usize = 64 * 1024;
/// Datagrams read per drain, so an event storm cannot hold the caller's loop.
const MAX_DATAGRAMS_PER_DRAIN: usize = 4096;

pub struct Monitor {
    socket: Socket,
    buf: Vec<u8>,
}

impl Monitor {
    /// Joins `groups` of netlink `protocol`, with `rcvbuf` bytes of room for
    /// bursts (set past the sysctl cap where we may).
    pub fn subscribe(protocol: isize, groups: &[u32], rcvbuf: usize) -> io::Result<Monitor> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.set_non_blocking(true)?;
        super::set_buffer(&socket, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, rcvbuf);
        for group in groups {
            socket.add_membership(*group)?;
        }
        Ok(Monitor {
            socket,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    /// Sends one request to the kernel on the subscribed socket (the process
    /// events connector takes its subscription so).
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let sent = self
            .socket
            .send_to(bytes, &netlink_sys::SocketAddr::new(0, 0), 0)?;
        if sent == bytes.len() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "sent {sent} of {} bytes",
                bytes.len()
            )))
        }
    }

    /// Reads what is queued; `relevant` says of each datagram whether it
    /// matters. `Ok(true)`: something relevant came, or events were lost.
    pub fn drain(&mut self, mut relevant: impl FnMut(&[u8]) -> bool) -> io::Result<bool> {
        let mut changed = false;
        for _ in 0..MAX_DATAGRAMS_PER_DRAIN {
            self.buf.clear();
            self.buf.reserve(RECV_BUFFER);
            match self
                .socket
                .recv(&mut self.buf, libc::MSG_DONTWAIT | libc::MSG_TRUNC)
            {
                Ok(len) if len > self.buf.len() => changed = true,
                Ok(_) => changed |= relevant(&self.buf),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(changed),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => changed = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Still more queued: say "maybe" and let the caller re-check the real state.
        Ok(true)
    }
}

impl AsRawFd for Monitor {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl AsFd for Monitor {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}
