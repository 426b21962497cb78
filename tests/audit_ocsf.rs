// SPDX-License-Identifier: GPL-3.0-or-later
//! `audit.format: "ocsf"`: docs/ocsf-network-activity.schema.json (OCSF 1.3.0's
//! required attributes and types for the classes used) against the events a
//! real daemon writes in a test world, the mapping of what matters to a SIEM
//! (class, activity, disposition, endpoints, the process and its parents), the
//! writer's own events, and `suggest` refusing such a file by name.

mod cli_run;
mod harness;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_egress::audit::{Event, PolicyAction, PolicyChange, Proto, Record, Verdict};
use agent_egress::audit_ocsf::encode_ocsf_line;
use agent_egress::procinfo::Ancestor;
use harness::daemon::{self, Daemon};
use harness::World;
use serde_json::{json, Value};

fn validator() -> jsonschema::Validator {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/ocsf-network-activity.schema.json"
    );
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("schema")).expect("JSON");
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("a valid schema")
}

/// Valid against the schema, and what the schema cannot say: type_uid is
/// class_uid * 100 + activity_id.
fn assert_valid(validator: &jsonschema::Validator, event: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{event}\ndoes not fit: {errors:#?}");
    let class = event["class_uid"].as_u64().expect("class_uid");
    let activity = event["activity_id"].as_u64().expect("activity_id");
    assert_eq!(event["type_uid"], class * 100 + activity, "{event}");
}

fn ocsf(record: &Record) -> Value {
    let mut line = Vec::new();
    encode_ocsf_line(record, &mut line).expect("encode");
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    serde_json::from_slice(&line).expect("JSON")
}

#[test]
fn the_writers_own_events_fit_and_misfits_are_refused() {
    let validator = validator();
    let ts = "2026-11-25T09:40:25.123Z".to_string();
    let lost = ocsf(&Record {
        ts: ts.clone(),
        event: Event::AuditDrops,
        dropped: Some(3),
        ..Record::default()
    });
    assert_valid(&validator, &lost);
    assert_eq!(lost["class_uid"], 0);
    assert_eq!(lost["unmapped"]["dropped"], 3);
    assert_eq!(lost["time"], 1_795_599_625_123_u64);
    let policy = ocsf(&Record {
        ts: ts.clone(),
        event: Event::Policy,
        pid: Some(7),
        uid: Some(1000),
        exe: Some("/usr/bin/agent-egress".into()),
        policy: Some(PolicyChange {
            action: PolicyAction::RuleAdded,
            rule: Some(json!({"domains": ["a.test"]})),
            config_hash: "ab".into(),
            runtime_rules: 1,
        }),
        ..Record::default()
    });
    assert_valid(&validator, &policy);
    assert_eq!(policy["message"], "policy rule_added");
    assert_eq!(policy["actor"]["user"]["uid"], "1000");
    assert_eq!(policy["unmapped"]["policy"]["runtime_rules"], 1);

    // A connection with parents and a pinned hash, and a query with a code
    // OCSF names otherwise.
    let connection = ocsf(&Record {
        ts: ts.clone(),
        event: Event::End,
        conn_id: Some(9),
        pid: Some(300),
        uid: Some(0),
        exe: Some("/usr/bin/curl".into()),
        cmdline: Some(vec!["curl".into(), "https://a.test/".into()]),
        exe_sha256: Some("00ff".into()),
        ancestry: Some(vec![
            Ancestor {
                pid: 200,
                exe: Some("/usr/bin/bash".into()),
                cmdline: Some(vec!["sh".into(), "-c".into()]),
                cmdline_truncated: false,
            },
            Ancestor {
                pid: 100,
                exe: Some("/usr/bin/node".into()),
                cmdline: None,
                cmdline_truncated: false,
            },
        ]),
        src: "[2001:db8::2]:40000".into(),
        dst: "[2001:db8::10]:443".into(),
        proto: Proto::Tls,
        host: Some("a.test".into()),
        verdict: Verdict::WouldBlock,
        outbound: "direct".into(),
        ..Record::default()
    });
    assert_valid(&validator, &connection);
    let process = &connection["actor"]["process"];
    assert_eq!(process["file"]["hashes"][0]["value"], "00ff");
    assert_eq!(process["cmd_line"], "curl https://a.test/");
    assert_eq!(process["parent_process"]["pid"], 200);
    assert_eq!(process["parent_process"]["cmd_line"], "sh -c");
    assert_eq!(process["parent_process"]["parent_process"]["pid"], 100);
    assert_eq!(
        process["lineage"],
        json!(["/usr/bin/node", "/usr/bin/bash", "/usr/bin/curl"])
    );
    assert_eq!(connection["disposition_id"], 15, "would_block: Detected");
    assert_eq!(connection["connection_info"]["protocol_ver_id"], 6);
    let query = ocsf(&Record {
        ts,
        event: Event::Dns,
        src: "10.0.0.2:5353".into(),
        dst: "10.0.0.1:53".into(),
        proto: Proto::Dns,
        host: Some("a.test".into()),
        qtype: Some("A".into()),
        rcode: Some("RCODE9".into()),
        verdict: Verdict::Allow,
        ..Record::default()
    });
    assert_valid(&validator, &query);
    let undated = ocsf(&Record {
        ts: "yesterday".into(),
        event: Event::AuditDrops,
        dropped: Some(1),
        ..Record::default()
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let time = undated["time"].as_u64().expect("time");
    assert!(
        now - time < 60_000,
        "a record without our ts is dated now, not {time}"
    );
    assert_eq!(
        (&query["rcode_id"], &query["rcode"]),
        (&json!(9), &json!("NotAuth"))
    );

    let mut bad = connection.clone();
    bad["metadata"]["product"]
        .as_object_mut()
        .expect("product")
        .remove("vendor_name");
    assert!(!validator.is_valid(&bad), "a product without vendor_name");
    let mut bad = connection.clone();
    bad["connection_info"]
        .as_object_mut()
        .expect("connection_info")
        .remove("direction_id");
    assert!(
        !validator.is_valid(&bad),
        "connection_info without direction_id"
    );
    let mut bad = connection.clone();
    bad["dst_endpont"] = bad["dst_endpoint"].take();
    assert!(!validator.is_valid(&bad), "a misspelt attribute");
    let mut bad = connection;
    bad["dst_endpoint"]["ip"] = json!("not an address");
    assert!(!validator.is_valid(&bad), "an endpoint's ip that is none");
}

fn wait_for(d: &Daemon, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        if let Some(event) = d.records().into_iter().find(&matches) {
            return event;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no OCSF event for {what}; events:\n{:#?}",
            d.records()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn code(event: &Value) -> &str {
    event["metadata"]["event_code"].as_str().unwrap_or("")
}

#[test]
fn events_of_a_real_daemon_fit() {
    if !harness::require_root_and_tools(&["curl", "bash"]) {
        return;
    }
    let world = World::new();
    let path = world.dir().join("audit.ocsf.jsonl");
    let d = Daemon::start(
        &world,
        daemon::config(
            &world,
            json!({"audit": {"path": path, "start_events": true, "format": "ocsf"}}),
        ),
    );
    let _ = world.curl_agent(["https://allowed.test/"]);
    let _ = world.curl_agent(["https://blocked.test/"]);
    let _ = world.curl_agent([
        "--resolve",
        "blocked.test:443:198.51.100.20",
        "https://blocked.test/",
    ]);
    let _ = world
        .agent_cmd(["bash", "-c", "echo quic > /dev/udp/198.51.100.10/443"])
        .output();
    let allowed = wait_for(&d, "allowed.test", |e| {
        code(e) == "end" && e["dst_endpoint"]["hostname"] == "allowed.test"
    });
    let refused = wait_for(&d, "blocked.test by SNI", |e| {
        code(e) == "end" && e["dst_endpoint"]["hostname"] == "blocked.test"
    });
    let query = wait_for(&d, "blocked.test refused at DNS", |e| {
        e["class_uid"] == 4003 && e["query"]["hostname"] == "blocked.test"
    });
    let drops = wait_for(&d, "the dropped UDP", |e| code(e) == "drops");
    wait_for(&d, "a start event", |e| code(e) == "start");

    let validator = validator();
    let events = d.records();
    for event in &events {
        assert_valid(&validator, event);
    }
    let classes: std::collections::BTreeSet<u64> = events
        .iter()
        .filter_map(|e| e["class_uid"].as_u64())
        .collect();
    assert_eq!(classes, [4001, 4003].into_iter().collect());

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let time = allowed["time"].as_u64().expect("time");
    assert!(now - time < 60_000, "time {time} is not now ({now})");
    assert_eq!(
        (
            allowed["activity_id"].clone(),
            allowed["disposition_id"].clone()
        ),
        (json!(2), json!(1)),
        "Close, Allowed: {allowed}"
    );
    assert_eq!(allowed["dst_endpoint"]["port"], 443);
    assert_eq!(allowed["connection_info"]["protocol_name"], "tcp");
    assert_eq!(allowed["unmapped"]["rule"], "allowed");
    let process = &allowed["actor"]["process"];
    assert!(process["pid"].as_u64().is_some(), "{allowed}");
    assert!(
        process["file"]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("/curl")),
        "{allowed}"
    );
    assert!(
        allowed["traffic"]["bytes_in"].as_u64() > Some(0),
        "{allowed}"
    );
    assert_eq!(allowed["actor"]["user"]["uid"], "0");
    assert_eq!(
        (
            refused["activity_id"].clone(),
            refused["disposition_id"].clone()
        ),
        (json!(5), json!(2)),
        "Refuse, Blocked: {refused}"
    );
    assert_eq!(query["disposition_id"], 2, "{query}");
    assert_eq!(query["rcode"], "NXDomain", "{query}");
    assert_eq!(drops["disposition_id"], 6, "Dropped: {drops}");
    drop(d);

    // Our readers read our JSON records, and say so of an OCSF file.
    let (code, _, err) = cli_run::run(&["suggest", "--audit", path.to_str().expect("path")]);
    assert!(
        err.contains("an OCSF event (audit.format \"ocsf\")"),
        "exit {code}: {err}"
    );
}

#[test]
fn the_control_api_keeps_json_denials_when_the_file_is_ocsf() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let dir = harness::control::SocketDir::new(&world);
    let socket = dir.socket();
    let path = world.dir().join("audit.ocsf.jsonl");
    let _d = Daemon::start(
        &world,
        daemon::config(
            &world,
            json!({
                "audit": {"path": path, "format": "ocsf"},
                "control": {"enable": true, "socket": socket, "group": "root"},
                "state_dir": world.dir().join("state"),
            }),
        ),
    );
    // Nobody watches the event stream: only the denial is kept, in our JSON.
    assert!(!world
        .curl_agent([
            "--resolve",
            "blocked.test:443:198.51.100.20",
            "https://blocked.test/"
        ])
        .status
        .success());
    let mut denials = Vec::new();
    harness::control::wait_until("the denial", std::time::Duration::from_secs(10), || {
        let (_, body) = harness::control::call(&socket, "GET", "/v1/denials", None);
        denials = body["denials"].as_array().cloned().unwrap_or_default();
        !denials.is_empty()
    });
    assert_eq!(denials[0]["verdict"], "block", "{denials:?}");
    assert_eq!(denials[0]["host"], "blocked.test", "{denials:?}");
    assert!(
        denials[0].get("class_uid").is_none(),
        "our format, not OCSF"
    );
}
