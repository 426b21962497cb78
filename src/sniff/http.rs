//! HTTP/1.x: reads the host a request is for from its request line and header block.
//!
//! Strict where servers disagree (RFC 9112 asks servers to refuse these): a bare CR or
//! LF, whitespace before a field's colon, folded lines and a second `Host` header make
//! the request unnamed rather than guessed at.

use super::{host_name, unnamed, Sniff, Sniffed, NOT_TLS_OR_HTTP};

/// Longest method accepted: the longest registered one, UPDATEREDIRECTREF, has 17 bytes.
const MAX_METHOD_LEN: usize = 20;
const MALFORMED_REQUEST: &str = "malformed HTTP request";
const MALFORMED_HOST: &str = "malformed HTTP host";

/// Whether `first` can start a request: methods are upper-case by convention, and no
/// real client sends another; this keeps the first byte of other protocols out.
pub(super) fn may_start_request(first: u8) -> bool {
    first.is_ascii_uppercase()
}

/// Sniffs `buf`, which starts with an upper-case letter.
pub(super) fn sniff(buf: &[u8]) -> Sniff {
    match request_host(buf) {
        Ok(Some(host)) => Sniff::Done(Sniffed::Http { host }),
        Ok(None) => Sniff::NeedMore,
        Err(reason) => unnamed(reason),
    }
}

/// The host once the whole header block has arrived. Complete lines are checked as
/// they come, so a stream that stops looking like HTTP is refused without waiting.
fn request_host(buf: &[u8]) -> Result<Option<String>, &'static str> {
    Ok(request_head(buf)?.map(|head| head.host))
}

/// A request's head: whom it is for, how long it is, and how its body is framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    pub host: String,
    /// Bytes of the request line and header block, the empty line included.
    pub len: usize,
    /// How the body that follows is delimited, or why that is ambiguous.
    pub body: Result<Body, &'static str>,
    /// CONNECT or an `Upgrade`: what follows may not be HTTP.
    pub opaque: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Body {
    None,
    Length(u64),
    Chunked,
}

/// The head once the whole header block has arrived (see [`request_host`]).
pub(super) fn request_head(buf: &[u8]) -> Result<Option<Head>, &'static str> {
    let Some(method_len) = method_len(buf)? else {
        return Ok(None);
    };
    let Some((request_line, mut rest)) = next_line(buf)? else {
        return Ok(None);
    };
    let (method, target) = method_and_target(request_line, method_len)?;
    let mut host_header = None;
    let mut framing = Framing::default();
    loop {
        let Some((field_line, after)) = next_line(rest)? else {
            return Ok(None);
        };
        rest = after;
        if field_line.is_empty() {
            break;
        }
        if let Some(value) = field_value(field_line, b"host")? {
            if host_header.replace(value).is_some() {
                return Err("duplicate Host header");
            }
        }
        framing.read(field_line)?;
    }
    // The target's authority wins over Host (RFC 9112 §3.2.2); CONNECT's target is one.
    let authority = if method == b"CONNECT" {
        Some(target)
    } else {
        absolute_form_authority(target)?
    };
    let host = match authority.or(host_header) {
        Some(authority) => host_of_authority(authority)?,
        None => return Err("no Host header"),
    };
    Ok(Some(Head {
        host,
        len: buf.len() - rest.len(),
        body: framing.body(),
        opaque: method == b"CONNECT" || framing.upgrade,
    }))
}

/// The framing fields of a header block, as read so far.
#[derive(Default)]
struct Framing {
    lengths: Vec<Option<u64>>,
    encodings: Vec<Vec<u8>>,
    upgrade: bool,
}

