//! The command line: `check`, `explain`, `status`, `--help` everywhere.

mod harness;

use harness::daemon::{self, binary, Daemon};
use harness::World;
use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("agent-egress");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_config(name: &str, json: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("ae-cli-{}-{name}.json", std::process::id()));
    std::fs::write(&path, json).expect("write config");
    path
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "run", "check", "explain", "exec", "down", "status", "suggest", "log", "version",
    ] {
        let (code, out, _) = run(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub} --help");
        assert!(out.contains("Usage"), "{sub} --help: {out}");
    }
}

#[test]
fn check_reports_every_error_with_its_path() {
    let bad = temp_config(
        "bad",
        r#"{"listen": {"port": 70000}, "rules": [{"ips": ["10.0.0.300/8"], "outbound": "direct"},
            {"domains": ["a.com"], "outbound": "nowhere"}]}"#,
    );
    let (code, _, err) = run(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    for want in [
        "listen.port: 70000 is out of range",
        "rules[0].ips[0]: \"10.0.0.300/8\" is not a CIDR",
        "rules[1].outbound: no outbound named \"nowhere\"",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    let good = temp_config(
        "good",
        r#"{"rules": [{"domains": ["a.com"], "outbound": "direct"}]}"#,
    );
    let (code, out, _) = run(&["check", "--config", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let _ = std::fs::remove_file(bad);
    let _ = std::fs::remove_file(good);
}

#[test]
fn check_reads_secret_files_unless_told_not_to() {
    let secret = std::env::temp_dir().join(format!("ae-cli-{}-absent.pass", std::process::id()));
    let config = temp_config(
        "secret",
        &format!(
            r#"{{"outbounds": {{"corp": {{"type": "socks5", "server": "127.0.0.1:1080",
                "username": "agent", "password_file": "{}"}}}}}}"#,
            secret.display()
        ),
    );
    let path = config.to_str().unwrap();
    let (code, _, err) = run(&["check", "--config", path]);
    assert_eq!(code, 1);
    let want = format!(
        "outbounds.corp.password_file: cannot read {}",
        secret.display()
    );
    assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    let (code, out, err) = run(&["check", "--no-secret-files", "--config", path]);
    assert_eq!(code, 0, "{out}{err}");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let (code, out, err) = run(&["check", "--config", path]);
    assert_eq!(code, 0, "{out}{err}");
    let _ = std::fs::remove_file(secret);
    let _ = std::fs::remove_file(config);
}

#[test]
fn explain_names_rule_outbound_and_why() {
    let config = temp_config(
        "explain",
        r#"{"rules": [{"name": "registries", "domains": ["crates.io"], "outbound": "direct"}]}"#,
    );
    let path = config.to_str().unwrap();
    let (code, out, _) = run(&["explain", "--config", path, "Static.Crates.IO.:443"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("registries") && out.contains("direct"),
        "{out}"
    );
    let (_, out, _) = run(&["explain", "--config", path, "example.com"]);
    assert!(out.contains("default") && out.contains("block"), "{out}");
    let _ = std::fs::remove_file(config);
}

#[test]
fn explain_takes_the_process_user_and_ancestors() {
    let config = temp_config(
        "explain-process",
        r#"{"interception": {"cgroups": ["agents.slice"]}, "rules": [
            {"name": "git's", "domains": ["forge.test"], "ancestor": ["*/git"], "user": ["root"], "outbound": "direct"},
            {"name": "browser", "domains": ["web.test"], "cgroup": ["browser.scope"], "outbound": "direct"},
            {"name": "curl", "domains": ["api.test"], "process": ["*/curl"], "comm": ["curl"], "outbound": "direct"}
        ]}"#,
    );
    let path = config.to_str().unwrap();
    let explain = |args: &[&str]| {
        let mut all = vec!["explain", "--config", path];
        all.extend_from_slice(args);
        run(&all)
    };
    let (code, out, _) = explain(&[
        "forge.test",
        "--user",
        "0",
        "--process",
        "/usr/bin/ssh",
        "--ancestor",
        "/usr/bin/bash",
        "--ancestor",
        "/usr/lib/git-core/git",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("rule \"git's\""), "{out}");
    assert!(
        out.contains("ancestor: */git matches /usr/lib/git-core/git"),
        "{out}"
    );
    assert!(out.contains("user: uid 0"), "{out}");
    let (_, out, _) = explain(&[
        "forge.test",
        "--user",
        "root",
        "--ancestor",
        "/usr/bin/bash",
    ]);
    assert!(out.contains("no rule matched"), "a shell's: {out}");
    let (_, out, _) = explain(&[
        "web.test",
        "--agent",
        "agents.slice",
        "--cgroup",
        "browser.scope/tab",
    ]);
    assert!(
        out.contains("cgroup: browser.scope holds browser.scope/tab"),
        "{out}"
    );
    let (_, out, _) = explain(&["api.test", "--process", "/usr/bin/curl", "--comm", "curl"]);
    assert!(out.contains("rule \"curl\""), "{out}");
    let (_, out, _) = explain(&["api.test"]);
    assert!(out.contains("process: none given"), "{out}");
    let (code, _, err) = explain(&["api.test", "--user", "no-such-user-here"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--user: no user named \"no-such-user-here\""),
        "{err}"
    );
    let _ = std::fs::remove_file(config);
}

