//! SOCKS5 CONNECT (RFC 1928), with username/password authentication (RFC 1929).

use super::{Handshake, Outgoing, Problem, Progress, RequestError, Target};
use crate::config::Credentials;
use std::net::SocketAddr;

const VERSION: u8 = 5;
const NO_AUTHENTICATION: u8 = 0x00;
const USERNAME_PASSWORD: u8 = 0x02;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const AUTH_VERSION: u8 = 1;
const CONNECT: u8 = 1;
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;

pub struct Socks5Handshake {
    target: Target,
    out: Outgoing,
    received: Vec<u8>,
    step: Step,
    /// RFC 1929 request, sent if the upstream picks username/password.
    auth_request: Option<Vec<u8>>,
    connect_request: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    AwaitMethod,
    AwaitAuth,
    AwaitReply,
    Finished,
}

impl Socks5Handshake {
    pub fn new(
        target: Target,
        auth: Option<&Credentials>,
    ) -> Result<Socks5Handshake, RequestError> {
        target.check().map_err(RequestError::Socks5)?;
        let auth_request = auth
            .map(encode_auth)
            .transpose()
            .map_err(RequestError::Socks5)?;
        let greeting = match auth_request {
            Some(_) => vec![VERSION, 2, NO_AUTHENTICATION, USERNAME_PASSWORD],
            None => vec![VERSION, 1, NO_AUTHENTICATION],
        };
        Ok(Socks5Handshake {
            connect_request: encode_connect(&target),
            target,
            out: Outgoing::new(greeting),
            received: Vec::new(),
            step: Step::AwaitMethod,
            auth_request,
        })
    }

    fn fail(&mut self, reason: String) -> Progress {
        self.step = Step::Finished;
        Progress::Failed(format!("socks5: {reason}"))
    }

    /// Takes a reply of exactly `len` bytes; more would be the upstream
    /// talking out of turn, which no correct server does.
    fn take_reply(&mut self, len: usize) -> Result<Option<Vec<u8>>, String> {
        if self.received.len() < len {
            return Ok(None);
        }
        if self.received.len() > len {
            return Err(format!(
                "upstream sent {} byte(s) beyond its reply",
                self.received.len() - len
            ));
        }
        Ok(Some(std::mem::take(&mut self.received)))
    }

    fn on_method(&mut self) -> Progress {
        if let Some(&version) = self.received.first() {
            if version != VERSION {
                return self.fail(format!(
                    "upstream is not a SOCKS5 server (its answer starts with byte 0x{version:02x})"
                ));
            }
        }
        let reply = match self.take_reply(2) {
            Ok(Some(reply)) => reply,
            Ok(None) => return Progress::NeedMore,
            Err(e) => return self.fail(e),
        };
        match (reply[1], self.auth_request.take()) {
            (NO_AUTHENTICATION, _) => self.send_connect(),
            (USERNAME_PASSWORD, Some(auth)) => {
                self.out = Outgoing::new(auth);
                self.step = Step::AwaitAuth;
                self.out.progress()
            }
            (NO_ACCEPTABLE_METHOD, auth) => self.fail(format!(
                "upstream accepts none of our authentication methods ({})",
                if auth.is_some() {
                    "we offered none and username/password"
                } else {
                    "we offered none; does it need a username and password?"
                }
            )),
            (method, _) => self.fail(format!(
                "upstream chose authentication method 0x{method:02x}, which we did not offer"
            )),
        }
    }

    fn on_auth(&mut self) -> Progress {
        let reply = match self.take_reply(2) {
            Ok(Some(reply)) => reply,
            Ok(None) => return Progress::NeedMore,
            Err(e) => return self.fail(e),
        };
        // Some servers answer with version 5 here: only the status matters.
        match reply[1] {
            0 => self.send_connect(),
            status => self.fail(format!(
                "upstream refused our username/password (status {status})"
            )),
        }
    }

    fn send_connect(&mut self) -> Progress {
        self.out = Outgoing::new(std::mem::take(&mut self.connect_request));
        self.step = Step::AwaitReply;
        self.out.progress()
    }

