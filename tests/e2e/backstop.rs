//! The kernel backstop (`interception.backstop`): with the nftables table
//! deleted while the daemon is frozen, or after it was killed, nothing leaves
//! the agent host; the agent's captured traffic works while it is on.

use crate::harness::daemon::{self, Daemon};
use crate::harness::{arrivals, World, ALLOWED, BLOCKED, DNS_V4};
use serde_json::json;
use std::process::Output;
use std::time::{Duration, Instant};

/// A blocked connect hangs (its SYNs are dropped at egress): give up soon.
const BLOCKED_MAX_TIME: &str = "1";

fn text(o: &Output) -> String {
    format!(
        "{}: stdout {:?} stderr {:?}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// curl as the agent with the name pinned: the agent's resolver is off-host,
/// which the backstop makes unreachable.
fn fetch(world: &World, url: &str, resolve: &str, max_time: &str) -> Output {
    world.curl_agent(["--max-time", max_time, "--resolve", resolve, url])
}

fn assert_allowed_works(world: &World) {
    let out = fetch(
        world,
        "https://allowed.test/",
        &ALLOWED.resolve_v4(443),
        "10",
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == ALLOWED.body(),
        "allowed.test through the proxy with the backstop on: {}",
        text(&out)
    );
}

/// allowed.test and blocked.test (IPv4 and IPv6) all fail and no SYN
/// reaches the internet.
fn assert_nothing_leaves(world: &World, when: &str) {
    let syns = world.count_arrived(arrivals::TCP_SYN);
    for (url, resolve) in [
        ("https://allowed.test/", ALLOWED.resolve_v4(443)),
        ("http://blocked.test/", BLOCKED.resolve_v4(80)),
        ("http://blocked.test/", BLOCKED.resolve_v6(80)),
    ] {
        let out = fetch(world, url, &resolve, BLOCKED_MAX_TIME);
        assert!(
            !out.status.success(),
            "{when}: {url} via {resolve} got out: {}",
            text(&out)
        );
    }
    assert_eq!(
        world.count_arrived(arrivals::TCP_SYN),
        syns,
        "{when}: a SYN left the agent host"
    );
}

fn delete_table(world: &World) {
    let out = world
        .host_cmd(["nft", "delete", "table", "inet", "agent_egress"])
        .output()
        .expect("nft");
    assert!(out.status.success(), "nft delete table: {}", text(&out));
}

pub fn table_deleted_and_daemon_frozen() {
    let world = World::new();
    let config = daemon::config(
        &world,
        json!({"interception": {"cgroups": [world.agent().relative_path()], "backstop": true}}),
    );
    let mut d = Daemon::start(&world, config);
    assert!(
        d.guard.log().contains("kernel backstop on 1 cgroup"),
        "{}",
        d.guard.log()
    );

    // Captured traffic leaves through lo: the proxy still serves the agent.
    assert_allowed_works(&world);
    // The off-host resolver is out of reach, table or not: agents need one on loopback.
    let dns = world.count_arrived(arrivals::DNS);
    let resolver = format!("@{DNS_V4}");
    let dig = world
        .agent_cmd(["dig", "+time=1", "+tries=1", &resolver, "allowed.test"])
        .output()
        .expect("dig");
    assert!(
        !String::from_utf8_lossy(&dig.stdout).contains("ANSWER SECTION"),
        "{}",
        text(&dig)
    );
    assert_eq!(
        world.count_arrived(arrivals::DNS),
        dns,
        "DNS left the agent host"
    );

    // Frozen daemon, table gone: only the backstop is left.
    d.signal(libc::SIGSTOP);
    delete_table(&world);
    assert!(!d.table_installed(&world));
    assert_nothing_leaves(&world, "table deleted, daemon frozen");

    // Thawed, the daemon puts its table back and the agent works again.
    d.signal(libc::SIGCONT);
    let started = Instant::now();
    while !d.table_installed(&world) {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "table not re-installed after SIGCONT:\n{}",
            d.guard.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_allowed_works(&world);

    // The attachment belongs to the cgroup, not to the daemon: it outlives it.
    d.signal(libc::SIGKILL);
    while d.guard.try_wait().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the daemon survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    delete_table(&world);
    assert_nothing_leaves(&world, "table deleted, daemon killed");

    // `down` lifts the lockdown, the backstop included.
    let mut down = world.host_cmd([daemon::binary(), "down", "--config"]);
    let out = down.arg(&d.config).output().expect("down");
    assert!(out.status.success(), "down: {}", text(&out));
    let out = fetch(
        &world,
        "http://blocked.test/",
        &BLOCKED.resolve_v4(80),
        "10",
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == BLOCKED.body(),
        "after down the agent is neither captured nor backstopped: {}",
        text(&out)
    );
}
