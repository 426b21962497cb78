//! Decision cost with 10,000 domain rules plus a few IP and port rules: it
//! must stay well under a microsecond whichever rule (or none) matches.

use agent_egress::config::{Cidr, Config, DomainPattern, PortRange, Rule};
use agent_egress::policy::{Policy, Process, Query};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::net::IpAddr;

const DOMAIN_RULES: usize = 10_000;

fn rule(name: String, outbound: &str) -> Rule {
    Rule {
        name,
        domains: Vec::new(),
        ips: Vec::new(),
        ports: Vec::new(),
        agents: Vec::new(),
        process: Default::default(),
        outbound: outbound.into(),
        locked: false,
    }
}

/// Rule i names `svc{i}.example{i % 100}.com`, cycling through the three
/// pattern kinds; then IPv4, IPv6 and port rules.
fn config() -> Config {
    let mut rules: Vec<Rule> = (0..DOMAIN_RULES)
        .map(|i| {
            let n = format!("svc{i}.example{}.com", i % 100);
            let pattern = match i % 3 {
                0 => DomainPattern::NameAndSubdomains(n),
                1 => DomainPattern::Exact(n),
                _ => DomainPattern::SubdomainsOnly(n),
            };
            Rule {
                domains: vec![pattern],
                ..rule(format!("domain-{i}"), "direct")
            }
        })
        .collect();
    for (name, cidr) in [
        ("test-net-3", "203.0.113.0/24"),
        ("doc-v6", "2001:db8::/32"),
    ] {
        rules.push(Rule {
            ips: vec![Cidr::parse(cidr).unwrap()],
            ..rule(name.into(), "block")
        });
    }
    rules.push(Rule {
        ports: vec![PortRange {
            first: 22,
            last: 22,
        }],
        ..rule("ssh".into(), "block")
    });
    Config {
        rules,
        ..Config::default()
    }
}

/// A connection to port 443 of `ip`, named `host`, from no known agent.
fn to_443(host: Option<&str>, ip: IpAddr) -> Query<'_> {
    Query {
        host,
        ip,
        port: 443,
        agent: None,
        uid: None,
        process: Process::Unknown,
    }
}

fn decide(c: &mut Criterion) {
    let policy = Policy::compile(&config());
    let ip: IpAddr = "198.51.100.1".parse().unwrap();
    let cases: [(&str, Option<&str>, IpAddr, Option<usize>); 6] = [
        ("first rule", Some("svc0.example0.com"), ip, Some(0)),
        (
            "last domain rule",
            Some("svc9999.example99.com"),
            ip,
            Some(9999),
        ),
        (
            "deep subdomain",
            Some("a.b.c.d.e.f.svc5000.example0.com"),
            ip,
            Some(5000),
        ),
        ("no rule", Some("www.nothing-here.example.org"), ip, None),
        (
            "ipv4 rule, no name",
            None,
            "203.0.113.9".parse().unwrap(),
            Some(10_000),
        ),
        (
            "ipv6 rule",
            Some("no-match.example"),
            "2001:db8::5".parse().unwrap(),
            Some(10_001),
        ),
    ];
    let mut group = c.benchmark_group("decide_10k_domain_rules");
    for (label, host, ip, want) in cases {
        let q = to_443(host, ip);
        assert_eq!(policy.decide(&q).rule, want, "{label}");
        group.bench_function(label, |b| b.iter(|| policy.decide(black_box(&q)).rule));
    }
    group.finish();
}

/// 10,000 runtime rules before 10,000 config rules: a decision asks both
/// (the runtime rules first, then the config's for a locked rule).
fn decide_runtime(c: &mut Criterion) {
    let config = config();
    let policy = Policy::with_runtime(&config, &config.rules);
    let ip: IpAddr = "198.51.100.1".parse().unwrap();
    let cases = [
        (
            "runtime rule, last domain",
            Some("svc9999.example99.com"),
            true,
        ),
        (
            "no rule in either",
            Some("www.nothing-here.example.org"),
            false,
        ),
    ];
    let mut group = c.benchmark_group("decide_10k_runtime_and_10k_config_rules");
    for (label, host, runtime) in cases {
        let q = to_443(host, ip);
        assert_eq!(policy.decide(&q).runtime, runtime, "{label}");
        group.bench_function(label, |b| b.iter(|| policy.decide(black_box(&q)).rule));
    }
    group.finish();
}

fn compile(c: &mut Criterion) {
    let config = config();
    c.bench_function("compile_10k_domain_rules", |b| {
        b.iter(|| Policy::compile(black_box(&config)))
    });
}

criterion_group!(benches, decide, decide_runtime, compile);
criterion_main!(benches);
