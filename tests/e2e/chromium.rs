//! The scenarios with headless Chromium as the agent: a real browser's
//! ClientHello, cross-origin subresources, QUIC and ECH, against the running daemon.
//! Chromium resolves through the agent netns' resolv.conf (dnsmasq) and trusts the
//! test CA through the NSS database the harness gives it.

use crate::harness::daemon::{self, Daemon};
use crate::harness::{
    arrivals, World, ALLOWED, BLOCKED, DNS_V4, ECH_PUBLIC_NAME, EVIL_MARKER, PAGE_CONTENT,
};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

/// Counter of TCP segments to port 443 whose payload opens a TLS handshake record
/// longer than a 1500-byte segment can carry: Chromium's ClientHello with its
/// post-quantum key share, as the proxy forwarded it.
const BIG_HELLO: &str = "big_client_hello";
const BIG_HELLO_MATCH: &str = "tcp dport 443 @ih,0,8 0x16 @ih,24,16 > 1500";

/// RFC 9000 §14.1: a QUIC client pads every datagram with an Initial packet to at
/// least this many bytes.
const QUIC_INITIAL_MIN_BYTES: u64 = 1200;

pub fn allowed_page_blocked_subresource() {
    let world = World::new();
    let d = Daemon::start(&world, daemon::config(&world, json!({})));
    world.add_counter(BIG_HELLO, BIG_HELLO_MATCH);
    let blocked_before = world.count_arrived(BLOCKED.counter);

    // The budget lets the page's script and subresources settle before the dump.
    // blocked.test pinned to its address: the refusal then comes by name
    // in the handshake (unpinned, the handler refuses the name itself).
    let pin = format!("--host-resolver-rules=MAP blocked.test {}", BLOCKED.v4);
    let dom = dump_dom(world.chromium_agent([
        "--virtual-time-budget=5000",
        "--dump-dom",
        pin.as_str(),
        "https://allowed.test/page.html",
    ]));
    assert!(dom.contains(PAGE_CONTENT), "the page did not render: {dom}");
    assert!(
        dom.contains("<title>BLOCKED</title>"),
        "the fetch from blocked.test did not fail: {dom}"
    );
    assert!(
        !dom.contains(EVIL_MARKER),
        "blocked.test's script ran: {dom}"
    );
    assert_eq!(
        world.count_arrived(BLOCKED.counter),
        blocked_before,
        "a packet reached blocked.test"
    );

    // The connection that carried the page (Chromium may open and drop a spare one).
    let page = d.wait_record("Chromium fetching allowed.test", |r| {
        r["host"] == "allowed.test"
            && by_chromium(r)
            && r["error"].is_null()
            && r["bytes_down"].as_u64() > Some(0)
    });
    assert_eq!(page["proto"], "tls", "{page}");
    assert_eq!(page["sni"], "allowed.test", "{page}");
    assert_eq!(page["verdict"], "allow", "{page}");
    assert_eq!(page["rule"], "allowed", "{page}");
    assert!(page["pid"].as_u64() > Some(1), "{page}");
    assert_eq!(page["agent"], world.agent().relative_path(), "{page}");
    // The SNI above came out of a hello longer than one segment: the proxy read it
    // whole before choosing, and forwarded it whole.
    assert!(
        world.count_arrived(BIG_HELLO) > 0,
        "no ClientHello over 1500 bytes reached allowed.test: not Chromium's post-quantum one"
    );

    // Chromium's own resolver asked the handler for allowed.test.
    let lookup = d.wait_event("dns", "Chromium resolving allowed.test", |r| {
        r["host"] == "allowed.test" && r["verdict"] == "allow"
    });
    assert_eq!(lookup["agent"], world.agent().relative_path(), "{lookup}");

    d.wait_record("Chromium's blocked.test connection", |r| {
        r["host"] == "blocked.test"
    });
    let blocked: Vec<Value> = end_records(&d)
        .into_iter()
        .filter(|r| r["host"] == "blocked.test")
        .collect();
    for r in &blocked {
        assert_eq!(r["proto"], "tls", "{r}");
        assert_eq!(r["sni"], "blocked.test", "{r}");
        assert_eq!(r["verdict"], "block", "{r}");
        assert_eq!(r["outbound"], "block", "{r}");
        assert_eq!(r["agent"], world.agent().relative_path(), "{r}");
        assert_eq!(r["cgroup_id"], world.agent().id(), "{r}");
        // Chromium closes a refused connection within a millisecond or two; the
        // proxy holds the refusal until the audit writer has named the process.
        assert!(by_chromium(r), "Chromium not named: {r}");
        assert!(r["pid"].as_u64().unwrap_or(0) > 1, "{r}");
    }
}

