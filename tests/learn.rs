// SPDX-License-Identifier: GPL-3.0-or-later
//! Learn → suggest → enforce in the test world: a daemon in audit mode lets the
//! agent reach a host the policy refuses; `suggest` on its records gives rules
//! that, enforced, let exactly that through (on the port it used) and refuse the
//! rest; `log` and `suggest` then show the refusal.

mod cli_run;
mod harness;

use cli_run::run as agent_egress;
use harness::daemon::{self, Daemon};
use harness::World;
use serde_json::{json, Value};

#[test]
fn learn_suggest_enforce() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let learnt = world.dir().join("learn.jsonl");
    let d = Daemon::start(
        &world,
        daemon::config(&world, json!({"mode": "audit", "audit": {"path": learnt}})),
    );
    let out = world.curl_agent(["https://blocked.test/"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from blocked.test\n"
    );
    d.wait_record("blocked.test in audit mode", |r| {
        r["verdict"] == "would_block"
    });
    drop(d);

    let (code, out, err) = agent_egress(&["suggest", "--audit", learnt.to_str().expect("path")]);
    assert_eq!(code, 0, "{err}");
    let suggested: Value = serde_json::from_str(&out).expect("JSON");
    let rules = suggested["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1, "{out}");
    assert_eq!(rules[0]["domains"], json!(["=blocked.test"]), "{out}");
    assert_eq!(rules[0]["ports"], json!([443]), "{out}");
    let rule_name = rules[0]["name"].as_str().expect("name").to_string();

    let enforced = world.dir().join("enforce.jsonl");
    let d = Daemon::start(
        &world,
        daemon::config(
            &world,
            json!({"rules": suggested["rules"], "audit": {"path": enforced}}),
        ),
    );
    let out = world.curl_agent(["https://blocked.test/"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from blocked.test\n"
    );
    let r = d.wait_record("the learnt host", |r| r["host"] == "blocked.test");
    assert_eq!(
        (&r["verdict"], &r["rule"]),
        (&json!("allow"), &json!(rule_name))
    );
    // The port it never used, and a host it never reached, stay refused.
    let out = world.curl_agent([
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://blocked.test/",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    let out = world.curl_agent(["https://allowed.test/"]);
    assert!(!out.status.success(), "allowed.test was never learnt");
    d.wait_record("port 80 refused", |r| {
        r["verdict"] == "block" && r["proto"] == "http"
    });
    drop(d);

    let path = enforced.to_str().expect("path");
    let (code, out, err) = agent_egress(&["log", "--verdict", "block", path]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.contains("blocked.test:80") && l.contains("default")),
        "{out}"
    );
    let (_, out, err) = agent_egress(&["suggest", "--audit", path]);
    let again: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {err}"));
    let blocked: Vec<&Value> = again["blocked"]
        .as_array()
        .expect("blocked")
        .iter()
        .collect();
    assert!(
        blocked
            .iter()
            .any(|b| b["pattern"] == "=blocked.test" && b["ports"] == json!([80])),
        "{out}"
    );
}

/// The same with `exec`: `--audit-only` to learn, the suggested rules (which name
/// no cgroup: each run has its own) in `--config` to enforce.
#[test]
fn learn_with_exec_then_enforce_with_exec() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let curl = |url: &str| -> Vec<String> {
        let host = url.split('/').nth(2).unwrap_or_default();
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "--resolve",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            format!("{host}:443:198.51.100.20"),
            "--resolve".into(),
            format!("{host}:80:198.51.100.20"),
            "--cacert".into(),
            world.ca_cert().to_string_lossy().into_owned(),
            url.into(),
        ])
        .collect()
    };
    let exec = |config: &str, extra: &[&str], url: &str| {
        let config = world.write_config(config);
        let out = world
            .host_cmd([daemon::binary(), "exec", "--config"])
            .arg(config)
            .args(extra)
            .arg("--user")
            .arg("nobody")
            .arg("--")
            .args(curl(url))
            .output()
            .expect("exec");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let learnt = world.dir().join("exec-learn.jsonl");
    let dns = r#"{"dns": {"servers": ["198.51.100.53"]}}"#;
    let learn = ["--audit-only", "--audit", learnt.to_str().expect("path")];
    assert_eq!(exec(dns, &learn, "https://blocked.test/"), "200");

    let (code, out, err) = agent_egress(&["suggest", "--audit", learnt.to_str().expect("path")]);
    assert_eq!(code, 0, "{err}");
    let suggested: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        suggested["rules"][0]["domains"],
        json!(["=blocked.test"]),
        "{out}"
    );
    assert!(suggested["rules"][0].get("agents").is_none(), "{out}");

    let config =
        json!({"dns": {"servers": ["198.51.100.53"]}, "rules": suggested["rules"]}).to_string();
    assert_eq!(exec(&config, &[], "https://blocked.test/"), "200");
    assert_eq!(exec(&config, &[], "http://blocked.test/"), "403");
}
