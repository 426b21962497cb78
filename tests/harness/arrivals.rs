//! Counting what reaches the internet: an nftables table of named counters in the
//! INTERNET netns, fed by every packet that comes in over the veth from the agent
//! host. Counters only grow; compare before and after.
//!
//! Counter names are nft identifiers that nft 1.0.6 cannot quote: a name that is
//! also an nft keyword (`udp`, `dns`, ...) is a syntax error. Names with an
//! underscore, like all of these, are safe.

use std::fmt::Write as _;
use std::process::Command;

use super::process::{run, run_with_input};
use super::topology::{ALL_HOSTS, DNS_V4, FORBIDDEN_DNS_V4, NET_IFACE};

/// UDP to port 443 on any host (QUIC).
pub const QUIC: &str = "udp_443";
/// DNS (UDP or TCP port 53) to the allowed resolver.
pub const DNS: &str = "dns_allowed";
/// DNS (UDP or TCP port 53) to the resolver agents must not reach.
pub const FORBIDDEN_DNS: &str = "dns_forbidden";
/// Any UDP.
pub const UDP: &str = "udp_any";
/// TCP SYNs (connection attempts) to anywhere.
pub const TCP_SYN: &str = "tcp_syn";

const TABLE: &str = "ae_arrivals";
const COUNT_CHAIN: &str = "count";

/// The ruleset for `nft -f -`. Per-host counters are named by `TestHost::counter`.
pub fn ruleset() -> String {
    let mut rules = vec![
        format!("udp dport 443 counter name {QUIC}"),
        format!("meta l4proto {{ tcp, udp }} th dport 53 ip daddr {DNS_V4} counter name {DNS}"),
        format!(
            "meta l4proto {{ tcp, udp }} th dport 53 ip daddr {FORBIDDEN_DNS_V4} \
             counter name {FORBIDDEN_DNS}"
        ),
        format!("meta l4proto udp counter name {UDP}"),
        format!("tcp flags & (syn | ack) == syn counter name {TCP_SYN}"),
    ];
    let mut counters = vec![QUIC, DNS, FORBIDDEN_DNS, UDP, TCP_SYN];
    for host in ALL_HOSTS {
        counters.push(host.counter);
        rules.push(format!(
            "ip daddr {} counter name {}",
            host.v4, host.counter
        ));
        if let Some(v6) = host.v6 {
            rules.push(format!("ip6 daddr {v6} counter name {}", host.counter));
        }
    }
    let mut table = format!("table inet {TABLE} {{\n");
    for counter in counters {
        let _ = writeln!(table, "    counter {counter} {{ }}");
    }
    let _ = write!(
        table,
        "    chain arrivals {{\n        type filter hook prerouting priority raw; policy accept;\n        \
         iifname \"{NET_IFACE}\" jump {COUNT_CHAIN}\n    }}\n    chain {COUNT_CHAIN} {{\n"
    );
    for rule in rules {
        let _ = writeln!(table, "        {rule}");
    }
    table.push_str("    }\n}\n");
    table
}

/// Loads [`ruleset`]; `netns_prefix` (a command that enters it) runs it in the internet netns.
pub fn install(mut netns_prefix: Command) -> Result<(), String> {
    run_with_input(netns_prefix.args(["nft", "-f", "-"]), ruleset().as_bytes()).map(drop)
}

/// Adds counter `name` for packets matching the nft expression `matches`
/// (e.g. `tcp dport 8080`). Counts from now on.
pub fn add(mut netns_prefix: Command, name: &str, matches: &str) -> Result<(), String> {
    let commands = format!(
        "add counter inet {TABLE} {name}\n\
         add rule inet {TABLE} {COUNT_CHAIN} {matches} counter name {name}\n"
    );
    run_with_input(netns_prefix.args(["nft", "-f", "-"]), commands.as_bytes()).map(drop)
}

/// Packets counted so far by counter `name`.
pub fn read(mut netns_prefix: Command, name: &str) -> Result<u64, String> {
    let output = run(netns_prefix.args(["nft", "-j", "list", "counter", "inet", TABLE, name]))?;
    let listing: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("nft printed invalid JSON for counter {name}: {e}"))?;
    listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|item| item["counter"]["packets"].as_u64())
        .ok_or_else(|| format!("nft listed no packet count for counter {name}"))
}
