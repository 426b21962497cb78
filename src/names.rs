//! Host name normalisation: one spelling per name, so matching and audit agree.
//!
//! `GitHub.COM.` and `github.com` are the same host; a Unicode look-alike is not
//! (it becomes an `xn--` label that no ASCII pattern matches).

use idna::AsciiDenyList;

/// The longest name DNS can carry (RFC 1035), without the trailing dot.
const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// Why a name is no host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    Empty,
    NotValid(String),
    TooLong,
    EmptyLabel(String),
    LabelTooLong(String),
    BadCharacters(String),
}

impl std::fmt::Display for NameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameError::Empty => write!(f, "empty host name"),
            NameError::NotValid(raw) => write!(f, "{raw:?} is not a valid host name"),
            NameError::TooLong => write!(f, "host name longer than {MAX_NAME_LEN} bytes"),
            NameError::EmptyLabel(raw) => write!(f, "{raw:?} has an empty label"),
            NameError::LabelTooLong(raw) => {
                write!(f, "{raw:?} has a label longer than {MAX_LABEL_LEN} bytes")
            }
            NameError::BadCharacters(raw) => {
                write!(f, "{raw:?} has characters a host name cannot have")
            }
        }
    }
}

impl std::error::Error for NameError {}

/// Lower-case, strip one trailing dot, map IDN to punycode (UTS 46), and check
/// the result is a name DNS could carry.
pub fn normalize_host(raw: &str) -> Result<String, NameError> {
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if trimmed.is_empty() {
        return Err(NameError::Empty);
    }
    let ascii = idna::domain_to_ascii_cow(trimmed.as_bytes(), AsciiDenyList::URL)
        .map_err(|_| NameError::NotValid(raw.to_string()))?;
    if ascii.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel(raw.to_string()));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong(raw.to_string()));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(NameError::BadCharacters(raw.to_string()));
        }
    }
    Ok(ascii.into_owned())
}

/// A name under `.invalid`, which RFC 6761 (6.4) reserves to never resolve:
/// nothing can be reached by it, so audit mode lets none through (`doctor`'s
/// probes use one, and must be refused in every mode to show the capture).
pub fn never_resolves(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    host == "invalid" || host.ends_with(".invalid")
}

#[cfg(test)]
mod tests {
    use super::{never_resolves, normalize_host};

    #[test]
    fn names_under_invalid_never_resolve() {
        for name in ["invalid", "doctor.agent-egress.invalid", "x.invalid."] {
            assert!(never_resolves(name), "{name}");
        }
        for name in ["invalid.example", "notinvalid", "example.com"] {
            assert!(!never_resolves(name), "{name}");
        }
    }

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