impl Framing {
    fn read(&mut self, line: &[u8]) -> Result<(), &'static str> {
        if let Some(value) = field_value(line, b"content-length")? {
            let digits = value.iter().all(u8::is_ascii_digit) && !value.is_empty();
            let length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            self.lengths.push(length.filter(|_| digits));
        } else if let Some(value) = field_value(line, b"transfer-encoding")? {
            self.encodings.push(value.to_ascii_lowercase());
        } else if field_value(line, b"upgrade")?.is_some() {
            self.upgrade = true;
        }
        Ok(())
    }

    /// RFC 9112 §6.3, strictly: where a server and we could read the body's end
    /// differently (request smuggling), there is no answer.
    fn body(&self) -> Result<Body, &'static str> {
        match (self.lengths.as_slice(), self.encodings.as_slice()) {
            ([], []) => Ok(Body::None),
            ([Some(length)], []) => Ok(Body::Length(*length)),
            ([], [encoding]) if encoding == b"chunked" => Ok(Body::Chunked),
            ([], _) => Err("a transfer coding other than chunked alone"),
            (_, []) => Err("an invalid or repeated Content-Length"),
            _ => Err("both Content-Length and Transfer-Encoding"),
        }
    }
}

/// The method's length once the space after it has arrived; an error as soon as a
/// byte cannot belong to a method, or the method grows too long.
fn method_len(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    for (i, &byte) in buf.iter().enumerate().take(MAX_METHOD_LEN + 1) {
        match byte {
            b' ' if i > 0 => return Ok(Some(i)),
            b'A'..=b'Z' | b'-' | b'_' => {}
            _ => return Err(NOT_TLS_OR_HTTP),
        }
    }
    if buf.len() > MAX_METHOD_LEN {
        Err(NOT_TLS_OR_HTTP)
    } else {
        Ok(None)
    }
}

/// A line without its CRLF, and the bytes after it.
type LineAndRest<'a> = (&'a [u8], &'a [u8]);

/// Splits off the first CRLF-terminated line, or None while it is incomplete. Control
/// bytes other than HTAB, a bare CR and a bare LF are errors.
fn next_line(buf: &[u8]) -> Result<Option<LineAndRest<'_>>, &'static str> {
    for (i, &byte) in buf.iter().enumerate() {
        match byte {
            b'\r' => {
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((&buf[..i], &buf[i + 2..]))),
                    Some(_) => Err(MALFORMED_REQUEST),
                }
            }
            b'\t' => {}
            _ if byte.is_ascii_control() => return Err(MALFORMED_REQUEST),
            _ => {}
        }
    }
    Ok(None)
}

/// The method and request-target of `METHOD SP target SP HTTP/1.x`.
fn method_and_target(line: &[u8], method_len: usize) -> Result<(&[u8], &[u8]), &'static str> {
    let (method, after_method) = line.split_at_checked(method_len).ok_or(MALFORMED_REQUEST)?;
    let after_method = after_method.strip_prefix(b" ").ok_or(MALFORMED_REQUEST)?;
    let space = after_method
        .iter()
        .position(|&b| b == b' ')
        .ok_or(MALFORMED_REQUEST)?;
    let (target, version) = (&after_method[..space], &after_method[space + 1..]);
    if target.is_empty() || target.contains(&b'\t') {
        return Err(MALFORMED_REQUEST);
    }
    match version {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor] if minor.is_ascii_digit() => {
            Ok((method, target))
        }
        _ => Err("not HTTP/1.x"),
    }
}

/// The value of a field line, OWS trimmed, if its name is `name` (case-insensitive).
fn field_value<'a>(line: &'a [u8], name: &[u8]) -> Result<Option<&'a [u8]>, &'static str> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(MALFORMED_REQUEST)?;
    let field_name = &line[..colon];
    // Catches whitespace before the colon and folded lines (leading whitespace) too.
    if field_name.is_empty() || !field_name.iter().all(|&b| is_token_byte(b)) {
        return Err(MALFORMED_REQUEST);
    }
    Ok(field_name
        .eq_ignore_ascii_case(name)
        .then(|| line[colon + 1..].trim_ascii()))
}

fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// The authority of an absolute-form target (`http://host:port/path`); None for the
/// origin form (`/path`) and the asterisk form (`*`), which leave the host to `Host`.
fn absolute_form_authority(target: &[u8]) -> Result<Option<&[u8]>, &'static str> {
    if target.starts_with(b"/") || target == b"*" {
        return Ok(None);
    }
    let scheme_end = target
        .windows(3)
        .position(|w| w == b"://")
        .ok_or(MALFORMED_REQUEST)?;
    let scheme = &target[..scheme_end];
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme_ok {
        return Err(MALFORMED_REQUEST);
    }
    let after_scheme = &target[scheme_end + 3..];
    let end = after_scheme
        .iter()
        .position(|b| b"/?#".contains(b))
        .unwrap_or(after_scheme.len());
    Ok(Some(&after_scheme[..end]))
}

