//! The compiled policy decides exactly as a plain linear scan of the rules
//! would: the proof that indexing by domain suffix and IP prefix loses nothing.

use agent_egress::config::{Cidr, Config, DomainPattern, PortRange, Rule};
use agent_egress::policy::{Policy, Process, Query};
use proptest::prelude::*;
use std::net::{IpAddr, Ipv6Addr};

/// Few labels, so rules and queries share names; "ab" vs "b" checks label
/// alignment, "1" and "0x1" make names that are really addresses.
const LABELS: &[&str] = &["a", "b", "ab", "c", "1", "0x1"];
/// Addresses queries use and CIDRs are cut from (with random prefix lengths).
const ADDRESSES: &[&str] = &[
    "192.0.2.1",
    "192.0.2.129",
    "198.51.100.7",
    "0.0.0.0",
    "::ffff:192.0.2.1",
    "::ffff:198.51.100.7",
    "2001:db8::1",
    "2001:db8:1::5",
    "::1",
    "::",
];
const AGENTS: &[&str] = &["a.slice", "b.slice", "c.slice"];

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(LABELS), 1..=4).prop_map(|labels| labels.join("."))
}

fn pattern() -> impl Strategy<Value = DomainPattern> {
    (0..3u8, name()).prop_map(|(kind, n)| match kind {
        0 => DomainPattern::NameAndSubdomains(n),
        1 => DomainPattern::Exact(n),
        _ => DomainPattern::SubdomainsOnly(n),
    })
}

fn address() -> impl Strategy<Value = IpAddr> {
    prop::sample::select(ADDRESSES).prop_map(|a| a.parse().unwrap())
}

fn cidr() -> impl Strategy<Value = Cidr> {
    (address(), any::<u8>()).prop_map(|(addr, p)| {
        // Mostly long prefixes, where near misses happen.
        let prefix = match addr {
            IpAddr::V4(_) => 32 - p % 33 / (1 + p % 3),
            IpAddr::V6(_) => 128 - p % 129 / (1 + p % 3),
        };
        Cidr { addr, prefix }
    })
}

fn port_range() -> impl Strategy<Value = PortRange> {
    (1..=6u16, 0..=3u16).prop_map(|(first, len)| PortRange {
        first,
        last: first + len,
    })
}

/// An absent field (empty) or one to three values.
fn field<S: Strategy>(s: S) -> impl Strategy<Value = Vec<S::Value>>
where
    S::Value: Clone,
{
    prop_oneof![Just(Vec::new()), prop::collection::vec(s, 1..=3),]
}

