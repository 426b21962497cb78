//! The requests that follow the first on a plain-HTTP connection. The proxy
//! decided the connection, and dialled its upstream, for the first request's
//! host; a keep-alive client may send more requests on it, and each must be for
//! that same host, or a second request could reach another virtual host on the
//! same server. So the client's stream is followed request by request: each head
//! is read (bounded) and its host compared, each body skipped by its framing.
//! Whatever could be read two ways (a malformed head, ambiguous framing) ends
//! the connection, and so does a request for another host, allowed or not.
//! After CONNECT or an `Upgrade` the stream is no longer HTTP and is not read.

use super::http::{request_head, Body};
use crate::names::normalize_host;

/// A complete line (CRLF removed) and the bytes after it.
type LineAndRest<'a> = (Vec<u8>, &'a [u8]);

/// Longest chunk-size line (with extensions) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 1024;

#[derive(Debug)]
enum State {
    /// Reading a request head, `held` bytes of it so far.
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping a chunk's data, then its CRLF.
    ChunkData(u64),
    ChunkEnd,
    /// Reading trailer lines up to the empty one.
    Trailers,
    /// Past CONNECT or an Upgrade.
    Opaque,
}

/// Why a later request on the connection must not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Which request on the connection (the first is 1).
    request: u64,
    why: Why,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Why {
    /// Its head or framing could be read two ways, or is over a bound.
    Unreadable(&'static str),
    OtherHost {
        host: String,
        decided: String,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.request;
        match &self.why {
            Why::Unreadable(why) => write!(f, "request {n} on this connection: {why}"),
            Why::OtherHost { host, decided } => write!(
                f,
                "request {n} on this connection is for {host}, not {decided}: one connection, one host"
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// Follows a client's requests; see the module comment.
#[derive(Debug)]
pub struct RequestStream {
    host: String,
    state: State,
    /// The incomplete head, chunk-size line or trailers read so far.
    held: Vec<u8>,
    max_head: usize,
    requests: u64,
}

impl RequestStream {
    /// For a connection decided for `host` (normalised); heads up to `max_head` bytes.
    pub fn new(host: &str, max_head: usize) -> RequestStream {
        RequestStream {
            host: host.to_string(),
            state: State::Head,
            held: Vec::new(),
            max_head,
            requests: 0,
        }
    }

    /// Takes the next bytes the client sent; an error says why the connection
    /// must end before they are passed on.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Refusal> {
        while !bytes.is_empty() {
            bytes = match self.state {
                State::Opaque => return Ok(()),
                State::Body(left) => self.skip(left, bytes, State::Body, State::Head),
                State::ChunkData(left) => self.skip(left, bytes, State::ChunkData, State::ChunkEnd),
                State::Head => self.head(bytes)?,
                State::ChunkSize => self.chunk_size(bytes)?,
                State::ChunkEnd => self.chunk_end(bytes)?,
                State::Trailers => self.trailers(bytes)?,
            };
        }
        Ok(())
    }

    /// Passes over up to `left` bytes of `bytes`, in state `more` while some
    /// are still to come, then `done`; what follows them.
    fn skip<'a>(
        &mut self,
        left: u64,
        bytes: &'a [u8],
        more: fn(u64) -> State,
        done: State,
    ) -> &'a [u8] {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
        let left = left - n as u64;
        self.state = if left == 0 { done } else { more(left) };
        &bytes[n..]
    }

    /// Reads the head out of `held` and `bytes`; the rest of `bytes` after it.
    fn head<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], Refusal> {
        let before = self.held.len();
        let take = bytes
            .len()
            .min(self.max_head + 1 - before.min(self.max_head + 1));
        self.held.extend_from_slice(&bytes[..take]);
        let head = request_head(&self.held).map_err(|e| self.refusal(e))?;
        let Some(head) = head else {
            if self.held.len() > self.max_head {
                return Err(self.refusal("a request head longer than the sniff bound"));
            }
            return Ok(&bytes[take..]);
        };
        self.requests += 1;
        let host = normalize_host(&head.host).unwrap_or(head.host.clone());
        if host != self.host {
            return Err(Refusal {
                request: self.requests,
                why: Why::OtherHost {
                    host,
                    decided: self.host.clone(),
                },
            });
        }
        let body = head.body.map_err(|e| self.refusal(e))?;
        self.state = if head.opaque {
            State::Opaque
        } else {
            match body {
                Body::None | Body::Length(0) => State::Head,
                Body::Length(n) => State::Body(n),
                Body::Chunked => State::ChunkSize,
            }
        };
        let used = head.len - before;
        self.held.clear();
        Ok(&bytes[used..])
    }

    fn chunk_size<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], Refusal> {
        let Some((line, rest)) = self.line(bytes)? else {
            return Ok(&[]);
        };
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size.trim_ascii())
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| self.refusal("a malformed chunk size"))?;
        self.state = if size == 0 {
            State::Trailers
        } else {
            State::ChunkData(size)
        };
        Ok(rest)
    }

    fn chunk_end<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], Refusal> {
        let Some((line, rest)) = self.line(bytes)? else {
            return Ok(&[]);
        };
        if !line.is_empty() {
            return Err(self.refusal("chunk data longer than its size"));
        }
        self.state = State::ChunkSize;
        Ok(rest)
    }

    fn trailers<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], Refusal> {
        let Some((line, rest)) = self.line(bytes)? else {
            return Ok(&[]);
        };
        if line.is_empty() {
            self.state = State::Head;
        }
        Ok(rest)
    }

    /// A CRLF-terminated line out of `held` and `bytes` (None while incomplete,
    /// everything taken), and what follows it.
    fn line<'a>(&mut self, bytes: &'a [u8]) -> Result<Option<LineAndRest<'a>>, Refusal> {
        let end = bytes.iter().position(|&b| b == b'\n');
        let take = end.map_or(bytes.len(), |i| i + 1);
        self.held.extend_from_slice(&bytes[..take]);
        if self.held.len() > MAX_CHUNK_LINE {
            return Err(self.refusal("a chunk line longer than 1 KiB"));
        }
        if end.is_none() {
            return Ok(None);
        }
        let line = std::mem::take(&mut self.held);
        match line.strip_suffix(b"\r\n") {
            Some(line) => Ok(Some((line.to_vec(), &bytes[take..]))),
            None => Err(self.refusal("a bare LF in chunked framing")),
        }
    }

    /// The request being read cannot be read one way only.
    fn refusal(&self, why: &'static str) -> Refusal {
        Refusal {
            request: self.requests + 1,
            why: Why::Unreadable(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> RequestStream {
        RequestStream::new("allowed.test", 16 * 1024)
    }

    /// Feeds `input` whole, then byte by byte: the answers must agree.
    fn feed(input: &str) -> Result<(), Refusal> {
        let whole = stream().feed(input.as_bytes());
        let mut split = stream();
        let mut bytewise = Ok(());
        for byte in input.as_bytes() {
            bytewise = split.feed(std::slice::from_ref(byte));
            if bytewise.is_err() {
                break;
            }
        }
        assert_eq!(
            whole.is_ok(),
            bytewise.is_ok(),
            "{input:?}: {whole:?} vs {bytewise:?}"
        );
        whole
    }

    #[test]
    fn requests_for_the_same_host_pass_with_their_bodies() {
        feed(concat!(
            "GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: ALLOWED.test.\r\nContent-Length: 31\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: evil.test",
            "POST /b HTTP/1.1\r\nHost: allowed.test:80\r\nTransfer-Encoding: chunked\r\n\r\n",
            "1f;x=y\r\nGET / HTTP/1.1\r\nHost: evil.test\r\n0\r\nT: 1\r\n\r\n",
            "GET http://allowed.test/x HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        ))
        .unwrap();
    }

    #[test]
    fn a_request_for_another_host_ends_the_connection() {
        let err = feed(concat!(
            "GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("request 2") && err.contains("blocked.test"),
            "{err}"
        );
        let err = feed("GET http://blocked.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("blocked.test"), "{err}");
    }

    #[test]
    fn ambiguous_framing_ends_the_connection() {
        for (input, why) in [
            (
                "POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both Content-Length and Transfer-Encoding",
            ),
            (
                "POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                "repeated Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: +3\r\n\r\n",
                "invalid or repeated Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "other than chunked",
            ),
            (
                "POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "malformed chunk size",
            ),
            (
                "POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
                "longer than its size",
            ),
            ("GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\nxyz / HTTP/1.1\r\n", "not TLS or HTTP"),
        ] {
            let err = feed(input).unwrap_err().to_string();
            assert!(err.contains(why), "{input:?}: {err}");
        }
    }

    #[test]
    fn after_an_upgrade_the_stream_is_not_read() {
        feed(concat!(
            "GET /ws HTTP/1.1\r\nHost: allowed.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "\u{1}\u{2} anything at all",
        ))
        .unwrap();
    }

    #[test]
    fn an_endless_head_is_refused_at_the_bound() {
        let mut s = RequestStream::new("allowed.test", 64);
        let err = s
            .feed(
                format!(
                    "GET / HTTP/1.1\r\nHost: allowed.test\r\nX: {}",
                    "a".repeat(100)
                )
                .as_bytes(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("longer than the sniff bound"), "{err}");
    }
}
