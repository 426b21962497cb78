// SPDX-License-Identifier: GPL-3.0-or-later
//! The questions in flight: asked by the workers, answered from the control
//! thread, under one lock that neither holds for long (no I/O under it but
//! the audit queue's `try_send`).
//!
//! A question is the (agent, host, port) a connection asked about; more
//! connections with the same key while it waits are merged into it, and one
//! answer releases them all. A question lives until every connection it held
//! has taken its outcome (or gone): a worker takes it when woken for the
//! answer, or at the question's deadline, when the first to come marks it
//! timed out. Held connections are bounded in number across all questions.

use super::{Answer, Asked, Decided, Settled};
use crate::audit::{AuditLog, Event, Record};
use crate::config::{self, AskFallback};
use crate::control::socket::Peer;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What makes two questions the same.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    agent: Option<String>,
    /// The name, or the address when the connection named none.
    host: String,
    port: u16,
}

/// One question, as the API lists it and the events carry it.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct QuestionInfo {
    pub id: u64,
    pub agent: Option<String>,
    /// The name the connection was decided on; null when it had none.
    pub host: Option<String>,
    pub ip: String,
    pub port: u16,
    /// The rule that said `ask`.
    pub rule: String,
    pub uid: Option<u32>,
    /// The first held connection's process, where known.
    pub pid: Option<u32>,
    pub exe: Option<String>,
    /// Unix milliseconds.
    pub asked_at: u64,
    /// Unix milliseconds: the fallback comes then.
    pub expires_at: u64,
    pub fallback: AskFallback,
    /// Connections held on it now.
    pub held: usize,
    /// The first held connection, for its process (the audit writer's).
    pub conn_id: Option<u64>,
}

#[cfg(test)]
impl QuestionInfo {
    /// For tests: curl's connection to blocked.test:443, asked at 1 s.
    pub fn example() -> QuestionInfo {
        QuestionInfo {
            id: 3,
            agent: Some("agent-egress-exec-1".into()),
            host: Some("blocked.test".into()),
            ip: "198.51.100.20".into(),
            port: 443,
            rule: "default".into(),
            uid: Some(65534),
            pid: Some(1234),
            exe: Some("/usr/bin/curl".into()),
            asked_at: 1_000,
            expires_at: 61_000,
            fallback: AskFallback::Block,
            held: 1,
            conn_id: Some(9),
        }
    }
}

struct Question {
    info: QuestionInfo,
    key: Key,
    asked: Instant,
    deadline: Instant,
    workers: BTreeSet<usize>,
    outcome: Option<Settled>,
    /// The first connection's record, for the question's own records.
    record: Record,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    questions: BTreeMap<u64, Question>,
    /// Unanswered questions by key, for merging.
    open: HashMap<Key, u64>,
    held: usize,
}

/// Counters for `status`.
#[derive(Default)]
struct Counters {
    asked: AtomicU64,
    answered: AtomicU64,
    timed_out: AtomicU64,
    over_bound: AtomicU64,
    merged: AtomicU64,
    withdrawn: AtomicU64,
}

pub struct Questions {
    inner: Mutex<Inner>,
    /// Signalled when a question is asked, for the long polls.
    asked: Condvar,
    audit: AuditLog,
    counters: Counters,
}

/// What a connection that asks is to do.
#[derive(Debug, PartialEq)]
pub enum Hold {
    /// Wait for question `question` until `until` at the latest.
    Wait { question: u64, until: Instant },
    /// Go on at once (over the bound).
    Settled(Settled),
}

/// Why an answer was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum NotPending {
    /// No such question, or it was answered, timed out, or nobody waits on it
    /// any more.
    Unknown,
}