fn rules() -> impl Strategy<Value = Vec<Rule>> {
    let rule = (
        field(pattern()),
        field(cidr()),
        field(port_range()),
        field(prop::sample::select(&AGENTS[..2]).prop_map(String::from)),
        any::<bool>(),
    );
    prop::collection::vec(rule, 0..=10).prop_map(|rules| {
        rules
            .into_iter()
            .enumerate()
            .map(|(i, (domains, ips, ports, agents, direct))| Rule {
                name: format!("r{i}"),
                domains,
                ips,
                ports,
                agents,
                process: Default::default(),
                outbound: if direct { "direct" } else { "block" }.into(),
                locked: false,
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
struct OwnedQuery {
    host: Option<String>,
    ip: IpAddr,
    port: u16,
    agent: Option<&'static str>,
}

impl OwnedQuery {
    fn as_query(&self) -> Query<'_> {
        Query {
            host: self.host.as_deref(),
            ip: self.ip,
            port: self.port,
            agent: self.agent,
            uid: None,
            process: Process::Unknown,
        }
    }
}

fn queries() -> impl Strategy<Value = Vec<OwnedQuery>> {
    let host = prop_oneof![
        4 => name().prop_map(Some),
        1 => Just(None),
        1 => prop::sample::select(&["192.0.2.1", "::1", ""][..]).prop_map(|h| Some(h.to_string())),
    ];
    let agent = prop::option::of(prop::sample::select(AGENTS));
    let query =
        (host, address(), 1..=10u16, agent).prop_map(|(host, ip, port, agent)| OwnedQuery {
            host,
            ip,
            port,
            agent,
        });
    prop::collection::vec(query, 1..=24)
}

// ---- The reference: every rule in order, every field checked plainly. ----

fn reference(rules: &[Rule], q: &Query) -> Option<usize> {
    rules.iter().position(|r| rule_matches(r, q))
}

fn rule_matches(r: &Rule, q: &Query) -> bool {
    let name = q.host.filter(|h| !h.is_empty() && !written_as_address(h));
    let domains_ok = r.domains.is_empty()
        || name.is_some_and(|h| r.domains.iter().any(|p| domain_matches(p, h)));
    let ips_ok = r.ips.is_empty() || r.ips.iter().any(|c| cidr_matches(c, q.ip));
    let ports_ok = r.ports.is_empty()
        || r.ports
            .iter()
            .any(|p| p.first <= q.port && q.port <= p.last);
    let agents_ok = r.agents.is_empty() || q.agent.is_some_and(|a| r.agents.iter().any(|x| x == a));
    domains_ok && ips_ok && ports_ok && agents_ok
}

/// IPv6 literals have ':'; a last label of decimal digits or 0x-hex is IPv4.
fn written_as_address(h: &str) -> bool {
    let last = h.split('.').next_back().unwrap();
    let hex = last.len() >= 2
        && last.to_ascii_lowercase().starts_with("0x")
        && last[2..].chars().all(|c| c.is_ascii_hexdigit());
    h.contains(':') || (!last.is_empty() && last.chars().all(|c| c.is_ascii_digit())) || hex
}

fn domain_matches(p: &DomainPattern, h: &str) -> bool {
    let below = |n: &str| h.ends_with(&format!(".{n}"));
    match p {
        DomainPattern::NameAndSubdomains(n) => h == n || below(n),
        DomainPattern::Exact(n) => h == n,
        DomainPattern::SubdomainsOnly(n) => below(n),
    }
}

/// Everything compared as 128 bits, IPv4 in its mapped form: an address is
/// IPv4 when it lies in ::ffff:0:0/96, and a network is IPv4 when it lies
/// there with a prefix of at least 96 bits. Families must agree.
fn cidr_matches(c: &Cidr, ip: IpAddr) -> bool {
    let as_v6 = |a: IpAddr| match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mapped_range = u128::from("::ffff:0:0".parse::<Ipv6Addr>().unwrap());
    let in_mapped = |a: u128| a >> 32 == mapped_range >> 32;
    let address = u128::from(as_v6(ip));
    let network = u128::from(as_v6(c.addr));
    let bits = u32::from(c.prefix) + if c.addr.is_ipv4() { 96 } else { 0 };
    let network_is_v4 = bits >= 96 && in_mapped(network);
    if in_mapped(address) != network_is_v4 {
        return false;
    }
    bits == 0 || (address ^ network) >> (128 - bits) == 0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn compiled_decisions_equal_the_linear_scan(rules in rules(), queries in queries()) {
        let config = Config { rules: rules.clone(), ..Config::default() };
        let policy = Policy::compile(&config);
        for owned in &queries {
            let q = owned.as_query();
            let decision = policy.decide(&q);
            let want = reference(&rules, &q);
            prop_assert_eq!(decision.rule, want, "query {:?}", owned);
            match want {
                Some(i) => {
                    prop_assert_eq!(decision.rule_name, rules[i].name.as_str());
                    prop_assert_eq!(decision.outbound, rules[i].outbound.as_str());
                    prop_assert_eq!(decision.matched_domain, !rules[i].domains.is_empty());
                }
                None => {
                    prop_assert_eq!(decision.rule_name, "default");
                    prop_assert_eq!(decision.outbound, config.default.as_str());
                    prop_assert!(!decision.matched_domain);
                }
            }
            let text = policy.explain(&q);
            prop_assert!(text.contains(&format!("{:?}", decision.outbound)), "{}", text);
        }
    }
}
