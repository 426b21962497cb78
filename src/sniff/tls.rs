//! TLS: reassembles the ClientHello from the client's first handshake records and reads
//! its `server_name` and whether it offered Encrypted Client Hello.
//!
//! A ClientHello may span several records (and TCP segments): tls-parser's record-level
//! parser fails on a split hello instead of asking for more, so the handshake bytes are
//! gathered here and only the complete message is handed to tls-parser.

use std::borrow::Cow;

use tls_parser::nom::multi::length_data;
use tls_parser::nom::number::complete::be_u16;
use tls_parser::nom::IResult;
use tls_parser::{parse_tls_extension_sni_hostname, parse_tls_handshake_client_hello, SNIType};

use super::{host_name, unnamed, Sniff, Sniffed};

pub(super) const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const RECORD_HEADER_LEN: usize = 5;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD_LEN: usize = 1 << 14;
const HANDSHAKE_HEADER_LEN: usize = 4;
const HANDSHAKE_TYPE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

/// Sniffs `buf`, which starts with a handshake record's content type.
pub(super) fn sniff(buf: &[u8], max_bytes: usize) -> Sniff {
    match client_hello(buf, max_bytes) {
        Ok(None) => Sniff::NeedMore,
        Ok(Some(message)) => match read_client_hello(&message) {
            Ok((sni, ech)) => Sniff::Done(Sniffed::Tls { sni, ech }),
            Err(reason) => unnamed(reason),
        },
        Err(reason) => unnamed(reason),
    }
}

/// The ClientHello handshake message (header included) once all of it has arrived;
/// borrowed from `buf` when a single record holds it, as real clients send it.
fn client_hello(buf: &[u8], max_bytes: usize) -> Result<Option<Cow<'_, [u8]>>, &'static str> {
    let mut message: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut rest = buf;
    loop {
        check_record_header(rest)?;
        let Some(header) = rest.get(..RECORD_HEADER_LEN) else {
            return Ok(None);
        };
        let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        // Empty handshake records are forbidden (RFC 8446 §5.1) and would let a client
        // make us walk thousands of headers.
        if record_len == 0 || record_len > MAX_RECORD_LEN {
            return Err("malformed TLS record");
        }
        let body = &rest[RECORD_HEADER_LEN..];
        let fragment = &body[..record_len.min(body.len())];
        if message.is_empty() {
            message = Cow::Borrowed(fragment);
        } else {
            message.to_mut().extend_from_slice(fragment);
        }
        if let Some(message_len) = client_hello_len(&message)? {
            // Even in one record the hello needs its length plus a record header: when
            // that cannot fit, say so now rather than wait for bytes we will not read.
            if message_len + RECORD_HEADER_LEN > max_bytes {
                return Err("too large");
            }
            if message.len() >= message_len {
                return Ok(Some(truncated(message, message_len)));
            }
        }
        if body.len() < record_len {
            return Ok(None);
        }
        rest = &body[record_len..];
    }
}

/// Checks what has arrived of a record header: a handshake record of SSL 3.0 to TLS 1.3.
fn check_record_header(header: &[u8]) -> Result<(), &'static str> {
    let plausible = match *header {
        [] => true,
        [content_type, ..] if content_type != CONTENT_TYPE_HANDSHAKE => false,
        [_, major, ..] if major != 3 => false,
        [_, _, minor, ..] => minor <= 4,
        [_] | [_, _] => true,
    };
    if plausible {
        Ok(())
    } else {
        Err("malformed TLS record")
    }
}

/// The whole length of the handshake message being gathered, once its header is in;
/// an error as soon as its first byte shows it is not a ClientHello.
fn client_hello_len(message: &[u8]) -> Result<Option<usize>, &'static str> {
    match *message {
        [] => Ok(None),
        [msg_type, ..] if msg_type != HANDSHAKE_TYPE_CLIENT_HELLO => Err("not a ClientHello"),
        [_, a, b, c, ..] => Ok(Some(
            HANDSHAKE_HEADER_LEN + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c)),
        )),
        _ => Ok(None),
    }
}