#[test]
fn explain_decides_loopback_by_its_listener() {
    let config = temp_config(
        "explain-loopback",
        r#"{"interception": {"cgroups": ["agents.slice"]},
            "loopback": {"allow": [{"name": "pg", "ports": [5432], "listeners": ["postgresql.service"]}]}}"#,
    );
    let path = config.to_str().unwrap();
    let explain = |target: &str, listener: &str| {
        let (code, out, err) = run(&[
            "explain",
            "--config",
            path,
            "--agent",
            "agents.slice",
            "--listener",
            listener,
            target,
        ]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let out = explain("127.0.0.1:5432", "system.slice/postgresql.service");
    assert!(out.contains("allowed by pg"), "{out}");
    let out = explain("[::1]:1080", "system.slice/socks.service");
    assert!(
        out.contains("refused") && out.contains("loopback:default"),
        "{out}"
    );
    let out = explain("[::ffff:127.0.0.1]:3000", "agents.slice/dev.scope");
    assert!(out.contains("allowed by loopback:own"), "{out}");
    let _ = std::fs::remove_file(config);
}

#[test]
fn status_shows_table_set_and_listener() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let d = Daemon::start(&world, daemon::config(&world, serde_json::json!({})));
    let out = world
        .host_cmd([binary(), "status", "--json", "--config"])
        .arg(&d.config)
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["table_installed"], true, "{status}");
    assert_eq!(status["routing_installed"], true, "{status}");
    // The agent's cgroup, and its parent, which holds nothing else.
    let set = status["agents_set"].as_array().cloned().unwrap_or_default();
    let member = |id: u64| set.iter().find(|m| m["id"] == id).cloned();
    let agent = member(world.agent().id()).unwrap_or_else(|| panic!("{status}"));
    assert_eq!(agent["path"], world.agent().relative_path(), "{status}");
    let parent_path = world
        .agent()
        .path()
        .parent()
        .expect("the agent's parent")
        .to_path_buf();
    let parent_id = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(&parent_path).expect("the agent's parent"),
    );
    let parent = member(parent_id).unwrap_or_else(|| panic!("no parent in {status}"));
    assert_eq!(
        parent["path"],
        world
            .agent()
            .relative_path()
            .rsplit_once('/')
            .map(|(p, _)| p)
            .unwrap_or_default(),
        "{status}"
    );
    assert_eq!(set.len(), 2, "{status}");
    assert_eq!(status["listener"]["127.0.0.1:15001"], true, "{status}");
    let text = world
        .host_cmd([binary(), "status", "--config"])
        .arg(&d.config)
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("table inet agent_egress: installed"),
        "{text}"
    );
}
