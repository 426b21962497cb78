//! The upstream side of a connection: making the socket, and the handshakes
//! that open a tunnel through an upstream proxy (SOCKS5, HTTP CONNECT).
//!
//! The handshakes are sans-IO state machines: the event loop writes
//! `bytes_to_send()`, reports what it wrote with `sent`, feeds what it reads to
//! `received`, and learns from the returned `Progress` when the tunnel is open.
//! They never touch a socket, so the loop keeps all waiting and timing.

mod block;
mod dial;
mod http_connect;
mod socks5;

pub use block::{http_forbidden, tls_access_denied_alert};
pub use dial::{connect_outcome, dial, DialOptions};
pub use http_connect::HttpConnectHandshake;
pub use socks5::Socks5Handshake;

use std::fmt;
use std::net::SocketAddr;

/// Where the upstream proxy should connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A host name the upstream resolves: preferred, so the upstream's view of
    /// DNS is the one used beyond it.
    Name(String, u16),
    Addr(SocketAddr),
}

impl Target {
    /// Refuses names that are not plain DNS host names: they end up inside a
    /// SOCKS request or an HTTP request line, where a space or CR LF could
    /// smuggle in something else.
    fn check(&self) -> Result<(), Problem> {
        if let Target::Name(name, _) = self {
            let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_');
            if name.is_empty() || name.len() > MAX_HOST_NAME || !name.bytes().all(plain) {
                return Err(Problem::NotAHostName(name.clone()));
            }
        }
        Ok(())
    }
}

/// Why a handshake cannot be started: its request cannot carry the target
/// or the credentials. Shown prefixed with the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    Socks5(Problem),
    HttpConnect(Problem),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Socks5(problem) => write!(f, "socks5: {problem}"),
            RequestError::HttpConnect(problem) => write!(f, "http connect: {problem}"),
        }
    }
}

impl std::error::Error for RequestError {}

/// What of the target or the credentials no request can carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Not a plain DNS host name: it could smuggle bytes into the request.
    NotAHostName(String),
    /// A SOCKS5 username or password (the field named) outside 1 to 255 bytes.
    FieldLength(&'static str),
    /// Basic auth joins username and password with ':'.
    ColonInUsername,
    ControlCharacters,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotAHostName(name) => write!(
                f,
                "{name:?} is not a host name (1 to {MAX_HOST_NAME} letters, digits, '.', '-', '_')"
            ),
            Problem::FieldLength(field) => write!(f, "the {field} must be 1 to 255 bytes"),
            Problem::ColonInUsername => f.write_str("a Basic auth username cannot contain ':'"),
            Problem::ControlCharacters => {
                f.write_str("username and password cannot hold control characters")
            }
        }
    }
}

/// The longest DNS name, without its trailing dot.
const MAX_HOST_NAME: usize = 253;

/// `host:port`, with brackets around an IPv6 address.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Name(name, port) => write!(f, "{name}:{port}"),
            Target::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

/// What the loop does next for a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Write `bytes_to_send()` to the upstream.
    Send,
    /// Read more from the upstream.
    NeedMore,
    /// The tunnel is open; `leftover` came after the handshake and is the
    /// first data from the far end: send it on to the client.
    Open { leftover: Vec<u8> },
    /// The handshake failed: close, and record the reason.
    Failed(String),
}

/// A handshake with an upstream proxy. A new one has bytes to send: write them
/// once the connection is up.
pub trait Handshake {
    /// What to write to the upstream now; empty when nothing is due.
    fn bytes_to_send(&self) -> &[u8];
    /// The loop wrote the first `n` bytes of `bytes_to_send()`.
    fn sent(&mut self, n: usize);
    /// Bytes read from the upstream.
    fn received(&mut self, bytes: &[u8]) -> Progress;
    /// The upstream closed the connection before the tunnel opened: why it
    /// failed, naming the step it was in.
    fn closed(&self) -> String;
}

/// Bytes queued for the upstream, written perhaps in several pieces.
#[derive(Debug, Default)]
struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
}

impl Outgoing {
    fn new(bytes: Vec<u8>) -> Outgoing {
        Outgoing { bytes, sent: 0 }
    }

    fn pending(&self) -> &[u8] {
        self.bytes.get(self.sent..).unwrap_or_default()
    }

    fn advance(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.bytes.len());
    }

    /// The progress to report once the upstream's latest reply is handled.
    fn progress(&self) -> Progress {
        if self.pending().is_empty() {
            Progress::NeedMore
        } else {
            Progress::Send
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_print_as_host_port() {
        assert_eq!(
            Target::Name("example.com".into(), 443).to_string(),
            "example.com:443"
        );
        let v6 = Target::Addr("[2001:db8::1]:8443".parse().unwrap());
        assert_eq!(v6.to_string(), "[2001:db8::1]:8443");
    }

    #[test]
    fn names_that_could_smuggle_bytes_are_refused() {
        for bad in ["", "a b", "evil.com\r\nX: y", "a/b", &"a".repeat(254)] {
            assert_eq!(
                Target::Name(bad.into(), 80).check(),
                Err(Problem::NotAHostName(bad.into())),
                "{bad:?}"
            );
        }
        assert!(Target::Name("xn--bcher-kva.example_1".into(), 80)
            .check()
            .is_ok());
    }

    #[test]
    fn outgoing_tracks_partial_writes() {
        let mut out = Outgoing::new(b"hello".to_vec());
        assert_eq!(out.progress(), Progress::Send);
        out.advance(2);
        assert_eq!(out.pending(), b"llo");
        out.advance(10);
        assert_eq!(out.pending(), b"");
        assert_eq!(out.progress(), Progress::NeedMore);
    }
}