    fn on_reply(&mut self) -> Progress {
        // VER REP RSV ATYP BND.ADDR BND.PORT; a domain's length is byte 4.
        let Some(&atyp) = self.received.get(3) else {
            return Progress::NeedMore;
        };
        let address_len = match atyp {
            ATYP_IPV4 => 4,
            ATYP_IPV6 => 16,
            ATYP_DOMAIN => match self.received.get(4) {
                Some(&n) => 1 + usize::from(n),
                None => return Progress::NeedMore,
            },
            other => {
                return self.fail(format!(
                    "upstream's reply has an unknown address type {other}"
                ))
            }
        };
        if self.received[0] != VERSION {
            return self.fail(format!(
                "upstream's reply has version {}, not 5",
                self.received[0]
            ));
        }
        let rep = self.received[1];
        if rep != 0 {
            let target = self.target.to_string();
            return self.fail(format!(
                "upstream could not connect to {target}: {} (reply {rep})",
                reply_meaning(rep)
            ));
        }
        let len = 4 + address_len + 2;
        if self.received.len() < len {
            return Progress::NeedMore;
        }
        self.step = Step::Finished;
        let leftover = self.received.split_off(len);
        self.received.clear();
        Progress::Open { leftover }
    }
}

impl Handshake for Socks5Handshake {
    fn bytes_to_send(&self) -> &[u8] {
        self.out.pending()
    }

    fn sent(&mut self, n: usize) {
        self.out.advance(n);
    }

    fn received(&mut self, bytes: &[u8]) -> Progress {
        if self.step == Step::Finished {
            return Progress::Failed("socks5: the handshake is already over".into());
        }
        self.received.extend_from_slice(bytes);
        match self.step {
            Step::AwaitMethod => self.on_method(),
            Step::AwaitAuth => self.on_auth(),
            Step::AwaitReply => self.on_reply(),
            Step::Finished => Progress::NeedMore,
        }
    }

    fn closed(&self) -> String {
        let when = match self.step {
            Step::AwaitMethod => "before choosing an authentication method".to_string(),
            Step::AwaitAuth => "during username/password authentication".to_string(),
            Step::AwaitReply => format!("before answering CONNECT to {}", self.target),
            Step::Finished => "after the handshake".to_string(),
        };
        format!("socks5: upstream closed the connection {when}")
    }
}

fn encode_auth(auth: &Credentials) -> Result<Vec<u8>, Problem> {
    let field = |what: &'static str, value: &str| -> Result<u8, Problem> {
        u8::try_from(value.len())
            .ok()
            .filter(|&n| n > 0)
            .ok_or(Problem::FieldLength(what))
    };
    let user_len = field("username", &auth.username)?;
    let pass_len = field("password", &auth.password)?;
    let mut request = vec![AUTH_VERSION, user_len];
    request.extend_from_slice(auth.username.as_bytes());
    request.push(pass_len);
    request.extend_from_slice(auth.password.as_bytes());
    Ok(request)
}

/// The CONNECT request; `target` has passed `Target::check`.
fn encode_connect(target: &Target) -> Vec<u8> {
    let mut request = vec![VERSION, CONNECT, 0];
    let port = match target {
        Target::Name(name, port) => {
            request.push(ATYP_DOMAIN);
            // check() keeps names to 253 bytes.
            request.push(name.len().min(255) as u8);
            request.extend_from_slice(name.as_bytes());
            *port
        }
        Target::Addr(SocketAddr::V4(addr)) => {
            request.push(ATYP_IPV4);
            request.extend_from_slice(&addr.ip().octets());
            addr.port()
        }
        Target::Addr(SocketAddr::V6(addr)) => {
            request.push(ATYP_IPV6);
            request.extend_from_slice(&addr.ip().octets());
            addr.port()
        }
    };
    request.extend_from_slice(&port.to_be_bytes());
    request
}

