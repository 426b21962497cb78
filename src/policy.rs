//! The routing policy, compiled once so each connection is decided in time
//! proportional to the labels of its host name, not to the number of rules.
//!
//! Semantics: rules are ordered and the first that matches wins, else the
//! default outbound. Within a rule the fields (`domains`, `ips`, `ports`,
//! `agents`, and those on the process: [`crate::process_match`]) must all
//! match and an absent field matches anything; within a field any one value
//! matching is enough. While the process is still being read, a rule on it
//! may match, and the decision says it awaits the process.
//!
//! Compiled form: every rule lands in exactly one index, chosen by its most
//! selective field, and a decision collects the candidate lists the query can
//! reach and keeps the lowest rule index whose remaining fields match.
//! - rules with `domains`: a map from each pattern's name to the rules that
//!   match that name itself and the rules that match names below it; the query
//!   looks up its host, parent, grandparent, ... (label-aligned suffixes),
//!   whose hashes one right-to-left pass over the host yields;
//! - rules with `ips` but no `domains`: one map per prefix length in use and
//!   address family, from network address to rules;
//! - the rest (only `ports`/`agents`/the process, or nothing): one ordered list.

use crate::config::{Cidr, Config, DomainPattern, Outbound, PortRange, Rule};
pub use crate::process_match::Process;
use crate::process_match::{uid_in_passwd, CompiledSelectors};
use crate::procinfo::ProcessNeeds;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::IpAddr;

/// What is known of a connection when it is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    /// The requested name (TLS SNI or HTTP Host), already normalised.
    pub host: Option<&'a str>,
    /// The original destination address.
    pub ip: IpAddr,
    pub port: u16,
    /// The configured cgroup path the connection came from; None if unknown.
    pub agent: Option<&'a str>,
    /// Who owns the client's socket (the kernel says with the socket).
    pub uid: Option<u32>,
    /// The process that connected, as far as it is read yet.
    pub process: Process<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'p> {
    /// Index into the config's rules; None when the default applies.
    pub rule: Option<usize>,
    /// The rule's name, or "default".
    pub rule_name: &'p str,
    pub outbound: &'p str,
    /// The winning rule has `domains`, so it matched on the name: the proxy
    /// must dial that name, not trust the address the client chose.
    pub matched_domain: bool,
    /// The winning rule has `ips`: it names the address itself.
    pub by_address: bool,
    /// The winning rule is a runtime rule (`rule` indexes those).
    pub runtime: bool,
    /// The winning rule asks about the process, which is still being read:
    /// decide again once it is (or the wait is over).
    pub awaits_process: bool,
}

/// The kind of address `ip` is when it is not one on the internet: what a name
/// must not lead the proxy to unless a rule by address allows it (loopback
/// services, the cloud metadata endpoint, the LAN).
pub fn internal_range(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let [first, second, ..] = a.octets();
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_unspecified() || first == 0 {
                Some("unspecified")
            } else if a.is_link_local() {
                Some("link-local")
            } else if a.is_private() {
                Some("private")
            } else if first == 100 && (64..128).contains(&second) {
                Some("shared (carrier-grade NAT)")
            } else if a.is_multicast() || a.is_broadcast() || first >= 240 {
                Some("multicast or reserved")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let first = a.segments()[0];
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_unspecified() {
                Some("unspecified")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if first & 0xfe00 == 0xfc00 {
                // fd00:ec2::254, the EC2 metadata endpoint over IPv6, is one.
                Some("unique local")
            } else if a.is_multicast() {
                Some("multicast or reserved")
            } else {
                None
            }
        }
    }
}

/// The rule name decisions by the default outbound carry.
pub const DEFAULT_RULE_NAME: &str = "default";

#[derive(Debug)]
pub struct Policy {
    rules: Vec<CompiledRule>,
    default_outbound: String,
    by_domain: DomainIndex,
    by_ipv4: PrefixTable<u32>,
    by_ipv6: PrefixTable<u128>,
    /// Rules with neither `domains` nor `ips`, ascending.
    unindexed: Vec<usize>,
    /// The runtime rules, asked before these (a policy of its own, whose
    /// default is never used); a locked rule's decision they may only narrow.
    runtime: Option<Box<Policy>>,
    /// Some rule (runtime rules included) asks what only /proc tells.
    needs_process: bool,
    /// What rules ask of the process beyond what every record carries.
    process_needs: ProcessNeeds,
}

#[derive(Debug)]
struct CompiledRule {
    name: String,
    outbound: String,
    domains: Vec<DomainPattern>,
    /// IPv4-mapped IPv6 networks rewritten as IPv4, to meet canonical addresses.
    ips: Vec<Cidr>,
    ports: Vec<PortRange>,
    agents: Vec<String>,
    /// `process`, `comm`, `user`, `ancestor`, `cgroup`, `exe_sha256`.
    process: Option<CompiledSelectors>,
    locked: bool,
    /// Its outbound refuses (type block).
    blocks: bool,
}

/// Rules naming one domain, each list ascending.
#[derive(Debug)]
struct DomainRules {
    name: Box<str>,
    /// Rules matching the name itself: `=name` and `name`.
    at_name: Vec<usize>,
    /// Rules matching names below it: `name` and `*.name`.
    below_name: Vec<usize>,
}

/// Which index found a candidate, i.e. which field is already known to match.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FoundBy {
    Domain,
    Ip,
    /// The list of rules neither index holds: nothing known yet.
    Scan,
}

impl Policy {
    /// Compiles a validated config (every outbound a rule names exists).
    pub fn compile(config: &Config) -> Policy {
        Policy::compile_rules(config, &config.rules)
    }

    /// The config's rules with `runtime` rules (validated against it) before them.
    pub fn with_runtime(config: &Config, runtime: &[Rule]) -> Policy {
        let mut policy = Policy::compile(config);
        if !runtime.is_empty() {
            let runtime = Policy::compile_rules(config, runtime);
            policy.needs_process |= runtime.needs_process;
            policy.process_needs = policy.process_needs.or(runtime.process_needs);
            policy.runtime = Some(Box::new(runtime));
        }
        policy
    }

