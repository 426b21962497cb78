// SPDX-License-Identifier: GPL-3.0-or-later
//! The control API through the real daemon in the test world: runtime rules
//! (allowed at once, kept over a restart, expiring, never widening a locked
//! rule), who may reach the socket, the event stream with a slow watcher, live
//! connections, and bad or heavy clients.

mod harness;

use harness::control::{call, config, curl_status, response, wait_until, SocketDir};
use harness::daemon::{self, Daemon};
use harness::{World, ALLOWED, BLOCKED, METADATA, OTHER};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn runtime_rules_apply_at_once_survive_a_restart_expire_and_never_widen_a_locked_rule() {
    if !harness::require_root_and_tools(&["curl", "nft"]) {
        return;
    }
    let world = World::new();
    let dir = SocketDir::new(&world);
    let sock = dir.socket();
    let config = config(&world, &sock);
    let first = Daemon::start(&world, config.clone());

    assert!(
        !curl_status(&world, &BLOCKED).0,
        "blocked.test is blocked by default"
    );
    let (status, added) = call(
        &sock,
        "POST",
        "/v1/rules",
        Some(r#"{"name": "let-blocked", "domains": ["blocked.test"], "outbound": "direct"}"#),
    );
    assert_eq!(status, 201, "{added}");
    assert_eq!(added["by"]["pid"], std::process::id());
    // At once: the reply comes after the proxy has the new policy.
    assert_eq!(curl_status(&world, &BLOCKED), (true, BLOCKED.body()));
    let record = first.wait_event("policy", "the rule added", |r| {
        r["policy"]["action"] == "rule_added"
    });
    assert_eq!(record["pid"], std::process::id());
    assert_eq!(record["policy"]["rule"]["name"], "let-blocked");
    assert_eq!(
        record["exe"],
        std::fs::read_link("/proc/self/exe")
            .unwrap()
            .display()
            .to_string()
    );

    // A reload (SIGHUP) keeps the runtime rules.
    first.signal(libc::SIGHUP);
    first.wait_event("policy", "the reload", |r| {
        r["policy"]["action"] == "reloaded"
    });
    assert_eq!(curl_status(&world, &BLOCKED), (true, BLOCKED.body()));

    // A locked rule's block stands, whatever a runtime rule says.
    let (status, _) = call(
        &sock,
        "POST",
        "/v1/rules",
        Some(r#"{"ips": ["169.254.169.254/32"], "outbound": "direct"}"#),
    );
    assert_eq!(status, 201);
    let out = world.curl_agent(["http://169.254.169.254/"]);
    assert_ne!(String::from_utf8_lossy(&out.stdout), METADATA.body());
    let said = explain(&first.config, "169.254.169.254:80");
    assert!(
        said.contains("\"metadata\"") && said.contains("locked"),
        "{said}"
    );

    // An expiring rule: in force, then gone (from the list and the policy).
    assert!(!curl_status(&world, &OTHER).0);
    let (status, brief) = call(
        &sock,
        "POST",
        "/v1/rules",
        Some(r#"{"domains": ["other.test"], "outbound": "direct", "ttl": 2}"#),
    );
    assert_eq!(status, 201, "{brief}");
    assert_eq!(curl_status(&world, &OTHER), (true, OTHER.body()));
    let brief_id = brief["id"].clone();
    wait_until("the rule expired", Duration::from_secs(5), || {
        let (_, list) = call(&sock, "GET", "/v1/rules", None);
        list["rules"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["id"] != brief_id))
    });
    assert!(
        !curl_status(&world, &OTHER).0,
        "other.test is blocked again"
    );
    first.wait_event("policy", "the rule expired", |r| {
        r["policy"]["action"] == "rule_expired"
    });

    // A restart: the state file brings the rule back before the first connection.
    let (stopped, _) = first.guard.stop(harness_grace());
    assert!(stopped.success());
    assert!(!sock.exists(), "the socket goes with the daemon");
    let second = Daemon::start(&world, config);
    assert_eq!(curl_status(&world, &BLOCKED), (true, BLOCKED.body()));
    let said = explain(&second.config, "blocked.test");
    assert!(
        said.contains("runtime rule") && said.contains("let-blocked"),
        "{said}"
    );
    let check = |state: &Path| {
        std::process::Command::new(daemon::binary())
            .args(["check", "--config"])
            .arg(&second.config)
            .arg("--state")
            .arg(state)
            .output()
            .unwrap()
    };
    let state = world.dir().join("state/runtime-rules.json");
    let out = check(&state);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("2 runtime rule(s)"),
        "{out:?}"
    );
    let bad = world.dir().join("bad-state.json");
    std::fs::write(
        &bad,
        r#"{"next_id": 2, "rules": [{"id": 1, "domains": ["x.test"], "outbound": "nowhere"}]}"#,
    )
    .unwrap();
    let out = check(&bad);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("rules[0].outbound"),
        "{out:?}"
    );
    let (_, list) = call(&sock, "GET", "/v1/rules", None);
    let id = list["rules"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "let-blocked"))
        .map(|r| r["id"].clone())
        .unwrap();
    let (status, _) = call(&sock, "DELETE", &format!("/v1/rules/{id}"), None);
    assert_eq!(status, 200);
    assert!(!curl_status(&world, &BLOCKED).0, "removed: blocked again");
    let (status, _) = call(&sock, "DELETE", &format!("/v1/rules/{id}"), None);
    assert_eq!(status, 404);
    assert_eq!(curl_status(&world, &ALLOWED), (true, ALLOWED.body()));

    // Every record, the policy ones of each action too, fits the audit schema.
    second.wait_event("policy", "the rule removed", |r| {
        r["policy"]["action"] == "rule_removed"
    });
    let schema: Value =
        serde_json::from_str(include_str!("../docs/audit-record.schema.json")).unwrap();
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let records = second.records();
    for record in &records {
        assert!(validator.is_valid(record), "{record}");
    }
    for action in ["rule_added", "rule_expired", "reloaded", "rule_removed"] {
        assert!(
            records.iter().any(|r| r["policy"]["action"] == action),
            "{action}"
        );
    }
}

