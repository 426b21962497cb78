//! HTTP CONNECT through an upstream proxy (RFC 9110 section 9.3.6), with
//! Basic proxy authentication (RFC 7617).

use super::{Handshake, Outgoing, Problem, Progress, RequestError, Target};
use crate::config::Credentials;

/// The proxy's status line and headers may take this much at most.
const MAX_RESPONSE_HEAD: usize = 8192;
/// How much of a status line an error message quotes.
const QUOTED_STATUS: usize = 120;

pub struct HttpConnectHandshake {
    target: Target,
    authenticating: bool,
    out: Outgoing,
    received: Vec<u8>,
    finished: bool,
}

impl HttpConnectHandshake {
    pub fn new(
        target: Target,
        auth: Option<&Credentials>,
    ) -> Result<HttpConnectHandshake, RequestError> {
        target.check().map_err(RequestError::HttpConnect)?;
        let authority = target.to_string();
        let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(auth) = auth {
            if auth.username.contains(':') {
                return Err(RequestError::HttpConnect(Problem::ColonInUsername));
            }
            if [&auth.username, &auth.password]
                .iter()
                .any(|s| s.bytes().any(|b| b.is_ascii_control()))
            {
                return Err(RequestError::HttpConnect(Problem::ControlCharacters));
            }
            let token = base64(format!("{}:{}", auth.username, auth.password).as_bytes());
            request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        request.push_str("\r\n");
        Ok(HttpConnectHandshake {
            target,
            authenticating: auth.is_some(),
            out: Outgoing::new(request.into_bytes()),
            received: Vec::new(),
            finished: false,
        })
    }

    fn fail(&mut self, reason: String) -> Progress {
        self.finished = true;
        Progress::Failed(format!("http connect: {reason}"))
    }

    fn verdict(&mut self, head_len: usize) -> Progress {
        let head = &self.received[..head_len];
        let status_line = head
            .split(|&b| b == b'\n')
            .next()
            .unwrap_or_default()
            .strip_suffix(b"\r")
            .unwrap_or_default();
        let quoted: String = String::from_utf8_lossy(status_line)
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .take(QUOTED_STATUS)
            .collect();
        let code = status_code(status_line);
        match code {
            Some(200..=299) => {
                self.finished = true;
                let leftover = self.received.split_off(head_len);
                self.received.clear();
                Progress::Open { leftover }
            }
            // tinyproxy answers 401, not 407, to wrong credentials.
            Some(401 | 407) if self.authenticating => {
                self.fail(format!("upstream refused our proxy credentials ({quoted})"))
            }
            Some(401 | 407) => self.fail(format!(
                "upstream wants proxy credentials and none are configured ({quoted})"
            )),
            Some(_) => {
                let target = self.target.to_string();
                self.fail(format!("upstream refused CONNECT to {target}: {quoted}"))
            }
            None => self.fail(format!("upstream sent a malformed status line: {quoted:?}")),
        }
    }
}

impl Handshake for HttpConnectHandshake {
    fn bytes_to_send(&self) -> &[u8] {
        self.out.pending()
    }

    fn sent(&mut self, n: usize) {
        self.out.advance(n);
    }

    fn received(&mut self, bytes: &[u8]) -> Progress {
        if self.finished {
            return Progress::Failed("http connect: the handshake is already over".into());
        }
        // Search only where the end of the head can newly be.
        let search_from = self.received.len().saturating_sub(3);
        self.received.extend_from_slice(bytes);
        if !b"HTTP/".starts_with(&self.received[..self.received.len().min(5)]) {
            let quoted = String::from_utf8_lossy(&self.received[..self.received.len().min(16)])
                .escape_debug()
                .to_string();
            return self.fail(format!(
                "upstream is not an HTTP proxy (its answer starts with \"{quoted}\")"
            ));
        }
        let end = self.received[search_from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| search_from + i + 4);
        match end {
            Some(head_len) if head_len <= MAX_RESPONSE_HEAD => self.verdict(head_len),
            Some(_) => self.fail(format!(
                "upstream's response head is longer than {MAX_RESPONSE_HEAD} bytes"
            )),
            None if self.received.len() >= MAX_RESPONSE_HEAD => self.fail(format!(
                "upstream's response head is longer than {MAX_RESPONSE_HEAD} bytes"
            )),
            None => self.out.progress(),
        }
    }