    fn compile_rules(config: &Config, rules: &[Rule]) -> Policy {
        let mut policy = Policy {
            rules: Vec::with_capacity(rules.len()),
            default_outbound: config.default.clone(),
            by_domain: DomainIndex::default(),
            by_ipv4: PrefixTable::default(),
            by_ipv6: PrefixTable::default(),
            unindexed: Vec::new(),
            runtime: None,
            needs_process: false,
            process_needs: ProcessNeeds::default(),
        };
        // Read once, and only for a rule that names a user.
        let mut passwd: Option<String> = None;
        let mut uid_of = |name: &str| {
            let text = passwd.get_or_insert_with(|| {
                std::fs::read_to_string("/etc/passwd").unwrap_or_else(|e| {
                    log::warn!("cannot read /etc/passwd to look up user names: {e}");
                    String::new()
                })
            });
            uid_in_passwd(text, name)
        };
        for (index, rule) in rules.iter().enumerate() {
            let ips: Vec<Cidr> = rule.ips.iter().map(|c| canonical_cidr(*c)).collect();
            let process = CompiledSelectors::compile(&rule.process, &mut uid_of);
            if let Some(selectors) = &process {
                policy.needs_process |= selectors.needs_process();
                policy.process_needs = policy.process_needs.or(selectors.needs());
            }
            if !rule.domains.is_empty() {
                for pattern in &rule.domains {
                    let entry = policy.by_domain.entry(pattern.name());
                    if matches!(
                        pattern,
                        DomainPattern::Exact(_) | DomainPattern::NameAndSubdomains(_)
                    ) {
                        push_once(&mut entry.at_name, index);
                    }
                    if matches!(
                        pattern,
                        DomainPattern::NameAndSubdomains(_) | DomainPattern::SubdomainsOnly(_)
                    ) {
                        push_once(&mut entry.below_name, index);
                    }
                }
            } else if !ips.is_empty() {
                for cidr in &ips {
                    match cidr.addr {
                        IpAddr::V4(a) => policy.by_ipv4.insert(u32::from(a), cidr.prefix, index),
                        IpAddr::V6(a) => policy.by_ipv6.insert(u128::from(a), cidr.prefix, index),
                    }
                }
            } else {
                policy.unindexed.push(index);
            }
            policy.rules.push(CompiledRule {
                name: rule.name.clone(),
                outbound: rule.outbound.clone(),
                domains: rule.domains.clone(),
                ips,
                ports: rule.ports.clone(),
                agents: rule.agents.clone(),
                process,
                locked: rule.locked,
                blocks: matches!(config.outbounds.get(&rule.outbound), Some(Outbound::Block)),
            });
        }
        policy
    }

    /// Some rule asks about what only /proc tells of the connecting process.
    pub fn needs_process(&self) -> bool {
        self.needs_process
    }

    /// What rules ask of the process beyond what every record carries.
    pub fn process_needs(&self) -> ProcessNeeds {
        self.process_needs
    }

    /// How many runtime rules are compiled in.
    pub fn runtime_rules(&self) -> usize {
        self.runtime.as_ref().map_or(0, |r| r.rules.len())
    }

