//! Host name normalisation: one spelling per name, so matching and audit agree.
//!
//! `GitHub.COM.` and `github.com` are the same host; a Unicode look-alike is not
//! (it becomes an `xn--` label that no ASCII pattern matches).

use idna::AsciiDenyList;

/// The longest name DNS can carry (RFC 1035), without the trailing dot.
const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// Lower-case, strip one trailing dot, map IDN to punycode (UTS 46), and check
/// the result is a name DNS could carry.
pub fn normalize_host(raw: &str) -> Result<String, String> {
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if trimmed.is_empty() {
        return Err("empty host name".into());
    }
    let ascii = idna::domain_to_ascii_cow(trimmed.as_bytes(), AsciiDenyList::URL)
        .map_err(|_| format!("{raw:?} is not a valid host name"))?;
    if ascii.len() > MAX_NAME_LEN {
        return Err(format!("host name longer than {MAX_NAME_LEN} bytes"));
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(format!("{raw:?} has an empty label"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "{raw:?} has a label longer than {MAX_LABEL_LEN} bytes"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(format!("{raw:?} has characters a host name cannot have"));
        }
    }
    Ok(ascii.into_owned())
}

#[cfg(test)]
mod tests {
    use super::normalize_host;

    #[test]
    fn case_and_trailing_dot_fold() {
        assert_eq!(normalize_host("GitHub.COM.").unwrap(), "github.com");
        assert_eq!(normalize_host("github.com").unwrap(), "github.com");
    }

    #[test]
    fn unicode_becomes_punycode() {
        assert_eq!(normalize_host("bücher.de").unwrap(), "xn--bcher-kva.de");
        // Cyrillic "а" in "аpple.com" must not become "apple.com".
        let lookalike = normalize_host("\u{0430}pple.com").unwrap();
        assert_ne!(lookalike, "apple.com");
        assert!(lookalike.starts_with("xn--"));
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(normalize_host("").is_err());
        assert!(normalize_host(".").is_err());
        assert!(normalize_host("a..b").is_err());
        assert!(normalize_host("a b.com").is_err());
        assert!(normalize_host(&"a".repeat(64)).is_err());
        assert!(normalize_host(&"a.".repeat(130)).is_err());
        assert!(normalize_host("exa/mple.com").is_err());
    }
}
