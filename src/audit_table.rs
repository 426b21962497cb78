// SPDX-License-Identifier: GPL-3.0-or-later
//! Audit records as table rows a person reads: `log` prints files with it,
//! `watch` the live event stream.

use std::io::{self, BufWriter, Stdout, Write};

use crate::audit::{Event, Verdict};
use crate::audit_read::LogRecord;
use crate::suggest::nix_name;

#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Its cgroup path as records give it, or its Nix name.
    pub agent: Option<String>,
    /// Any of these; none: all.
    pub verdicts: Vec<Verdict>,
    /// Records stamped at or after this (an RFC 3339 prefix, as records write it).
    pub since: Option<String>,
}

impl Filter {
    pub fn keeps(&self, r: &LogRecord<'_>) -> bool {
        let agent_ok = self.agent.as_deref().is_none_or(|want| {
            r.agent
                .as_deref()
                .is_some_and(|a| a == want || nix_name(a) == want)
        });
        let since_ok = self.since.as_deref().is_none_or(|s| r.ts.as_ref() >= s);
        agent_ok && since_ok && (self.verdicts.is_empty() || self.verdicts.contains(&r.verdict))
    }
}

/// The rows, written through a buffer that is flushed when the input pauses.
pub struct Table {
    filter: Filter,
    out: BufWriter<Stdout>,
    /// Verdicts in colour (a terminal that wants it).
    colour: bool,
}

impl Table {
    pub fn new(filter: Filter, colour: bool) -> Table {
        Table {
            filter,
            out: BufWriter::new(io::stdout()),
            colour,
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn header(&mut self) -> io::Result<()> {
        self.line(
            [
                "TIME",
                "AGENT",
                "VERDICT",
                "PROTO",
                "DESTINATION",
                "RULE",
                "PROCESS",
                "UP",
                "DOWN",
                "MS",
            ],
            "ERROR",
        )
    }

    /// Fixed widths (wider values push the rest along), nothing after the last column.
    fn line(&mut self, c: [&str; 10], error: &str) -> io::Result<()> {
        let verdict = format!("{:<11}", c[2]);
        let verdict = match (self.colour, colour_of(c[2])) {
            (true, Some(code)) => format!("\x1b[{code}m{verdict}\x1b[0m"),
            _ => verdict,
        };
        let text = format!(
            "{:<24} {:<14} {verdict} {:<5} {:<36} {:<22} {:<24} {:>8} {:>8} {:>6}  {error}",
            c[0], c[1], c[3], c[4], c[5], c[6], c[7], c[8], c[9]
        );
        writeln!(self.out, "{}", text.trim_end())
    }

    pub fn row(&mut self, r: &LogRecord<'_>) -> io::Result<()> {
        if !self.filter.keeps(r) {
            return Ok(());
        }
        let agent = r.agent.as_deref().map_or_else(|| "-".to_string(), nix_name);
        let port = r.dst.rsplit_once(':').map_or("", |(_, p)| p);
        let destination = match (r.event, r.host.as_deref()) {
            (Event::Drops | Event::AuditDrops, _) => {
                format!("{} {} lost", r.dst, r.dropped.unwrap_or(0))
            }
            (Event::Dns, Some(host)) => format!("{host} {}", r.qtype.as_deref().unwrap_or("")),
            (_, Some(host)) => format!("{host}:{port}"),
            (_, None) => r.dst.to_string(),
        };
        let verdict = match r.event {
            Event::End | Event::Dns => r.verdict.as_str(),
            Event::Start => "start",
            Event::Drops => "drops",
            Event::AuditDrops => "audit_drops",
            Event::Policy => "policy",
            Event::QuestionAsked => "asked",
            Event::QuestionAnswered => "answered",
        };
        let process = match (r.exe.as_deref(), r.pid) {
            (Some(exe), Some(pid)) => format!("{}[{pid}]", exe.rsplit('/').next().unwrap_or(exe)),
            (Some(exe), None) => exe.rsplit('/').next().unwrap_or(exe).to_string(),
            (None, Some(pid)) => format!("[{pid}]"),
            (None, None) => "-".to_string(),
        };
        let error: String = r
            .error
            .as_deref()
            .unwrap_or("")
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        self.line(
            [
                &r.ts,
                &agent,
                verdict,
                r.proto.as_str(),
                &destination,
                r.rule.as_deref().unwrap_or("-"),
                &process,
                &r.bytes_up.to_string(),
                &r.bytes_down.to_string(),
                &r.duration_ms.to_string(),
            ],
            &error,
        )
    }
}

/// The ANSI colour of a verdict: green lets through, red refuses, yellow
/// would refuse (audit mode), magenta failed upstream; a question waiting
/// for an answer stands out (reverse video).
fn colour_of(verdict: &str) -> Option<u8> {
    match verdict {
        "asked" => Some(7),
        "allow" => Some(32),
        "block" => Some(31),
        "would_block" => Some(33),
        "error" => Some(35),
        _ => None,
    }
}