    pub fn decide(&self, q: &Query) -> Decision<'_> {
        let own = self
            .first_match(q)
            .map_or_else(|| self.default_decision(), |i| self.decision(i));
        let decision = self.with_runtime_rule(own, |runtime| runtime.first_match(q));
        let rules = match (decision.runtime, self.runtime.as_deref()) {
            (true, Some(runtime)) => runtime,
            _ => self,
        };
        let asks = decision
            .rule
            .and_then(|i| rules.rules[i].process.as_ref())
            .is_some_and(CompiledSelectors::needs_process);
        Decision {
            awaits_process: asks && q.process == Process::Pending,
            ..decision
        }
    }

    /// `own` (this policy's decision), unless a runtime rule (`find` in
    /// the runtime policy) decides first: never against a locked rule,
    /// except to refuse what it lets through.
    fn with_runtime_rule<'p>(
        &'p self,
        own: Decision<'p>,
        find: impl FnOnce(&'p Policy) -> Option<usize>,
    ) -> Decision<'p> {
        let Some(runtime) = self.runtime.as_deref() else {
            return own;
        };
        let locked = own.rule.map(|i| &self.rules[i]).filter(|r| r.locked);
        if locked.is_some_and(|r| r.blocks) {
            return own;
        }
        match find(runtime) {
            Some(i) if locked.is_none() || runtime.rules[i].blocks => Decision {
                runtime: true,
                ..runtime.decision(i)
            },
            _ => own,
        }
    }

    fn decision(&self, index: usize) -> Decision<'_> {
        let rule = &self.rules[index];
        Decision {
            rule: Some(index),
            rule_name: &rule.name,
            outbound: &rule.outbound,
            matched_domain: !rule.domains.is_empty(),
            by_address: !rule.ips.is_empty(),
            runtime: false,
            awaits_process: false,
        }
    }

    fn default_decision(&self) -> Decision<'_> {
        Decision {
            rule: None,
            rule_name: DEFAULT_RULE_NAME,
            outbound: &self.default_outbound,
            matched_domain: false,
            by_address: false,
            runtime: false,
            awaits_process: false,
        }
    }

    /// Whether an agent may learn the addresses of `host` (a DNS question),
    /// where `is_block` says which outbounds refuse. The rules that can apply
    /// to some connection to the name are those with `domains` matching it
    /// and those with neither `domains` nor `ips`; in order, the first that
    /// lets a connection through allows the name, and the first that refuses
    /// every connection to it (no `ports`, no `ips`) refuses it; one that
    /// refuses only some ports or addresses, or some processes, is passed
    /// over. Else the default.
    pub fn decide_name(
        &self,
        host: &str,
        agent: Option<&str>,
        is_block: impl Fn(&str) -> bool,
    ) -> Decision<'_> {
        let own = self
            .name_match(host, agent, &is_block)
            .map_or_else(|| self.default_decision(), |i| self.decision(i));
        self.with_runtime_rule(own, |runtime| runtime.name_match(host, agent, &is_block))
    }

    fn name_match(
        &self,
        host: &str,
        agent: Option<&str>,
        is_block: &impl Fn(&str) -> bool,
    ) -> Option<usize> {
        let mut candidates: Vec<usize> = self.unindexed.clone();
        if let Some(host) = usable_name(Some(host)) {
            self.by_domain
                .for_each_candidate_list(host, |list| candidates.extend_from_slice(list));
        }
        candidates.sort_unstable();
        candidates.dedup();
        for index in candidates {
            let rule = &self.rules[index];
            if !rule.agents.is_empty() && !agent.is_some_and(|a| rule.agents.iter().any(|x| x == a))
            {
                continue;
            }
            let refuses = is_block(&rule.outbound);
            let every_process = rule.process.is_none();
            if !refuses || (rule.ports.is_empty() && rule.ips.is_empty() && every_process) {
                return Some(index);
            }
        }
        None
    }

    /// Human text for `agent-egress explain`: the connection, the rule and
    /// outbound it gets, and which value of each of the rule's fields matched.
    pub fn explain(&self, q: &Query) -> String {
        let decision = self.decide(q);
        let ip = q.ip.to_canonical();
        let mut lines = vec![format!(
            "connection: host {}, address {}, port {}, agent {}",
            q.host.unwrap_or("(none)"),
            q.ip,
            q.port,
            q.agent.unwrap_or("(unknown)")
        )];
        let uid = q.uid.map(|u| format!(", user uid {u}")).unwrap_or_default();
        match q.process {
            Process::Known(p) => lines.push(format!(
                "process: exe {}, comm {}, cgroup {}, ancestors [{}]{uid}",
                p.exe.as_deref().unwrap_or("(none)"),
                p.comm.as_deref().unwrap_or("(none)"),
                p.cgroup.as_deref().unwrap_or("(none)"),
                p.ancestry
                    .iter()
                    .map(|a| a.exe.as_deref().unwrap_or("?"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            _ if self.needs_process => lines.push(format!(
                "process: none given{uid}, so rules on the process (process, comm, ancestor, cgroup, exe_sha256) do not match: --process, --comm, --ancestor, --cgroup tell one"
            )),
            _ if q.uid.is_some() => lines.push(format!("process:{}", &uid[1..])),
            _ => {}
        }
        match decision.rule {
            None => lines.push(format!(
                "no rule matched: default outbound {:?}",
                decision.outbound
            )),
            Some(index) => {
                let (rules, place) = match (decision.runtime, self.runtime.as_deref()) {
                    (true, Some(runtime)) => (runtime, "runtime rule"),
                    _ => (self, "rules"),
                };
                let rule = &rules.rules[index];
                lines.push(format!(
                    "rule {:?} ({place}[{index}]) matched: outbound {:?}{}",
                    rule.name,
                    rule.outbound,
                    if rule.locked { " (locked)" } else { "" }
                ));
                lines.extend(rule.reasons(q, ip));
                if decision.matched_domain {
                    lines.push(format!(
                        "matched by name: the proxy dials {} itself, not the address the client chose",
                        q.host.unwrap_or_default()
                    ));
                }
                let held = self
                    .runtime
                    .as_deref()
                    .filter(|_| !decision.runtime)
                    .and_then(|runtime| Some(&runtime.rules[runtime.first_match(q)?]));
                if let Some(held) = held {
                    lines.push(format!(
                        "runtime rule {:?} matches too, but a locked rule's decision stands (runtime rules may only refuse what it allows)",
                        held.name
                    ));
                }
            }
        }
        if usable_name(q.host).is_none() && self.rules.iter().any(|r| !r.domains.is_empty()) {
            lines.push(
                "no host name (or an IP literal as the name): rules with domains cannot match"
                    .into(),
            );
        }
        lines.join("\n")
    }

    /// What the rules by address (`ips` without `domains`) say of an address a
    /// name resolved to, before the proxy dials it: the first that matches `q`
    /// (whose `host` is not looked at), if any. Domain rules and rules without
    /// `ips` have no say on an address.
    pub fn decide_address(&self, q: &Query) -> Option<Decision<'_>> {
        let q = &Query { host: None, ..*q };
        let own = self.address_match(q).map(|i| self.decision(i));
        match own {
            Some(own) => Some(self.with_runtime_rule(own, |runtime| runtime.address_match(q))),
            None => {
                let runtime = self.runtime.as_deref()?;
                let i = runtime.address_match(q)?;
                Some(Decision {
                    runtime: true,
                    ..runtime.decision(i)
                })
            }
        }
    }

    fn address_match(&self, q: &Query) -> Option<usize> {
        let mut best = usize::MAX;
        self.scan_ip_rules(q, q.ip.to_canonical(), &mut best);
        (best != usize::MAX).then_some(best)
    }

    fn first_match(&self, q: &Query) -> Option<usize> {
        let ip = q.ip.to_canonical();
        let mut best = usize::MAX;
        if let Some(host) = usable_name(q.host) {
            self.by_domain.for_each_candidate_list(host, |list| {
                self.scan(list, FoundBy::Domain, q, ip, &mut best);
            });
        }
        self.scan_ip_rules(q, ip, &mut best);
        self.scan(&self.unindexed, FoundBy::Scan, q, ip, &mut best);
        (best != usize::MAX).then_some(best)
    }

    fn scan_ip_rules(&self, q: &Query, ip: IpAddr, best: &mut usize) {
        match ip {
            IpAddr::V4(a) => {
                for list in self.by_ipv4.lists(u32::from(a)) {
                    self.scan(list, FoundBy::Ip, q, ip, best);
                }
            }
            IpAddr::V6(a) => {
                for list in self.by_ipv6.lists(u128::from(a)) {
                    self.scan(list, FoundBy::Ip, q, ip, best);
                }
            }
        }
    }

    /// Lowers `best` to the first candidate below it whose other fields match.
    fn scan(
        &self,
        candidates: &[usize],
        found_by: FoundBy,
        q: &Query,
        ip: IpAddr,
        best: &mut usize,
    ) {
        for &index in candidates {
            if index >= *best {
                return;
            }
            if self.rules[index].matches_besides(found_by, ip, q) {
                *best = index;
                return;
            }
        }
    }
}

impl CompiledRule {
    /// The fields the index that found this rule did not already check.
    fn matches_besides(&self, found_by: FoundBy, ip: IpAddr, q: &Query) -> bool {
        let agent = q.agent;
        (found_by == FoundBy::Ip || self.ips.is_empty() || self.ips.iter().any(|c| c.contains(ip)))
            && (self.ports.is_empty() || self.ports.iter().any(|r| r.contains(q.port)))
            && (self.agents.is_empty() || agent.is_some_and(|a| self.agents.iter().any(|x| x == a)))
            && self
                .process
                .as_ref()
                .is_none_or(|p| p.matches(q.uid, agent, q.process))
    }

    /// For a rule known to match: which value of each field did.
    fn reasons(&self, q: &Query, ip: IpAddr) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Some(host) = usable_name(q.host) {
            if let Some(p) = self.domains.iter().find(|p| pattern_matches(p, host)) {
                reasons.push(format!("  domains: {p} matches {host}"));
            }
        }
        if let Some(c) = self.ips.iter().find(|c| c.contains(ip)) {
            reasons.push(format!("  ips: {c} contains {ip}"));
        }
        if let Some(r) = self.ports.iter().find(|r| r.contains(q.port)) {
            let range = if r.first == r.last {
                r.first.to_string()
            } else {
                format!("{}-{}", r.first, r.last)
            };
            reasons.push(format!("  ports: {range} contains {}", q.port));
        }
        if let Some(a) = q.agent.filter(|a| self.agents.iter().any(|x| x == a)) {
            reasons.push(format!("  agents: {a}"));
        }
        if let Some(selectors) = &self.process {
            reasons.extend(selectors.user_reason(q.uid));
            if let Process::Known(info) = q.process {
                reasons.extend(selectors.why(q.agent, info).into_iter().flatten());
            }
        }
        if reasons.is_empty() {
            reasons.push("  the rule has no selectors: it matches every connection".into());
        }
        reasons
    }
}

/// The host, if it is a name domain rules may match.
fn usable_name(host: Option<&str>) -> Option<&str> {
    host.filter(|h| !h.is_empty() && !is_ip_literal(h))
}

/// An address written where a name goes (`Host: 10.0.0.1`, `[::1]`): as the
/// URL standard decides, a name ending in a numeric label (decimal or 0x hex)
/// is an IPv4 address, since no top-level domain is numeric and resolvers read
/// forms like `10.1` or `0x7f.1` as addresses. A name never contains ':'.
fn is_ip_literal(host: &str) -> bool {
    if host.contains(':') {
        return true;
    }
    let last = host.rsplit('.').next().unwrap_or(host);
    let decimal = !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit());
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    decimal || hex
}

