// SPDX-License-Identifier: GPL-3.0-or-later
//! `exec --ask`: questions asked and answered on exec's own terminal.
//!
//! CMD has standard input and output; exec opens /dev/tty, its controlling
//! terminal, and asks there: each question, oldest first, is one line (the
//! process, the host and port, the rule, the keys), and a key answers it as
//! in `watch` ([`Answer::from_key`]). The terminal is in single keys only
//! while a question waits, and as CMD left it otherwise. A question merged
//! with others is one line and one answer; one that times out (or loses its
//! connections) while shown is said to have.
//!
//! The answer goes through the control API's own [`answer_for`], in this
//! process, as exec itself (its uid and pid, as SO_PEERCRED would name a
//! client): the same records as a daemon's answer, and an always answer a
//! runtime rule kept for the rest of this run (in memory: exec keeps no state
//! between runs).

use super::keys::{said, RawKeys};
use super::questions::{QuestionInfo, Questions};
use super::Answer;
use crate::audit::AuditLog;
use crate::config::AskFallback;
use crate::control::questions::{answer_for, with_processes};
use crate::control::socket::Peer;
use crate::control::state::{now_ms, LoadedConfig, PolicyState};
use crate::proxy::ProxyHandle;
use serde_json::{json, Value};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a wait looks whether the question is still pending and exec
/// still running.
const SLICE: Duration = Duration::from_millis(100);

/// This process's controlling terminal, for reading and writing; it fails
/// (ENXIO) when there is none.
pub fn open() -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/tty")
}

/// The thread asking on the terminal.
pub struct Prompter {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// What the prompt answers with, and where it asks.
struct Seat {
    tty: File,
    policy: Arc<PolicyState>,
    proxy: ProxyHandle,
    audit: AuditLog,
    by: Peer,
}

impl Prompter {
    /// Ask on `tty` for `proxy`'s questions; `loaded` is the policy it runs
    /// (an always answer adds its runtime rule to it).
    pub fn start(
        tty: File,
        loaded: LoadedConfig,
        proxy: &ProxyHandle,
        audit: &AuditLog,
    ) -> io::Result<Prompter> {
        let seat = Seat {
            tty,
            policy: PolicyState::in_memory(loaded, proxy.clone(), audit.clone()),
            proxy: proxy.clone(),
            audit: audit.clone(),
            by: Peer::this_process(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ask-tty".into())
            .spawn(move || seat.serve(&stopping))?;
        Ok(Prompter { stop, thread })
    }

    /// Stop asking (within a slice), the terminal as it was.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        if self.thread.join().is_err() {
            log::error!("the terminal's question thread panicked");
        }
    }
}

/// How a wait for a key ended.
enum Waited {
    Key(Answer),
    /// The question is no longer pending: it timed out, or no connection
    /// waits on it any more.
    Gone,
    /// The terminal hung up, or cannot be read.
    Lost(io::Error),
    Stopped,
}

impl Seat {
    fn serve(self, stop: &AtomicBool) {
        let questions = &self.proxy.shared().questions;
        let mut after = 0;
        while !stop.load(Ordering::SeqCst) {
            let Some(question) = questions.next(after, SLICE) else {
                continue;
            };
            after = question.id;
            let Some(question) = with_processes(&self.audit, vec![question]).pop() else {
                continue;
            };
            let waited = {
                // Single keys from before the line is shown, so that a key
                // pressed on seeing it is taken, not echoed.
                let _keys = RawKeys::start(self.tty.as_raw_fd());
                self.say(&prompt(&question));
                self.wait_for_key(questions, question.id, stop)
            };
            let line = match waited {
                Waited::Key(answer) => {
                    let body = json!({"answer": answer.name()});
                    let reply = answer_for(&self.policy, &self.proxy, question.id, &body, &self.by);
                    said(
                        question.id,
                        answer,
                        reply.status(),
                        reply.body().unwrap_or(&Value::Null),
                    )
                }
                Waited::Gone => gone(&question, now_ms()),
                Waited::Lost(e) => {
                    eprintln!(
                        "agent-egress exec: the terminal cannot be read ({e}): no more questions \
                         are asked there, and each falls back when it times out"
                    );
                    return;
                }
                Waited::Stopped => return,
            };
            self.say(&line);
        }
    }

