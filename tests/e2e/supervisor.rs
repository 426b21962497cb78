// SPDX-License-Identifier: GPL-3.0-or-later
//! The supervisor's seat on NixOS (control.supervisors) for real: the very
//! script of nix/example-configuration.nix's supervisor, run as its unit runs
//! it (bash -e, the socket in AGENT_EGRESS_CONTROL), answering the questions
//! of an ask rule while the agent's curl waits.

use crate::harness::control::{self, SocketDir};
use crate::harness::daemon::Daemon;
use crate::harness::{World, OTHER, SUPERVISED_NAMES};
use serde_json::{json, Value};
use std::process::Command;

/// The example configuration's `control.supervisors.by-host.script`, as Nix
/// makes it of the indented string (common indentation removed; the script
/// holds none of the string's escapes).
fn example_supervisor_script() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/nix/example-configuration.nix");
    let nix = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let supervisor = &nix[nix
        .find("control.supervisors.by-host")
        .expect("the example's supervisor")..];
    let body = &supervisor[supervisor.find("script = ''\n").expect("its script") + 12..];
    let body = &body[..body.find("'';").expect("the script's end")];
    assert!(
        !body.contains("''") && !body.contains("${"),
        "the script uses Nix string escapes this reader does not undo"
    );
    let indent = body
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.lines()
        .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
        .collect()
}

fn fetch(world: &World, host: &str, path: &str) -> (bool, String) {
    let out = world.curl_agent([
        "--resolve",
        &format!("{host}:80:{}", OTHER.v4),
        &format!("http://{host}{path}"),
    ]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

pub fn supervisor_answers_questions() {
    let world = World::new();
    let dir = SocketDir::new(&world);
    let socket = dir.socket();
    let config = control::config_with(
        &world,
        &socket,
        json!({"name": "ask-supervisor", "domains": SUPERVISED_NAMES, "outbound": "ask"}),
        json!({"ask": {"timeout_ms": 15000}}),
    );
    let d = Daemon::start(&world, config);
    let mut supervisor = Command::new("bash");
    supervisor
        .args(["-e", "-c", &example_supervisor_script()])
        .env("AGENT_EGRESS_CONTROL", &socket);
    let supervisor = world.spawn("supervisor", supervisor);

    // pypi.org: allowed for good, by a runtime rule the answer adds.
    let [allowed, refused] = SUPERVISED_NAMES;
    let (ok, body) = fetch(&world, allowed, "/supervised/pypi");
    assert!(
        ok && body == OTHER.body(),
        "pypi.org: {body:?}\n{}",
        supervisor.log()
    );
    let asked = d.wait_record("pypi.org, asked", |r| {
        r["http_host"] == allowed && r["event"] == "end" && r["asked"].is_object()
    });
    assert_eq!(
        (&asked["verdict"], &asked["rule"], &asked["asked"]["answer"]),
        (
            &json!("allow"),
            &json!("ask-supervisor"),
            &json!("allow-always")
        ),
        "{asked}"
    );
    let by = &asked["asked"]["by"];
    assert!(
        by["exe"].as_str().is_some_and(|e| e.ends_with("/curl")),
        "answered by the supervisor's curl: {asked}"
    );
    let policy = d.wait_event("policy", "the rule the answer added", |r| {
        r["policy"]["action"] == "rule_added"
    });
    assert_eq!(policy["uid"], by["uid"], "{policy}");
    let rule = format!("asked-{}", asked["asked"]["question"]);
    let (ok, body) = fetch(&world, allowed, "/supervised/again");
    assert!(ok && body == OTHER.body(), "pypi.org again: {body:?}");
    let again = d.wait_record("pypi.org again", |r| {
        r["http_host"] == allowed && r["event"] == "end" && r["rule"] == json!(rule)
    });
    assert_eq!(
        again["asked"],
        Value::Null,
        "no question the second time: {again}"
    );

    // paste.test: refused this once; the server never sees it.
    let (ok, body) = fetch(&world, refused, "/supervised/paste");
    assert!(
        !ok || !body.contains("hello"),
        "paste.test went through: {body:?}"
    );
    let refused = d.wait_record("paste.test, refused", |r| {
        r["http_host"] == refused && r["event"] == "end"
    });
    assert_eq!(
        (&refused["verdict"], &refused["asked"]["answer"]),
        (&json!("block"), &json!("deny-once")),
        "{refused}"
    );
    assert!(
        !world.access_log().contains("/supervised/paste"),
        "paste.test's request reached the server"
    );
}
