// SPDX-License-Identifier: GPL-3.0-or-later
//! The DNS handler against upstreams that misbehave: one that answers
//! garbage, one that answers with another id, one that stays silent. None of
//! them settles a query; the next server does, and with none left the agent
//! gets SERVFAIL and a record that says what each server did.

mod harness;

use harness::daemon::{self, Daemon};
use harness::{ChildGuard, World, ALLOWED, DNS_V4};
use serde_json::json;
use std::time::{Duration, Instant};

/// A UDP "resolver" on argv[1]:53 that answers each query as argv[2] says:
/// `garbage` (random bytes), `other-id` (the query echoed back as a response
/// with its id changed), `silent` (nothing). Prints each query it gets.
const BAD_RESOLVER: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    query, peer = s.recvfrom(4096)
    print("query", len(query), flush=True)
    if sys.argv[2] == "garbage":
        s.sendto(os.urandom(40), peer)
    elif sys.argv[2] == "other-id":
        reply = bytearray(query)
        reply[0] ^= 0xFF
        reply[2] |= 0x80
        s.sendto(bytes(reply), peer)
"#;

const BAD: [(&str, &str); 3] = [
    ("198.51.100.54", "garbage"),
    ("198.51.100.55", "other-id"),
    ("198.51.100.56", "silent"),
];

fn dig(world: &World, name: &str) -> (String, Duration) {
    let started = Instant::now();
    let out = world
        .agent_cmd(["dig", "+time=5", "+tries=1", &format!("@{DNS_V4}"), name])
        .output()
        .expect("dig");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text, started.elapsed())
}

#[test]
fn misbehaving_upstreams_settle_nothing() {
    if !harness::require_root_and_tools(&["dig", "python3"]) {
        return;
    }
    let world = World::new();
    let mut servers: Vec<ChildGuard> = Vec::new();
    for (addr, mode) in BAD {
        let added = world
            .net_cmd(["ip", "addr", "add", &format!("{addr}/32"), "dev", "lo"])
            .status()
            .expect("ip addr");
        assert!(added.success());
        let log = world.dir().join(format!("resolver-{mode}.log"));
        let server = ChildGuard::spawn(
            world.net_cmd(["python3", "-c", BAD_RESOLVER, addr, mode]),
            mode,
            &log,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        while !server.log().contains("ready") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{mode} resolver: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        servers.push(server);
    }
    let bad: Vec<String> = BAD.iter().map(|(a, _)| a.to_string()).collect();

    // Garbage, another id, silence: each waits out its timeout; the last server answers.
    let mut with_good = bad.clone();
    with_good.push(DNS_V4.to_string());
    let d = Daemon::start(
        &world,
        daemon::config(
            &world,
            json!({"dns": {"servers": with_good, "timeout_ms": 300}}),
        ),
    );
    let (out, took) = dig(&world, "allowed.test");
    assert!(out.contains(&ALLOWED.v4.to_string()), "{out}");
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    let r = d.wait_event("dns", "the answered query", |r| r["host"] == "allowed.test");
    assert_eq!(
        (&r["rcode"], &r["upstream"]),
        (&json!("NOERROR"), &json!(format!("{DNS_V4}:53"))),
        "{r}"
    );
    for server in &servers {
        assert!(
            server.log().contains("query"),
            "a server was not asked: {}",
            server.log()
        );
    }
    drop(d);

    // Only misbehaving servers: SERVFAIL, and the record says what each did.
    let d = Daemon::start(
        &world,
        daemon::config(&world, json!({"dns": {"servers": bad, "timeout_ms": 300}})),
    );
    let (out, took) = dig(&world, "other.allowed.test");
    assert!(out.contains("status: SERVFAIL"), "{out}");
    assert!(took < Duration::from_secs(3), "failed after {took:?}");
    let r = d.wait_event("dns", "the failed query", |r| {
        r["host"] == "other.allowed.test"
    });
    assert_eq!(r["rcode"], "SERVFAIL", "{r}");
    let error = r["error"].as_str().unwrap_or("");
    for (addr, _) in BAD {
        assert!(error.contains(&format!("{addr}:53 timed out")), "{r}");
    }
    // The handler goes on: a refused name is still refused at once.
    let (out, _) = dig(&world, "x.blocked.test");
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    drop(d);
    drop(servers);
}

/// argv[2] queries a second for argv[3] seconds to argv[1]:53, each for a
/// fresh random label below allowed.test (paced in 10 ms steps), reading
/// answers as they come. Prints "sent N" and each rcode's count.
const LABEL_FLOOD: &str = r#"
import random, socket, string, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
s.connect((sys.argv[1], 53))
s.setblocking(False)
rate, seconds = int(sys.argv[2]), float(sys.argv[3])
codes, sent, start = {}, 0, time.monotonic()
def drain():
    while True:
        try:
            rcode = s.recv(4096)[3] & 0xF
        except BlockingIOError:
            return
        codes[rcode] = codes.get(rcode, 0) + 1
while time.monotonic() - start < seconds:
    due = int((time.monotonic() - start) * rate)
    while sent < due:
        label = "".join(random.choice(string.ascii_lowercase) for _ in range(30))
        q = struct.pack(">HHHHHH", sent & 0xFFFF, 0x0100, 1, 0, 0, 0)
        for part in (label, "allowed", "test"):
            q += bytes([len(part)]) + part.encode()
        s.send(q + b"\0\0\1\0\1")
        sent += 1
    drain()
    time.sleep(0.01)
time.sleep(0.5)
drain()
print("sent", sent, " ".join(f"{k}:{v}" for k, v in sorted(codes.items())))
"#;

/// argv[1]:53 asked for allowed.test every 20 ms for argv[2] seconds, one at a
/// time. Prints how many were answered NOERROR, how many were not, and the
/// slowest answer in ms.
const STEADY_LOOKUPS: &str = r#"
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 53))
s.settimeout(2)
ok = bad = 0
slowest = 0.0
q = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\7allowed\4test\0\0\1\0\1"
start = time.monotonic()
while time.monotonic() - start < float(sys.argv[2]):
    t = time.monotonic()
    s.send(q)
    try:
        answer = s.recv(4096)
        ok, bad = (ok + 1, bad) if answer[3] & 0xF == 0 else (ok, bad + 1)
    except socket.timeout:
        bad += 1
    slowest = max(slowest, (time.monotonic() - t) * 1000)
    time.sleep(0.02)