fn truncated(message: Cow<'_, [u8]>, len: usize) -> Cow<'_, [u8]> {
    match message {
        Cow::Borrowed(bytes) => Cow::Borrowed(&bytes[..len]),
        Cow::Owned(mut bytes) => {
            bytes.truncate(len);
            Cow::Owned(bytes)
        }
    }
}

/// Reads a complete ClientHello message: its host name, if any, and whether it
/// offered ECH.
fn read_client_hello(message: &[u8]) -> Result<(Option<String>, bool), &'static str> {
    const MALFORMED: &str = "malformed ClientHello";
    let body = message.get(HANDSHAKE_HEADER_LEN..).ok_or(MALFORMED)?;
    // Not parse_tls_message_handshake: it drops what follows the parsed fields, and an
    // extension block that overruns the message would then vanish without an error.
    let (trailing, hello) = parse_tls_handshake_client_hello(body).map_err(|_| MALFORMED)?;
    if !trailing.is_empty() {
        return Err(MALFORMED);
    }
    let mut extensions = hello.ext.unwrap_or_default();
    let mut sni = None;
    let mut ech = false;
    while !extensions.is_empty() {
        let (rest, (extension_type, data)) = extension(extensions).map_err(|_| MALFORMED)?;
        extensions = rest;
        match extension_type {
            // Two server_name extensions could be read differently by the server.
            EXTENSION_SERVER_NAME if sni.is_some() => return Err("duplicate server_name"),
            EXTENSION_SERVER_NAME => sni = Some(server_name(data)?),
            EXTENSION_ENCRYPTED_CLIENT_HELLO => ech = true,
            _ => {}
        }
    }
    Ok((sni, ech))
}

fn extension(input: &[u8]) -> IResult<&[u8], (u16, &[u8])> {
    let (input, extension_type) = be_u16(input)?;
    let (input, data) = length_data(be_u16)(input)?;
    Ok((input, (extension_type, data)))
}

