// SPDX-License-Identifier: GPL-3.0-or-later
//! A worker's sessions held for questions (`ask`): which session waits on
//! which question, so that the answer (a message and a wake-up from the
//! control thread) reaches them, and so that a session that goes before its
//! answer lets go of its question. The deadline is the session's own, on the
//! worker's timers; the loop keeps serving every other session meanwhile.

use crate::ask::{Hold, Questions, Settled};
use crate::proxy::session::Session;
use std::collections::HashMap;
use std::time::Instant;

#[derive(Default)]
pub struct Held {
    /// Question id → the keys of the sessions held on it here.
    by_question: HashMap<u64, Vec<usize>>,
}

impl Held {
    /// Session `key` said `ask` (just decided) or reached its deadline: the
    /// outcome it is to take now, if any.
    pub fn on_ask(
        &mut self,
        questions: &Questions,
        worker: usize,
        key: usize,
        session: &mut Session,
        now: Instant,
    ) -> Option<Settled> {
        if session.wants_to_ask() {
            let settings = &session.runtime().config.ask;
            let hold = questions.ask(
                &session.record,
                session.original_dst(),
                worker,
                settings,
                now,
            );
            return match hold {
                Hold::Wait { question, until } => {
                    session.hold_for(question, until);
                    self.by_question.entry(question).or_default().push(key);
                    None
                }
                Hold::Settled(settled) => Some(settled),
            };
        }
        let question = session.held_on()?;
        let settled = questions.settle(question, now)?;
        self.forget(question, key);
        Some(settled)
    }

    /// The sessions held here on `question`, answered: each with its outcome.
    pub fn answered(
        &mut self,
        questions: &Questions,
        question: u64,
        now: Instant,
    ) -> Vec<(usize, Settled)> {
        let keys = self.by_question.remove(&question).unwrap_or_default();
        keys.into_iter()
            .filter_map(|key| Some((key, questions.settle(question, now)?)))
            .collect()
    }

    /// Session `key` is closing while held (its client went, a supervisor
    /// closed it, the daemon stops): it no longer waits, and never dials.
    pub fn closing(&mut self, questions: &Questions, key: usize, session: &Session) {
        if let Some(question) = session.held_on() {
            if self.forget(question, key) {
                questions.release(question);
            }
        }
    }

    /// True if `key` was held on `question` here.
    fn forget(&mut self, question: u64, key: usize) -> bool {
        let Some(keys) = self.by_question.get_mut(&question) else {
            return false;
        };
        let before = keys.len();
        keys.retain(|k| *k != key);
        let found = keys.len() != before;
        if keys.is_empty() {
            self.by_question.remove(&question);
        }
        found
    }
}
