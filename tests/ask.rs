// SPDX-License-Identifier: GPL-3.0-or-later
//! The `ask` verdict through the real daemon in the test world: the agent's
//! curl is held until a supervisor answers over the control API (allow, deny,
//! merged, allow-always kept over a restart), falls back when nobody answers
//! in time or too many are held, and bad answers are refused by field.

mod harness;

use harness::control::{self, call, wait_until, SocketDir};
use harness::daemon::Daemon;
use harness::{World, ALLOWED, BLOCKED};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// blocked.test asks; `ask` settings as given.
fn config(world: &World, socket: &Path, ask: Value) -> Value {
    control::config_with(
        world,
        socket,
        json!({"name": "ask-blocked", "domains": ["blocked.test"], "outbound": "ask"}),
        json!({ "ask": ask }),
    )
}

/// The agent's curl to blocked.test, running.
fn curl(world: &World) -> Child {
    world
        .agent_cmd([
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "15",
            "--cacert",
        ])
        .arg(world.ca_cert())
        .args([
            "--resolve",
            &BLOCKED.resolve_v4(443),
            &format!("https://{}/", BLOCKED.name),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl")
}

/// Whether it succeeded, and its output.
fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().expect("curl ends");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The next question newer than `after`, waited for.
fn next_question(sock: &Path, after: u64) -> Value {
    let (status, body) = call(
        sock,
        "GET",
        &format!("/v1/questions/next?timeout_ms=8000&after={after}"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body["question"].is_object(), "no question came: {body}");
    body["question"].clone()
}

fn answer(sock: &Path, id: &Value, body: Value) -> (u16, Value) {
    call(
        sock,
        "POST",
        &format!("/v1/questions/{id}/answer"),
        Some(&body.to_string()),
    )
}

fn status(sock: &Path) -> Value {
    call(sock, "GET", "/v1/status", None).1["questions"].clone()
}

#[test]
fn an_asked_connection_waits_and_goes_as_answered_identical_ones_merge_and_bad_answers_name_the_field(
) {
    if !harness::require_root_and_tools(&["curl", "nft"]) {
        return;
    }
    let world = World::new();
    let dir = SocketDir::new(&world);
    let sock = dir.socket();
    let d = Daemon::start(&world, config(&world, &sock, json!({"timeout_ms": 8000})));

    // Allowed: the curl waits, nothing dialled, and completes once answered.
    let held = curl(&world);
    let q = next_question(&sock, 0);
    assert_eq!(
        (
            q["host"].clone(),
            q["port"].clone(),
            q["rule"].clone(),
            q["held"].clone()
        ),
        (
            json!("blocked.test"),
            json!(443),
            json!("ask-blocked"),
            json!(1)
        ),
        "{q}"
    );
    assert_eq!(q["agent"], world.agent().relative_path());
    assert_eq!(q["exe"], "/usr/bin/curl", "{q}");
    let asked = d.wait_event("question_asked", "the question", |r| {
        r["question"]["id"] == q["id"]
    });
    assert_eq!(asked["exe"], "/usr/bin/curl");
    let (listed_status, listed) = call(&sock, "GET", "/v1/questions", None);
    assert_eq!(listed_status, 200);
    assert_eq!(listed["questions"][0]["id"], q["id"]);

    // Bad answers, while it waits: each names its field, and changes nothing.
    for (body, code, field) in [
        (json!({"answer": "maybe"}), 422, "answer"),
        (json!({}), 422, "answer"),
        (
            json!({"answer": "allow-always", "scope": {"host": "everything"}}),
            422,
            "scope.host",
        ),
        (
            json!({"answer": "allow-always", "scope": {"agents": "some"}}),
            422,
            "scope.agents",
        ),
        (
            json!({"answer": "allow-always", "scope": {"port": 1}}),
            422,
            "scope.port",
        ),
        (
            json!({"answer": "allow-once", "scope": {"host": "exact"}}),
            422,
            "scope",
        ),
        (
            json!({"answer": "deny-always", "for_seconds": 0}),
            422,
            "for_seconds",
        ),
        (json!({"answer": "allow-once", "colour": 1}), 422, "colour"),
    ] {
        let (got, reply) = answer(&sock, &q["id"], body.clone());
        assert_eq!(
            (got, reply["field"].as_str()),
            (code, Some(field)),
            "{body}: {reply}"
        );
    }
    let (got, reply) = answer(&sock, &json!(999_999), json!({"answer": "allow-once"}));
    assert_eq!((got, reply["field"].clone()), (404, json!("id")), "{reply}");
    let (got, reply) = answer(&sock, &json!("x"), json!({"answer": "allow-once"}));
    assert_eq!((got, reply["field"].clone()), (400, json!("id")), "{reply}");
    let (got, reply) = call(&sock, "GET", "/v1/questions/next?timeout_ms=soon", None);
    assert_eq!((got, reply["field"].clone()), (422, json!("timeout_ms")));

    let posted = Instant::now();
    let (got, reply) = answer(&sock, &q["id"], json!({"answer": "allow-once"}));
    assert_eq!(got, 200, "{reply}");
    assert_eq!(finish(held), (true, BLOCKED.body()));
    eprintln!("answer POST to curl done: {:?}", posted.elapsed());
    let end = d.wait_record("the allowed connection", |r| {
        r["asked"]["question"] == q["id"]
    });
    assert_eq!(
        (
            end["verdict"].clone(),
            end["outbound"].clone(),
            end["asked"]["answer"].clone()
        ),
        (json!("allow"), json!("direct"), json!("allow-once")),
        "{end}"
    );
    assert_eq!(end["asked"]["by"]["pid"], std::process::id());
    assert!(end["asked"]["waited_ms"].as_u64().unwrap() > 0, "{end}");
    let (got, _) = answer(&sock, &q["id"], json!({"answer": "allow-once"}));
    assert_eq!(got, 404, "answered once only");

    // Denied: curl fails, the record says by whom.
    let held = curl(&world);
    let q2 = next_question(&sock, q["id"].as_u64().unwrap());
    let (got, reply) = answer(&sock, &q2["id"], json!({"answer": "deny-once"}));
    assert_eq!(got, 200, "{reply}");
    assert!(!finish(held).0, "a denied connection fails");
    let end = d.wait_record("the denied connection", |r| {
        r["asked"]["question"] == q2["id"]
    });
    assert_eq!(end["verdict"], "block");
    assert!(
        end["error"]
            .as_str()
            .is_some_and(|e| e.contains("denied by the supervisor")),
        "{end}"
    );
    d.wait_event("question_answered", "the denial", |r| {
        r["question"]["id"] == q2["id"] && r["question"]["answer"] == "deny-once"
    });

    // Five at once to the same host: one question, one answer releases all;
    // meanwhile the worker serves others.
    let many: Vec<Child> = (0..5).map(|_| curl(&world)).collect();
    let q3 = next_question(&sock, q2["id"].as_u64().unwrap());
    wait_until(
        "all five held on one question",
        Duration::from_secs(5),
        || {
            let (_, list) = call(&sock, "GET", "/v1/questions", None);
            list["questions"]
                .as_array()
                .is_some_and(|l| l.len() == 1 && l[0]["held"] == 5)
        },
    );
    let other = world.curl_agent([
        "--resolve",
        &ALLOWED.resolve_v4(443),
        &format!("https://{}/", ALLOWED.name),
    ]);
    assert!(other.status.success(), "others are served while five wait");
    let (got, reply) = answer(&sock, &q3["id"], json!({"answer": "allow-once"}));
    assert_eq!((got, reply["held"].clone()), (200, json!(5)), "{reply}");
    for child in many {
        assert_eq!(finish(child), (true, BLOCKED.body()));
    }
    let counts = status(&sock);
    assert_eq!(
        (
            counts["asked"].clone(),
            counts["answered"].clone(),
            counts["merged"].clone(),
            counts["held_now"].clone()
        ),
        (json!(3), json!(3), json!(4), json!(0)),
        "{counts}"
    );

    // Fail closed: a connection held when the daemon stops is closed, not let through.
    let held = curl(&world);
    let q4 = next_question(&sock, q3["id"].as_u64().unwrap());
    let records = d.audit.clone();
    let (stopped, _) = d.guard.stop(Duration::from_secs(10));
    assert!(stopped.success());
    assert!(!finish(held).0, "held at the stop: closed");
    let text = std::fs::read_to_string(records).unwrap();
    let end: Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["event"] == "end" && r["conn_id"] == q4["conn_id"])
        .expect("the held connection's record");
    assert_ne!(end["verdict"], "allow", "{end}");

    // Every record (asked, answered, held and decided) fits the schema.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/audit-record.schema.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let validator = jsonschema::draft202012::new(&schema).expect("a valid schema");
    let mut asked = 0;
    for line in text.lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&record)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{record}: {errors:?}");
        asked += usize::from(record["asked"].is_object());
    }
    assert!(asked >= 7, "{text}");
}

