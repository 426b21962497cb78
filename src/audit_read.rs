// SPDX-License-Identifier: GPL-3.0-or-later
//! Reading audit files back: the records `suggest` and `log` consume.
//!
//! A file is read as a stream of lines (plain, or gzip as logrotate's `compress`
//! leaves it, told by its magic bytes rather than its name), each parsed on its own:
//! a bad line is an error naming `file:line` and why, and the lines after it are
//! still read. Records borrow from the line where they can, so reading costs no
//! allocation per record beyond the escaped strings.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::audit::{Event, Proto, Verdict};

/// What a consumer reads of one record. `ts`, `event`, `verdict` and `dst` are
/// written on every record the daemon writes, so a line without them is not one of
/// its records; the rest may be null. Unknown fields are ignored (newer daemons).
#[derive(Deserialize, Debug)]
pub struct LogRecord<'a> {
    #[serde(borrow)]
    pub ts: Cow<'a, str>,
    pub event: Event,
    pub verdict: Verdict,
    #[serde(borrow)]
    pub dst: Cow<'a, str>,
    #[serde(borrow, default)]
    pub agent: Option<Cow<'a, str>>,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(borrow, default)]
    pub exe: Option<Cow<'a, str>>,
    #[serde(default)]
    pub proto: Proto,
    #[serde(borrow, default)]
    pub host: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub resolved_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub rule: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub outbound: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub qtype: Option<Cow<'a, str>>,
    #[serde(default)]
    pub bytes_up: u64,
    #[serde(default)]
    pub bytes_down: u64,
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(borrow, default)]
    pub error: Option<Cow<'a, str>>,
    #[serde(default)]
    pub dropped: Option<u64>,
}

impl<'a> LogRecord<'a> {
    pub fn parse(line: &'a str) -> Result<LogRecord<'a>, String> {
        serde_json::from_str(line).map_err(|e| {
            // serde_json says "at line 1 column N" of the one-line document: the
            // column is what helps, the line is ours to give.
            let text = e.to_string();
            match text.rsplit_once(" at line 1 ") {
                Some((why, at)) => format!("{why} (at {at})"),
                None => text,
            }
        })
    }
}

/// A problem with one input: a file that cannot be read, or one of its lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError {
    pub file: String,
    /// 1-based; none for the file as a whole.
    pub line: Option<u64>,
    pub why: String,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file, self.why),
            None => write!(f, "{}: {}", self.file, self.why),
        }
    }
}

/// Opens an audit file for reading lines: `-` is standard input; a file that
/// starts with gzip's magic bytes is decompressed as it is read.
pub fn open(path: &Path) -> io::Result<Box<dyn BufRead>> {
    if path == Path::new("-") {
        return Ok(Box::new(BufReader::new(io::stdin())));
    }
    let mut reader = BufReader::with_capacity(1 << 16, File::open(path)?);
    if reader.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
        let gz = flate2::bufread::MultiGzDecoder::new(reader);
        return Ok(Box::new(BufReader::with_capacity(1 << 16, gz)));
    }
    Ok(Box::new(reader))
}

/// Calls `each` with every parsed record of `input` and `report` with every bad
/// line (named `name`:line); stops only at a read error, which it returns.
pub fn for_each_record<R: Read + ?Sized>(
    name: &str,
    input: &mut R,
    mut each: impl FnMut(&LogRecord<'_>),
    report: impl Fn(ReadError),
) -> Result<u64, ReadError> {
    let mut reader = BufReader::with_capacity(1 << 16, input);
    let mut buf = Vec::with_capacity(1024);
    let mut line = 0;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| ReadError {
            file: name.to_string(),
            line: Some(line + 1),
            why: e.to_string(),
        })?;
        if n == 0 {
            return Ok(line);
        }
        line += 1;
        match parse_line(name, line, &buf) {
            Ok(Some(record)) => each(&record),
            Ok(None) => {}
            Err(e) => report(e),
        }
    }
}

/// One line (its newline included or not) of file `name`: a record, none for a
/// blank line, or why it is not one.
pub fn parse_line<'a>(
    name: &str,
    line: u64,
    bytes: &'a [u8],
) -> Result<Option<LogRecord<'a>>, ReadError> {
    let error = |why: String| ReadError {
        file: name.to_string(),
        line: Some(line),
        why,
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|e| error(format!("not UTF-8 ({e})")))?
        .trim_end_matches(['\n', '\r']);
    if text.trim().is_empty() {
        return Ok(None);
    }
    LogRecord::parse(text).map(Some).map_err(|why| {
        if text.starts_with("{\"class_uid\":") {
            error("an OCSF event (audit.format \"ocsf\"): this reads only audit.format \"json\" records".into())
        } else {
            error(format!("not an audit record: {why}"))
        }
    })
}