/// The host name of a `server_name` extension, which must hold exactly one entry of
/// type host_name (RFC 6066 §3, and what OpenSSL accepts).
fn server_name(data: &[u8]) -> Result<String, &'static str> {
    const MALFORMED: &str = "malformed server_name";
    let list = |input| -> IResult<&[u8], &[u8]> { length_data(be_u16)(input) };
    let (rest, entries) = list(data).map_err(|_| MALFORMED)?;
    let (after_first, (name_type, name)) =
        parse_tls_extension_sni_hostname(entries).map_err(|_| MALFORMED)?;
    if !rest.is_empty() || !after_first.is_empty() || name_type != SNIType::HostName {
        return Err(MALFORMED);
    }
    host_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sniff::tests::fixture;
    use crate::sniff::{sniff as sniff_any, DEFAULT_MAX_BYTES};

    fn done_unnamed(reason: &'static str) -> Sniff {
        Sniff::Done(Sniffed::Unnamed { reason })
    }

    fn u16_prefixed(bytes: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    }

    fn sni_extension(entries: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend(u16_prefixed(name));
        }
        (EXTENSION_SERVER_NAME, u16_prefixed(&list))
    }

    /// A ClientHello handshake message (with its 4-byte header) carrying `extensions`.
    fn hello_message(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut block = Vec::new();
        for (extension_type, data) in extensions {
            block.extend(extension_type.to_be_bytes());
            block.extend(u16_prefixed(data));
        }
        let mut body = vec![3, 3];
        body.extend([7; 32]); // random
        body.push(0); // no session id
        body.extend(u16_prefixed(&[0x13, 0x01])); // TLS_AES_128_GCM_SHA256
        body.extend([1, 0]); // null compression
        body.extend(u16_prefixed(&block));
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut message = vec![HANDSHAKE_TYPE_CLIENT_HELLO, len[1], len[2], len[3]];
        message.extend(body);
        message
    }

    /// `message` framed as handshake records of at most `chunk` bytes each.
    fn records(message: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for fragment in message.chunks(chunk) {
            out.extend([CONTENT_TYPE_HANDSHAKE, 3, 1]);
            out.extend(u16_prefixed(fragment));
        }
        out
    }

    fn sniff_message(message: &[u8]) -> Sniff {
        sniff_any(&records(message, MAX_RECORD_LEN), DEFAULT_MAX_BYTES)
    }

    #[test]
    fn hello_split_into_many_records_is_reassembled() {
        let message = hello_message(&[sni_extension(&[(0, b"split.example")])]);
        for chunk in [1, 2, 3, 4, 5, 17, message.len() - 1] {
            assert_eq!(
                sniff_any(&records(&message, chunk), DEFAULT_MAX_BYTES),
                Sniff::Done(Sniffed::Tls {
                    sni: Some("split.example".into()),
                    ech: false
                }),
                "records of {chunk} bytes"
            );
        }
    }

    #[test]
    fn real_hello_reframed_into_tiny_records_reads_the_same() {
        let hello = fixture("chromium.bin");
        let message = &hello[RECORD_HEADER_LEN..];
        assert_eq!(
            sniff_any(&records(message, 100), DEFAULT_MAX_BYTES),
            Sniff::Done(Sniffed::Tls {
                sni: Some("chromium.example.test".into()),
                ech: true
            })
        );
    }

    #[test]
    fn hello_without_server_name_is_tls_without_sni() {
        assert_eq!(
            sniff_message(&hello_message(&[])),
            Sniff::Done(Sniffed::Tls {
                sni: None,
                ech: false
            })
        );
    }

    #[test]
    fn encrypted_client_hello_sets_ech_and_keeps_the_outer_name() {
        let message = hello_message(&[
            sni_extension(&[(0, b"public.example")]),
            (EXTENSION_ENCRYPTED_CLIENT_HELLO, vec![0, 0, 1, 0, 1]),
        ]);
        assert_eq!(
            sniff_message(&message),
            Sniff::Done(Sniffed::Tls {
                sni: Some("public.example".into()),
                ech: true
            })
        );
    }

    #[test]
    fn ambiguous_server_names_are_unnamed() {
        let two_extensions = hello_message(&[
            sni_extension(&[(0, b"a.example")]),
            sni_extension(&[(0, b"b.example")]),
        ]);
        assert_eq!(
            sniff_message(&two_extensions),
            done_unnamed("duplicate server_name")
        );
        let two_entries = hello_message(&[sni_extension(&[(0, b"a.example"), (0, b"b.ex")])]);
        assert_eq!(
            sniff_message(&two_entries),
            done_unnamed("malformed server_name")
        );
        let wrong_type = hello_message(&[sni_extension(&[(1, b"a.example")])]);
        assert_eq!(
            sniff_message(&wrong_type),
            done_unnamed("malformed server_name")
        );
        let empty = hello_message(&[(EXTENSION_SERVER_NAME, Vec::new())]);
        assert_eq!(sniff_message(&empty), done_unnamed("malformed server_name"));
    }

    #[test]
    fn unusable_server_names_are_unnamed() {
        let long = vec![b'a'; 300];
        let cases: [(&[u8], &str); 3] = [
            (&long, "name too long"),
            (b"evil.example\0good.example", "invalid characters in name"),
            (b"", "empty name"),
        ];
        for (name, reason) in cases {
            let message = hello_message(&[sni_extension(&[(0, name)])]);
            assert_eq!(sniff_message(&message), done_unnamed(reason), "{name:?}");
        }
    }

    #[test]
    fn overrunning_or_trailing_extension_bytes_are_malformed() {
        // Offset of the extension block's length: handshake header 4, version 2, random
        // 32, session id 1, cipher suites 2 + 2, compression methods 2.
        const EXTENSIONS_LEN_AT: usize = 45;
        let mut overrun = hello_message(&[sni_extension(&[(0, b"a.example")])]);
        overrun[EXTENSIONS_LEN_AT + 1] += 1;
        assert_eq!(
            sniff_message(&overrun),
            done_unnamed("malformed ClientHello")
        );

        let mut trailing = hello_message(&[]);
        trailing.push(0);
        trailing[3] += 1;
        assert_eq!(
            sniff_message(&trailing),
            done_unnamed("malformed ClientHello")
        );
    }

    #[test]
    fn wrong_first_handshake_message_is_decided_from_its_first_byte() {
        assert_eq!(
            sniff_any(b"\x16\x03\x03\x00\x40\x02", DEFAULT_MAX_BYTES),
            done_unnamed("not a ClientHello")
        );
    }

    #[test]
    fn bad_record_headers_are_decided_early() {
        for bad in [
            &b"\x16\x02"[..],
            b"\x16\x03\x05",
            b"\x16\x03\x01\x00\x00",
            b"\x16\x03\x01\x40\x01",
        ] {
            assert_eq!(
                sniff_any(bad, DEFAULT_MAX_BYTES),
                done_unnamed("malformed TLS record"),
                "{bad:?}"
            );
        }
        // A handshake record followed by something that is not one.
        let message = hello_message(&[]);
        let mut interleaved = records(&message[..10], MAX_RECORD_LEN);
        interleaved.extend(b"\x17\x03\x03\x00\x05hello");
        assert_eq!(
            sniff_any(&interleaved, DEFAULT_MAX_BYTES),
            done_unnamed("malformed TLS record")
        );
    }

    #[test]
    fn hello_announcing_more_than_the_bound_is_too_large_at_once() {
        // A 64 KiB ClientHello: its header alone is enough to refuse it.
        let start = b"\x16\x03\x01\x40\x00\x01\x01\x00\x00";
        assert_eq!(
            sniff_any(start, DEFAULT_MAX_BYTES),
            done_unnamed("too large")
        );
        let mut whole = records(&[0u8; 65536], MAX_RECORD_LEN);
        whole[5..9].copy_from_slice(&[1, 0, 0xff, 0xfc]);
        assert_eq!(
            sniff_any(&whole, DEFAULT_MAX_BYTES),
            done_unnamed("too large")
        );
    }
}
