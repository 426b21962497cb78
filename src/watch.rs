// SPDX-License-Identifier: GPL-3.0-or-later
//! `agent-egress watch`: the daemon's live event stream (every connection
//! decided and ended, DNS query, dropped packets, policy change) as a table
//! in a terminal, verdicts in colour, or as JSON lines with `--json`.

use crate::audit_read::{parse_line, LogRecord};
use crate::audit_table::{Filter, Table};
use crate::control::client::ControlClient;
use std::io::{self, BufRead, IsTerminal, Write};
use std::path::Path;

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
        follow_table(events, Table::new(filter, colour))
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

fn follow_table(events: impl BufRead, mut table: Table) -> io::Result<()> {
    table.header()?;
    table.flush()?;
    each_record(events, |record, _| {
        table.row(record)?;
        table.flush()
    })
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
