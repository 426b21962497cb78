//! Properties of `sniff` over arbitrary input, the captured ClientHellos and generated
//! HTTP requests.

use agent_egress::sniff::{sniff, Sniff, Sniffed, DEFAULT_MAX_BYTES};
use proptest::prelude::*;

const RECORD_HEADER_LEN: usize = 5;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/clienthello/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The captured single-record hellos and the answer each must give.
fn hellos() -> Vec<(Vec<u8>, Sniffed)> {
    [
        ("curl.bin", "curl.example.test", false),
        ("openssl.bin", "openssl.example.test", false),
        ("chromium.bin", "chromium.example.test", true),
    ]
    .into_iter()
    .map(|(file, sni, ech)| {
        let sniffed = Sniffed::Tls {
            sni: Some(sni.to_string()),
            ech,
        };
        (fixture(file), sniffed)
    })
    .collect()
}

/// `message` re-framed as handshake records cut at `cuts` (sorted offsets into it).
fn reframed(message: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut bounds = vec![0];
    bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < message.len()));
    bounds.push(message.len());
    bounds.dedup();
    let mut out = Vec::new();
    for pair in bounds.windows(2) {
        let fragment = &message[pair[0]..pair[1]];
        out.extend([0x16, 3, 1]);
        out.extend(u16::try_from(fragment.len()).unwrap().to_be_bytes());
        out.extend(fragment);
    }
    out
}

fn assert_prefixes_need_more(bytes: &[u8]) {
    for end in 0..bytes.len() {
        assert_eq!(
            sniff(&bytes[..end], DEFAULT_MAX_BYTES),
            Sniff::NeedMore,
            "prefix of {end} bytes"
        );
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_wait_only_below_the_bound(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        max_bytes in 0usize..5000,
    ) {
        if sniff(&bytes, max_bytes) == Sniff::NeedMore {
            prop_assert!(bytes.len() < max_bytes);
        }
    }

    #[test]
    fn bytes_after_a_tls_record_header_never_panic(
        version_minor in 0u8..6,
        len in any::<u16>(),
        tail in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = vec![0x16, 3, version_minor];
        bytes.extend(len.to_be_bytes());
        bytes.push(1);
        bytes.extend(tail);
        sniff(&bytes, DEFAULT_MAX_BYTES);
    }

    #[test]
    fn bytes_after_a_method_never_panic(
        method in "[A-Z]{1,8}",
        tail in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = format!("{method} ").into_bytes();
        bytes.extend(tail);
        sniff(&bytes, DEFAULT_MAX_BYTES);
    }

    #[test]
    fn a_mutated_hello_never_panics(
        which in 0usize..3,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let (mut hello, _) = hellos().swap_remove(which);
        for (at, byte) in flips {
            let at = at.index(hello.len());
            hello[at] = byte;
        }
        sniff(&hello, DEFAULT_MAX_BYTES);
    }

    #[test]
    fn any_record_split_of_a_hello_gives_the_same_answer(
        which in 0usize..3,
        mut cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let (hello, want) = hellos().swap_remove(which);
        let message = &hello[RECORD_HEADER_LEN..];
        let mut offsets: Vec<usize> = cuts.drain(..).map(|c| c.index(message.len())).collect();
        offsets.sort_unstable();
        let split = reframed(message, &offsets);
        prop_assert_eq!(sniff(&split, DEFAULT_MAX_BYTES), Sniff::Done(want));
        assert_prefixes_need_more(&split);
    }

    #[test]
    fn generated_requests_give_their_host(
        host in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]{1,10}){0,3}",
        port in prop::option::of(any::<u16>()),
        form in 0usize..3,
        noise in prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,15}", "[ -~]{0,40}"), 0..6),
    ) {
        let authority = match port {
            Some(port) => format!("{host}:{port}"),
            None => host.clone(),
        };
        let request_line = match form {
            0 => format!("GET /path?q=1 HTTP/1.1\r\nHost: {authority}\r\n"),
            1 => format!("GET http://{authority}/x HTTP/1.1\r\nHost: decoy.example\r\n"),
            _ => format!("CONNECT {authority} HTTP/1.1\r\n"),
        };
        let mut request = request_line;
        for (name, value) in noise {
            if !name.eq_ignore_ascii_case("host") {
                request.push_str(&format!("{name}: {}\r\n", value.trim()));
            }
        }
        request.push_str("\r\n");
        prop_assert_eq!(
            sniff(request.as_bytes(), DEFAULT_MAX_BYTES),
            Sniff::Done(Sniffed::Http { host })
        );
        assert_prefixes_need_more(request.as_bytes());
    }
}

#[test]
fn every_prefix_of_each_real_hello_needs_more_and_the_whole_is_read() {
    for (hello, want) in hellos() {
        assert_prefixes_need_more(&hello);
        assert_eq!(sniff(&hello, DEFAULT_MAX_BYTES), Sniff::Done(want));
    }
}