fn pattern_matches(pattern: &DomainPattern, host: &str) -> bool {
    match pattern {
        DomainPattern::Exact(n) => host == n,
        DomainPattern::NameAndSubdomains(n) => host == n || is_below(host, n),
        DomainPattern::SubdomainsOnly(n) => is_below(host, n),
    }
}

/// `host` is a subdomain of `name`, on a label boundary.
fn is_below(host: &str, name: &str) -> bool {
    host.strip_suffix(name)
        .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
}

/// `::ffff:10.0.0.0/104` is written for IPv4 peers of a dual-stack socket;
/// queries carry those as plain IPv4, so the network must be IPv4 too.
fn canonical_cidr(cidr: Cidr) -> Cidr {
    match cidr.addr {
        IpAddr::V6(a) if cidr.prefix >= 96 => match a.to_ipv4_mapped() {
            Some(v4) => Cidr {
                addr: IpAddr::V4(v4),
                prefix: cidr.prefix - 96,
            },
            None => cidr,
        },
        _ => cidr,
    }
}

fn push_once(list: &mut Vec<usize>, index: usize) {
    if list.last() != Some(&index) {
        list.push(index);
    }
}

/// Domain names by a hash computed from the last byte to the first, so that
/// hashing a host once yields the hash of each of its label-aligned suffixes.
#[derive(Debug, Default)]
struct DomainIndex {
    /// Names whose hashes collide share a bucket.
    by_hash: HashMap<u64, Vec<DomainRules>, IntegerHashing>,
}

impl DomainIndex {
    fn entry(&mut self, name: &str) -> &mut DomainRules {
        let bucket = self.by_hash.entry(suffix_hash(name)).or_default();
        let position = match bucket.iter().position(|d| *d.name == *name) {
            Some(p) => p,
            None => {
                bucket.push(DomainRules {
                    name: name.into(),
                    at_name: Vec::new(),
                    below_name: Vec::new(),
                });
                bucket.len() - 1
            }
        };
        &mut bucket[position]
    }

    /// Hands `visit` the rules of each pattern that can match `host`: those
    /// matching the name itself for `host`, those matching names below for
    /// each parent domain.
    fn for_each_candidate_list<'s>(&'s self, host: &str, mut visit: impl FnMut(&'s [usize])) {
        let bytes = host.as_bytes();
        let mut hash = SUFFIX_HASH_SEED;
        for start in (0..bytes.len()).rev() {
            hash = suffix_hash_step(hash, bytes[start]);
            if start > 0 && bytes[start - 1] != b'.' {
                continue;
            }
            let Some(suffix) = host.get(start..) else {
                continue;
            };
            let Some(rules) = self
                .by_hash
                .get(&hash)
                .and_then(|bucket| bucket.iter().find(|d| *d.name == *suffix))
            else {
                continue;
            };
            visit(if start == 0 {
                &rules.at_name
            } else {
                &rules.below_name
            });
        }
    }
}

// FNV-1a over the bytes in reverse order.
const SUFFIX_HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;

fn suffix_hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
}

fn suffix_hash(name: &str) -> u64 {
    name.bytes().rev().fold(SUFFIX_HASH_SEED, suffix_hash_step)
}

/// Hash maps keyed by integers: names' suffix hashes and network addresses.
/// An unkeyed hash is safe here because the tables hold only configured
/// values and lookups never insert, so a client cannot grow a collision
/// chain; a keyed SipHash would buy nothing and cost time on every lookup.
type IntegerHashing = BuildHasherDefault<IntegerHasher>;

#[derive(Debug, Default)]
struct IntegerHasher(u64);

impl Hasher for IntegerHasher {
    fn finish(&self) -> u64 {
        // The murmur3 finaliser: FNV and network addresses are weak in the
        // low bits the table picks buckets by.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
}

/// An address as an integer, so a prefix is a mask.
trait Address: Copy + Eq + Hash {
    fn network(self, prefix: u8) -> Self;
}

impl Address for u32 {
    fn network(self, prefix: u8) -> u32 {
        self & !u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0)
    }
}

impl Address for u128 {
    fn network(self, prefix: u8) -> u128 {
        self & !u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0)
    }
}

/// Rules by network, one hash map per prefix length in use: a lookup costs
/// one probe per distinct length, however many networks there are.
#[derive(Debug)]
struct PrefixTable<A> {
    levels: Vec<PrefixLevel<A>>,
}

#[derive(Debug)]
struct PrefixLevel<A> {
    prefix: u8,
    /// Keyed by network address (host bits zero).
    rules: HashMap<A, Vec<usize>, IntegerHashing>,
}

impl<A> Default for PrefixTable<A> {
    fn default() -> Self {
        PrefixTable { levels: Vec::new() }
    }
}

