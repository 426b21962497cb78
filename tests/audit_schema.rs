// SPDX-License-Identifier: GPL-3.0-or-later
//! docs/audit-record.schema.json against the records a real daemon writes in a
//! test world (start and end of allowed, refused and nameless connections, TLS
//! and plain HTTP, DNS queries answered and refused, kernel drops), the writer's
//! own loss summary, and the recorded fixture `suggest` and `log` are tested on.

mod harness;

use agent_egress::audit::{encode_line, Event, Record};
use harness::daemon::{self, Daemon};
use harness::World;
use serde_json::{json, Value};

fn validator() -> jsonschema::Validator {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/audit-record.schema.json");
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("schema")).expect("JSON");
    jsonschema::draft202012::new(&schema).expect("a valid schema")
}

fn assert_valid(validator: &jsonschema::Validator, record: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(record)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{record}\ndoes not fit the schema: {errors:#?}"
    );
}

#[test]
fn the_schema_refuses_what_is_not_a_record() {
    let validator = validator();
    let mut line = Vec::new();
    // What the writer's tick() writes when its queue overflowed.
    encode_line(
        &Record {
            event: Event::AuditDrops,
            ts: "2026-11-25T09:40:25.123Z".into(),
            dropped: Some(3),
            ..Record::default()
        },
        &mut line,
    )
    .expect("encode");
    let mut record: Value = serde_json::from_slice(&line).expect("JSON");
    assert_valid(&validator, &record);
    record["verdict"] = json!("deny");
    assert!(!validator.is_valid(&record));
    record["verdict"] = json!("block");
    record["ancestors"] = json!([]);
    assert!(!validator.is_valid(&record), "an undocumented field passed");
    record.as_object_mut().expect("object").remove("ancestors");
    record.as_object_mut().expect("object").remove("dropped");
    assert!(
        !validator.is_valid(&record),
        "audit_drops without dropped passed"
    );
}

#[test]
fn the_recorded_fixture_fits() {
    let validator = validator();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/suggest/audit.jsonl"
    ))
    .expect("fixture");
    // Lines 18 and 19 are the fixture's deliberately bad ones.
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(i, _)| ![17, 18].contains(i))
    {
        let record: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        assert_valid(&validator, &record);
    }
}

#[test]
fn records_of_a_real_daemon_fit() {
    if !harness::require_root_and_tools(&["curl", "bash"]) {
        return;
    }
    let world = World::new();
    let d = Daemon::start(
        &world,
        daemon::config(
            &world,
            json!({"audit": {"path": world.dir().join("audit.jsonl"), "start_events": true}}),
        ),
    );
    let _ = world.curl_agent(["https://allowed.test/"]);
    let _ = world.curl_agent(["http://allowed.test/"]);
    // Refused by name at DNS, then by SNI on a connection that skips DNS.
    let _ = world.curl_agent(["https://blocked.test/"]);
    let _ = world.curl_agent([
        "--resolve",
        "blocked.test:443:198.51.100.20",
        "https://blocked.test/",
    ]);
    // No name at all, and UDP the kernel drops.
    let _ = world.curl_agent(["-k", "https://198.51.100.20/"]);
    let _ = world
        .agent_cmd(["bash", "-c", "echo quic > /dev/udp/198.51.100.10/443"])
        .output();
    d.wait_record("allowed.test over HTTP", |r| r["proto"] == "http");
    d.wait_record("blocked.test by SNI", |r| r["host"] == "blocked.test");
    d.wait_record("a nameless connection", |r| {
        r["dst"] == "198.51.100.20:443" && r["host"].is_null()
    });
    d.wait_event("dns", "blocked.test refused", |r| r["verdict"] == "block");
    d.wait_event("start", "a start event", |_| true);
    d.wait_event("drops", "the dropped UDP", |r| {
        r["dst"] == "198.51.100.10:443"
    });
    let validator = validator();
    let records = d.records();
    for record in &records {
        assert_valid(&validator, record);
    }
    let events: std::collections::BTreeSet<&str> =
        records.iter().filter_map(|r| r["event"].as_str()).collect();
    assert_eq!(
        events,
        ["dns", "drops", "end", "start"].into_iter().collect()
    );
}
