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