impl<A: Address> PrefixTable<A> {
    fn insert(&mut self, addr: A, prefix: u8, index: usize) {
        let position = match self.levels.iter().position(|l| l.prefix == prefix) {
            Some(p) => p,
            None => {
                self.levels.push(PrefixLevel {
                    prefix,
                    rules: HashMap::default(),
                });
                self.levels.len() - 1
            }
        };
        let level = &mut self.levels[position];
        push_once(level.rules.entry(addr.network(prefix)).or_default(), index);
    }

    /// The rule lists of every network containing `addr`.
    fn lists(&self, addr: A) -> impl Iterator<Item = &[usize]> {
        self.levels
            .iter()
            .filter_map(move |l| l.rules.get(&addr.network(l.prefix)).map(Vec::as_slice))
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges_are_named_and_the_internet_is_not() {
        for (ip, class) in [
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("fd00:ec2::254", "unique local"),
            ("fe80::1", "link-local"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("100.100.100.200", "shared (carrier-grade NAT)"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast or reserved"),
            ("ff02::1", "multicast or reserved"),
        ] {
            assert_eq!(internal_range(ip.parse().unwrap()), Some(class), "{ip}");
        }
        for ip in [
            "198.51.100.20",
            "2001:db8::20",
            "8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
        ] {
            assert_eq!(internal_range(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn an_address_is_decided_by_rules_by_address_only() {
        let policy = policy(
            r#"{"rules": [{"name": "allowed", "domains": ["allowed.test"], "outbound": "direct"},
                          {"name": "refused", "ips": ["203.0.113.20/32"], "outbound": "block"},
                          {"name": "lan-db", "ips": ["10.0.0.5"], "ports": [5432], "outbound": "direct"},
                          {"name": "anything", "outbound": "direct"}]}"#,
        );
        let at = |ip: &str, port| {
            policy
                .decide_address(&query(None, ip, port, None))
                .map(|d| d.rule_name)
        };
        assert_eq!(at("203.0.113.20", 443), Some("refused"));
        assert_eq!(at("::ffff:203.0.113.20", 443), Some("refused"));
        assert_eq!(at("10.0.0.5", 5432), Some("lan-db"));
        assert_eq!(at("10.0.0.5", 22), None);
        assert_eq!(
            at("198.51.100.10", 443),
            None,
            "domain and catch-all rules have no say"
        );
    }

    /// A policy from the `rules` (and optionally `interception`) JSON of a config.
    fn policy(json: &str) -> Policy {
        let config = Config::from_json(json).unwrap();
        Policy::compile(&config)
    }

    fn query<'a>(host: Option<&'a str>, ip: &str, port: u16, agent: Option<&'a str>) -> Query<'a> {
        Query {
            host,
            ip: ip.parse().unwrap(),
            port,
            agent,
            uid: None,
            process: Process::Unknown,
        }
    }

    /// The winning rule's name for a host on 192.0.2.1:443 from no known agent.
    fn rule_for(p: &Policy, host: &str) -> String {
        p.decide(&query(Some(host), "192.0.2.1", 443, None))
            .rule_name
            .to_string()
    }

    #[test]
    fn name_and_subdomains_is_label_aligned() {
        let p = policy(
            r#"{"rules": [{"name": "ex", "domains": ["example.com"], "outbound": "direct"}]}"#,
        );
        assert_eq!(rule_for(&p, "example.com"), "ex");
        assert_eq!(rule_for(&p, "www.example.com"), "ex");
        assert_eq!(rule_for(&p, "a.b.c.example.com"), "ex");
        assert_eq!(rule_for(&p, "badexample.com"), "default");
        assert_eq!(rule_for(&p, "example.com.evil.net"), "default");
        assert_eq!(rule_for(&p, "com"), "default");
    }

    #[test]
    fn exact_matches_only_the_name() {
        let p = policy(
            r#"{"rules": [{"name": "ex", "domains": ["=example.com"], "outbound": "direct"}]}"#,
        );
        assert_eq!(rule_for(&p, "example.com"), "ex");
        assert_eq!(rule_for(&p, "www.example.com"), "default");
        assert_eq!(rule_for(&p, "badexample.com"), "default");
    }

    #[test]
    fn subdomains_only_excludes_the_name() {
        let p = policy(
            r#"{"rules": [{"name": "ex", "domains": ["*.example.com"], "outbound": "direct"}]}"#,
        );
        assert_eq!(rule_for(&p, "example.com"), "default");
        assert_eq!(rule_for(&p, "www.example.com"), "ex");
        assert_eq!(rule_for(&p, "a.www.example.com"), "ex");
        assert_eq!(rule_for(&p, "wwwexample.com"), "default");
    }

    #[test]
    fn fields_and_values_within_a_field_or() {
        let p = policy(
            r#"{"rules": [{"name": "web", "domains": ["a.test", "b.test"], "ports": [80, 443],
                           "outbound": "direct"}]}"#,
        );
        let d = |host, port| p.decide(&query(Some(host), "192.0.2.1", port, None)).rule;
        assert_eq!(d("a.test", 80), Some(0));
        assert_eq!(d("b.test", 443), Some(0));
        assert_eq!(d("a.test", 8080), None, "port fails the AND");
        assert_eq!(d("c.test", 443), None, "domain fails the AND");
    }

    #[test]
    fn first_match_wins_over_a_later_more_specific_rule() {
        let p = policy(
            r#"{"outbounds": {"tor": {"type": "socks5", "server": "127.0.0.1:9050"}},
                "rules": [
                  {"name": "broad", "domains": ["example.com"], "outbound": "direct"},
                  {"name": "narrow", "domains": ["=api.example.com"], "outbound": "tor"},
                  {"name": "port-any", "ports": [443], "outbound": "tor"}
                ]}"#,
        );
        let d = p.decide(&query(Some("api.example.com"), "192.0.2.1", 443, None));
        assert_eq!(
            (d.rule, d.rule_name, d.outbound),
            (Some(0), "broad", "direct")
        );
        // A rule without domains that comes later loses too, and wins when alone.
        assert_eq!(rule_for(&p, "other.test"), "port-any");
    }

    #[test]
    fn an_earlier_non_domain_rule_beats_a_domain_rule() {
        let p = policy(
            r#"{"rules": [
                  {"name": "ssh", "ports": [22], "outbound": "block"},
                  {"name": "net", "ips": ["192.0.2.0/24"], "outbound": "block"},
                  {"name": "ex", "domains": ["example.com"], "outbound": "direct"}
                ]}"#,
        );
        let d = |ip, port| {
            p.decide(&query(Some("example.com"), ip, port, None))
                .rule_name
        };
        assert_eq!(d("198.51.100.1", 22), "ssh");
        assert_eq!(d("192.0.2.7", 443), "net");
        assert_eq!(d("198.51.100.1", 443), "ex");
    }

    #[test]
    fn default_applies_when_nothing_matches() {
        let p = policy(
            r#"{"rules": [{"domains": ["a.test"], "outbound": "direct"}], "default": "block"}"#,
        );
        let d = p.decide(&query(Some("b.test"), "192.0.2.1", 443, None));
        assert_eq!(
            d,
            Decision {
                rule: None,
                rule_name: "default",
                outbound: "block",
                matched_domain: false,
                by_address: false,
                runtime: false,
                awaits_process: false,
            }
        );
        let open = policy(r#"{"default": "direct"}"#);
        let d = open.decide(&query(None, "::1", 1, None));
        assert_eq!((d.rule, d.outbound), (None, "direct"));
    }

    #[test]
    fn runtime_rules_come_first_but_never_widen_a_locked_rule() {
        let config = Config::from_json(
            r#"{"rules": [
                {"name": "api", "domains": ["=api.example.com"], "outbound": "direct"},
                {"name": "metadata", "ips": ["169.254.169.254/32"], "outbound": "block", "locked": true},
                {"name": "corp", "domains": ["corp.test"], "outbound": "direct", "locked": true},
                {"name": "example", "domains": ["example.com"], "outbound": "block"}
            ], "default": "block"}"#,
        )
        .unwrap();
        let runtime: Vec<Rule> = [
            r#"{"name": "open-example", "domains": ["example.com"], "outbound": "direct"}"#,
            r#"{"name": "open-metadata", "ips": ["169.254.0.0/16"], "outbound": "direct"}"#,
            r#"{"name": "shut-corp", "domains": ["=x.corp.test"], "outbound": "block"}"#,
            r#"{"name": "open-corp", "domains": ["corp.test"], "outbound": "block"}"#,
        ]
        .iter()
        .map(|r| {
            config
                .runtime_rule("", &serde_json::from_str(r).unwrap(), &[])
                .unwrap()
        })
        .collect();
        let p = Policy::with_runtime(&config, &runtime);
        let decide = |host, ip| {
            let d = p.decide(&query(host, ip, 443, None));
            (d.rule_name, d.runtime)
        };
        // Before the config's rules, unlocked ones included.
        assert_eq!(
            decide(Some("www.example.com"), "192.0.2.1"),
            ("open-example", true)
        );
        assert_eq!(
            decide(Some("api.example.com"), "192.0.2.1"),
            ("open-example", true)
        );
        // A locked block stands; a locked allow may only be narrowed.
        assert_eq!(decide(None, "169.254.169.254"), ("metadata", false));
        assert_eq!(
            decide(Some("x.corp.test"), "192.0.2.1"),
            ("shut-corp", true)
        );
        assert_eq!(
            decide(Some("y.corp.test"), "192.0.2.1"),
            ("open-corp", true)
        );
        assert_eq!(decide(None, "169.254.1.1"), ("open-metadata", true));
        let address = p.decide_address(&query(None, "169.254.169.254", 80, None));
        assert_eq!(address.map(|d| d.rule_name), Some("metadata"));
        assert!(p
            .explain(&query(None, "169.254.169.254", 80, None))
            .contains("locked rule's decision stands"));
        assert_eq!(p.runtime_rules(), 4);
    }

    #[test]
    fn port_ranges_are_inclusive() {
        let p = policy(
            r#"{"rules": [{"name": "hi", "ports": ["8000-8100", 22], "outbound": "direct"}]}"#,
        );
        let d = |port| p.decide(&query(None, "192.0.2.1", port, None)).rule;
        assert_eq!(d(7999), None);
        assert_eq!(d(8000), Some(0));
        assert_eq!(d(8100), Some(0));
        assert_eq!(d(8101), None);
        assert_eq!(d(22), Some(0));
    }

    #[test]
    fn cidrs_of_both_families_and_v4_mapped_addresses() {
        let p = policy(
            r#"{"rules": [
                  {"name": "v4", "ips": ["192.0.2.0/25"], "outbound": "direct"},
                  {"name": "v6", "ips": ["2001:db8::/32"], "outbound": "direct"},
                  {"name": "mapped", "ips": ["::ffff:198.51.100.0/120"], "outbound": "direct"},
                  {"name": "host", "ips": ["203.0.113.9"], "outbound": "direct"},
                  {"name": "all6", "ips": ["::/0"], "outbound": "block"}
                ]}"#,
        );
        let d = |ip| p.decide(&query(None, ip, 443, None)).rule_name;
        assert_eq!(d("192.0.2.127"), "v4");
        assert_eq!(d("192.0.2.128"), "default");
        assert_eq!(d("::ffff:192.0.2.5"), "v4", "v4-mapped meets a v4 CIDR");
        assert_eq!(d("2001:db8:ffff::1"), "v6");
        assert_eq!(d("2001:db9::1"), "all6");
        assert_eq!(d("198.51.100.200"), "mapped", "a v4-mapped CIDR meets v4");
        assert_eq!(d("::ffff:198.51.100.200"), "mapped");
        assert_eq!(d("203.0.113.9"), "host");
        assert_eq!(d("203.0.113.10"), "default", "::/0 is IPv6 only");
    }

    #[test]
    fn ips_and_domains_together_need_both() {
        let p = policy(
            r#"{"rules": [{"name": "pinned", "domains": ["example.com"], "ips": ["192.0.2.0/24"],
                           "outbound": "direct"}]}"#,
        );
        let d = |ip| p.decide(&query(Some("example.com"), ip, 443, None)).rule;
        assert_eq!(d("192.0.2.1"), Some(0));
        assert_eq!(d("198.51.100.1"), None);
    }

    #[test]
    fn agents_match_their_cgroup_and_unknown_agents_match_none() {
        let p = policy(
            r#"{"interception": {"cgroups": ["a.slice", "b.slice"]},
                "rules": [{"name": "a-only", "agents": ["a.slice"], "outbound": "direct"},
                          {"name": "anyone", "domains": ["x.test"], "outbound": "direct"}]}"#,
        );
        let d = |agent| {
            p.decide(&query(Some("y.test"), "192.0.2.1", 443, agent))
                .rule_name
        };
        assert_eq!(d(Some("a.slice")), "a-only");
        assert_eq!(d(Some("b.slice")), "default");
        assert_eq!(d(None), "default");
    }

    #[test]
    fn connections_without_a_name_skip_domain_rules() {
        let p = policy(
            r#"{"rules": [{"name": "num", "domains": ["2.3"], "outbound": "direct"},
                          {"name": "hex", "domains": ["0x7f"], "outbound": "direct"},
                          {"name": "com", "domains": ["com"], "outbound": "direct"},
                          {"name": "v4net", "ips": ["192.0.2.0/24"], "outbound": "block"}]}"#,
        );
        let d = |host| p.decide(&query(host, "192.0.2.1", 443, None));
        assert_eq!(d(None).rule_name, "v4net");
        assert_eq!(d(Some("")).rule_name, "v4net");
        assert_eq!(
            d(Some("1.2.3")).rule_name,
            "v4net",
            "numeric last label is an address"
        );
        assert_eq!(d(Some("a.0x7f")).rule_name, "v4net", "so is hex");
        assert_eq!(d(Some("::1")).rule_name, "v4net");
        assert!(!d(Some("::1")).matched_domain);
        let named = d(Some("example.com"));
        assert_eq!(named.rule_name, "com");
        assert!(named.matched_domain);
    }

    #[test]
    fn explain_names_rule_outbound_and_matching_values() {
        let p = policy(
            r#"{"interception": {"cgroups": ["agents.slice"]},
                "rules": [{"name": "registries", "domains": ["=crates.io", "*.crates.io"],
                           "ports": ["440-450"], "agents": ["agents.slice"], "outbound": "direct"},
                          {"name": "lan", "ips": ["::ffff:192.0.2.0/120"], "outbound": "block"}]}"#,
        );
        let text = p.explain(&query(
            Some("static.crates.io"),
            "192.0.2.1",
            443,
            Some("agents.slice"),
        ));
        for want in [
            "rule \"registries\" (rules[0])",
            "outbound \"direct\"",
            "domains: *.crates.io matches static.crates.io",
            "ports: 440-450 contains 443",
            "agents: agents.slice",
            "dials static.crates.io",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        let text = p.explain(&query(None, "::ffff:192.0.2.1", 443, None));
        assert!(text.contains("rule \"lan\" (rules[1])"), "{text}");
        assert!(
            text.contains("ips: 192.0.2.0/24 contains 192.0.2.1"),
            "{text}"
        );
        assert!(text.contains("rules with domains cannot match"), "{text}");
        let text = p.explain(&query(Some("example.com"), "198.51.100.1", 443, None));
        assert!(
            text.contains("no rule matched: default outbound \"block\""),
            "{text}"
        );
    }

    #[test]
    fn names_whose_hashes_collide_stay_apart() {
        // File "b.test" under the hash of "a.test", as a collision would.
        let mut index = DomainIndex::default();
        index.by_hash.insert(
            suffix_hash("a.test"),
            vec![DomainRules {
                name: "b.test".into(),
                at_name: vec![2],
                below_name: vec![3],
            }],
        );
        index.entry("a.test").at_name.push(1);
        assert_eq!(index.by_hash[&suffix_hash("a.test")].len(), 2);
        let mut found = Vec::new();
        index.for_each_candidate_list("a.test", |l| found.push(l.to_vec()));
        assert_eq!(found, vec![vec![1]]);
    }

    #[test]
    fn a_name_is_allowed_by_the_first_rule_that_lets_some_connection_to_it_through() {
        let p = policy(
            r#"{
              "interception": {"cgroups": ["a.slice", "b.slice"]},
              "rules": [
                {"name": "smtp-off", "ports": [25], "outbound": "block"},
                {"name": "git-ssh", "domains": ["=github.com"], "ports": [22], "outbound": "direct"},
                {"name": "no-github", "domains": ["github.com"], "outbound": "block"},
                {"name": "intranet", "ips": ["10.0.0.0/8"], "outbound": "direct"},
                {"name": "b-all", "agents": ["b.slice"], "outbound": "direct"},
                {"name": "pypi", "domains": ["pypi.org"], "outbound": "direct"}
              ],
              "default": "block"
            }"#,
        );
        let name = |host: &str, agent: Option<&str>| {
            let d = p.decide_name(host, agent, |o| o == "block");
            (d.rule_name.to_string(), d.outbound.to_string())
        };
        let pair = |r: &str, o: &str| (r.to_string(), o.to_string());
        // A rule for one port lets the name resolve; a refusal of some ports does not refuse it.
        assert_eq!(
            name("github.com", Some("a.slice")),
            pair("git-ssh", "direct")
        );
        // A refusal of every connection to the name refuses the name.
        assert_eq!(
            name("api.github.com", Some("a.slice")),
            pair("no-github", "block")
        );
        // Rules by address say nothing about names; rules for an agent's every connection do.
        assert_eq!(
            name("intranet.example", Some("a.slice")),
            pair("default", "block")
        );
        assert_eq!(
            name("intranet.example", Some("b.slice")),
            pair("b-all", "direct")
        );
        assert_eq!(name("files.pypi.org", None), pair("pypi", "direct"));
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(0xc000_0201u32.network(0), 0);
        assert_eq!(0xc000_0201u32.network(24), 0xc000_0200);
        assert_eq!(0xc000_0201u32.network(32), 0xc000_0201);
        assert_eq!(u128::MAX.network(0), 0);
        assert_eq!(u128::MAX.network(128), u128::MAX);
        assert_eq!(u128::MAX.network(1), 1 << 127);
    }

    fn process(exe: &str, ancestors: &[&str]) -> crate::procinfo::ProcessInfo {
        crate::procinfo::ProcessInfo {
            pid: 40,
            exe: Some(exe.into()),
            comm: exe.rsplit('/').next().map(str::to_string),
            ancestry: ancestors
                .iter()
                .map(|a| crate::procinfo::Ancestor {
                    pid: 30,
                    exe: Some(a.to_string()),
                    cmdline: None,
                    cmdline_truncated: false,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn by_process<'a>(host: &'a str, uid: Option<u32>, process: Process<'a>) -> Query<'a> {
        Query {
            uid,
            process,
            ..query(Some(host), "192.0.2.1", 443, None)
        }
    }

    const PROCESS_RULES: &str = r#"{"rules": [
        {"name": "curl", "domains": ["api.test"], "process": ["*/curl"], "outbound": "direct"},
        {"name": "git's", "domains": ["forge.test"], "ancestor": ["*/git"], "outbound": "direct"},
        {"name": "root", "domains": ["root.test"], "user": [0, "root"], "outbound": "direct"},
        {"name": "no-python", "process": ["/usr/bin/python3*"], "outbound": "block"},
        {"name": "rest", "domains": ["api.test", "forge.test", "open.test"], "outbound": "direct"}
    ], "default": "block"}"#;

    #[test]
    fn rules_by_process_and_by_ancestor() {
        let p = policy(PROCESS_RULES);
        assert!(p.needs_process());
        assert_eq!(p.process_needs(), ProcessNeeds::default());
        let curl = process("/usr/bin/curl", &["/usr/bin/bash"]);
        let python = process("/usr/bin/python3.13", &["/usr/bin/bash"]);
        let from_git = process("/usr/bin/curl", &["/usr/lib/git-core/git", "/usr/bin/bash"]);
        let from_shell = process("/usr/bin/ssh", &["/usr/bin/bash"]);
        let rule = |q: Query| p.decide(&q).rule_name.to_string();
        assert_eq!(
            rule(by_process("api.test", None, Process::Known(&curl))),
            "curl"
        );
        assert_eq!(
            rule(by_process("api.test", None, Process::Known(&python))),
            "no-python",
            "python3 falls through the curl rule to the block"
        );
        assert_eq!(
            rule(by_process("forge.test", None, Process::Known(&from_git))),
            "git's"
        );
        assert_eq!(
            rule(by_process("forge.test", None, Process::Known(&from_shell))),
            "rest",
            "what a shell started is not git's"
        );
        // The socket's owner is known at once: no process needed.
        assert_eq!(
            rule(by_process("root.test", Some(0), Process::Pending)),
            "root"
        );
        assert_eq!(
            rule(by_process("root.test", Some(1000), Process::Unknown)),
            "default"
        );
        // Unknown: no selector on the process matches, the python block neither.
        assert_eq!(rule(by_process("api.test", None, Process::Unknown)), "rest");
    }

    #[test]
    fn a_decision_waits_only_when_a_rule_on_the_process_could_decide() {
        let p = policy(PROCESS_RULES);
        let pending = |host| p.decide(&by_process(host, None, Process::Pending));
        let d = pending("api.test");
        assert!(d.awaits_process, "the curl rule could match: {d:?}");
        assert_eq!(d.rule_name, "curl");
        // open.test: only rule 3 (no-python, any host) comes before "rest".
        assert!(pending("open.test").awaits_process);
        // root.test: "root" is decided by the socket's uid (None here) and
        // then no-python (any host) might block it.
        assert!(pending("root.test").awaits_process);
        let no_process_rule_first = policy(
            r#"{"rules": [
                {"domains": ["open.test"], "outbound": "direct"},
                {"process": ["*/curl"], "outbound": "block"}
            ]}"#,
        );
        let d = no_process_rule_first.decide(&by_process("open.test", None, Process::Pending));
        assert!(!d.awaits_process, "a rule without selectors decides first");
        let d = no_process_rule_first.decide(&by_process("other.test", None, Process::Pending));
        assert!(d.awaits_process);
        let d = no_process_rule_first.decide(&by_process("other.test", None, Process::Unknown));
        assert!(!d.awaits_process);
        assert_eq!(d.rule_name, "default");
        assert!(
            !policy(r#"{"rules": [{"domains": ["a.test"], "outbound": "direct"}]}"#)
                .needs_process()
        );
    }

    #[test]
    fn a_process_rule_lets_a_name_resolve_but_cannot_refuse_it() {
        let p = policy(
            r#"{"rules": [
                {"name": "curl", "domains": ["api.test"], "process": ["*/curl"], "outbound": "direct"},
                {"name": "no-python", "process": ["*/python3"], "outbound": "block"}
            ], "default": "block"}"#,
        );
        let is_block = |o: &str| o == "block";
        assert_eq!(p.decide_name("api.test", None, is_block).rule_name, "curl");
        assert_eq!(
            p.decide_name("other.test", None, is_block).rule_name,
            "default",
            "the python rule refuses only some processes: passed over"
        );
    }

    #[test]
    fn a_cgroup_rule_has_the_cgroup_read_and_a_runtime_one_too() {
        let by_cgroup = r#"{"rules": [{"name": "browser", "domains": ["web.test"],
            "cgroup": ["browser.scope"], "outbound": "direct"}], "default": "block"}"#;
        let wants_cgroup = ProcessNeeds {
            exe_sha256: false,
            cgroup: true,
        };
        assert_eq!(policy(by_cgroup).process_needs(), wants_cgroup);
        let config = Config::from_json(r#"{"default": "block"}"#).unwrap();
        let rule = r#"{"name": "rt", "domains": ["web.test"], "cgroup": ["b.scope"], "outbound": "direct"}"#;
        let runtime = [config
            .runtime_rule("", &serde_json::from_str(rule).unwrap(), &[])
            .unwrap()];
        let with_runtime = Policy::with_runtime(&config, &runtime);
        assert_eq!(with_runtime.process_needs(), wants_cgroup);
    }

    #[test]
    fn pinned_hashes_and_explain_with_a_process() {
        let sha = "ab".repeat(32);
        let p = policy(&format!(
            r#"{{"rules": [{{"name": "pinned", "domains": ["api.test"], "process": ["*/curl"],
                "exe_sha256": ["{}"], "outbound": "direct"}}], "default": "block"}}"#,
            sha.to_uppercase()
        ));
        assert_eq!(
            p.process_needs(),
            ProcessNeeds {
                exe_sha256: true,
                cgroup: false
            }
        );
        let mut curl = process("/usr/bin/curl", &[]);
        let copied = curl.clone();
        curl.exe_sha256 = Some(sha.clone());
        let rule = |info| {
            p.decide(&by_process("api.test", None, Process::Known(info)))
                .rule_name
        };
        assert_eq!(rule(&curl), "pinned");
        assert_eq!(rule(&copied), "default", "no hash read: no match");
        let other = crate::procinfo::ProcessInfo {
            exe_sha256: Some("cd".repeat(32)),
            ..curl.clone()
        };
        assert_eq!(rule(&other), "default", "another binary at the same path");
        let text = p.explain(&by_process("api.test", None, Process::Known(&curl)));
        assert!(text.contains("process: exe /usr/bin/curl"), "{text}");
        assert!(
            text.contains("  process: */curl matches /usr/bin/curl"),
            "{text}"
        );
        assert!(text.contains(&format!("  exe_sha256: {sha}")), "{text}");
        let text = p.explain(&by_process("api.test", None, Process::Unknown));
        assert!(text.contains("process: none given"), "{text}");
        assert!(text.contains("no rule matched"), "{text}");
    }
}
