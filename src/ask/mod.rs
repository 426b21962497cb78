// SPDX-License-Identifier: GPL-3.0-or-later
//! The `ask` verdict: a connection the policy sends to `ask` is held after
//! the sniff, before any dial, while a supervisor is asked over the control
//! API; the answer (or its absence) decides it.
//!
//! - `questions`: the questions in flight, shared by the workers (which hold
//!   the connections) and the control thread (which answers), identical ones
//!   merged, the held connections bounded, the counters for `status`;
//! - this module: the answers and how an asked connection was decided, as
//!   the API takes them and the audit records say them.
//!
//! - `keys`: answering by key in a terminal (`watch`, `exec --ask`);
//! - `tty`: `exec --ask`'s questions on its own terminal.
//!
//! The worker's side (its held sessions, the wake-up an answer brings) is in
//! `proxy::held`; the API's routes in `control::questions`.

pub mod keys;
pub mod questions;
pub mod tty;

use crate::control::socket::Peer;
use serde::Serialize;

pub use questions::{Hold, Questions};

/// A supervisor's answer.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    AllowOnce,
    AllowAlways,
    DenyOnce,
    DenyAlways,
}

impl Answer {
    pub const ALL: [&'static str; 4] = ["allow-once", "allow-always", "deny-once", "deny-always"];

    /// What a terminal's keys answer (`watch`, `exec --ask`), as one line of help.
    pub const KEYS: &'static str = "a allow-once, A allow-always, d deny-once, D deny-always";

    pub fn parse(s: &str) -> Option<Answer> {
        match s {
            "allow-once" => Some(Answer::AllowOnce),
            "allow-always" => Some(Answer::AllowAlways),
            "deny-once" => Some(Answer::DenyOnce),
            "deny-always" => Some(Answer::DenyAlways),
            _ => None,
        }
    }

    /// The answer a key gives in a terminal, as [`Answer::KEYS`] says; the
    /// always ones for the API's default scope (the exact host, this agent).
    pub fn from_key(key: u8) -> Option<Answer> {
        match key {
            b'a' => Some(Answer::AllowOnce),
            b'A' => Some(Answer::AllowAlways),
            b'd' => Some(Answer::DenyOnce),
            b'D' => Some(Answer::DenyAlways),
            _ => None,
        }
    }

    /// As the API and the records spell it.
    pub fn name(self) -> &'static str {
        match self {
            Answer::AllowOnce => "allow-once",
            Answer::AllowAlways => "allow-always",
            Answer::DenyOnce => "deny-once",
            Answer::DenyAlways => "deny-always",
        }
    }

    pub fn allows(self) -> bool {
        matches!(self, Answer::AllowOnce | Answer::AllowAlways)
    }

    /// Whether it becomes a runtime rule.
    pub fn always(self) -> bool {
        matches!(self, Answer::AllowAlways | Answer::DenyAlways)
    }
}

/// How an asked connection was decided: the `asked.answer` of its record.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Decided {
    AllowOnce,
    AllowAlways,
    DenyOnce,
    DenyAlways,
    /// No answer within `ask.timeout_ms`: `ask.fallback`.
    TimedOut,
    /// `ask.max_held` connections were held already: `ask.fallback` at once.
    OverBound,
    /// Every connection it held went away (closed, or the daemon stopped)
    /// before an answer: a question's own record only, nothing to release.
    Withdrawn,
}

impl From<Answer> for Decided {
    fn from(a: Answer) -> Decided {
        match a {
            Answer::AllowOnce => Decided::AllowOnce,
            Answer::AllowAlways => Decided::AllowAlways,
            Answer::DenyOnce => Decided::DenyOnce,
            Answer::DenyAlways => Decided::DenyAlways,
        }
    }
}

/// The `asked` field of an asked connection's record.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Asked {
    /// The question it waited on (none when over the bound).
    pub question: Option<u64>,
    pub answer: Decided,
    /// Who answered (the control client, by SO_PEERCRED); none on a fallback.
    pub by: Option<Peer>,
    /// How long the connection was held.
    pub waited_ms: u64,
    /// The runtime rule an "always" answer added.
    pub runtime_rule: Option<u64>,
}

/// What a held connection is to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Settled {
    pub allow: bool,
    pub asked: Asked,
    /// For a refusal, the record's `error`.
    pub why: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::Answer;

    #[test]
    fn each_key_answers_what_the_help_line_says_and_others_nothing() {
        for pair in Answer::KEYS.split(", ") {
            let (key, name) = pair.split_once(' ').expect("key and answer");
            let answer = Answer::from_key(key.as_bytes()[0]).expect("a key that answers");
            assert_eq!(answer.name(), name);
            assert_eq!(Answer::parse(name), Some(answer));
            let spelt = serde_json::to_value(answer).expect("serialises");
            assert_eq!(spelt, name, "the records' spelling");
        }
        assert_eq!(Answer::KEYS.split(", ").count(), Answer::ALL.len());
        for other in [b'x', b'q', b'\n', b' ', 0x1b] {
            assert_eq!(Answer::from_key(other), None);
        }
    }
}