    fn closed(&self) -> String {
        format!(
            "http connect: upstream closed the connection before answering CONNECT to {}",
            self.target
        )
    }
}

/// `HTTP/1.x NNN ...` → NNN.
fn status_code(line: &[u8]) -> Option<u16> {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let version = parts.next()?;
    let code = parts.next()?;
    if !version.starts_with(b"HTTP/1.") || code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Standard base64 with padding (RFC 4648 section 4).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, pass: &str) -> Credentials {
        Credentials {
            username: user.into(),
            password: pass.into(),
        }
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        // RFC 7617's example.
        assert_eq!(
            base64(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn request_names_the_target_and_carries_credentials() {
        let h = HttpConnectHandshake::new(
            Target::Addr("[2001:db8::1]:443".parse().unwrap()),
            Some(&creds("Aladdin", "open sesame")),
        )
        .unwrap();
        assert_eq!(
            h.bytes_to_send(),
            b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\
              Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n"
        );
    }

    #[test]
    fn head_split_across_reads_opens_and_hands_back_the_rest() {
        let mut h =
            HttpConnectHandshake::new(Target::Name("example.com".into(), 22), None).unwrap();
        let n = h.bytes_to_send().len();
        h.sent(n);
        assert_eq!(
            h.received(b"HTTP/1.1 200 Connection established\r"),
            Progress::NeedMore
        );
        assert_eq!(h.received(b"\nProxy-Agent: x\r\n\r"), Progress::NeedMore);
        assert_eq!(
            h.received(b"\nSSH-2.0-banner"),
            Progress::Open {
                leftover: b"SSH-2.0-banner".to_vec()
            }
        );
    }

    #[test]
    fn refusals_are_explained() {
        let target = || Target::Name("example.com".into(), 443);
        let reason = |h: &mut HttpConnectHandshake, response: &[u8]| match h.received(response) {
            Progress::Failed(r) => r,
            other => panic!("expected a failure, got {other:?}"),
        };
        let mut h = HttpConnectHandshake::new(target(), Some(&creds("u", "p"))).unwrap();
        assert_eq!(
            reason(&mut h, b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n"),
            "http connect: upstream refused our proxy credentials (HTTP/1.0 407 Proxy Authentication Required)"
        );
        let mut h = HttpConnectHandshake::new(target(), None).unwrap();
        assert!(reason(&mut h, b"HTTP/1.1 407 x\r\n\r\n").contains("none are configured"));
        let mut h = HttpConnectHandshake::new(target(), None).unwrap();
        assert_eq!(
            reason(&mut h, b"HTTP/1.1 502 Bad Gateway\r\n\r\n"),
            "http connect: upstream refused CONNECT to example.com:443: HTTP/1.1 502 Bad Gateway"
        );
        let mut h = HttpConnectHandshake::new(target(), None).unwrap();
        assert!(reason(&mut h, &[5, 0]).contains("not an HTTP proxy"));
        let mut h = HttpConnectHandshake::new(target(), None).unwrap();
        assert!(reason(&mut h, b"HTTP/1.1 2x0 OK\r\n\r\n").contains("malformed status line"));
    }

    #[test]
    fn response_head_is_bounded() {
        let mut h =
            HttpConnectHandshake::new(Target::Name("example.com".into(), 443), None).unwrap();
        // Not all of the request written yet: the loop is told to go on sending.
        assert_eq!(h.received(b"HTTP/1.1 200 OK\r\n"), Progress::Send);
        let n = h.bytes_to_send().len();
        h.sent(n);
        let header = format!("X-Padding: {}\r\n", "a".repeat(100));
        let mut last = Progress::NeedMore;
        for _ in 0..100 {
            last = h.received(header.as_bytes());
            if last != Progress::NeedMore {
                break;
            }
        }
        assert!(
            matches!(&last, Progress::Failed(r) if r.contains("longer than 8192")),
            "{last:?}"
        );
    }

    #[test]
    fn unsafe_credentials_are_refused() {
        let t = || Target::Name("example.com".into(), 443);
        let why = |auth: &Credentials| {
            HttpConnectHandshake::new(t(), Some(auth))
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(
            why(&creds("a:b", "p")).as_deref(),
            Some("http connect: a Basic auth username cannot contain ':'")
        );
        assert_eq!(
            why(&creds("a", "p\r\nX: y")).as_deref(),
            Some("http connect: username and password cannot hold control characters")
        );
    }
}