pub fn quic_fallback() {
    let world = World::new();
    let d = Daemon::start(&world, daemon::config(&world, json!({})));
    let quic_before = world.count_arrived(arrivals::QUIC);
    let dropped_before = dropped(&world, &d);

    // The first visit learns `Alt-Svc: h3` and keeps it in the profile; from then on
    // Chromium tries QUIC (the favicon of the first visit, or the second visit), is
    // dropped, marks QUIC broken for the origin and stays on TCP. No --disable-quic.
    let profile = world.chromium_profile();
    for visit in 1..=2 {
        let dom = dump_dom(
            world.chromium_agent_with_profile(&profile, ["--dump-dom", "https://allowed.test/"]),
        );
        assert!(
            dom.contains(ALLOWED.body().trim_end()),
            "visit {visit}: the page did not render: {dom}"
        );
    }

    assert_eq!(
        world.count_arrived(arrivals::QUIC),
        quic_before,
        "UDP/443 left the agent host"
    );
    let (packets, bytes) = dropped(&world, &d);
    let (packets, bytes) = (packets - dropped_before.0, bytes - dropped_before.1);
    assert!(packets > 0, "Chromium never tried QUIC: nothing dropped");
    assert!(
        bytes >= packets * QUIC_INITIAL_MIN_BYTES,
        "dropped {packets} packets of {bytes} bytes: not all QUIC Initials"
    );
    // Each visit is its own Chromium, with its own network process.
    let visits: BTreeSet<u64> = end_records(&d)
        .iter()
        .filter(|r| r["host"] == "allowed.test" && by_chromium(r))
        .filter(|r| r["proto"] == "tls" && r["verdict"] == "allow")
        .filter(|r| r["bytes_down"].as_u64() > Some(0))
        .filter_map(|r| r["pid"].as_u64())
        .collect();
    assert_eq!(
        visits.len(),
        2,
        "expected TCP connections to allowed.test from both visits; records:\n{:#?}",
        d.records()
    );
    eprintln!("QUIC tried and dropped: {packets} packets, {bytes} bytes; both visits over TCP");
}

/// The features Chromium needs to use an ECH config from DNS: its own resolver
/// (which asks for HTTPS records; the system's getaddrinfo cannot), the use of
/// those records, and ECH itself. Debian's Chromium 156 has all three on by
/// default, as a user's Chrome does; named here so that a build or a field trial
/// turning one off cannot make the control pass for want of ECH.
const ECH_FEATURES: &str = "--enable-features=AsyncDns,UseDnsHttpsSvcb,EncryptedClientHello";