/// The host of `host[:port]` or `[IPv6]:port`, without port or brackets.
fn host_of_authority(authority: &[u8]) -> Result<String, &'static str> {
    let (host, port) = match authority.strip_prefix(b"[") {
        Some(bracketed) => {
            let close = bracketed
                .iter()
                .position(|&b| b == b']')
                .ok_or(MALFORMED_HOST)?;
            let literal = &bracketed[..close];
            let is_ipv6_literal = literal.contains(&b':')
                && literal
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
            let port = match &bracketed[close + 1..] {
                [] => &[][..],
                [b':', port @ ..] => port,
                _ => return Err(MALFORMED_HOST),
            };
            if !is_ipv6_literal {
                return Err(MALFORMED_HOST);
            }
            (literal, port)
        }
        None => match authority.iter().position(|&b| b == b':') {
            Some(colon) => (&authority[..colon], &authority[colon + 1..]),
            None => (authority, &[][..]),
        },
    };
    if !port.iter().all(u8::is_ascii_digit) {
        return Err(MALFORMED_HOST);
    }
    host_name(host)
}

#[cfg(test)]
mod tests {
    use crate::sniff::{sniff, Sniff, Sniffed, DEFAULT_MAX_BYTES};

    fn sniffed(request: &str) -> Sniff {
        sniff(request.as_bytes(), DEFAULT_MAX_BYTES)
    }

    fn host(host: &str) -> Sniff {
        Sniff::Done(Sniffed::Http {
            host: host.to_string(),
        })
    }

    fn unnamed(reason: &'static str) -> Sniff {
        Sniff::Done(Sniffed::Unnamed { reason })
    }

    #[test]
    fn host_header_is_read_with_port_stripped() {
        let cases = [
            ("GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example"),
            ("GET / HTTP/1.1\r\nhOsT:b.example:8080\r\n\r\n", "b.example"),
            (
                "GET / HTTP/1.1\r\nX: 1\r\nHOST: \t C.Example. \t\r\n\r\n",
                "C.Example.",
            ),
            ("GET / HTTP/1.0\r\nHost: d.example:\r\n\r\n", "d.example"),
            ("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", "::1"),
            (
                "GET / HTTP/1.1\r\nHost: [2001:db8::1]\r\n\r\n",
                "2001:db8::1",
            ),
            ("GET / HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n", "192.0.2.1"),
            ("OPTIONS * HTTP/1.1\r\nHost: e.example\r\n\r\n", "e.example"),
            (
                "PROPFIND /d HTTP/1.1\r\nHost: f.example\r\n\r\n",
                "f.example",
            ),
        ];
        for (request, want) in cases {
            assert_eq!(sniffed(request), host(want), "{request:?}");
        }
    }

    #[test]
    fn absolute_form_wins_over_host() {
        assert_eq!(
            sniffed("GET http://h.example:8080/x HTTP/1.1\r\nHost: other.example\r\n\r\n"),
            host("h.example")
        );
        assert_eq!(
            sniffed("GET HTTPS://[2001:db8::2]?q HTTP/1.1\r\n\r\n"),
            host("2001:db8::2")
        );
        assert_eq!(
            sniffed("GET http://i.example#f HTTP/1.0\r\n\r\n"),
            host("i.example")
        );
    }

    #[test]
    fn connect_authority_is_the_host() {
        assert_eq!(
            sniffed("CONNECT j.example:443 HTTP/1.1\r\nHost: other.example:443\r\n\r\n"),
            host("j.example")
        );
        assert_eq!(sniffed("CONNECT [::1]:443 HTTP/1.1\r\n\r\n"), host("::1"));
    }

