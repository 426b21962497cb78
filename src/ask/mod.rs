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
//! The worker's side (its held sessions, the wake-up an answer brings) is in
//! `proxy::held`; the API's routes in `control::questions`.

pub mod questions;

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

    pub fn parse(s: &str) -> Option<Answer> {
        match s {
            "allow-once" => Some(Answer::AllowOnce),
            "allow-always" => Some(Answer::AllowAlways),
            "deny-once" => Some(Answer::DenyOnce),
            "deny-always" => Some(Answer::DenyAlways),
            _ => None,
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