/// What `agent-egress explain` prints for `target` under `config` (and its state file).
fn explain(config: &Path, target: &str) -> String {
    let out = std::process::Command::new(daemon::binary())
        .args(["explain", "--config"])
        .arg(config)
        .arg(target)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn harness_grace() -> Duration {
    Duration::from_secs(5)
}

/// Connect as uid/gid nobody without groups, from `cmd` (the agent's cgroup or not).
fn connect_as_nobody(mut cmd: std::process::Command, socket: &Path) -> String {
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); print('connected')\nexcept OSError as e: print(e.errno)";
    cmd.args([
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        script,
    ]);
    cmd.arg(socket);
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_socket_serves_its_group_only_streams_events_and_bounds_its_clients() {
    if !harness::require_root_and_tools(&["curl", "nft", "setpriv"]) {
        return;
    }
    let world = World::new();
    let dir = SocketDir::new(&world);
    let sock = dir.socket();
    let daemon = Daemon::start(&world, config(&world, &sock));
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.uid(), meta.gid()),
        (0o660, 0, 0)
    );

    // Who may connect: not a user outside the group, not the agent.
    assert_eq!(
        connect_as_nobody(world.host_cmd(Vec::<&str>::new()), &sock),
        libc::EACCES.to_string()
    );
    assert_eq!(
        connect_as_nobody(world.agent_cmd(Vec::<&str>::new()), &sock),
        libc::EACCES.to_string()
    );

    // curl, as the README shows it: a GET, and a POST with -d (a form type
    // and no Connection header).
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", "--unix-socket"])
            .arg(&sock)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    assert_eq!(curl(&["http://agent-egress/v1/status"])["runtime_rules"], 0);
    let added = curl(&[
        "-d",
        r#"{"domains": ["x.test"], "outbound": "block"}"#,
        "http://agent-egress/v1/rules",
    ]);
    let removed = curl(&[
        "-X",
        "DELETE",
        &format!("http://agent-egress/v1/rules/{}", added["id"]),
    ]);
    assert_eq!(removed["removed"]["id"], added["id"]);
    // A body over 1 KiB: curl sends Expect: 100-continue, answered at once.
    let started = Instant::now();
    let many: Vec<String> = (0..100).map(|i| format!("host-{i}.x.test")).collect();
    let body = json!({"domains": many, "outbound": "block"}).to_string();
    let added = curl(&["-d", &body, "http://agent-egress/v1/rules"]);
    assert_eq!(added["domains"].as_array().map(Vec::len), Some(100));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    curl(&[
        "-X",
        "DELETE",
        &format!("http://agent-egress/v1/rules/{}", added["id"]),
    ]);

    // Bad requests: 4xx naming the field.
    let (status, e) = call(&sock, "POST", "/v1/rules", Some("{not json"));
    assert_eq!((status, e["field"].as_str()), (400, Some("body")));
    let (status, e) = call(
        &sock,
        "POST",
        "/v1/rules",
        Some(r#"{"domains": ["x.test"], "outbound": "direct", "colour": "red"}"#),
    );
    assert_eq!((status, e["field"].as_str()), (422, Some("colour")), "{e}");
    let (status, e) = call(
        &sock,
        "POST",
        "/v1/rules",
        Some(r#"{"domains": ["x.test"], "outbound": "nowhere"}"#),
    );
    assert_eq!(
        (status, e["field"].as_str()),
        (422, Some("outbound")),
        "{e}"
    );
    let (status, _) = call(&sock, "PUT", "/v1/rules", None);
    assert_eq!(status, 405);
    let (status, _) = call(&sock, "GET", "/v2/status", None);
    assert_eq!(status, 404);
    let (status, e) = call(&sock, "DELETE", "/v1/connections/abc", None);
    assert_eq!((status, e["field"].as_str()), (400, Some("id")));
    let big = format!(r#"{{"domains": ["{}"]}}"#, "a".repeat(100 * 1024));
    let (status, e) = call(&sock, "POST", "/v1/rules", Some(&big));
    assert_eq!((status, e["field"].as_str()), (413, Some("body")));
    // A reload over the API: a bad config is refused with its errors (and
    // the running one stays), a good one is applied and on record.
    let good = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(&daemon.config, r#"{"rules": 5}"#).unwrap();
    let (status, e) = call(&sock, "POST", "/v1/reload", None);
    assert_eq!(status, 422, "{e}");
    assert!(
        e["errors"][0].as_str().unwrap().starts_with("rules:"),
        "{e}"
    );
    std::fs::write(&daemon.config, &good).unwrap();
    let (status, reloaded) = call(&sock, "POST", "/v1/reload", None);
    assert_eq!(status, 200, "{reloaded}");
    assert_eq!(
        reloaded["config_hash"],
        harness::sha256_bytes(good.as_bytes()).unwrap()
    );
    let record = daemon.wait_event("policy", "the reload", |r| {
        r["policy"]["action"] == "reloaded"
    });
    assert_eq!(record["pid"], std::process::id());

    // A silent client is timed out; the server meanwhile serves others.
    let silent = UnixStream::connect(&sock).unwrap();
    let started = Instant::now();
    let (status, _) = call(&sock, "GET", "/v1/status", None);
    assert_eq!(status, 200);
    let (status, _) = response(silent);
    let waited = started.elapsed();
    assert_eq!(status, 408);
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(8),
        "{waited:?}"
    );

    // 100 clients at once.
    let started = Instant::now();
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let all: Vec<_> = (0..100)
            .map(|_| scope.spawn(|| call(&sock, "GET", "/v1/status", None).0))
            .collect();
        all.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    eprintln!("100 parallel status requests in {:?}", started.elapsed());

    // Live connections: one held open by the agent, listed with its
    // process, then closed over the API.
    let holder = world.spawn(
        "holder",
        world.agent_cmd([
            "/usr/bin/python3",
            "-c",
            "import socket,time\ns=socket.create_connection(('198.51.100.10',80))\ns.sendall(b'GET / HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n')\nprint(s.recv(4096)[:15], flush=True)\nprint('ended', s.recv(4096), flush=True)\ntime.sleep(30)",
        ]),
    );
    let mut listed = Value::Null;
    wait_until("the connection is listed", Duration::from_secs(5), || {
        let (_, all) = call(&sock, "GET", "/v1/connections", None);
        listed = all
            .as_array()
            .and_then(|a| a.iter().find(|c| c["host"] == "allowed.test"))
            .cloned()
            .unwrap_or(Value::Null);
        !listed.is_null() && !listed["pid"].is_null()
    });
    assert_eq!(listed["pid"], holder.pid(), "{listed}");
    assert_eq!(listed["rule"], "allowed");
    assert!(listed["bytes_down"].as_u64().unwrap() > 0, "{listed}");
    let close = || {
        call(
            &sock,
            "DELETE",
            &format!("/v1/connections/{}", listed["id"]),
            None,
        )
        .0
    };
    assert_eq!(close(), 200);
    let end = daemon.wait_record("the closed connection", |r| r["conn_id"] == listed["id"]);
    assert!(
        end["error"].as_str().unwrap().contains("control API"),
        "{end}"
    );
    assert_eq!(close(), 404);

    // Two watchers, one that never reads: the other sees every event, the
    // slow one is cut off, and the proxy decides every connection meanwhile.
    let watch = |accept: &str| {
        let mut s = UnixStream::connect(&sock).unwrap();
        write!(
            s,
            "GET /v1/events HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"
        )
        .unwrap();
        s
    };
    let slow = watch("application/x-ndjson");
    let fast = watch("text/event-stream");
    wait_until("two watchers", Duration::from_secs(5), || {
        call(&sock, "GET", "/v1/status", None).1["events"]["watchers"] == 2
    });
    const CONNECTIONS: usize = 1500;
    let reader = std::thread::spawn(move || {
        let mut lines = BufReader::new(fast);
        let (mut ends, mut line) = (0, String::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        while ends < CONNECTIONS && Instant::now() < deadline {
            line.clear();
            if lines.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if let Some(data) = line.strip_prefix("data: ") {
                let event: Value = serde_json::from_str(data).unwrap();
                if event["event"] == "end" && event["host"] == "blocked.test" {
                    ends += 1;
                }
            }
        }
        ends
    });
    let burst = format!(
        "import socket\nfor i in range({CONNECTIONS}):\n s=socket.create_connection(('198.51.100.20',80))\n s.sendall(b'GET / HTTP/1.0\\r\\nHost: blocked.test\\r\\n\\r\\n')\n s.recv(4096)\n s.close()"
    );
    let started = Instant::now();
    let out = world
        .agent_cmd(["/usr/bin/python3", "-c", &burst])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{CONNECTIONS} blocked connections with a stalled watcher in {:?}",
        started.elapsed()
    );
    assert_eq!(
        reader.join().unwrap(),
        CONNECTIONS,
        "the fast watcher saw every end"
    );
    let (_, status) = call(&sock, "GET", "/v1/status", None);
    assert!(
        status["events"]["watchers_cut_off"].as_u64().unwrap() >= 1,
        "{status}"
    );
    let mut rest = String::new();
    let _ = BufReader::new(slow).read_to_string(&mut rest);
    let last = rest.lines().last().unwrap_or_default();
    assert!(last.contains("cut_off"), "{last}");
    let ends = daemon
        .records()
        .iter()
        .filter(|r| r["event"] == "end" && r["host"] == "blocked.test")
        .count();
    assert_eq!(ends, CONNECTIONS, "every connection has its record");
}