    #[test]
    fn requests_without_a_usable_host_are_unnamed() {
        let cases = [
            ("GET / HTTP/1.1\r\n\r\n", "no Host header"),
            ("GET / HTTP/1.1\r\nHost: \r\n\r\n", "empty name"),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                "duplicate Host header",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
                "invalid characters in name",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a.example, b\r\n\r\n",
                "invalid characters in name",
            ),
            (
                "GET / HTTP/1.1\r\nHost: u@a.example\r\n\r\n",
                "invalid characters in name",
            ),
            (
                "GET http://u:p@a.example/ HTTP/1.1\r\n\r\n",
                "malformed HTTP host",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a:b:80\r\n\r\n",
                "malformed HTTP host",
            ),
            (
                "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
                "malformed HTTP host",
            ),
            (
                "GET / HTTP/1.1\r\nHost: [a.example]\r\n\r\n",
                "malformed HTTP host",
            ),
            (
                "GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n",
                "malformed HTTP host",
            ),
            ("CONNECT /x HTTP/1.1\r\n\r\n", "invalid characters in name"),
        ];
        for (request, reason) in cases {
            assert_eq!(sniffed(request), unnamed(reason), "{request:?}");
        }
    }

    #[test]
    fn ambiguous_framing_is_unnamed() {
        let cases = [
            ("GET / HTTP/1.1\nHost: a\r\n\r\n", "malformed HTTP request"),
            ("GET / HTTP/1.1\r\nHost: a\n\r\n", "malformed HTTP request"),
            (
                "GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
                "malformed HTTP request",
            ),
            (
                "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
                "malformed HTTP request",
            ),
            (
                "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
                "malformed HTTP request",
            ),
            (
                "GET / HTTP/1.1\r\nno colon\r\n\r\n",
                "malformed HTTP request",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\0\r\n\r\n",
                "malformed HTTP request",
            ),
            ("GET  / HTTP/1.1\r\n\r\n", "malformed HTTP request"),
            ("GET /\tx HTTP/1.1\r\n\r\n", "malformed HTTP request"),
            ("GET /\r\n\r\n", "malformed HTTP request"),
            ("GET ftp:/x HTTP/1.1\r\n\r\n", "malformed HTTP request"),
            ("GET 1a://x/ HTTP/1.1\r\n\r\n", "malformed HTTP request"),
            ("GET / HTTP/2.0\r\n\r\n", "not HTTP/1.x"),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "not HTTP/1.x"),
            ("GET / HTTP/1.1 \r\n\r\n", "not HTTP/1.x"),
        ];
        for (request, reason) in cases {
            assert_eq!(sniffed(request), unnamed(reason), "{request:?}");
        }
    }

    #[test]
    fn non_method_bytes_are_refused_without_waiting() {
        for start in [
            "SSH-2.0-OpenSSH_9.2",
            "G\x00",
            "Get / HTTP/1.1",
            "ABCDEFGHIJKLMNOPQRSTU",
        ] {
            assert_eq!(sniffed(start), unnamed("not TLS or HTTP"), "{start:?}");
        }
    }

    #[test]
    fn bad_bytes_in_an_incomplete_request_are_refused_without_waiting() {
        assert_eq!(sniffed("GET /\x01"), unnamed("malformed HTTP request"));
        assert_eq!(
            sniffed("GET / HTTP/1.1\r\nHost: a\r\nX\x02"),
            unnamed("malformed HTTP request")
        );
    }

    #[test]
    fn every_strict_prefix_of_a_request_needs_more() {
        let request =
            "CONNECT k.example:443 HTTP/1.1\r\nHost: k.example:443\r\nUser-Agent: t\r\n\r\n";
        for end in 0..request.len() {
            assert_eq!(sniffed(&request[..end]), Sniff::NeedMore, "cut at {end}");
        }
        assert_eq!(sniffed(request), host("k.example"));
    }

    #[test]
    fn huge_host_header_is_unnamed_not_a_panic() {
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {}.example\r\n\r\n",
            "a".repeat(10_000)
        );
        assert_eq!(sniffed(&request), unnamed("name too long"));
        // Past the bound the headers never end: the caller hears "too large".
        assert_eq!(sniff(request.as_bytes(), 4096), unnamed("too large"));
    }
}