/// allowed.test publishes an HTTPS record whose ECH config names public.test.
/// With `dns.strip_ech` on, Chromium gets the record without it, loads the page,
/// and the proxy decides and audits the connection under allowed.test. The
/// control, with `strip_ech` off: Chromium uses the config and sends only the
/// public name in the clear, so the proxy sees (and here refuses) public.test
/// and the page does not load.
pub fn ech_stripped() {
    for strip in [true, false] {
        let world = World::new();
        let dns = json!({"servers": [DNS_V4.to_string()], "timeout_ms": 1000, "strip_ech": strip});
        let d = Daemon::start(&world, daemon::config(&world, json!({ "dns": dns })));
        let dom =
            dump_dom(world.chromium_agent([ECH_FEATURES, "--dump-dom", "https://allowed.test/"]));

        // Chromium's own resolver asked for the HTTPS record, and got it with
        // its ECH config taken out, or whole.
        let https = d.wait_event(
            "dns",
            "Chromium asking for allowed.test's HTTPS record",
            |r| r["host"] == "allowed.test" && r["qtype"] == "HTTPS" && by_chromium(r),
        );
        assert_eq!(https["rcode"], "NOERROR", "{https}");
        let taken_out = https["answers"].to_string().contains("ech taken out");
        assert_eq!(taken_out, strip, "strip_ech {strip}: {https}");

        // Every connection Chromium made to allowed.test's addresses, by the
        // name its ClientHello carried in the clear.
        d.wait_record("Chromium's connection to allowed.test's address", |r| {
            by_chromium(r) && to_allowed(r)
        });
        let snis: BTreeSet<String> = end_records(&d)
            .iter()
            .filter(|r| by_chromium(r) && to_allowed(r))
            .map(|r| r["sni"].as_str().unwrap_or("(none)").to_string())
            .collect();
        if strip {
            assert!(
                dom.contains(ALLOWED.body().trim_end()),
                "strip_ech on: the page did not render: {dom}"
            );
            let page = d.wait_record("Chromium fetching allowed.test", |r| {
                by_chromium(r) && r["error"].is_null() && r["bytes_down"].as_u64() > Some(0)
            });
            assert_eq!(page["sni"], "allowed.test", "{page}");
            assert_eq!(page["host"], "allowed.test", "{page}");
            assert_eq!(page["verdict"], "allow", "{page}");
            assert_eq!(page["rule"], "allowed", "{page}");
            assert_eq!(
                snis,
                BTreeSet::from(["allowed.test".to_string()]),
                "strip_ech on: Chromium sent another name in the clear"
            );
        } else {
            assert!(
                !dom.contains(ALLOWED.body().trim_end()),
                "strip_ech off: the page rendered, so Chromium did not use ECH: {dom}"
            );
            assert_eq!(
                snis,
                BTreeSet::from([ECH_PUBLIC_NAME.to_string()]),
                "strip_ech off: Chromium did not send only the ECH public name"
            );
            for r in end_records(&d)
                .iter()
                .filter(|r| by_chromium(r) && to_allowed(r))
            {
                assert_eq!(r["host"], ECH_PUBLIC_NAME, "{r}");
                assert_eq!(r["verdict"], "block", "{r}");
                assert_eq!(r["rule"], "default", "{r}");
            }
        }
    }
}

/// A connection to one of allowed.test's addresses, on port 443.
fn to_allowed(record: &Value) -> bool {
    let v6 = ALLOWED.v6.map(|v6| format!("[{v6}]:443"));
    let dst = record["dst"].as_str().unwrap_or_default();
    dst == format!("{}:443", ALLOWED.v4) || Some(dst) == v6.as_deref()
}

/// Runs Chromium to completion and returns the DOM it printed.
fn dump_dom(mut chromium: Command) -> String {
    let started = Instant::now();
    let out = chromium.output().expect("run chromium");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "chromium failed ({}): stdout {stdout}\nstderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("chromium ran {} ms", started.elapsed().as_millis());
    stdout
}

/// The record names Chromium's process (its wrapper script execs this binary).
fn by_chromium(record: &Value) -> bool {
    record["exe"]
        .as_str()
        .is_some_and(|exe| exe.ends_with("/chromium"))
        && record["pid"].as_u64() > Some(1)
}

fn end_records(d: &Daemon) -> Vec<Value> {
    d.records()
        .into_iter()
        .filter(|r| r["event"] == "end")
        .collect()
}

/// The daemon's counts of the agents' dropped packets and bytes, from
/// `agent-egress status --json`.
fn dropped(world: &World, d: &Daemon) -> (u64, u64) {
    let mut status = world.host_cmd([daemon::binary(), "status", "--json", "--config"]);
    let out = status.arg(&d.config).output().expect("agent-egress status");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "agent-egress status --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let count = |field: &str| {
        status[field]
            .as_u64()
            .unwrap_or_else(|| panic!("status has no {field}: {status}"))
    };
    (count("dropped_packets"), count("dropped_bytes"))
}
