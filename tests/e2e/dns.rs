//! The DNS scenarios: the agent's own DNS clients (dig, curl's resolver,
//! getent) against a daemon that answers every query of the agent under the
//! policy (`dns.capture`), whatever resolver it asks.

use crate::harness::daemon::{self, Daemon};
use crate::harness::{self, arrivals, World, ALLOWED, BLOCKED, DNS_V4, OTHER};
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

pub fn dns_decided() {
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
    // Asked again: answered from the cache, the resolver not asked.
    let asked = world.count_arrived(arrivals::DNS);
    let out = dig(&world, &DNS_V4.to_string(), &["allowed.test", "A"]);
    assert!(out.contains(&ALLOWED.v4.to_string()), "{out}");
    let cached = d.wait_event("dns", "the cached answer", |r| {
        r["host"] == "allowed.test" && r["cached"] == true
    });
    assert_eq!(
        cached["answers"],
        json!([ALLOWED.v4.to_string()]),
        "{cached}"
    );
    assert_eq!(
        world.count_arrived(arrivals::DNS),
        asked,
        "the cached name was asked again"
    );

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
    // Answered at once, dig exiting as soon as it has the answer: the
    // records name it all the same.
    for r in [&cached, &r] {
        assert!(
            r["pid"].is_u64() && r["exe"].as_str().is_some_and(|e| e.ends_with("/dig")),
            "the asking process was not named: {r}"
        );
    }
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
pub fn dns_handler_down_leaks_nothing() {
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

/// Bytes that are neither TLS nor HTTP (an SSH-like greeting) to `addr`:80,
/// as the agent; what came back.
fn nameless(world: &World, addr: &str) -> String {
    let out = world
        .agent_cmd([
            "sh",
            "-c",
            &format!(
                "printf 'SSH-2.0-agent\\r\\n\\r\\n' | socat -t 2 - TCP:{addr}:80,connect-timeout=3"
            ),
        ])
        .output()
        .expect("socat");
    text(&out)
}

/// A connection that names nothing is decided under the name the agent
/// resolved its address for; with `require_dns`, one to an address it never
/// resolved through us gets only rules by address, even when the default
/// would let it through.
pub fn nameless_by_resolved_name() {
    let world = World::new();
    let config = daemon::config(
        &world,
        json!({
            "dns": {"servers": [DNS_V4.to_string()], "capture": true, "require_dns": true},
            "rules": [
                {"name": "allowed", "domains": ["allowed.test"], "outbound": "direct"},
                {"name": "other-by-address", "ips": [OTHER.v4.to_string()], "outbound": "direct"},
                {"name": "no-blocked", "domains": ["blocked.test"], "outbound": "block"}
            ],
            "default": "direct"
        }),
    );
    let d = Daemon::start(&world, config);
    let out = dig(&world, &DNS_V4.to_string(), &["allowed.test", "A"]);
    assert_eq!(status_of(&out), "NOERROR", "{out}");

    // Resolved through us: the greeting reaches nginx under allowed.test's rule.
    let reply = nameless(&world, &ALLOWED.v4.to_string());
    assert!(
        reply.contains("400"),
        "nginx did not answer the greeting: {reply}"
    );
    let r = d.wait_record("the nameless connection to a resolved address", |r| {
        r["dst"] == format!("{}:80", ALLOWED.v4)
    });
    assert_eq!(
        (
            &r["verdict"],
            &r["rule"],
            &r["host"],
            &r["resolved"],
            &r["resolved_name"]
        ),
        (
            &json!("allow"),
            &json!("allowed"),
            &json!("allowed.test"),
            &json!(true),
            &json!("allowed.test")
        ),
        "{r}"
    );

    // Never resolved, and the default would allow it: refused all the same.
    let before = world.count_arrived(BLOCKED.counter);
    nameless(&world, &BLOCKED.v4.to_string());
    let r = d.wait_record("the hard-coded address", |r| {
        r["dst"] == format!("{}:80", BLOCKED.v4)
    });
    assert_eq!(
        (&r["verdict"], &r["dial"], &r["resolved"]),
        (&json!("block"), &json!("refused_unresolved"), &json!(false)),
        "{r}"
    );
    assert_eq!(
        world.count_arrived(BLOCKED.counter),
        before,
        "the hard-coded address was reached"
    );
    // A rule by address still lets a never-resolved address through.
    nameless(&world, &OTHER.v4.to_string());
    let r = d.wait_record("the address a rule names", |r| {
        r["dst"] == format!("{}:80", OTHER.v4)
    });
    assert_eq!(
        (&r["verdict"], &r["rule"]),
        (&json!("allow"), &json!("other-by-address")),
        "{r}"
    );

    // A name of its own that is none of its address's: said so.
    let out = world.curl_agent([
        "--resolve",
        &format!("other.test:80:{}", ALLOWED.v4),
        "http://other.test/",
    ]);
    let _ = out;
    let r = d.wait_record("the name its address was not resolved for", |r| {
        r["host"] == "other.test" && r["dst"] == format!("{}:80", ALLOWED.v4)
    });
    assert_eq!(
        (&r["name_mismatch"], &r["resolved_name"]),
        (&json!(true), &json!("allowed.test")),
        "{r}"
    );
}

/// 1,000 queries for random labels under an allowed domain, as fast as one
/// socket sends them: past the per-agent bound on distinct names below one
/// parent, REFUSED at once and not forwarded; the agent's other lookups go on.
const EXFIL_BURST: &str = include_str!("../../vm-tests/dns-burst.py");

pub fn dns_exfiltration_limited() {
    let world = World::new();
    let config = daemon::config(
        &world,
        json!({"dns": {"servers": [DNS_V4.to_string()], "capture": true,
                       "rate_limit": {"queries_per_second": 100000, "burst": 100000, "names_per_parent": 50}},
               "audit": {"path": world.dir().join("audit.jsonl"), "queue": 65536}}),
    );
    let d = Daemon::start(&world, config);
    let before = world.count_arrived(arrivals::DNS);
    let out = world
        .agent_cmd(["python3", "-c", EXFIL_BURST, &DNS_V4.to_string()])
        .output()
        .expect("python3");
    let codes = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // rcode 5 is REFUSED; the first 50 names went to dnsmasq, which answers
    // whatever it answers.
    let counts: Vec<(String, u32)> = codes
        .split(' ')
        .filter_map(|c| c.split_once(':'))
        .map(|(rcode, n)| (rcode.to_string(), n.parse().unwrap_or(0)))
        .collect();
    let refused: u32 = counts
        .iter()
        .filter(|(c, _)| c == "5")
        .map(|(_, n)| n)
        .sum();
    let others: u32 = counts
        .iter()
        .filter(|(c, _)| c != "5")
        .map(|(_, n)| n)
        .sum();
    let records = d.records();
    let dns_records = records.iter().filter(|r| r["event"] == "dns").count();
    let send_errors: Vec<String> = records
        .iter()
        .filter_map(|r| r["error"].as_str())
        .filter(|e| e.contains("answering"))
        .map(String::from)
        .take(3)
        .collect();
    assert_eq!(
        (refused, others),
        (950, 50),
        "answers by rcode: {codes} ({}); {dns_records} dns records; send errors {send_errors:?}",
        text(&out)
    );
    let forwarded = world.count_arrived(arrivals::DNS) - before;
    assert!(
        forwarded <= 50 * 2,
        "{forwarded} queries reached the resolver"
    );
    let r = d.wait_event("dns", "a rate-limited query", |r| r["rate_limited"] == true);
    assert_eq!(
        (&r["verdict"], &r["rcode"]),
        (&json!("block"), &json!("REFUSED")),
        "{r}"
    );
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("below allowed.test"),
        "{r}"
    );
    // The limit is on that parent: the agent's other lookups are answered.
    let out = dig(&world, &DNS_V4.to_string(), &["allowed.test", "A"]);
    assert_eq!(status_of(&out), "NOERROR", "{out}");
}

/// glibc's own resolver (`getent`) in the agent's cgroup, pointed at a
/// resolver on the agent host's loopback that answers any name: answered by
/// the handler under the policy; the loopback resolver is asked nothing.
pub fn getent_loopback_resolver() {
    let world = World::new();
    let config = daemon::config(
        &world,
        json!({"dns": {"servers": [DNS_V4.to_string()], "capture": true}}),
    );
    let _d = Daemon::start(&world, config);
    let log = world.dir().join("loopback-dnsmasq.log");
    let loopback = harness::ChildGuard::spawn(
        world.host_cmd([
            "dnsmasq",
            "--no-daemon",
            "--listen-address=127.0.0.53",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--address=/#/203.0.113.99",
            "--log-queries",
            "--log-facility=-",
        ]),
        "loopback dnsmasq",
        &log,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The control: outside the agents, it answers anything with its canary.
    let started = std::time::Instant::now();
    loop {
        let out = world
            .host_cmd([
                "dig",
                "+short",
                "+time=1",
                "+tries=1",
                "@127.0.0.53",
                "blocked.test",
            ])
            .output()
            .expect("dig");
        if text(&out).contains("203.0.113.99") {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the loopback resolver does not answer: {} {}",
            text(&out),
            loopback.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let resolv = world.dir().join("resolv-loopback.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").expect("resolv.conf");
    let getent = |name: &str| {
        world
            .agent_cmd([
                "unshare",
                "-m",
                "sh",
                "-c",
                &format!(
                    "mount --bind {} /etc/resolv.conf && exec getent ahosts {name}",
                    resolv.display()
                ),
            ])
            .output()
            .expect("getent")
    };
    let out = getent("allowed.test");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&ALLOWED.v4.to_string()),
        "{}",
        text(&out)
    );
    let out = getent("blocked.test");
    assert!(!out.status.success(), "{}", text(&out));
    for out in [getent("allowed.test"), getent("blocked.test")] {
        assert!(
            !text(&out).contains("203.0.113.99"),
            "the loopback resolver answered the agent: {}",
            text(&out)
        );
    }
    assert!(
        !loopback.log().contains("allowed.test"),
        "the loopback resolver was asked: {}",
        loopback.log()
    );
}

/// allowed.test publishes an HTTPS record with an ECH config: the agent gets
/// the record without it (a client would otherwise send only the provider's
/// public name in the clear); with `strip_ech` off, with it.
pub fn ech_stripped() {
    for strip in [true, false] {
        let world = World::new();
        let config = daemon::config(
            &world,
            json!({"dns": {"servers": [DNS_V4.to_string()], "strip_ech": strip}}),
        );
        let d = Daemon::start(&world, config);
        let out = dig(&world, &DNS_V4.to_string(), &["allowed.test", "HTTPS"]);
        assert_eq!(status_of(&out), "NOERROR", "{out}");
        assert!(
            out.contains("alpn=\"h2\"") || out.contains("alpn=h2"),
            "{out}"
        );
        assert_eq!(out.contains("ech="), !strip, "strip_ech {strip}: {out}");
        let r = record(&d, "allowed.test", "HTTPS");
        let said = r["answers"].to_string().contains("ech taken out");
        assert_eq!(said, strip, "{r}");
    }
}

/// Over TCP too: an agent's TCP query is answered by the handler under the
/// policy, and an answer too large for a datagram, truncated over UDP, comes
/// whole when the agent's resolver asks again over TCP.
pub fn dns_over_tcp() {
    let world = World::new();
    let config = daemon::config(
        &world,
        json!({"dns": {"servers": [DNS_V4.to_string()], "timeout_ms": 1000}}),
    );
    let d = Daemon::start(&world, config);
    let out = dig(&world, &DNS_V4.to_string(), &["+tcp", "allowed.test", "A"]);
    assert_eq!(status_of(&out), "NOERROR", "{out}");
    assert!(out.contains(&ALLOWED.v4.to_string()), "{out}");
    let before = world.count_arrived(arrivals::DNS);
    let out = dig(&world, "127.0.0.53", &["+tcp", "x.blocked.test", "A"]);
    assert_eq!(status_of(&out), "NXDOMAIN", "{out}");
    assert_eq!(
        world.count_arrived(arrivals::DNS),
        before,
        "a refused TCP query was forwarded"
    );
    // No EDNS: 512 bytes over UDP, too few for its addresses; dig asks again over TCP.
    let out = dig(
        &world,
        &DNS_V4.to_string(),
        &["+noedns", harness::BIG_NAME, "A"],
    );
    assert_eq!(status_of(&out), "NOERROR", "{out}");
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    let answers = out.lines().filter(|l| l.contains("\tA\t")).count();
    assert_eq!(answers, harness::BIG_NAME_ADDRESSES as usize, "{out}");
    let r = d.wait_event("dns", "the query over TCP", |r| {
        r["host"] == harness::BIG_NAME && r["answers"].as_array().is_some_and(|a| a.len() >= 16)
    });
    assert_eq!(
        (&r["verdict"], &r["rcode"]),
        (&json!("allow"), &json!("NOERROR")),
        "{r}"
    );
    assert!(
        r["pid"].is_u64(),
        "the TCP query's process was not named: {r}"
    );
}