/// What reading a set of files came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub records: u64,
    pub bad_lines: u64,
    pub bad_files: u64,
}

/// Bad lines printed before the rest are only counted.
const SHOWN_ERRORS: u64 = 50;

/// Reads every file in turn, giving `each` every record; bad lines and files that
/// cannot be read are said on standard error (the first [`SHOWN_ERRORS`]) and counted,
/// and the other files are read all the same.
pub fn read_files(files: &[PathBuf], mut each: impl FnMut(&LogRecord<'_>)) -> Totals {
    let reporter = Reporter::default();
    for path in files {
        let name = path.display().to_string();
        let result = open(path)
            .map_err(|e| ReadError {
                file: name.clone(),
                line: None,
                why: e.to_string(),
            })
            .and_then(|mut input| {
                for_each_record(
                    &name,
                    &mut input,
                    |r| {
                        reporter.count_record();
                        each(r);
                    },
                    |e| reporter.say(e),
                )
            });
        if let Err(e) = result {
            // The file as a whole is bad from there on (a truncated gzip member).
            let why = match e.line {
                Some(line) => format!("stopped at line {line}: {}", e.why),
                None => e.why,
            };
            reporter.say(ReadError {
                file: e.file,
                line: None,
                why,
            });
        }
    }
    reporter.finish()
}

/// Says bad lines and files on standard error (the first [`SHOWN_ERRORS`]) and
/// counts them, with the records read.
#[derive(Default)]
pub struct Reporter {
    totals: Cell<Totals>,
}

impl Reporter {
    pub fn count_record(&self) {
        let mut t = self.totals.get();
        t.records += 1;
        self.totals.set(t);
    }

    pub fn say(&self, e: ReadError) {
        let mut t = self.totals.get();
        if t.bad_lines + t.bad_files < SHOWN_ERRORS {
            eprintln!("agent-egress: {e}");
        }
        match e.line {
            Some(_) => t.bad_lines += 1,
            None => t.bad_files += 1,
        }
        self.totals.set(t);
    }

    /// The totals, after saying how many errors were not shown.
    pub fn finish(&self) -> Totals {
        let totals = self.totals.get();
        let hidden = (totals.bad_lines + totals.bad_files).saturating_sub(SHOWN_ERRORS);
        if hidden > 0 {
            eprintln!("agent-egress: {hidden} more bad line(s) or file(s) not shown");
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(input: &str) -> (Vec<String>, Vec<String>) {
        let (mut hosts, errors) = (Vec::new(), std::cell::RefCell::new(Vec::new()));
        let end = for_each_record(
            "a.jsonl",
            &mut input.as_bytes(),
            |r| hosts.push(r.host.as_deref().unwrap_or("-").to_string()),
            |e| errors.borrow_mut().push(e.to_string()),
        );
        assert_eq!(end, Ok(input.lines().count() as u64));
        (hosts, errors.into_inner())
    }

    #[test]
    fn bad_lines_are_named_and_skipped() {
        let good =
            r#"{"ts":"t","event":"end","verdict":"allow","dst":"192.0.2.1:443","host":"a.test"}"#;
        let input = format!(
            "{good}\nnot json\n\n{{\"ts\":\"t\",\"event\":\"end\",\"dst\":\"x\"}}\n{good}\n"
        );
        let (hosts, errors) = collect(&input);
        assert_eq!(hosts, ["a.test", "a.test"]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("a.jsonl:2: not an audit record: expected"),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("a.jsonl:4: not an audit record: missing field `verdict`"),
            "{errors:?}"
        );
    }

    #[test]
    fn escaped_strings_are_read() {
        let line =
            r#"{"ts":"t","event":"dns","verdict":"block","dst":"x","exe":"/tmp/a\"b","extra":1}"#;
        let record = LogRecord::parse(line).expect("a record");
        assert_eq!(record.exe.as_deref(), Some("/tmp/a\"b"));
        assert_eq!(record.event, Event::Dns);
    }
}