print(ok, bad, round(slowest, 1))
"#;

/// 1,000 random labels a second below an allowed suffix from one agent, for
/// three seconds: refused past its limits, while another agent's lookups are
/// all answered, none stalled, and the flooding agent's own ordinary lookup
/// is answered again once its rate allows.
#[test]
fn a_label_flood_is_refused_and_stalls_no_other_agent() {
    if !harness::require_root_and_tools(&["python3"]) {
        return;
    }
    let world = World::new();
    let other = world.add_cgroup("other-agent");
    let d = Daemon::start(
        &world,
        daemon::config(
            &world,
            json!({
                "interception": {"cgroups": [world.agent().relative_path(), other.relative_path()]},
                "audit": {"path": world.dir().join("audit.jsonl"), "queue": 65536}
            }),
        ),
    );
    let resolver = DNS_V4.to_string();
    let flood = world
        .agent_cmd(["python3", "-c", LABEL_FLOOD, &resolver, "1000", "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let steady = world
        .cgroup_cmd(&other, ["python3", "-c", STEADY_LOOKUPS, &resolver, "3"])
        .output()
        .expect("python3");
    let flood = flood.wait_with_output().expect("the flood");
    let flood_out = String::from_utf8_lossy(&flood.stdout).trim().to_string();
    let steady_out = String::from_utf8_lossy(&steady.stdout).trim().to_string();

    // The other agent: every lookup answered, none slow.
    let fields: Vec<f64> = steady_out
        .split(' ')
        .filter_map(|f| f.parse().ok())
        .collect();
    let [ok, bad, slowest] = fields[..] else {
        panic!(
            "steady lookups: {steady_out:?} {}",
            String::from_utf8_lossy(&steady.stderr)
        );
    };
    assert!(ok >= 100.0 && bad == 0.0, "other agent: {steady_out}");
    assert!(slowest < 500.0, "an other agent's lookup took {slowest} ms");

    // The flood: sent at the rate asked, and refused past the limits (100
    // names below one parent a minute, 100 queries a second after a burst
    // of 500).
    let mut sent = 0u32;
    let mut refused = 0u32;
    let mut answered = 0u32;
    for field in flood_out.split(' ') {
        match field.split_once(':') {
            Some(("5", n)) => refused += n.parse::<u32>().unwrap_or(0),
            Some((_, n)) => answered += n.parse::<u32>().unwrap_or(0),
            None => sent = field.parse().unwrap_or(sent),
        }
    }
    assert!(sent >= 2_700, "the flood sent {sent}: {flood_out}");
    assert!(
        answered <= 100 && refused + answered >= sent * 9 / 10,
        "the flood: {flood_out}"
    );
    let r = d.wait_event("dns", "a rate-limited query", |r| r["rate_limited"] == true);
    assert_eq!(r["agent"], world.agent().relative_path(), "{r}");

    // Its limit refills: an ordinary lookup of the flooding agent is answered.
    std::thread::sleep(Duration::from_millis(1_100));
    let (out, _) = dig(&world, "allowed.test");
    assert!(out.contains(&ALLOWED.v4.to_string()), "{out}");
}
