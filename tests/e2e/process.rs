//! Rules by process (#15) for real: the connecting process read from /proc
//! as the daemon decides, real curl, python3, git and bash as the agent.

use crate::harness::daemon::{self, Daemon};
use crate::harness::{World, ALLOWED, OTHER};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// Where curl runs from (the harness's curl is this one on PATH).
fn curl_exe() -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", "readlink -f \"$(command -v curl)\""])
        .output()
        .expect("sh");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sha256(path: &Path) -> String {
    crate::harness::sha256_file(path).expect("sha256")
}

/// A TLS client to allowed.test that prints how its handshake ended.
const PYTHON_TLS_CLIENT: &str = r#"
import socket, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = ctx.wrap_socket(socket.create_connection(("198.51.100.10", 443)), server_hostname="allowed.test", do_handshake_on_connect=False)
try:
    s.do_handshake()
    print("handshake done")
except ssl.SSLError as e:
    print(e.reason)
"#;

/// The four rules, before the harness's default of block.
fn rules(curl_sha256: &str) -> Value {
    json!([
        {"name": "pinned-curl", "domains": ["allowed.test"], "ports": [80],
         "process": ["*/curl"], "exe_sha256": [curl_sha256], "outbound": "direct"},
        {"name": "curl-only", "domains": ["allowed.test"], "ports": [443],
         "process": ["*/curl"], "outbound": "direct"},
        {"name": "git-started", "domains": ["other.test"], "ancestor": ["*/git"],
         "outbound": "direct"},
        {"name": "python-by-address", "ips": [format!("{}/32", OTHER.v4)], "ports": [80],
         "process": ["*/python3*"], "outbound": "direct"}
    ])
}

