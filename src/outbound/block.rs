//! What a blocked client is told before its connection is closed.

/// A fatal TLS `access_denied` alert (RFC 8446 section 6.2), sent in place of
/// a ServerHello: clients report "access denied" instead of a vague
/// handshake failure. Record version 0x0303 is what TLS 1.2 and 1.3 peers
/// both accept before a version is agreed.
pub fn tls_access_denied_alert() -> [u8; 7] {
    const ALERT: u8 = 0x15;
    const FATAL: u8 = 2;
    const ACCESS_DENIED: u8 = 49;
    [ALERT, 0x03, 0x03, 0x00, 0x02, FATAL, ACCESS_DENIED]
}

/// A complete `403 Forbidden` response naming agent-egress, the host and the
/// rule, so whoever reads it knows which policy stopped them.
pub fn http_forbidden(rule: &str, host: &str) -> Vec<u8> {
    let body = format!(
        "agent-egress: the connection to {} was blocked by rule {}.\n",
        printable(host),
        printable(rule)
    );
    format!(
        "HTTP/1.1 403 Forbidden\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Cache-Control: no-store\r\n\
         Connection: close\r\n\
         \r\n\
         {body}",
        body.len()
    )
    .into_bytes()
}

/// The host comes from the client's own request: keep control characters
/// (terminal escapes, line breaks) out of what we echo back.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_bytes() {
        assert_eq!(
            tls_access_denied_alert(),
            [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31]
        );
    }

    #[test]
    fn forbidden_response_is_complete_and_clean() {
        let response =
            String::from_utf8(http_forbidden("no-pastebins", "paste.example\r\nX: 1")).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(head.contains("\r\nConnection: close"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        assert_eq!(
            body,
            "agent-egress: the connection to paste.example??X: 1 was blocked by rule no-pastebins.\n"
        );
    }
}
