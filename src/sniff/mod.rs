//! Learns the name a client means to reach from the first bytes of its TCP stream: the
//! `server_name` of a TLS ClientHello, or the host of an HTTP/1.x request.
//!
//! The proxy keeps everything the client has sent so far and calls [`sniff`] again each
//! time more arrives; `sniff` is stateless and re-reads the buffer from the start. It
//! looks at no more than `max_bytes` of it, and returns [`Sniff::NeedMore`] only while a
//! name can still come within that bound: anything else is decided at once, so a client
//! that speaks neither protocol is never held waiting for bytes it will not send.
//!
//! Names are returned raw, as the client wrote them (normalising case, trailing dot and
//! IDN is the policy's job), but only when they could be a host name at all: a name
//! that is empty, longer than [`MAX_NAME_LEN`] bytes (a 10 KB `Host` header, say), not
//! UTF-8, or holds whitespace, control characters or URI delimiters gives
//! [`Sniffed::Unnamed`], so the connection gets IP rules only. Where the client's bytes
//! are ambiguous (two `server_name` extensions, two `Host` headers, a bare LF, trailing
//! bytes after the ClientHello's extensions) the answer is `Unnamed` too, since the
//! server might read them differently from us.

mod http;
mod requests;
mod tls;

pub use requests::{Refusal, RequestStream};

/// The sniff bound the proxy uses unless configured otherwise.
pub const DEFAULT_MAX_BYTES: usize = 16 * 1024;

/// Longest name accepted: a DNS name has at most 253 characters, 254 with its trailing
/// dot; anything longer cannot be resolved and is not worth carrying around.
pub const MAX_NAME_LEN: usize = 255;

const NOT_TLS_OR_HTTP: &str = "not TLS or HTTP";

/// The answer for the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// Undecided: call again when more bytes have arrived.
    NeedMore,
    Done(Sniffed),
}

/// What the first bytes said about the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS ClientHello. `sni` is the `host_name` from `server_name`, raw as sent; `ech`
    /// says the hello carried `encrypted_client_hello` (0xfe0d), real or GREASE: the SNI
    /// is then only the outer, public name.
    Tls { sni: Option<String>, ech: bool },
    /// An HTTP/1.x request: the authority of an absolute-form or CONNECT target, else the
    /// `Host` header; port and IPv6 brackets stripped, otherwise raw.
    Http { host: String },
    /// No usable name: not TLS or HTTP, malformed, ambiguous or too large.
    Unnamed { reason: &'static str },
}

/// Reads the destination name from `buf`, everything the client has sent so far.
pub fn sniff(buf: &[u8], max_bytes: usize) -> Sniff {
    let window = &buf[..buf.len().min(max_bytes)];
    let answer = match window.first() {
        None => Sniff::NeedMore,
        Some(&tls::CONTENT_TYPE_HANDSHAKE) => tls::sniff(window, max_bytes),
        Some(&first) if http::may_start_request(first) => http::sniff(window),
        Some(_) => unnamed(NOT_TLS_OR_HTTP),
    };
    match answer {
        Sniff::NeedMore if window.len() >= max_bytes => unnamed("too large"),
        decided => decided,
    }
}

fn unnamed(reason: &'static str) -> Sniff {
    Sniff::Done(Sniffed::Unnamed { reason })
}

