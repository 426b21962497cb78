// SPDX-License-Identifier: GPL-3.0-or-later
//! `agent-egress log`: the table, its filters, rotated and gzip-compressed files
//! read oldest first, and `--follow` across a rename rotation and a truncation.

mod cli_run;

use cli_run::run;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

const FIXTURE: &str = "tests/fixtures/suggest/audit.jsonl";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ae-log-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn record(ts: &str, host: &str, verdict: &str) -> String {
    format!(
        r#"{{"ts":"{ts}","event":"end","agent":"agents.slice","pid":7,"exe":"/usr/bin/curl","dst":"192.0.2.1:443","proto":"tls","host":"{host}","rule":"default","outbound":"direct","verdict":"{verdict}","bytes_up":1,"bytes_down":2,"duration_ms":3,"error":null}}"#
    ) + "\n"
}

/// The DESTINATION column of each row (the header left out).
fn destinations(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
        .collect()
}

#[test]
fn table_of_a_recorded_file() {
    let (code, out, err) = run(&["log", FIXTURE]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("TIME                     AGENT          VERDICT"),
        "{out}"
    );
    assert_eq!(lines.len(), 1 + 25, "{out}");
    assert_eq!(
        lines[13],
        "2026-11-25T09:43:30.000Z openclaw       block       tls   evil.example:443                     \
         default                curl[2205]                    517        7     38  blocked by rule \"default\""
    );
    assert!(err.contains("audit.jsonl:18: not an audit record"), "{err}");
}

#[test]
fn filters_by_verdict_agent_and_time() {
    let (code, out, _) = run(&["log", "--verdict", "block", "--agent", "openclaw", FIXTURE]);
    assert_eq!(code, 0);
    assert_eq!(
        destinations(&out),
        ["evil.example:443", "c2vjcmv0.example.net"]
    );
    let (_, out, _) = run(&[
        "log",
        "--verdict",
        "would_block",
        "--agent",
        "agent.slice/agent-egress.slice/agent-egress-agents.slice/agent-egress-agents-research\\x2dbot.slice/research-bot.service",
        "--since",
        "2026-11-26T14:13",
        FIXTURE,
    ]);
    assert_eq!(
        destinations(&out),
        [
            "huggingface.co:443",
            "cdn-lfs.huggingface.co:443",
            "example.com:80",
            "example.com:8080"
        ]
    );
    let (code, _, err) = run(&["log", "--since", "last tuesday", FIXTURE]);
    assert_eq!(code, 2);
    assert!(err.contains("neither a UTC time"), "{err}");
}

#[test]
fn rotated_and_compressed_files_oldest_first() {
    let dir = temp_dir("rotated");
    let write = |name: &str, body: &[u8], age_s: u64| {
        let path = dir.join(name);
        std::fs::write(&path, body).expect("write");
        let file = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .expect("mtime");
        path
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(record("2026-11-23T10:00:00.000Z", "oldest.test", "allow").as_bytes())
        .expect("gzip");
    let files = [
        write(
            "audit.jsonl",
            record("2026-11-25T10:00:00.000Z", "live.test", "allow").as_bytes(),
            0,
        ),
        write(
            "audit.jsonl.1",
            record("2026-11-24T10:00:00.000Z", "older.test", "block").as_bytes(),
            86_400,
        ),
        write("audit.jsonl.2.gz", &gz.finish().expect("gzip"), 2 * 86_400),
    ];
    let mut args = vec!["log"];
    args.extend(files.iter().map(|p| p.to_str().expect("path")));
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        destinations(&out),
        ["oldest.test:443", "older.test:443", "live.test:443"]
    );

    let (code, _, err) = run(&["log", dir.join("gone.jsonl").to_str().expect("path")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("gone.jsonl: No such file or directory"),
        "{err}"
    );
}

fn append(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open");
    file.write_all(text.as_bytes()).expect("append");
}

#[test]
fn follow_goes_on_across_rotation_and_truncation() {
    let dir = temp_dir("follow");
    let live = dir.join("audit.jsonl");
    append(
        &live,
        &record("2026-11-25T10:00:00.000Z", "first.test", "allow"),
    );
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_agent-egress"))
            .args(["log", "--follow", "--verdict", "allow"])
            .arg(&live)
            .stdout(Stdio::piped())
            .spawn()
            .expect("log --follow"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no line for {what}"));
        assert!(line.contains(what), "expected {what}, got {line}");
    };
    next("TIME");
    next("first.test");
    append(
        &live,
        &record("2026-11-25T10:00:01.000Z", "appended.test", "allow"),
    );
    next("appended.test");
    // logrotate's rename: the daemon writes on to the old file until it reopens.
    let rotated = dir.join("audit.jsonl.1");
    std::fs::rename(&live, &rotated).expect("rename");
    append(
        &live,
        &record("2026-11-25T10:00:03.000Z", "new-file.test", "allow"),
    );
    append(
        &rotated,
        &record("2026-11-25T10:00:02.000Z", "late-in-old.test", "allow"),
    );
    append(
        &rotated,
        &record("2026-11-25T10:00:02.500Z", "refused.test", "block"),
    );
    next("late-in-old.test");
    next("new-file.test");
    // copytruncate: the same file, emptied.
    std::fs::write(&live, "").expect("truncate");
    std::thread::sleep(Duration::from_millis(500));
    append(
        &live,
        &record("2026-11-25T10:00:04.000Z", "after-truncate.test", "allow"),
    );
    next("after-truncate.test");
}

/// `log --follow` never ends by itself: ended when the test is, passed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
