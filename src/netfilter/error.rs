//! The one error type of the netfilter module.

use std::fmt;
use std::io;

/// What went wrong while talking to nf_tables.
#[derive(Debug)]
pub enum NetfilterError {
    /// The plan cannot become a ruleset (empty table name, mark 0, too many entries...).
    InvalidPlan(String),
    /// A netlink socket call failed (`action` says which one).
    Io {
        action: &'static str,
        source: io::Error,
    },
    /// The kernel refused a message of a batch. A refused batch is aborted as a whole:
    /// nothing of it was applied.
    Refused {
        /// The message, e.g. "rule 'tproxy to proxy' in chain prerouting".
        item: String,
        /// The part of the message the kernel pointed at, e.g. "expression 4 (tproxy)".
        part: Option<String>,
        /// The errno the kernel answered with.
        errno: i32,
        /// The kernel's extended-ack text, when it gave one.
        kernel_message: Option<String>,
        /// What to check or load, e.g. "is nft_tproxy loaded? modprobe nft_tproxy".
        hint: Option<String>,
        /// How many other messages of the same batch were refused too.
        also_refused: usize,
    },
    /// The kernel answered something this module does not understand.
    Protocol(String),
    /// The kernel lacks something the ruleset needs.
    Unsupported(String),
}

impl NetfilterError {
    /// The errno of a kernel refusal, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetfilterError::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl fmt::Display for NetfilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetfilterError::InvalidPlan(why) => write!(f, "invalid nftables plan: {why}"),
            NetfilterError::Io { action, source } => {
                write!(f, "netlink (nf_tables) {action} failed: {source}")
            }
            NetfilterError::Refused {
                item,
                part,
                errno,
                kernel_message,
                hint,
                also_refused,
            } => {
                write!(f, "kernel refused {item}")?;
                if let Some(part) = part {
                    write!(f, " at {part}")?;
                }
                write!(f, ": {}", io::Error::from_raw_os_error(*errno))?;
                if let Some(text) = kernel_message {
                    write!(f, " ({text})")?;
                }
                if let Some(hint) = hint {
                    write!(f, " ({hint})")?;
                }
                if *also_refused > 0 {
                    write!(f, "; {also_refused} more message(s) of the batch refused")?;
                }
                write!(f, "; nothing was changed")
            }
            NetfilterError::Protocol(what) => write!(f, "unexpected nf_tables reply: {what}"),
            NetfilterError::Unsupported(what) => write!(f, "kernel support missing: {what}"),
        }
    }
}

impl std::error::Error for NetfilterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NetfilterError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_item_part_and_hint() {
        let err = NetfilterError::Refused {
            item: "rule 'tproxy to proxy' in chain prerouting".into(),
            part: Some("expression 5 (tproxy)".into()),
            errno: libc::EOPNOTSUPP,
            kernel_message: None,
            hint: Some("is nft_tproxy loaded? modprobe nft_tproxy".into()),
            also_refused: 0,
        };
        let text = err.to_string();
        assert!(text.starts_with(
            "kernel refused rule 'tproxy to proxy' in chain prerouting at expression 5 (tproxy): "
        ));
        assert!(text.contains("Operation not supported"));
        assert!(text.contains("modprobe nft_tproxy"));
        assert!(text.ends_with("nothing was changed"));
        assert_eq!(err.errno(), Some(libc::EOPNOTSUPP));
    }
}
