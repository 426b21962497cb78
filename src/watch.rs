// SPDX-License-Identifier: GPL-3.0-or-later
//! `agent-egress watch`: the daemon's live event stream (every connection
//! decided and ended, DNS query, dropped packets, policy change) as a table
//! in a terminal, verdicts in colour, or as JSON lines with `--json`.
//!
//! In a terminal, questions (the `ask` verdict) stand out, and a key answers
//! the newest pending one: `a` allow-once, `A` allow-always, `d` deny-once,
//! `D` deny-always (the always ones for the exact host and this agent).

use crate::ask::keys::{said, RawKeys};
use crate::ask::Answer;
use crate::audit_read::{parse_line, LogRecord};
use crate::audit_table::{Filter, Table};
use crate::control::client::ControlClient;
use serde_json::{json, Value};
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Prints until the daemon ends the stream (non-zero then) or the reader
/// goes away (zero).
pub fn run(socket: &Path, json: bool, filter: Filter) -> i32 {
    let events = match ControlClient::new(socket).events(None) {
        Ok(events) => events,
        Err(e) => {
            eprintln!("agent-egress watch: {e}");
            return 1;
        }
    };
    let result = if json {
        follow_json(events, &filter)
    } else {
        let colour = io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let pending = Pending::default();
        // Keys answer only where someone types them.
        let _keys = io::stdin()
            .is_terminal()
            .then(|| answer_by_keys(socket.to_path_buf(), pending.clone()))
            .flatten();
        follow_table(events, Table::new(filter, colour), &pending)
    };
    match result {
        Ok(()) => {
            eprintln!(
                "agent-egress watch: the daemon ended the event stream (it stopped, or this watcher fell behind by a whole queue)"
            );
            1
        }
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("agent-egress watch: {e}");
            1
        }
    }
}

/// The questions asked and not answered yet, oldest first.
#[derive(Clone, Default)]
struct Pending(Arc<Mutex<Vec<u64>>>);

impl Pending {
    fn note(&self, line: &[u8]) {
        let Ok(record) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        let Some(id) = record["question"]["id"].as_u64() else {
            return;
        };
        let mut ids = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match record["event"].as_str() {
            Some("question_asked") => ids.push(id),
            Some("question_answered") => ids.retain(|i| *i != id),
            _ => {}
        }
    }

    fn newest(&self) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .copied()
    }
}

fn follow_table(events: impl BufRead, mut table: Table, pending: &Pending) -> io::Result<()> {
    table.header()?;
    table.flush()?;
    each_record(events, |record, line| {
        pending.note(line);
        table.row(record)?;
        table.flush()
    })
}

/// A thread answering the newest pending question by key; the terminal is
/// restored when the returned guard goes.
fn answer_by_keys(socket: PathBuf, pending: Pending) -> Option<RawKeys> {
    let keys = RawKeys::start(libc::STDIN_FILENO)?;
    let spawned = std::thread::Builder::new()
        .name("keys".into())
        .spawn(move || {
            let client = ControlClient::new(&socket);
            for byte in io::stdin().lock().bytes() {
                let Ok(byte) = byte else { return };
                let Some(answer) = Answer::from_key(byte) else {
                    continue;
                };
                let Some(id) = pending.newest() else {
                    eprintln!("agent-egress watch: no question is pending");
                    continue;
                };
                let body = json!({"answer": answer.name()});
                let path = format!("/v1/questions/{id}/answer");
                match client.call("POST", &path, Some(&body)) {
                    Ok((status, reply)) => {
                        eprintln!("agent-egress watch: {}", said(id, answer, status, &reply))
                    }
                    Err(e) => eprintln!("agent-egress watch: question {id}: {e}"),
                }
            }
        });
    spawned.is_ok().then_some(keys)
}

fn follow_json(events: impl BufRead, filter: &Filter) -> io::Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    each_record(events, |record, line| {
        if filter.keeps(record) {
            out.write_all(line)?;
            out.flush()?;
        }
        Ok(())
    })
}

/// Each record the stream sends, with its line, until the stream ends. A
/// line that does not read as a record is skipped: the stream goes on.
fn each_record(
    mut events: impl BufRead,
    mut show: impl FnMut(&LogRecord<'_>, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        if events.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        number += 1;
        if let Ok(Some(record)) = parse_line("events", number, &line) {
            show(&record, &line)?;
        }
    }
}
