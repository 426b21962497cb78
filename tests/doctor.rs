// SPDX-License-Identifier: GPL-3.0-or-later
//! `agent-egress doctor` against a daemon in a test world: all checks pass on
//! a healthy one, and it fails, naming the check, when the daemon is frozen
//! (the probe's connection is not answered) and when its table is gone.

mod harness;

use harness::daemon::{self, binary, Daemon};
use harness::World;
use serde_json::json;
use std::process::Output;
use std::time::{Duration, Instant};

fn doctor(world: &World, d: &Daemon) -> Output {
    world
        .host_cmd([binary(), "doctor", "--config"])
        .arg(&d.config)
        .output()
        .expect("run doctor")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The doctor fails, its report saying each of `lines`.
fn doctor_fails_saying(world: &World, d: &Daemon, lines: &[String]) {
    let out = doctor(world, d);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    for line in lines {
        assert!(
            report.contains(line.as_str()),
            "missing {line:?} in\n{report}"
        );
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

#[test]
fn doctor_passes_on_a_healthy_daemon_and_names_what_broke() {
    if !harness::require_root_and_tools(&["nft"]) {
        return;
    }
    let world = World::new();
    let d = Daemon::start(&world, daemon::config(&world, json!({})));
    let agent = world.agent().relative_path().to_string();

    let out = doctor(&world, &d);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    for line in [
        "ok    table inet agent_egress: installed".to_string(),
        "ok    policy routing: installed".to_string(),
        format!("ok    agent {agent} in the set: member"),
        format!("ok    connect log on {agent}"),
        format!(
            "ok    capture of TCP from {agent}: 192.0.2.254:80 answered by the proxy's refusal"
        ),
        format!("ok    drop of UDP from {agent}"),
        format!("ok    capture of DNS from {agent}: 192.0.2.254:53: answered NXDOMAIN"),
    ] {
        assert!(report.contains(&line), "missing {line:?} in\n{report}");
    }
    let json = world
        .host_cmd([binary(), "doctor", "--json", "--config"])
        .arg(&d.config)
        .output()
        .expect("doctor --json");
    let checks: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert!(
        checks
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["ok"] == true)),
        "{checks}"
    );

    // Frozen: the listener's backlog takes the connection, nobody answers it.
    let pid = d.guard.pid();
    signal(pid, libc::SIGSTOP);
    doctor_fails_saying(
        &world,
        &d,
        &[
            format!("FAIL  capture of TCP from {agent}"),
            // Its DNS handler is frozen too: nobody answers the probe's query.
            format!("FAIL  capture of DNS from {agent}"),
        ],
    );

    // And its table gone: said as such.
    let deleted = world
        .host_cmd(["nft", "delete", "table", "inet", "agent_egress"])
        .status()
        .expect("nft");
    assert!(deleted.success());
    doctor_fails_saying(
        &world,
        &d,
        &["FAIL  table inet agent_egress: missing".into()],
    );

    // And its policy routing gone (the rules that send marked packets to lo).
    for family in ["-4", "-6"] {
        let deleted = world
            .host_cmd([
                "ip", family, "rule", "del", "fwmark", "0xae1", "lookup", "2785",
            ])
            .status()
            .expect("ip rule");
        assert!(deleted.success());
    }
    doctor_fails_saying(&world, &d, &["FAIL  policy routing: missing".into()]);

    // Thawed, the daemon repairs its table and the doctor is content again.
    signal(pid, libc::SIGCONT);
    let started = Instant::now();
    while !d.table_installed(&world) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the table did not come back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = doctor(&world, &d);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Killed: its listener is gone, and said so.
    signal(pid, libc::SIGKILL);
    let started = Instant::now();
    let killed = loop {
        let out = doctor(&world, &d);
        let report = text(&out);
        if report.contains(&format!("FAIL  listener 127.0.0.1:{}", daemon::PORT)) {
            break (out, report);
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{report}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(killed.0.status.code(), Some(1), "{}", killed.1);
}

/// Audit mode lets refused connections through, but never one to a name that
/// cannot resolve: the doctor's probes still show the capture (learn runs the
/// daemon so, and the unit's ExecStartPost runs the doctor).
#[test]
fn doctor_passes_on_a_daemon_in_audit_mode() {
    if !harness::require_root_and_tools(&["nft"]) {
        return;
    }
    let world = World::new();
    let d = Daemon::start(&world, daemon::config(&world, json!({"mode": "audit"})));
    let out = doctor(&world, &d);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let probe = d.wait_record("the probe's record", |r| {
        r["event"] == "end" && r["host"] == "doctor.agent-egress.invalid"
    });
    assert_eq!(probe["verdict"], "block", "{probe}");
}
