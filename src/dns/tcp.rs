//! One DNS question over TCP (RFC 7766), asked when its UDP answer came back
//! truncated: the message framed by a two-byte length, on a non-blocking
//! connection the resolver's own epoll set watches.

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use std::io::{self, Read, Write};
use std::net::SocketAddr;

pub(super) struct TcpQuery {
    stream: TcpStream,
    /// The framed query and how much of it is written.
    out: Vec<u8>,
    written: usize,
    /// The framed answer as far as it has come.
    answer: Vec<u8>,
}

/// Length prefix of a DNS message over TCP.
const FRAME_HEADER: usize = 2;

impl TcpQuery {
    pub(super) fn start(
        server: SocketAddr,
        query: &[u8],
        registry: &Registry,
        token: Token,
    ) -> io::Result<TcpQuery> {
        let len = u16::try_from(query.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long for TCP"))?;
        let mut out = Vec::with_capacity(FRAME_HEADER + query.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(query);
        let mut stream = TcpStream::connect(server)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(TcpQuery {
            stream,
            out,
            written: 0,
            answer: Vec::new(),
        })
    }

    /// Writes and reads as far as the socket allows (it is edge-triggered:
    /// both until they would block); the answer once it is all in.
    pub(super) fn advance(&mut self) -> io::Result<Option<&[u8]>> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(n) => self.written += n,
                // Also what a socket still connecting says.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(len) = self.frame_len() {
                if self.answer.len() >= FRAME_HEADER + len {
                    return Ok(Some(&self.answer[FRAME_HEADER..FRAME_HEADER + len]));
                }
            }
            // Read no further than this frame: the length prefix bounds it.
            let wanted = match self.frame_len() {
                Some(len) => FRAME_HEADER + len - self.answer.len(),
                None => FRAME_HEADER - self.answer.len(),
            };
            let limit = wanted.min(chunk.len());
            match self.stream.read(&mut chunk[..limit]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed the TCP connection before answering",
                    ))
                }
                Ok(n) => self.answer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn frame_len(&self) -> Option<usize> {
        match self.answer.get(..FRAME_HEADER) {
            Some(&[hi, lo]) => Some(usize::from(u16::from_be_bytes([hi, lo]))),
            _ => None,
        }
    }
}
