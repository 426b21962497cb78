// SPDX-License-Identifier: GPL-3.0-or-later
//! `dns.capture`: the agent's own DNS clients (dig, curl's resolver) against a
//! daemon that answers every query of the agent under the policy, whatever
//! resolver it asks: allowed names are forwarded to `dns.servers`, refused
//! names and tunnel types are answered at once and nothing leaves, a rogue
//! resolver's address and a loopback resolver are answered by the handler.

mod harness;

use harness::daemon::{self, Daemon};
use harness::{arrivals, World, ALLOWED, DNS_V4};
use serde_json::{json, Value};
use std::process::Output;

const FORBIDDEN_DNS: &str = "203.0.113.53";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `dig` as the agent: its full output.
fn dig(world: &World, server: &str, args: &[&str]) -> String {
    let at = format!("@{server}");
    let out = world
        .agent_cmd(["dig", "+time=2", "+tries=1", &at])
        .args(args)
        .output()
        .expect("dig");
    text(&out)
}

fn status_of(dig_output: &str) -> &str {
    dig_output
        .split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("(no answer)")
}

fn record(d: &Daemon, host: &str, qtype: &str) -> Value {
    d.wait_event("dns", &format!("the record of {host} {qtype}"), |r| {
        r["host"] == host && r["qtype"] == qtype
    })
}

#[test]
fn every_agent_query_is_decided_and_refused_names_leave_nothing() {
    if !harness::require_root_and_tools(&["dig", "curl", "socat"]) {
        return;
    }
    let world = World::new();
    let config = daemon::config(
        &world,
        json!({"dns": {"servers": [DNS_V4.to_string()], "timeout_ms": 1000, "capture": true}}),
    );
    let d = Daemon::start(&world, config);
    let agent = world.agent().relative_path().to_string();

    // Allowed: forwarded, answered, recorded with the agent.
    let out = dig(&world, &DNS_V4.to_string(), &["allowed.test", "A"]);
    assert_eq!(status_of(&out), "NOERROR", "{out}");
    assert!(out.contains(&ALLOWED.v4.to_string()), "{out}");
    let r = record(&d, "allowed.test", "A");
    assert_eq!(
        (&r["verdict"], &r["rcode"], &r["agent"]),
        (&json!("allow"), &json!("NOERROR"), &json!(agent)),
        "{r}"
    );
    assert_eq!(r["answers"], json!([ALLOWED.v4.to_string()]), "{r}");
    assert_eq!(r["upstream"], format!("{DNS_V4}:53"), "{r}");

    // Refused: NXDOMAIN at once, and the resolver sees nothing of it.
    let before = world.count_arrived(arrivals::DNS);
    let out = dig(
        &world,
        &DNS_V4.to_string(),
        &["c2VjcmV0LWRhdGE.blocked.test", "A"],
    );
    assert_eq!(status_of(&out), "NXDOMAIN", "{out}");
    let r = record(&d, "c2vjcmv0lwrhdge.blocked.test", "A");
    assert_eq!(
        (&r["verdict"], &r["rule"]),
        (&json!("block"), &json!("default")),
        "{r}"
    );
    assert!(r["duration_ms"].as_u64().is_some_and(|ms| ms < 5), "{r}");
    // Tunnel types, even for an allowed name.
    let out = dig(&world, &DNS_V4.to_string(), &["allowed.test", "TXT"]);
    assert_eq!(status_of(&out), "REFUSED", "{out}");
    assert_eq!(
        world.count_arrived(arrivals::DNS),
        before,
        "a refused query reached the resolver"
    );

    // A rogue resolver's address and a loopback resolver: answered by us,
    // and not a packet at the rogue.
    let rogue = world.count_arrived(arrivals::FORBIDDEN_DNS);
    for server in [FORBIDDEN_DNS, "127.0.0.53", "::1", "2001:db8:1::2"] {
        let out = dig(&world, server, &["allowed.test", "AAAA"]);
        assert_eq!(status_of(&out), "NOERROR", "via {server}: {out}");
        assert!(out.contains("2001:db8:100::10"), "via {server}: {out}");
        let out = dig(&world, server, &["x.blocked.test", "A"]);
        assert_eq!(status_of(&out), "NXDOMAIN", "via {server}: {out}");
    }
    assert_eq!(
        world.count_arrived(arrivals::FORBIDDEN_DNS),
        rogue,
        "a query reached the rogue resolver"
    );

    // Garbage does not stop the handler; curl's own resolver goes through it.
    let garbage = world
        .agent_cmd(["sh", "-c", &format!("printf 'xx' | socat -u - UDP-SENDTO:{DNS_V4}:53; printf '%0100d' 0 | socat -u - UDP-SENDTO:{DNS_V4}:53")])
        .output()
        .expect("socat");
    assert!(garbage.status.success(), "{}", text(&garbage));
    let out = world.curl_agent(["https://allowed.test/"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == ALLOWED.body(),
        "{}",
        text(&out)
    );
    let out = world.curl_agent(["https://blocked.test/"]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "curl must not resolve blocked.test: {}",
        text(&out)
    );
}

/// With the handler gone (the daemon killed), an agent's query is answered
/// by nobody and reaches no resolver; one to a loopback resolver is refused
/// at once (ICMP port unreachable; the kernel cannot send one from a foreign
/// address, so a query to an off-host resolver times out instead).
#[test]
fn handler_down_leaks_nothing() {
    if !harness::require_root_and_tools(&["dig"]) {
        return;
    }
    let world = World::new();
    let config = daemon::config(
        &world,
        json!({"dns": {"servers": [DNS_V4.to_string()], "capture": true}}),
    );
    let d = Daemon::start(&world, config);
    d.signal(libc::SIGKILL);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let before = world.count_arrived(arrivals::DNS);
    for server in [DNS_V4.to_string(), "127.0.0.53".into(), "::1".into()] {
        let started = std::time::Instant::now();
        let out = dig(&world, &server, &["allowed.test", "A"]);
        let took = started.elapsed();
        assert!(!out.contains("ANSWER SECTION"), "via {server}: {out}");
        if server != DNS_V4.to_string() {
            assert!(
                out.contains("refused") && took < std::time::Duration::from_secs(1),
                "via {server}: {took:?}: {out}"
            );
        }
    }
    assert_eq!(
        world.count_arrived(arrivals::DNS),
        before,
        "a query left the agent host"
    );
}