impl Questions {
    pub fn new(audit: AuditLog) -> Questions {
        Questions {
            inner: Mutex::new(Inner {
                next_id: 1,
                ..Inner::default()
            }),
            asked: Condvar::new(),
            audit,
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection of worker `worker` asks about `record`'s host (or `dst`'s
    /// address) and port: merged into an open question with the same key,
    /// else a new one (published on the event stream), unless `settings`'
    /// bound on held connections is reached.
    pub fn ask(
        &self,
        record: &Record,
        dst: SocketAddr,
        worker: usize,
        settings: &config::Ask,
        now: Instant,
    ) -> Hold {
        let key = Key {
            agent: record.agent.clone(),
            host: record
                .host
                .clone()
                .unwrap_or_else(|| dst.ip().to_canonical().to_string()),
            port: dst.port(),
        };
        let mut inner = self.lock();
        if inner.held >= settings.max_held {
            drop(inner);
            self.counters.over_bound.fetch_add(1, Ordering::Relaxed);
            return Hold::Settled(fallback(settings.fallback, Decided::OverBound, None, 0));
        }
        inner.held += 1;
        if let Some(id) = inner.open.get(&key).copied() {
            if let Some(q) = inner.questions.get_mut(&id) {
                q.info.held += 1;
                q.workers.insert(worker);
                self.counters.merged.fetch_add(1, Ordering::Relaxed);
                return Hold::Wait {
                    question: id,
                    until: q.deadline,
                };
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let timeout = Duration::from_millis(settings.timeout_ms);
        let asked_at = crate::control::state::now_ms();
        let info = QuestionInfo {
            id,
            agent: key.agent.clone(),
            host: record.host.clone(),
            ip: dst.ip().to_canonical().to_string(),
            port: key.port,
            rule: record.rule.clone().unwrap_or_default(),
            uid: record.uid,
            pid: record.pid,
            exe: record.exe.clone(),
            asked_at,
            expires_at: asked_at + settings.timeout_ms,
            fallback: settings.fallback,
            held: 1,
            conn_id: record.conn_id,
        };
        let question = Question {
            info,
            key: key.clone(),
            asked: now,
            deadline: now + timeout,
            workers: BTreeSet::from([worker]),
            outcome: None,
            record: record.clone(),
        };
        self.publish(Event::QuestionAsked, &question, None);
        inner.open.insert(key, id);
        inner.questions.insert(id, question);
        drop(inner);
        self.counters.asked.fetch_add(1, Ordering::Relaxed);
        self.asked.notify_all();
        Hold::Wait {
            question: id,
            until: now + timeout,
        }
    }

    /// What a connection held on `id` is to do now: the answer, the fallback
    /// once the deadline has passed (the first to see it marks the question
    /// timed out), or nothing yet. A connection that takes an outcome is no
    /// longer held. Call it only for a connection held on `id`.
    pub fn settle(&self, id: u64, now: Instant) -> Option<Settled> {
        let mut inner = self.lock();
        let Some(q) = inner.questions.get_mut(&id) else {
            // Never while a connection holds it; if it were, fail closed.
            return Some(Settled {
                allow: false,
                asked: Asked {
                    question: Some(id),
                    answer: Decided::TimedOut,
                    by: None,
                    waited_ms: 0,
                    runtime_rule: None,
                },
                why: Some(format!("question {id} was lost")),
            });
        };
        if q.outcome.is_none() {
            if now < q.deadline {
                return None;
            }
            let waited = now.saturating_duration_since(q.asked).as_millis() as u64;
            q.outcome = Some(fallback(
                q.info.fallback,
                Decided::TimedOut,
                Some(id),
                waited,
            ));
            self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
            let key = q.key.clone();
            self.publish(Event::QuestionAnswered, q, None);
            inner.open.remove(&key);
        }
        let q = inner.questions.get_mut(&id)?;
        let outcome = q.outcome.clone();
        self.unhold(&mut inner, id);
        outcome
    }

    /// A connection held on `id` went (closed, or the daemon stops) without
    /// an outcome; a question nobody waits on any more is dropped, and one
    /// still unanswered says so (answer `withdrawn`): a supervisor sees it
    /// go instead of finding it gone when it answers.
    pub fn release(&self, id: u64) {
        let mut inner = self.lock();
        self.unhold(&mut inner, id);
    }

    fn unhold(&self, inner: &mut Inner, id: u64) {
        let Some(q) = inner.questions.get_mut(&id) else {
            return;
        };
        q.info.held = q.info.held.saturating_sub(1);
        inner.held = inner.held.saturating_sub(1);
        if q.info.held > 0 {
            return;
        }
        let Some(mut q) = inner.questions.remove(&id) else {
            return;
        };
        if inner.open.get(&q.key) == Some(&id) {
            inner.open.remove(&q.key);
        }
        if q.outcome.is_none() {
            q.outcome = Some(Settled {
                allow: false,
                asked: Asked {
                    question: Some(id),
                    answer: Decided::Withdrawn,
                    by: None,
                    waited_ms: Instant::now()
                        .saturating_duration_since(q.asked)
                        .as_millis() as u64,
                    runtime_rule: None,
                },
                why: None,
            });
            self.counters.withdrawn.fetch_add(1, Ordering::Relaxed);
            self.publish(Event::QuestionAnswered, &q, None);
        }
    }

    /// An unanswered question.
    pub fn get(&self, id: u64) -> Option<QuestionInfo> {
        let inner = self.lock();
        inner
            .questions
            .get(&id)
            .filter(|q| q.outcome.is_none())
            .map(|q| q.info.clone())
    }

    /// Answer `id` (unanswered); `runtime_rule` is the rule an "always"
    /// answer added. The workers holding its connections are returned, to be
    /// woken.
    pub fn answer(
        &self,
        id: u64,
        answer: Answer,
        by: &Peer,
        runtime_rule: Option<u64>,
        now: Instant,
    ) -> Result<Vec<usize>, NotPending> {
        let mut inner = self.lock();
        let q = inner
            .questions
            .get_mut(&id)
            .filter(|q| q.outcome.is_none())
            .ok_or(NotPending::Unknown)?;
        let waited_ms = now.saturating_duration_since(q.asked).as_millis() as u64;
        let why = (!answer.allows()).then(|| {
            format!(
                "denied by the supervisor (uid {}, pid {}): {}",
                by.uid,
                by.pid,
                answer.name()
            )
        });
        q.outcome = Some(Settled {
            allow: answer.allows(),
            asked: Asked {
                question: Some(id),
                answer: answer.into(),
                by: Some(by.clone()),
                waited_ms,
                runtime_rule,
            },
            why,
        });
        let workers = q.workers.iter().copied().collect();
        let key = q.key.clone();
        self.publish(Event::QuestionAnswered, q, Some(by));
        inner.open.remove(&key);
        self.counters.answered.fetch_add(1, Ordering::Relaxed);
        Ok(workers)
    }

    /// The unanswered questions, oldest first.
    pub fn pending(&self) -> Vec<QuestionInfo> {
        let inner = self.lock();
        inner
            .questions
            .values()
            .filter(|q| q.outcome.is_none())
            .map(|q| q.info.clone())
            .collect()
    }

    /// The oldest unanswered question newer than `after`, waiting up to
    /// `timeout` for one to be asked.
    pub fn next(&self, after: u64, timeout: Duration) -> Option<QuestionInfo> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        loop {
            let found = inner
                .questions
                .range(after.saturating_add(1)..)
                .map(|(_, q)| q)
                .find(|q| q.outcome.is_none());
            if let Some(q) = found {
                return Some(q.info.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            inner = match self.asked.wait_timeout(inner, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// For `GET /v1/status`.
    pub fn status(&self) -> Value {
        let (pending, held) = {
            let inner = self.lock();
            let pending = inner
                .questions
                .values()
                .filter(|q| q.outcome.is_none())
                .count();
            (pending, inner.held)
        };
        let c = &self.counters;
        json!({
            "pending": pending,
            "held_now": held,
            "asked": c.asked.load(Ordering::Relaxed),
            "merged": c.merged.load(Ordering::Relaxed),
            "answered": c.answered.load(Ordering::Relaxed),
            "timed_out": c.timed_out.load(Ordering::Relaxed),
            "over_bound": c.over_bound.load(Ordering::Relaxed),
            "withdrawn": c.withdrawn.load(Ordering::Relaxed),
        })
    }

    /// A question's own record (asked, answered): the first connection's
    /// record with the question; the writer names its process.
    fn publish(&self, event: Event, q: &Question, by: Option<&Peer>) {
        let mut record = q.record.clone();
        record.event = event;
        record.question = Some(Box::new(QuestionRecord {
            id: q.info.id,
            held: q.info.held,
            expires_at: q.info.expires_at,
            fallback: q.info.fallback,
            answer: q.outcome.as_ref().map(|o| o.asked.answer),
            by: by.cloned(),
            runtime_rule: q.outcome.as_ref().and_then(|o| o.asked.runtime_rule),
        }));
        record.asked = None;
        self.audit.submit(record.into());
    }
}

/// The `question` field of a `question_asked` or `question_answered` record.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct QuestionRecord {
    pub id: u64,
    pub held: usize,
    pub expires_at: u64,
    pub fallback: AskFallback,
    pub answer: Option<Decided>,
    pub by: Option<Peer>,
    pub runtime_rule: Option<u64>,
}

fn fallback(to: AskFallback, how: Decided, question: Option<u64>, waited_ms: u64) -> Settled {
    let allow = to == AskFallback::Allow;
    let why = match how {
        Decided::OverBound => "too many connections held for questions (ask.max_held)",
        _ => "no answer in time (ask.timeout_ms)",
    };
    Settled {
        allow,
        asked: Asked {
            question,
            answer: how,
            by: None,
            waited_ms,
            runtime_rule: None,
        },
        why: (!allow).then(|| format!("{why}: ask.fallback is block")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Sink;
    use crate::config::AuditFormat;

    fn questions() -> Questions {
        let sink = Sink::File("/dev/null".into());
        let (audit, _thread) =
            AuditLog::start(sink, AuditFormat::Json, 1024, None).expect("an audit log");
        Questions::new(audit)
    }

    fn record(host: &str, conn_id: u64) -> Record {
        Record {
            agent: Some("agents.slice".into()),
            host: Some(host.into()),
            rule: Some("default".into()),
            conn_id: Some(conn_id),
            ..Record::default()
        }
    }

    fn settings(max_held: usize) -> config::Ask {
        config::Ask {
            timeout_ms: 1000,
            fallback: AskFallback::Block,
            max_held,
            outbound: "direct".into(),
        }
    }

    fn peer() -> Peer {
        Peer {
            uid: 0,
            gid: 0,
            pid: 42,
            exe: None,
        }
    }

    const DST: &str = "192.0.2.1:443";

    fn wait(hold: Hold) -> (u64, Instant) {
        match hold {
            Hold::Wait { question, until } => (question, until),
            other => panic!("not held: {other:?}"),
        }
    }

    #[test]
    fn a_question_whose_connections_all_went_says_it_was_withdrawn() {
        let sink = Sink::File("/dev/null".into());
        let (audit, _thread) =
            AuditLog::start(sink, AuditFormat::Json, 1024, None).expect("an audit log");
        let (_, lines) = audit.events().subscribe().expect("a watcher");
        let q = Questions::new(audit);
        let now = Instant::now();
        let dst = DST.parse().unwrap();
        let (id, _) = wait(q.ask(&record("x.test", 1), dst, 0, &settings(10), now));
        wait(q.ask(&record("x.test", 2), dst, 0, &settings(10), now));
        q.release(id);
        assert_eq!(q.get(id).map(|i| i.held), Some(1), "one still held");
        q.release(id);
        assert_eq!(q.get(id), None);
        assert_eq!(q.status()["withdrawn"], 1);
        let answered = std::iter::from_fn(|| lines.recv_timeout(Duration::from_secs(5)).ok())
            .map(|line| serde_json::from_slice::<Value>(&line).expect("JSON"))
            .find(|r| r["event"] == "question_answered")
            .expect("a question_answered record");
        assert_eq!(answered["question"]["id"], id);
        assert_eq!(answered["question"]["answer"], "withdrawn");
        assert_eq!(answered["question"]["held"], 0);
    }

    #[test]
    fn identical_questions_merge_and_one_answer_releases_all() {
        let q = questions();
        let now = Instant::now();
        let dst = DST.parse().unwrap();
        let (a, until) = wait(q.ask(&record("x.test", 1), dst, 0, &settings(10), now));
        let (b, same) = wait(q.ask(&record("x.test", 2), dst, 1, &settings(10), now));
        let (c, _) = wait(q.ask(&record("y.test", 3), dst, 1, &settings(10), now));
        assert_eq!((a, until), (b, same));
        assert_ne!(a, c);
        assert_eq!(q.pending().len(), 2);
        assert_eq!(q.get(a).map(|i| i.held), Some(2));
        assert_eq!(q.settle(a, now), None, "not answered, not due");
        let workers = q.answer(a, Answer::DenyOnce, &peer(), None, now).unwrap();
        assert_eq!(workers, vec![0, 1]);
        assert_eq!(
            q.answer(a, Answer::AllowOnce, &peer(), None, now),
            Err(NotPending::Unknown),
            "answered once only"
        );
        for _ in 0..2 {
            let settled = q.settle(a, now).unwrap();
            assert!(!settled.allow);
            assert_eq!(settled.asked.answer, Decided::DenyOnce);
            assert!(settled.why.unwrap().contains("pid 42"));
        }
        // A new connection to x.test after the answer asks again.
        let (d, _) = wait(q.ask(&record("x.test", 4), dst, 0, &settings(10), now));
        assert!(d > c);
        assert_eq!(q.status()["held_now"], 2);
    }

    #[test]
    fn no_answer_in_time_falls_back_and_the_bound_falls_back_at_once() {
        let q = questions();
        let now = Instant::now();
        let dst = DST.parse().unwrap();
        let (a, until) = wait(q.ask(&record("x.test", 1), dst, 0, &settings(2), now));
        wait(q.ask(&record("x.test", 2), dst, 0, &settings(2), now));
        match q.ask(&record("x.test", 3), dst, 0, &settings(2), now) {
            Hold::Settled(s) => {
                assert!(!s.allow);
                assert_eq!(s.asked.answer, Decided::OverBound);
            }
            other => panic!("held over the bound: {other:?}"),
        }
        let settled = q.settle(a, until).unwrap();
        assert_eq!(settled.asked.answer, Decided::TimedOut);
        assert!(
            q.pending().is_empty(),
            "a timed out question is not pending"
        );
        assert_eq!(
            q.answer(a, Answer::AllowOnce, &peer(), None, until),
            Err(NotPending::Unknown)
        );
        assert_eq!(q.settle(a, until).unwrap().asked.answer, Decided::TimedOut);
        let status = q.status();
        assert_eq!(
            (
                status["timed_out"].clone(),
                status["over_bound"].clone(),
                status["held_now"].clone()
            ),
            (json!(1), json!(1), json!(0))
        );
    }

    #[test]
    fn a_question_nobody_waits_on_goes_and_the_long_poll_sees_new_ones() {
        let q = std::sync::Arc::new(questions());
        let now = Instant::now();
        let dst = DST.parse().unwrap();
        let (a, _) = wait(q.ask(&record("x.test", 1), dst, 0, &settings(5), now));
        assert_eq!(q.next(0, Duration::ZERO).map(|i| i.id), Some(a));
        assert_eq!(q.next(a, Duration::from_millis(10)), None);
        q.release(a);
        assert!(q.get(a).is_none() && q.pending().is_empty());
        let poller = {
            let q = q.clone();
            std::thread::spawn(move || q.next(a, Duration::from_secs(5)).map(|i| i.host))
        };
        std::thread::sleep(Duration::from_millis(50));
        wait(q.ask(&record("y.test", 2), dst, 0, &settings(5), now));
        assert_eq!(poller.join().unwrap(), Some(Some("y.test".into())));
    }
}