#[test]
fn no_answer_in_time_falls_back_and_over_the_bound_falls_back_at_once() {
    if !harness::require_root_and_tools(&["curl", "nft"]) {
        return;
    }
    let world = World::new();
    let dir = SocketDir::new(&world);
    let sock = dir.socket();
    let ask = json!({"timeout_ms": 1500, "fallback": "block", "max_held": 1});
    let d = Daemon::start(&world, config(&world, &sock, ask));

    let held = curl(&world);
    let q = next_question(&sock, 0);
    // The second would be the bound's second: refused at once.
    let started = Instant::now();
    assert!(!finish(curl(&world)).0);
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    let over = d.wait_record("the connection over the bound", |r| {
        r["asked"]["answer"] == "over-bound"
    });
    assert_eq!(over["verdict"], "block");

    assert!(!finish(held).0, "no answer: the fallback blocks");
    let end = d.wait_record("the timed out one", |r| r["asked"]["question"] == q["id"]);
    assert_eq!(
        (end["verdict"].clone(), end["asked"]["answer"].clone()),
        (json!("block"), json!("timed-out")),
        "{end}"
    );
    assert!(end["asked"]["waited_ms"].as_u64().unwrap() >= 1400, "{end}");
    let (got, _) = answer(&sock, &q["id"], json!({"answer": "allow-once"}));
    assert_eq!(got, 404, "an expired question is not answered");
    let counts = status(&sock);
    assert_eq!(
        (
            counts["timed_out"].clone(),
            counts["over_bound"].clone(),
            counts["held_now"].clone()
        ),
        (json!(1), json!(1), json!(0)),
        "{counts}"
    );
}