/// Checks that `raw` could be a host name (see the module doc) and returns it unchanged.
fn host_name(raw: &[u8]) -> Result<String, &'static str> {
    if raw.is_empty() {
        return Err("empty name");
    }
    if raw.len() > MAX_NAME_LEN {
        return Err("name too long");
    }
    // Delimiters that would let a URI or log reader split the name differently.
    let forbidden = |b: &u8| b.is_ascii_control() || b" /\\?#@[],%".contains(b);
    if raw.iter().any(forbidden) {
        return Err("invalid characters in name");
    }
    String::from_utf8(raw.to_vec()).map_err(|_| "name not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/clienthello/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    fn tls(sni: &str, ech: bool) -> Sniff {
        Sniff::Done(Sniffed::Tls {
            sni: Some(sni.to_string()),
            ech,
        })
    }

    fn http(host: &str) -> Sniff {
        Sniff::Done(Sniffed::Http {
            host: host.to_string(),
        })
    }

    #[test]
    fn real_client_hellos_give_their_sni() {
        let cases = [
            ("curl.bin", tls("curl.example.test", false)),
            ("openssl.bin", tls("openssl.example.test", false)),
            ("chromium.bin", tls("chromium.example.test", true)),
            ("curl-two-records.bin", tls("curl.example.test", false)),
        ];
        for (name, want) in cases {
            assert_eq!(sniff(&fixture(name), DEFAULT_MAX_BYTES), want, "{name}");
        }
    }

    #[test]
    fn real_http_requests_give_their_host() {
        let cases = [
            ("http-curl.bin", http("plain.example.test")),
            ("http-curl-absolute-form.bin", http("absolute.example.test")),
            ("http-curl-connect.bin", http("tunnel.example.test")),
        ];
        for (name, want) in cases {
            assert_eq!(sniff(&fixture(name), DEFAULT_MAX_BYTES), want, "{name}");
        }
    }

    #[test]
    fn chromium_hello_is_larger_than_one_segment() {
        assert!(fixture("chromium.bin").len() > 1500);
    }

    #[test]
    fn chromium_hello_in_two_segments_needs_more_then_is_done() {
        let hello = fixture("chromium.bin");
        // 1448 bytes: the payload of one full-sized TCP segment on a 1500-byte MTU.
        assert_eq!(sniff(&hello[..1448], DEFAULT_MAX_BYTES), Sniff::NeedMore);
        assert_eq!(
            sniff(&hello, DEFAULT_MAX_BYTES),
            tls("chromium.example.test", true)
        );
    }

    #[test]
    fn every_strict_prefix_of_a_real_hello_needs_more() {
        for name in ["curl.bin", "chromium.bin", "curl-two-records.bin"] {
            let hello = fixture(name);
            for end in 0..hello.len() {
                assert_eq!(
                    sniff(&hello[..end], DEFAULT_MAX_BYTES),
                    Sniff::NeedMore,
                    "{name} cut at {end}"
                );
            }
        }
    }

    #[test]
    fn bytes_after_the_hello_do_not_change_the_answer() {
        let mut hello = fixture("curl.bin");
        hello.extend_from_slice(b"\x14\x03\x03\x00\x01\x01 and whatever follows");
        assert_eq!(
            sniff(&hello, DEFAULT_MAX_BYTES),
            tls("curl.example.test", false)
        );
    }

    #[test]
    fn undecided_at_the_bound_is_too_large() {
        let too_large = Sniff::Done(Sniffed::Unnamed {
            reason: "too large",
        });
        let request = b"GET / HTTP/1.1\r\nHost: a.example\r\nX: y";
        assert_eq!(sniff(request, request.len() + 1), Sniff::NeedMore);
        assert_eq!(sniff(request, request.len()), too_large);
        // A hello's length is known from its first 9 bytes: one that cannot fit is
        // refused then, not after the bound's worth of bytes.
        let hello = fixture("chromium.bin");
        assert_eq!(sniff(&hello[..8], 1000), Sniff::NeedMore);
        assert_eq!(sniff(&hello[..9], 1000), too_large);
    }

    #[test]
    fn a_hello_complete_within_the_bound_is_read() {
        let hello = fixture("curl.bin");
        assert_eq!(sniff(&hello, hello.len()), tls("curl.example.test", false));
    }

    #[test]
    fn empty_buffer_needs_more() {
        assert_eq!(sniff(b"", DEFAULT_MAX_BYTES), Sniff::NeedMore);
    }

    #[test]
    fn other_protocols_are_unnamed_from_the_first_byte() {
        for first in [&b"\x00"[..], b"\x05", b"\x80", b"g", b"{", b"\r"] {
            assert_eq!(
                sniff(first, DEFAULT_MAX_BYTES),
                Sniff::Done(Sniffed::Unnamed {
                    reason: "not TLS or HTTP"
                }),
                "{first:?}"
            );
        }
    }

    #[test]
    fn host_names_are_checked_but_kept_raw() {
        assert_eq!(host_name(b"GitHub.COM."), Ok("GitHub.COM.".to_string()));
        assert_eq!(
            host_name("bücher.de".as_bytes()),
            Ok("bücher.de".to_string())
        );
        assert_eq!(host_name(b"::1"), Ok("::1".to_string()));
        assert_eq!(host_name(b""), Err("empty name"));
        assert_eq!(host_name(&[b'a'; 256]), Err("name too long"));
        assert!(host_name(&[b'a'; 255]).is_ok());
        for bad in [
            &b"a b"[..],
            b"a\0b",
            b"a/b",
            b"u@h",
            b"a,b",
            b"a%2eb",
            b"\x7f",
        ] {
            assert_eq!(host_name(bad), Err("invalid characters in name"), "{bad:?}");
        }
        assert_eq!(host_name(b"\xff\xfe"), Err("name not UTF-8"));
    }
}
