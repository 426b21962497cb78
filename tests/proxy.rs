//! The proxy against bad input, failing upstreams and real upstream proxies,
//! with the daemon capturing a real agent cgroup in a test world.
//!
//! Raw clients are small Python programs run as the agent: they send exactly
//! the bytes a test needs (garbage, a 64 KiB hello, one byte a second...).

mod harness;

use harness::daemon::{self, Daemon};
use harness::{World, ALLOWED};
use serde_json::{json, Value};
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PYTHON: &str = "/usr/bin/python3";

/// A client that connects to HOST:PORT, sends the bytes `payload` (Python
/// expression) `pace` bytes at a time every `delay` seconds, then reads until
/// the proxy closes, and prints how it ended: "eof", "reset" or "timeout",
/// after what it received.
const CLIENT: &str = r#"
import socket, sys, time
host, port, payload, pace, delay = sys.argv[1], int(sys.argv[2]), eval(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.create_connection((host, port), timeout=10)
try:
    for i in range(0, len(payload), pace):
        s.sendall(payload[i:i + pace])
        if delay:
            time.sleep(delay)
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            print(repr(got[:200]), "eof"); break
        got += chunk
except ConnectionResetError:
    print(repr(got[:200]) if 'got' in dir() else "b''", "reset")
except BrokenPipeError:
    print("b''", "reset")
except socket.timeout:
    print("b''", "timeout")
"#;

fn client(world: &World, host: &str, port: u16, payload: &str, pace: usize, delay: f64) -> String {
    let out = world
        .agent_cmd([PYTHON, "-c", CLIENT])
        .args([
            host,
            &port.to_string(),
            payload,
            &pace.to_string(),
            &delay.to_string(),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn curl_ok(world: &World, url: &str) {
    let out = world.curl_agent([url]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == ALLOWED.body(),
        "{url}: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start(world: &World, extra: Value) -> Daemon {
    Daemon::start(world, daemon::config(world, extra))
}

fn alive(d: &mut Daemon) {
    assert!(
        d.guard.try_wait().is_none(),
        "the daemon died:\n{}",
        d.guard.log()
    );
}

#[test]
fn bad_client_input_ends_in_a_record_and_a_closed_connection() {
    if !harness::require_root_and_tools(&["curl", PYTHON]) {
        return;
    }
    let world = World::new();
    let mut d = start(&world, json!({}));
    let cases: [(&str, &str, &str); 7] = [
        (
            "malformed hello",
            r"b'\x16\x03\x01\x00\x08\x01\x00\x00\x04\xff\xff\xff\xff'",
            "malformed",
        ),
        (
            "record longer than TLS allows",
            r"b'\x16\x03\x01\xff\xff\x01\x00\xff\xfb' + b'\x00' * 65535",
            "malformed TLS record",
        ),
        (
            "64 KiB hello in 16 KiB records",
            r"b''.join(b'\x16\x03\x01\x40\x00' + (b'\x01\x00\xff\xfc' if i == 0 else b'') + b'\x00' * (16384 - (4 if i == 0 else 0)) for i in range(4))",
            "too large",
        ),
        (
            "binary garbage",
            r"bytes(range(256)) * 4",
            "not TLS or HTTP",
        ),
        (
            "10 KB Host header",
            r"b'GET / HTTP/1.1\r\nHost: ' + b'a' * 10240 + b'\r\n\r\n'",
            "name too long",
        ),
        (
            "truncated hello, then the client waits",
            r"b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03'",
            "sniff timeout",
        ),
        ("silent client", "b''", "sniff timeout"),
    ];
    for (what, payload, reason) in cases {
        let started = Instant::now();
        let ended = client(&world, "198.51.100.10", 443, payload, 65536, 0.0);
        assert!(
            ended.ends_with("reset") || ended.ends_with("eof"),
            "{what}: {ended}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{what} held {:?}",
            started.elapsed()
        );
        let r = d.wait_record(what, |r| {
            r["sniff"].as_str().is_some_and(|s| s.contains(reason))
                && r["dst"] == "198.51.100.10:443"
        });
        assert_eq!(r["verdict"], "block", "{what}: {r}");
        alive(&mut d);
    }
    // The proxy still serves others.
    curl_ok(&world, "https://allowed.test/");
}

#[test]
fn a_slow_client_does_not_hold_up_others() {
    if !harness::require_root_and_tools(&["curl", PYTHON]) {
        return;
    }
    let world = World::new();
    let mut d = start(&world, json!({"limits": {"sniff_timeout_ms": 5000}}));
    // A hello at one byte every 0.3 s: the sniff deadline (5 s) ends it. A loop
    // that waited on it would hold each request below for seconds. (To an
    // address the agent never resolves: nameless, it is refused at the deadline.)
    let mut slow = world
        .agent_cmd([PYTHON, "-c", CLIENT])
        .args([
            "198.51.100.20",
            "443",
            r"b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' + b'\x00' * 32",
            "1",
            "0.3",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    for _ in 0..5 {
        let started = Instant::now();
        curl_ok(&world, "https://allowed.test/");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a request beside the slow client took {:?}",
            started.elapsed()
        );
    }
    let r = d.wait_record("slow client", |r| {
        r["sniff"]
            .as_str()
            .is_some_and(|s| s.contains("sniff timeout"))
    });
    assert!(r["duration_ms"].as_u64().unwrap_or(0) >= 4900, "{r}");
    let _ = slow.kill();
    let _ = slow.wait();
    alive(&mut d);
}

/// A server in the internet netns on 198.51.100.10:`port` that does `action`
/// with each connection (a Python statement on socket `c`).
fn server(world: &World, port: u16, action: &str) -> harness::ChildGuard {
    let script = format!(
        "import socket, time\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('198.51.100.10', {port})); s.listen(16)\n\
         while True:\n    c, _ = s.accept()\n    {action}\n"
    );
    let guard = world.spawn("server", world.net_cmd([PYTHON, "-c", &script]));
    std::thread::sleep(Duration::from_millis(300));
    guard
}

#[test]
fn failing_upstreams_reset_the_client_and_say_why() {
    if !harness::require_root_and_tools(&["curl", PYTHON]) {
        return;
    }
    let world = World::new();
    let rules = json!({
        "rules": [
            {"name": "allowed", "domains": ["allowed.test"], "outbound": "direct"},
            {"name": "test-ports", "ips": ["198.51.100.10/32"], "ports": ["8081-8099"], "outbound": "direct"}
        ],
        "limits": {"sniff_timeout_ms": 300, "idle_timeout_s": 2, "connect_timeout_ms": 1000}
    });
    let mut d = start(&world, rules);
    // Nobody listens: refused at once.
    let started = Instant::now();
    let ended = client(&world, "198.51.100.10", 8099, "b'hello'", 5, 0.0);
    assert!(ended.ends_with("reset"), "{ended}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let r = d.wait_record("refused upstream", |r| r["dst"] == "198.51.100.10:8099");
    assert!(r["error"].as_str().unwrap_or("").contains("refused"), "{r}");
    assert_eq!(r["verdict"], "error");

    // Accepts and never answers: the idle timeout ends it.
    let _silent = server(&world, 8081, "time.sleep(60)");
    let ended = client(&world, "198.51.100.10", 8081, "b'hello'", 5, 0.0);
    assert!(ended.ends_with("reset"), "{ended}");
    let r = d.wait_record("silent upstream", |r| r["dst"] == "198.51.100.10:8081");
    assert_eq!(r["error"], "idle timeout");

    // Resets mid-stream: the client is reset too, after the bytes that came.
    let _resetting = server(
        &world,
        8082,
        "c.sendall(b'x' * 1000); c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00'); time.sleep(0.2); c.close()",
    );
    let ended = client(&world, "198.51.100.10", 8082, "b'hello'", 5, 0.0);
    assert!(ended.ends_with("reset"), "{ended}");
    let r = d.wait_record("resetting upstream", |r| r["dst"] == "198.51.100.10:8082");
    assert!(r["error"].as_str().unwrap_or("").contains("reset"), "{r}");
    assert_eq!(r["bytes_down"], 1000);
    alive(&mut d);
    curl_ok(&world, "https://allowed.test/");
}

/// An upstream proxy from Debian in the agent netns, outside the agent
/// cgroup (so its own connections go out directly), resolving through the
/// agent netns' resolv.conf.
fn upstream_proxy(world: &World, args: &[&str]) -> harness::ChildGuard {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &world.agent_ns()]).args(args);
    let guard = world.spawn("upstream-proxy", cmd);
    std::thread::sleep(Duration::from_millis(300));
    guard
}

fn via(world: &World, outbound: Value) -> Daemon {
    start(
        world,
        json!({
            "outbounds": {"up": outbound},
            "rules": [{"name": "via-upstream", "domains": ["allowed.test"], "outbound": "up"}]
        }),
    )
}

fn curl_fails(world: &World, url: &str) -> Output {
    let out = world.curl_agent([url]);
    assert!(!out.status.success(), "{url} went through");
    out
}

#[test]
fn socks5_upstream_with_and_without_password() {
    if !harness::require_root_and_tools(&["curl", "microsocks"]) {
        return;
    }
    let world = World::new();
    let _open = upstream_proxy(&world, &["microsocks", "-i", "127.0.0.1", "-p", "1080"]);
    let d = via(
        &world,
        json!({"type": "socks5", "server": "127.0.0.1:1080"}),
    );
    curl_ok(&world, "https://allowed.test/");
    let r = d.wait_record("socks5", |r| r["outbound"] == "up");
    assert_eq!(r["dial"], "upstream_resolves");
    assert_eq!(r["upstream"], "127.0.0.1:1080");
    drop(d);

    let _auth = upstream_proxy(
        &world,
        &[
            "microsocks",
            "-i",
            "127.0.0.1",
            "-p",
            "1081",
            "-u",
            "agent",
            "-P",
            "s3cret",
        ],
    );
    let d = via(
        &world,
        json!({"type": "socks5", "server": "127.0.0.1:1081", "username": "agent", "password": "s3cret"}),
    );
    curl_ok(&world, "https://allowed.test/");
    drop(d);
    let d = via(
        &world,
        json!({"type": "socks5", "server": "127.0.0.1:1081", "username": "agent", "password": "wrong"}),
    );
    curl_fails(&world, "https://allowed.test/");
    let r = d.wait_record("socks5 wrong password", |r| {
        r["outbound"] == "up" && !r["error"].is_null()
    });
    assert!(r["error"].as_str().unwrap_or("").contains("socks5"), "{r}");
}

#[test]
fn http_connect_upstream_and_unreachable_upstream() {
    if !harness::require_root_and_tools(&["curl", "tinyproxy"]) {
        return;
    }
    let world = World::new();
    let conf = world.dir().join("tinyproxy.conf");
    std::fs::write(
        &conf,
        "Port 3128\nListen 127.0.0.1\nAllow 127.0.0.1\nConnectPort 443\nMaxClients 20\n\
         BasicAuth agent s3cret\nLogLevel Info\n",
    )
    .expect("tinyproxy.conf");
    let conf = conf.to_string_lossy().into_owned();
    let _proxy = upstream_proxy(&world, &["tinyproxy", "-d", "-c", &conf]);
    let d = via(
        &world,
        json!({"type": "http", "server": "127.0.0.1:3128", "username": "agent", "password": "s3cret"}),
    );
    curl_ok(&world, "https://allowed.test/");
    let r = d.wait_record("http connect", |r| r["outbound"] == "up");
    assert_eq!(r["upstream"], "127.0.0.1:3128");
    drop(d);

    // Nobody at the upstream's address: the client is reset at once.
    let d = via(&world, json!({"type": "http", "server": "127.0.0.1:3999"}));
    let started = Instant::now();
    curl_fails(&world, "https://allowed.test/");
    assert!(started.elapsed() < Duration::from_secs(1));
    let r = d.wait_record("unreachable upstream", |r| {
        r["outbound"] == "up" && !r["error"].is_null()
    });
    assert!(r["error"].as_str().unwrap_or("").contains("refused"), "{r}");
}

/// A client that connects and sends nothing, left running.
fn silent_client(world: &World) -> std::process::Child {
    world
        .agent_cmd([
            PYTHON,
            "-c",
            CLIENT,
            "198.51.100.10",
            "443",
            "b''",
            "1",
            "0",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("python3")
}

fn end_all(clients: Vec<std::process::Child>) {
    for mut c in clients {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn connection_limit_refuses_and_counts() {
    if !harness::require_root_and_tools(&["curl", PYTHON]) {
        return;
    }
    let world = World::new();
    let mut d = start(
        &world,
        json!({"limits": {"connections": 4, "sniff_timeout_ms": 3000}, "listen": {"port": daemon::PORT, "workers": 1}}),
    );
    // Four silent clients hold every slot; the fifth is refused at once.
    let holders: Vec<_> = (0..4).map(|_| silent_client(&world)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let out = world.curl_agent(["https://allowed.test/"]);
    assert!(!out.status.success(), "over the limit but served");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        d.guard.log().contains("connection limit (4) reached"),
        "{}",
        d.guard.log()
    );
    end_all(holders);
    std::thread::sleep(Duration::from_millis(300));
    curl_ok(&world, "https://allowed.test/");
    alive(&mut d);
}

/// How many times a thread of `pid` named `name` has been switched out.
fn context_switches(pid: u32, name: &str) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    for task in tasks.flatten() {
        let dir = task.path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == name) {
            let status = std::fs::read_to_string(dir.join("status")).expect("status");
            return status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        }
    }
    panic!("no thread {name} in {pid}");
}

#[test]
fn idle_connections_leave_the_worker_asleep() {
    if !harness::require_root_and_tools(&["curl", PYTHON]) {
        return;
    }
    let world = World::new();
    let mut d = start(
        &world,
        json!({"listen": {"port": daemon::PORT, "workers": 1}, "limits": {"sniff_timeout_ms": 60000}}),
    );
    // One process holding a hundred connections that send nothing.
    let mut holder = world
        .agent_cmd([
            PYTHON,
            "-c",
            "import socket, time\n\
             held = [socket.create_connection(('198.51.100.10', 443)) for _ in range(100)]\n\
             print('open', flush=True)\n\
             time.sleep(60)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut open = [0u8; 5];
    holder
        .stdout
        .take()
        .expect("stdout")
        .read_exact(&mut open)
        .expect("the connections open");
    std::thread::sleep(Duration::from_millis(500));
    // No deadline near: the worker sleeps (a wake-up a second at most), it
    // does not look at its hundred sessions every few milliseconds.
    let before = context_switches(d.guard.pid(), "worker-0");
    std::thread::sleep(Duration::from_secs(2));
    let woken = context_switches(d.guard.pid(), "worker-0") - before;
    assert!(woken <= 6, "the idle worker woke {woken} times in 2 s");
    end_all(vec![holder]);
    curl_ok(&world, "https://allowed.test/");
    alive(&mut d);
}

#[test]
fn audit_mode_lets_everything_through_and_records_the_verdict() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let d = start(&world, json!({"mode": "audit"}));
    let out = world.curl_agent(["https://blocked.test/"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from blocked.test\n"
    );
    let r = d.wait_record("blocked.test in audit mode", |r| {
        r["host"] == "blocked.test"
    });
    assert_eq!(r["verdict"], "would_block");
    assert_eq!(r["rule"], "default");
    // Its name was answered too, and the record says enforce would not have.
    let q = d.wait_event("dns", "blocked.test's lookup in audit mode", |r| {
        r["host"] == "blocked.test"
    });
    assert_eq!(
        (&q["verdict"], &q["rcode"]),
        (&json!("would_block"), &json!("NOERROR")),
        "{q}"
    );
    curl_ok(&world, "https://allowed.test/");
    let r = d.wait_record("allowed.test in audit mode", |r| {
        r["host"] == "allowed.test"
    });
    assert_eq!(r["verdict"], "allow");
}

#[test]
fn running_out_of_fds_refuses_without_spinning() {
    if !harness::require_root_and_tools(&["curl", "prlimit", PYTHON]) {
        return;
    }
    let world = World::new();
    let config = daemon::config(
        &world,
        json!({"listen": {"port": daemon::PORT, "workers": 1}, "limits": {"sniff_timeout_ms": 3000}}),
    );
    let mut d = Daemon::start_with(&world, config, &["prlimit", "--nofile=48:48"]);
    // Silent clients until the daemon has no fd left for the next one.
    let holders: Vec<_> = (0..60).map(|_| silent_client(&world)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        d.guard.log().contains("out of file descriptors"),
        "{}",
        d.guard.log()
    );
    // Not spinning: the daemon used well under a second of CPU meanwhile.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", d.guard.pid())).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    assert!(ticks < 100, "the daemon burnt {ticks} ticks of CPU");
    end_all(holders);
    std::thread::sleep(Duration::from_millis(3500));
    curl_ok(&world, "https://allowed.test/");
    alive(&mut d);
}

#[test]
fn two_hundred_parallel_connections_all_complete() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let d = start(&world, json!({}));
    let dir = world.dir().join("parallel");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let pattern = dir.join("out_#1").to_string_lossy().into_owned();
    let out = world.curl_agent([
        "-Z",
        "--parallel-max",
        "200",
        "--parallel-immediate",
        "--http1.1",
        "-H",
        "Connection: close",
        "-o",
        &pattern,
        "https://allowed.test/?n=[1-200]",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in 1..=200 {
        let body = std::fs::read_to_string(dir.join(format!("out_{n}"))).unwrap_or_default();
        assert_eq!(body, ALLOWED.body(), "response {n}");
    }
    // Records are written when each connection ends, just after curl's view of it.
    let started = Instant::now();
    let allowed = loop {
        let n = d
            .records()
            .iter()
            .filter(|r| r["host"] == "allowed.test" && r["verdict"] == "allow")
            .count();
        if n >= 200 || started.elapsed() > Duration::from_secs(5) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(allowed >= 200, "{allowed} records for 200 connections");
}

#[test]
fn one_gigabyte_download_arrives_intact() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let d = start(&world, json!({}));
    let file = world.make_file("gigabyte", 1 << 30);
    let output = world.dir().join("gigabyte.out");
    let url = format!("https://allowed.test{}", file.big_path);
    let mut cmd = world.agent_cmd(["curl", "-sS", "--max-time", "300", "--cacert"]);
    let out = cmd
        .arg(world.ca_cert())
        .arg("-o")
        .arg(&output)
        .arg(&url)
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(harness::sha256_file(&output).expect("sha256"), file.sha256);
    let r = d.wait_record("1 GiB download", |r| {
        r["bytes_down"].as_u64() > Some(1 << 30)
    });
    assert!(r["error"].is_null(), "{r}");
    let _ = std::fs::remove_file(&output);
}

#[test]
fn a_slow_upstream_does_not_delay_others() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let _d = start(
        &world,
        json!({"listen": {"port": daemon::PORT, "workers": 1}}),
    );
    let file = world.make_file("slow", 1 << 20);
    let url = format!("https://allowed.test{}?rate=16k", file.slow_path);
    let mut slow: Vec<_> = (0..8)
        .map(|_| {
            let mut cmd = world.agent_cmd([
                "curl",
                "-sS",
                "--max-time",
                "20",
                "-o",
                "/dev/null",
                "--cacert",
            ]);
            cmd.arg(world.ca_cert()).arg(&url).spawn().expect("curl")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..20 {
        let started = Instant::now();
        curl_ok(&world, "https://allowed.test/");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a quick request took {:?} beside slow ones",
            started.elapsed()
        );
    }
    for s in &mut slow {
        let _ = s.kill();
        let _ = s.wait();
    }
}

#[test]
fn a_second_daemon_with_the_same_table_or_port_is_refused() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let mut first = start(&world, json!({}));
    let first_pid = first.guard.pid();
    for (what, extra) in [
        ("the same config", json!({})),
        (
            "another table, the same port",
            json!({"interception": {"cgroups": [world.agent().relative_path()], "table": "second"}}),
        ),
    ] {
        let config = world.write_config(daemon::config(&world, extra));
        let mut second = world
            .host_cmd([daemon::binary(), "run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run agent-egress");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = second.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = second.kill();
                let _ = second.wait();
                panic!("{what}: the second daemon kept running beside pid {first_pid}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut log = String::new();
        second
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut log)
            .expect("read its log");
        assert_eq!(status.code(), Some(1), "{what}: {log}");
        assert!(
            log.contains(&format!("agent-egress pid {first_pid} already runs")),
            "{what}: {log}"
        );
    }
    // The first is untouched: its table and its connections.
    alive(&mut first);
    assert!(first.table_installed(&world));
    curl_ok(&world, "https://allowed.test/");
}