/// RFC 1928 section 6.
fn reply_meaning(rep: u8) -> &'static str {
    match rep {
        1 => "general SOCKS server failure",
        2 => "connection not allowed by its ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unknown reply code",
    }
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

    /// Takes everything the handshake has to send.
    fn drain(h: &mut Socks5Handshake) -> Vec<u8> {
        let bytes = h.bytes_to_send().to_vec();
        h.sent(bytes.len());
        bytes
    }

    #[test]
    fn connect_by_name_without_auth() {
        let mut h = Socks5Handshake::new(Target::Name("example.com".into(), 443), None).unwrap();
        assert_eq!(drain(&mut h), [5, 1, 0]);
        assert_eq!(h.received(&[5]), Progress::NeedMore);
        assert_eq!(h.received(&[0]), Progress::Send);
        let mut want = vec![5, 1, 0, 3, 11];
        want.extend_from_slice(b"example.com");
        want.extend_from_slice(&[1, 187]);
        assert_eq!(drain(&mut h), want);
        // A reply with a domain-name bound address, then tunnel bytes.
        let mut reply = vec![5, 0, 0, 3, 4];
        reply.extend_from_slice(b"host");
        reply.extend_from_slice(&[0, 80]);
        assert_eq!(h.received(&reply[..6]), Progress::NeedMore);
        let mut rest = reply[6..].to_vec();
        rest.extend_from_slice(b"SSH-2.0-banner");
        assert_eq!(
            h.received(&rest),
            Progress::Open {
                leftover: b"SSH-2.0-banner".to_vec()
            }
        );
    }

    #[test]
    fn connect_by_address_with_auth() {
        let target = Target::Addr("[2001:db8::1]:8080".parse().unwrap());
        let mut h = Socks5Handshake::new(target, Some(&creds("u", "pw"))).unwrap();
        assert_eq!(drain(&mut h), [5, 2, 0, 2]);
        assert_eq!(h.received(&[5, 2]), Progress::Send);
        assert_eq!(drain(&mut h), [1, 1, b'u', 2, b'p', b'w']);
        assert_eq!(h.received(&[1, 0]), Progress::Send);
        let request = drain(&mut h);
        assert_eq!(request[..4], [5, 1, 0, 4]);
        assert_eq!(request.len(), 4 + 16 + 2);
        assert_eq!(request[20..], [0x1f, 0x90]);
        let reply = [5, 0, 0, 1, 127, 0, 0, 1, 0, 80];
        assert_eq!(h.received(&reply), Progress::Open { leftover: vec![] });
    }

    #[test]
    fn failures_say_what_happened() {
        let target = || Target::Addr("192.0.2.1:443".parse().unwrap());
        let failed = |p: Progress| match p {
            Progress::Failed(reason) => reason,
            other => panic!("expected a failure, got {other:?}"),
        };

        let mut h = Socks5Handshake::new(target(), Some(&creds("u", "bad"))).unwrap();
        h.received(&[5, 2]);
        let reason = failed(h.received(&[1, 1]));
        assert_eq!(
            reason,
            "socks5: upstream refused our username/password (status 1)"
        );

        let mut h = Socks5Handshake::new(target(), None).unwrap();
        let reason = failed(h.received(&[5, 0xff]));
        assert!(
            reason.contains("none of our authentication methods"),
            "{reason}"
        );

        let mut h = Socks5Handshake::new(target(), None).unwrap();
        let reason = failed(h.received(b"HTTP/1.1 400 Bad Request\r\n"));
        assert!(reason.contains("not a SOCKS5 server"), "{reason}");

        let mut h = Socks5Handshake::new(target(), None).unwrap();
        let reason = failed(h.received(&[5, 0, 9]));
        assert!(reason.contains("1 byte(s) beyond its reply"), "{reason}");

        let mut h = Socks5Handshake::new(target(), None).unwrap();
        h.received(&[5, 0]);
        let reason = failed(h.received(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]));
        assert_eq!(
            reason,
            "socks5: upstream could not connect to 192.0.2.1:443: connection refused (reply 5)"
        );
        assert!(matches!(h.received(&[0]), Progress::Failed(_)));

        let h = Socks5Handshake::new(target(), None).unwrap();
        assert!(h.closed().contains("before choosing"));
    }

    #[test]
    fn bad_inputs_are_refused_up_front() {
        let t = Target::Name("example.com".into(), 1);
        let why = |t: Target, auth: Option<&Credentials>| {
            Socks5Handshake::new(t, auth).err().map(|e| e.to_string())
        };
        assert_eq!(
            why(t.clone(), Some(&creds("", "x"))).as_deref(),
            Some("socks5: the username must be 1 to 255 bytes")
        );
        assert_eq!(
            why(t, Some(&creds("u", &"x".repeat(256)))).as_deref(),
            Some("socks5: the password must be 1 to 255 bytes")
        );
        assert_eq!(
            why(Target::Name("a\r\nb".into(), 1), None).as_deref(),
            Some(
                r#"socks5: "a\r\nb" is not a host name (1 to 253 letters, digits, '.', '-', '_')"#
            )
        );
    }
}
