// SPDX-License-Identifier: GPL-3.0-or-later
//! `agent-egress watch` through the real daemon in the test world: in a
//! terminal (tmux) the live events are a table with verdicts in colour; with
//! `--json` they are the records as the daemon sends them.

mod harness;

use harness::control::{config, curl_status, wait_until, SocketDir};
use harness::daemon::{self, Daemon};
use harness::{Tmux, World, ALLOWED, BLOCKED};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::Duration;

#[test]
fn watch_shows_the_live_events_as_a_coloured_table_and_as_json() {
    if !harness::require_root_and_tools(&["curl", "nft", "tmux"]) {
        return;
    }
    let world = World::new();
    let dir = SocketDir::new(&world);
    let sock = dir.socket();
    let _daemon = Daemon::start(&world, config(&world, &sock));

    let tmux = Tmux::start(
        format!("ae-watch-{}", world.id()),
        &format!("{} watch --socket {}", daemon::binary(), sock.display()),
    );
    wait_until("the table's header", Duration::from_secs(10), || {
        tmux.screen().contains("VERDICT")
    });
    assert!(curl_status(&world, &ALLOWED).0);
    assert!(!curl_status(&world, &BLOCKED).0);
    wait_until(
        "end rows for both connections",
        Duration::from_secs(10),
        || {
            let screen = tmux.screen();
            let ended = |host: &str| {
                screen
                    .lines()
                    .any(|l| l.contains(host) && !l.contains(" start "))
            };
            ended("allowed.test:443") && ended("blocked.test:443")
        },
    );
    let screen = tmux.screen();
    let row = |host: &str| {
        screen
            .lines()
            // The end record's row, not the start record's.
            .find(|l| l.contains(host) && !l.contains(" start "))
            .unwrap_or_else(|| panic!("no decided row for {host}:\n{screen}"))
            .to_string()
    };
    // Green for what passed, red for what was refused; the process named.
    let allowed = row("allowed.test:443");
    assert!(allowed.contains("\x1b[32mallow"), "{allowed:?}");
    assert!(allowed.contains("curl["), "{allowed:?}");
    let blocked = row("blocked.test:443");
    assert!(blocked.contains("\x1b[31mblock"), "{blocked:?}");

    // --json: the daemon's records, one a line, filtered by verdict.
    let mut json = Command::new(daemon::binary())
        .args(["watch", "--json", "--verdict", "block", "--socket"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .expect("watch --json");
    let stdout = json.stdout.take().unwrap();
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // Connected once the daemon counts the watcher: then the curls below are seen.
    wait_until("the json watcher", Duration::from_secs(10), || {
        let (_, status) = harness::control::call(&sock, "GET", "/v1/status", None);
        status["events"]["watchers"].as_u64() == Some(2)
    });
    assert!(curl_status(&world, &ALLOWED).0);
    assert!(!curl_status(&world, &BLOCKED).0);
    let line = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("a record from watch --json");
    let record: Value = serde_json::from_str(&line).expect("a JSON record");
    assert_eq!(record["verdict"], "block", "{record}");
    assert_eq!(record["host"], "blocked.test", "{record}");
    let _ = json.kill();
    let _ = json.wait();
}

#[test]
fn watch_without_a_daemon_says_what_it_cannot_reach() {
    let out = Command::new(daemon::binary())
        .args(["watch", "--socket", "/nonexistent/agent-egress.sock"])
        .output()
        .expect("watch");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/agent-egress.sock"),
        "{stderr}"
    );
}

#[test]
fn watch_highlights_a_question_and_answers_it_by_key() {
    if !harness::require_root_and_tools(&["curl", "nft", "tmux"]) {
        return;
    }
    let world = World::new();
    let dir = SocketDir::new(&world);
    let sock = dir.socket();
    let mut settings = config(&world, &sock);
    settings["rules"] = serde_json::json!([{"name": "ask-blocked", "domains": ["blocked.test"], "outbound": "ask"}]);
    settings["ask"] = serde_json::json!({"timeout_ms": 8000});
    let _daemon = Daemon::start(&world, settings);
    let tmux = Tmux::start(
        format!("ae-watch-ask-{}", world.id()),
        &format!("{} watch --socket {}", daemon::binary(), sock.display()),
    );
    wait_until("the table's header", Duration::from_secs(10), || {
        tmux.screen().contains("VERDICT")
    });
    std::thread::scope(|s| {
        let curl = s.spawn(|| curl_status(&world, &BLOCKED));
        wait_until("the question, highlighted", Duration::from_secs(5), || {
            tmux.screen().contains("\x1b[7masked")
        });
        tmux.send_keys("a");
        assert_eq!(curl.join().unwrap(), (true, BLOCKED.body()));
    });
    wait_until("the answer said", Duration::from_secs(5), || {
        tmux.screen().contains(": allow-once")
    });
}