    fn say(&self, line: &str) {
        // A terminal that cannot be written to shows as one that cannot be read.
        let _ = writeln!(&self.tty, "agent-egress exec: {line}");
    }

    /// A key that answers, while question `id` is pending.
    fn wait_for_key(&self, questions: &Questions, id: u64, stop: &AtomicBool) -> Waited {
        let mut keys = [0u8; 16];
        loop {
            if stop.load(Ordering::SeqCst) {
                return Waited::Stopped;
            }
            if questions.get(id).is_none() {
                return Waited::Gone;
            }
            let mut ready = libc::pollfd {
                fd: self.tty.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, for as long as the call.
            let n = unsafe { libc::poll(&mut ready, 1, SLICE.as_millis() as libc::c_int) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Waited::Lost(e);
            }
            if n == 0 {
                continue;
            }
            match (&self.tty).read(&mut keys) {
                Ok(0) => return Waited::Lost(io::ErrorKind::UnexpectedEof.into()),
                Ok(read) => {
                    if let Some(answer) = keys[..read].iter().find_map(|k| Answer::from_key(*k)) {
                        return Waited::Key(answer);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Waited::Lost(e),
            }
        }
    }
}

/// The question's line: who asks for what, by which rule, the keys, and
/// what comes without an answer.
fn prompt(q: &QuestionInfo) -> String {
    let who = match (&q.exe, q.pid) {
        (Some(exe), Some(pid)) => format!("{exe} (pid {pid})"),
        (None, Some(pid)) => format!("pid {pid}"),
        (Some(exe), None) => exe.clone(),
        (None, None) => "a process not found".into(),
    };
    let to = match (&q.host, q.ip.parse::<IpAddr>()) {
        (Some(host), _) => format!("{host}:{}", q.port),
        (None, Ok(ip)) => SocketAddr::new(ip, q.port).to_string(),
        (None, Err(_)) => format!("{}:{}", q.ip, q.port),
    };
    format!(
        "question {}: {who} connects to {to} (rule {}): {}? (no answer in {}: {})",
        q.id,
        q.rule,
        Answer::KEYS,
        duration(q.expires_at.saturating_sub(q.asked_at)),
        fallback(q.fallback),
    )
}

/// What became of a question that went while shown, at `now_ms`.
fn gone(q: &QuestionInfo, now_ms: u64) -> String {
    if now_ms >= q.expires_at {
        format!(
            "question {}: timed out: {} (ask.fallback)",
            q.id,
            fallback(q.fallback)
        )
    } else {
        format!("question {}: no connection waits on it any more", q.id)
    }
}

fn fallback(to: AskFallback) -> &'static str {
    match to {
        AskFallback::Allow => "allow",
        AskFallback::Block => "block",
    }
}

fn duration(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn question() -> QuestionInfo {
        QuestionInfo::example()
    }

    #[test]
    fn a_question_is_one_line_with_its_process_host_port_rule_and_keys() {
        assert_eq!(
            prompt(&question()),
            "question 3: /usr/bin/curl (pid 1234) connects to blocked.test:443 (rule default): \
             a allow-once, A allow-always, d deny-once, D deny-always? (no answer in 60 s: block)"
        );
        let unnamed = QuestionInfo {
            host: None,
            ip: "2001:db8::1".into(),
            pid: None,
            exe: None,
            expires_at: 2_500,
            fallback: AskFallback::Allow,
            ..question()
        };
        let line = prompt(&unnamed);
        assert!(
            line.starts_with("question 3: a process not found connects to [2001:db8::1]:443 "),
            "{line}"
        );
        assert!(line.ends_with("(no answer in 1500 ms: allow)"), "{line}");
    }

    #[test]
    fn a_question_gone_while_shown_says_whether_it_timed_out() {
        let q = question();
        assert_eq!(
            gone(&q, 61_000),
            "question 3: timed out: block (ask.fallback)"
        );
        assert_eq!(
            gone(&q, 30_000),
            "question 3: no connection waits on it any more"
        );
    }
}