#[test]
fn allow_always_is_a_runtime_rule_in_force_at_once_and_after_a_restart() {
    if !harness::require_root_and_tools(&["curl", "nft"]) {
        return;
    }
    let world = World::new();
    let dir = SocketDir::new(&world);
    let sock = dir.socket();
    let config = config(&world, &sock, json!({"timeout_ms": 8000}));
    let first = Daemon::start(&world, config.clone());

    let held = curl(&world);
    let q = next_question(&sock, 0);
    let body = json!({"answer": "allow-always", "scope": {"host": "exact", "agents": "this"}, "for_seconds": 3600});
    let (got, reply) = answer(&sock, &q["id"], body);
    assert_eq!(got, 200, "{reply}");
    assert_eq!(reply["rule"]["domains"], json!(["=blocked.test"]));
    assert_eq!(
        reply["rule"]["agents"],
        json!([world.agent().relative_path()])
    );
    assert_eq!(finish(held), (true, BLOCKED.body()));
    let policy = first.wait_event("policy", "the rule the answer added", |r| {
        r["policy"]["action"] == "rule_added"
    });
    assert_eq!(policy["pid"], std::process::id());

    // The next connection finds the rule: no question.
    let quick = Instant::now();
    assert_eq!(finish(curl(&world)), (true, BLOCKED.body()));
    assert!(quick.elapsed() < Duration::from_secs(3));
    assert_eq!(status(&sock)["asked"], 1);

    let (stopped, _) = first.guard.stop(Duration::from_secs(10));
    assert!(stopped.success());
    let second = Daemon::start(&world, config);
    assert_eq!(finish(curl(&world)), (true, BLOCKED.body()));
    assert_eq!(status(&sock)["asked"], 0, "the state file's rule decided");
    // One decided by the rule before the restart, one after.
    let rule = format!("asked-{}", q["id"]);
    wait_until("both decided by the rule", Duration::from_secs(5), || {
        let by_rule = second.records().into_iter().filter(|r| {
            r["event"] == "end" && r["rule"] == rule.as_str() && r["verdict"] == "allow"
        });
        by_rule.count() == 2
    });
}
