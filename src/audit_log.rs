// SPDX-License-Identifier: GPL-3.0-or-later
//! `agent-egress log`: audit files as a table a person reads, filtered by agent,
//! verdict and time, and `--follow` to keep printing what the daemon appends, across
//! logrotate's rotation (the live file renamed and a new one made, or truncated in
//! place with `copytruncate`).

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::audit::{format_timestamp, Verdict};
use crate::audit_read::{self, parse_line, ReadError, Reporter};
pub use crate::audit_table::Filter;
use crate::audit_table::Table;

/// How often `--follow` looks for more lines, and for a rotation.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// How long a rotated file is still read (the daemon reopens within a second).
const ROTATION_GRACE: Duration = Duration::from_millis(1500);

/// A command-line filter that means nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterError {
    NotAVerdict,
    NotATime(String),
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FilterError::NotAVerdict => {
                write!(f, "expected allow, block, would_block, error or undecided")
            }
            FilterError::NotATime(s) => write!(
                f,
                "{s:?} is neither a UTC time like 2026-11-25T09:40 nor an age like 30m, 2h, 7d"
            ),
        }
    }
}

impl std::error::Error for FilterError {}

/// A verdict as records write it.
pub fn parse_verdict(s: &str) -> Result<Verdict, FilterError> {
    serde_json::from_value(serde_json::Value::from(s)).map_err(|_| FilterError::NotAVerdict)
}

/// `--since`: an RFC 3339 UTC time or its prefix (`2026-11-25`, `2026-11-25T09:40`),
/// or an age (`90s`, `30m`, `2h`, `7d`) before `now`.
pub fn parse_since(s: &str, now: SystemTime) -> Result<String, FilterError> {
    let unit = match s.chars().last() {
        Some('s') => Some(1),
        Some('m') => Some(60),
        Some('h') => Some(3600),
        Some('d') => Some(86_400),
        _ => None,
    };
    if let (Some(unit), Ok(n)) = (unit, s[..s.len() - 1].parse::<u64>()) {
        let age = Duration::from_secs(n.saturating_mul(unit));
        return Ok(format_timestamp(
            now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH),
        ));
    }
    const SHAPE: &str = "dddd-dd-ddTdd:dd:dd.ddd";
    let time = s.strip_suffix('Z').unwrap_or(s);
    let fits = time.len() >= 4
        && time.len() <= SHAPE.len()
        && time.chars().zip(SHAPE.chars()).all(|(c, want)| match want {
            'd' => c.is_ascii_digit(),
            _ => c == want,
        });
    if fits {
        Ok(time.to_string())
    } else {
        Err(FilterError::NotATime(s.to_string()))
    }
}

/// Files oldest first by modification time (logrotate keeps it on the rotated
/// and compressed ones), the order given where it ties or cannot be read.
fn oldest_first(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut timed: Vec<(Option<SystemTime>, &PathBuf)> = files
        .iter()
        .map(|f| (fs::metadata(f).and_then(|m| m.modified()).ok(), f))
        .collect();
    timed.sort_by_key(|(t, _)| *t);
    timed.into_iter().map(|(_, f)| f.clone()).collect()
}

/// Prints the files; with `follow`, then keeps printing what is appended to the
/// newest. Non-zero when no file could be read.
pub fn run(files: &[PathBuf], filter: Filter, follow: bool) -> i32 {
    let files = oldest_first(files);
    let mut table = Table::new(filter, false);
    let mut failed = None;
    let result = table.header().and_then(|()| {
        let (done, live) = match (follow, files.split_last()) {
            (true, Some((live, done))) => (done, Some(live)),
            _ => (files.as_slice(), None),
        };
        let mut write_error = None;
        let totals = audit_read::read_files(done, |r| {
            if write_error.is_none() {
                write_error = table.row(r).err();
            }
        });
        if let Some(e) = write_error {
            return Err(e);
        }
        if totals.bad_files == done.len() as u64 && !done.is_empty() && live.is_none() {
            failed = Some(1);
        }
        table.flush()?;
        match live {
            Some(live) => tail(live, &mut table),
            None => Ok(()),
        }
    });
    match result {
        // A reader that went away (`log | head`) is not an error.
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            eprintln!("agent-egress log: {e}");
            1
        }
        _ => failed.unwrap_or(0),
    }
}

/// The live file from its start, then what is appended, forever. When the path
/// names another file (rotated away) the old one is read for [`ROTATION_GRACE`] more; when
/// it shrinks (truncated in place) it is read again from its start.
fn tail(path: &Path, table: &mut Table) -> io::Result<()> {
    let name = path.display().to_string();
    let reporter = Reporter::default();
    let mut open: Option<(File, u64)> = None;
    let mut pending = Vec::new();
    let mut line = 0u64;
    let mut chunk = vec![0u8; 1 << 16];
    let mut rotated: Option<Instant> = None;
    loop {
        if open.is_none() {
            match File::open(path) {
                Ok(file) => {
                    let ino = file.metadata()?.ino();
                    open = Some((file, ino));
                    pending.clear();
                    line = 0;
                }
                // Between a rename and the daemon's new file: try again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    reporter.say(ReadError {
                        file: name.clone(),
                        line: None,
                        why: e.to_string(),
                    });
                    return Ok(());
                }
            }
        }
        let Some((file, ino)) = open.as_mut() else {
            std::thread::sleep(FOLLOW_POLL);
            continue;
        };
        let n = file.read(&mut chunk)?;
        if n > 0 {
            pending.extend_from_slice(&chunk[..n]);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                line += 1;
                match parse_line(&name, line, &pending[..=end]) {
                    Ok(Some(record)) => table.row(&record)?,
                    Ok(None) => {}
                    Err(e) => reporter.say(e),
                }
                pending.drain(..=end);
            }
            continue;
        }
        table.flush()?;
        match fs::metadata(path) {
            // The daemon writes on to the renamed file until it notices (within a
            // second): read it that much longer before taking the new one.
            Ok(now) if now.ino() != *ino => match rotated {
                Some(at) if at.elapsed() >= ROTATION_GRACE => {
                    open = None;
                    rotated = None;
                }
                Some(_) => std::thread::sleep(FOLLOW_POLL),
                None => rotated = Some(Instant::now()),
            },
            Ok(now) if now.len() < file.stream_position()? => {
                file.seek(SeekFrom::Start(0))?;
                pending.clear();
                line = 0;
            }
            _ => std::thread::sleep(FOLLOW_POLL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_and_ages() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_063_625);
        assert_eq!(parse_since("2026-11-25", now).as_deref(), Ok("2026-11-25"));
        assert_eq!(
            parse_since("2026-11-25T09:40:25.123Z", now).as_deref(),
            Ok("2026-11-25T09:40:25.123")
        );
        assert_eq!(
            parse_since("2h", now).as_deref(),
            Ok("2025-11-25T07:40:25.000Z")
        );
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("2026-11-25 09:40", now).is_err());
    }

    #[test]
    fn verdicts_as_records_write_them() {
        assert_eq!(parse_verdict("would_block"), Ok(Verdict::WouldBlock));
        assert!(parse_verdict("deny").is_err());
    }
}
