//! DNS over TCP (RFC 7766): each message behind its two-byte length, on a
//! non-blocking stream. The agents' TCP queries (a resolver retrying a
//! truncated answer) come in on such streams, and the handler forwards them
//! to the servers on streams of its own, so a large answer arrives whole.

use mio::net::TcpStream;
use std::io::{self, Read, Write};

/// The largest message a two-byte length can announce.
const MAX_MESSAGE: usize = 65_535;
/// What one connection may hold unread: a message and the start of the next.
const MAX_INBOX: usize = 2 * (MAX_MESSAGE + 2);

/// One TCP connection carrying DNS messages.
pub struct Conn {
    pub stream: TcpStream,
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    /// The peer closed its side.
    pub closed: bool,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            inbox: Vec::new(),
            outbox: Vec::new(),
            closed: false,
        }
    }

    /// Reads what is there (until it would block, the peer closes, or the
    /// inbox is full); an error is the connection's end.
    pub fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 4096];
        while !self.closed && self.inbox.len() < MAX_INBOX {
            let room = (MAX_INBOX - self.inbox.len()).min(chunk.len());
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => self.closed = true,
                Ok(n) => self.inbox.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The next whole message read, if one is.
    pub fn next_message(&mut self) -> Option<Vec<u8>> {
        let len = usize::from(u16::from_be_bytes([
            *self.inbox.first()?,
            *self.inbox.get(1)?,
        ]));
        if self.inbox.len() < 2 + len {
            return None;
        }
        let message = self.inbox[2..2 + len].to_vec();
        self.inbox.drain(..2 + len);
        Some(message)
    }

    /// Queues `message` behind its length and writes what the socket takes.
    pub fn send(&mut self, message: &[u8]) -> io::Result<()> {
        let len = u16::try_from(message.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "a DNS message over 64 KiB")
        })?;
        self.outbox.extend_from_slice(&len.to_be_bytes());
        self.outbox.extend_from_slice(message);
        self.flush()
    }

    /// Writes what is queued, as far as the socket takes it.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.outbox.is_empty() {
            match self.stream.write(&self.outbox) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.outbox.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Nothing left to write.
    pub fn drained(&self) -> bool {
        self.outbox.is_empty()
    }

    /// More unread than one message may be: a peer that sends without
    /// reading, or lies about a length.
    pub fn overfull(&self) -> bool {
        self.inbox.len() >= MAX_INBOX
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (Conn, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (Conn::new(TcpStream::from_std(server)), client)
    }

    #[test]
    fn messages_come_whole_across_reads_and_go_with_their_length() {
        let (mut conn, mut peer) = pair();
        peer.write_all(&[0, 3, b'a', b'b']).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        conn.fill().unwrap();
        assert_eq!(conn.next_message(), None);
        peer.write_all(&[b'c', 0, 1, b'd', 0]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        conn.fill().unwrap();
        assert_eq!(conn.next_message().as_deref(), Some(&b"abc"[..]));
        assert_eq!(conn.next_message().as_deref(), Some(&b"d"[..]));
        assert_eq!(conn.next_message(), None);
        conn.send(b"xyz").unwrap();
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, [0, 3, b'x', b'y', b'z']);
        drop(peer);
        std::thread::sleep(std::time::Duration::from_millis(20));
        conn.fill().unwrap();
        assert!(conn.closed);
    }
}