fn world_with_process_rules() -> (World, Daemon) {
    let world = World::new();
    let config = daemon::config(
        &world,
        json!({"rules": rules(&sha256(Path::new(&curl_exe())))}),
    );
    let d = Daemon::start(&world, config);
    (world, d)
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// curl allowed and python3 refused to the same host by a rule on `process`;
/// what git started allowed by a rule on `ancestor`, what a shell started
/// not; a copy of another binary under curl's name refused by `exe_sha256`.
pub fn process_rules_decide() {
    let (world, d) = world_with_process_rules();

    let out = world.curl_agent(["https://allowed.test/?by=curl"]);
    assert_eq!(stdout(&out), ALLOWED.body(), "curl: {out:?}");
    let r = d.wait_record("curl's", |r| r["cmdline"].to_string().contains("?by=curl"));
    assert_eq!(
        (&r["rule"], &r["verdict"]),
        (&json!("curl-only"), &json!("allow")),
        "{r}"
    );
    assert!(r.get("attribution").is_none(), "{r}");

    let out = world
        .agent_cmd(["python3", "-c", PYTHON_TLS_CLIENT])
        .output()
        .expect("python3");
    assert_eq!(stdout(&out).trim(), "TLSV1_ALERT_ACCESS_DENIED", "{out:?}");
    let r = d.wait_record("python3's", |r| {
        r["exe"].as_str().is_some_and(|e| e.contains("python3")) && r["host"] == "allowed.test"
    });
    assert_eq!(
        (&r["rule"], &r["verdict"]),
        (&json!("default"), &json!("block")),
        "{r}"
    );

    // git's https helper is a child of git: its connection is git's.
    let out = world
        .agent_cmd([
            "git",
            "-c",
            &format!("http.sslCAInfo={}", world.ca_cert().display()),
            "ls-remote",
            "https://other.test/process-rules.git",
        ])
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git");
    let r = d.wait_record("git's helper's", |r| {
        r["host"] == "other.test" && r["cmdline"].to_string().contains("process-rules.git")
    });
    assert_eq!(
        (&r["rule"], &r["verdict"]),
        (&json!("git-started"), &json!("allow")),
        "{r}\ngit: {out:?}"
    );
    let ancestry = r["ancestry"].as_array().expect("ancestry");
    assert!(
        ancestry
            .iter()
            .any(|a| a["exe"].as_str().is_some_and(|e| e.ends_with("/git"))),
        "{r}"
    );
    let script = format!(
        "curl -sS --noproxy '*' --max-time 5 --cacert {} https://other.test/?by=shell; true",
        world.ca_cert().display()
    );
    let out = world.agent_cmd(["sh", "-c", &script]).output().expect("sh");
    assert!(
        !stdout(&out).contains(&OTHER.body()),
        "a shell's curl got through: {out:?}"
    );
    let r = d.wait_record("the shell's curl", |r| {
        r["cmdline"].to_string().contains("?by=shell")
    });
    assert_eq!(
        (&r["rule"], &r["verdict"]),
        (&json!("default"), &json!("block")),
        "{r}"
    );

    // The pinned hash: the real curl passes, bash copied to a file named curl
    // (the same `process` glob matches it) does not.
    let out = world.curl_agent(["http://allowed.test/?by=pinned"]);
    assert_eq!(stdout(&out), ALLOWED.body(), "pinned curl: {out:?}");
    let r = d.wait_record("pinned curl's", |r| {
        r["cmdline"].to_string().contains("?by=pinned")
    });
    assert_eq!(r["rule"], "pinned-curl", "{r}");
    assert_eq!(
        r["exe_sha256"].as_str(),
        Some(sha256(Path::new(&curl_exe())).as_str()),
        "{r}"
    );
    let bin = world.dir().join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let impostor = bin.join("curl");
    std::fs::copy("/bin/bash", &impostor).expect("copy bash");
    let request = format!(
        "exec 3<>/dev/tcp/{}/80; printf 'GET /?by=impostor HTTP/1.1\\r\\nHost: allowed.test\\r\\nConnection: close\\r\\n\\r\\n' >&3; cat <&3",
        ALLOWED.v4
    );
    let out = world
        .agent_cmd([impostor.to_str().expect("path"), "-c", &request])
        .output()
        .expect("the copied binary");
    assert!(stdout(&out).starts_with("HTTP/1.1 403"), "{out:?}");
    let r = d.wait_record("the impostor's", |r| r["exe"].as_str() == impostor.to_str());
    assert_eq!(
        (&r["rule"], &r["verdict"]),
        (&json!("default"), &json!("block")),
        "{r}"
    );
    assert_eq!(
        r["exe_sha256"].as_str(),
        Some(sha256(&impostor).as_str()),
        "{r}"
    );
    assert_ne!(sha256(&impostor), sha256(Path::new(&curl_exe())));
}

/// A process that connects, sends part of a request and exits: the decision
/// comes only at the sniff timeout, long after it is gone, and the rule on
/// its executable still decides it (it was read right after accept).
pub fn process_exited_still_matched() {
    let (world, d) = world_with_process_rules();
    let client = format!(
        "import os, socket, time\n\
         s = socket.create_connection(('{}', 80))\n\
         time.sleep(0.3)\n\
         s.sendall(b'GET /?by=exited HTTP/1.1\\r\\nHo')\n\
         os._exit(0)\n",
        OTHER.v4
    );
    let started = Instant::now();
    let out = world
        .agent_cmd(["python3", "-c", &client])
        .output()
        .expect("python3");
    let exited_after = started.elapsed();
    assert!(out.status.success(), "{out:?}");
    let r = d.wait_record("the exited client's", |r| {
        r["dst"] == format!("{}:80", OTHER.v4)
    });
    let decided_after = Duration::from_millis(r["duration_ms"].as_u64().unwrap_or(0));
    assert!(
        exited_after < Duration::from_millis(900) && r["sniff"] == "sniff timeout",
        "it exited after {exited_after:?}, before the 1 s sniff timeout decided: {r}"
    );
    assert!(decided_after >= Duration::from_millis(900), "{r}");
    assert_eq!(
        (&r["rule"], &r["verdict"]),
        (&json!("python-by-address"), &json!("allow")),
        "{r}"
    );
    assert!(
        r["exe"].as_str().is_some_and(|e| e.contains("python3")),
        "{r}"
    );
    assert!(r.get("attribution").is_none(), "{r}");

    // Gone before the daemon could read it (the daemon stopped meanwhile; a
    // child keeps the socket open): the rule does not match, the record says why.
    let client = format!(
        "import os, socket, time\n\
         s = socket.create_connection(('{}', 80))\n\
         s.sendall(b'GET /?by=gone HTTP/1.1\\r\\nHost: other.test\\r\\n\\r\\n')\n\
         if os.fork() == 0:\n\
         \x20   os.closerange(0, 3); time.sleep(3); os._exit(0)\n\
         os._exit(0)\n",
        OTHER.v4
    );
    d.signal(libc::SIGSTOP);
    let out = world.agent_cmd(["python3", "-c", &client]).output();
    d.signal(libc::SIGCONT);
    assert!(out.as_ref().is_ok_and(|o| o.status.success()), "{out:?}");
    let r = d.wait_record("the vanished client's", |r| {
        r["http_host"] == "other.test" && r["dst"] == format!("{}:80", OTHER.v4)
    });
    assert_eq!(
        (&r["rule"], &r["verdict"]),
        (&json!("default"), &json!("block")),
        "{r}"
    );
    assert!(
        r["attribution"]
            .as_str()
            .is_some_and(|a| a.contains("gone")),
        "{r}"
    );
    assert!(
        r["pid"].as_u64().is_some(),
        "the connect log still names it: {r}"
    );
}
