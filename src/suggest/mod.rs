// SPDX-License-Identifier: GPL-3.0-or-later
//! `agent-egress suggest`: a minimal allowlist per agent, learnt from audit records.
//!
//! Records stream through [`Learner::feed`], which keeps one small tally per
//! (agent, destination), never the records: memory grows with the distinct
//! destinations (bounded by [`MAX_DESTINATIONS`]), not with the log. [`Learner::finish`]
//! then collapses names to their registrable domain (Public Suffix List) where two or
//! more distinct names of one domain were seen, and groups the entries into rules by
//! port set and outbound. What was refused is kept apart: it is evidence, not a rule.

pub mod render;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::audit::{Event, Verdict};
use crate::audit_read::{self, LogRecord};

/// Distinct (agent, destination) pairs tallied; past it new ones are counted, not kept.
pub const MAX_DESTINATIONS: usize = 100_000;
/// Processes named per entry; the others are counted.
const MAX_PROCESSES: usize = 8;
/// Distinct ports kept per destination; past it the entry allows any port.
const MAX_PORTS: usize = 64;
/// Port ranges in a rule before it is clearer to allow any port.
const MAX_PORT_RANGES: usize = 8;

/// Port ranges (first, last), as a rule's `ports` holds them.
pub type Ports = Vec<(u16, u16)>;

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only this agent: its configured cgroup path or its Nix name.
    pub agent: Option<String>,
    /// Entries seen fewer times are left out (and listed as such).
    pub min_count: u64,
}

/// Where connections went: a name, or an address for connections without one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Name(String),
    Ip(IpAddr),
}

/// The tally of one destination (or, after collapsing, one entry).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    pub count: u64,
    pub first: String,
    pub last: String,
    /// Ports connected to; none for DNS-only refusals.
    pub ports: BTreeSet<u16>,
    /// More than [`MAX_PORTS`] distinct ports.
    pub any_port: bool,
    pub processes: BTreeMap<String, u64>,
    /// Connections by processes beyond [`MAX_PROCESSES`] or unnamed.
    pub other_processes: u64,
    /// The outbound of the first allowed connection, or the rule that refused.
    pub via: Option<String>,
}

impl Seen {
    fn note(&mut self, record: &LogRecord<'_>, port: Option<u16>, via: Option<&str>) {
        let ts = record.ts.as_ref();
        if self.count == 0 || ts < self.first.as_str() {
            self.first = ts.to_string();
        }
        if ts > self.last.as_str() {
            self.last = ts.to_string();
        }
        self.count += 1;
        if let Some(port) = port {
            if self.ports.len() < MAX_PORTS || self.ports.contains(&port) {
                self.ports.insert(port);
            } else {
                self.any_port = true;
            }
        }
        match record.exe.as_deref() {
            Some(exe)
                if self.processes.len() < MAX_PROCESSES || self.processes.contains_key(exe) =>
            {
                *self.processes.entry(exe.to_string()).or_default() += 1;
            }
            _ => self.other_processes += 1,
        }
        if self.via.is_none() {
            self.via = via.map(str::to_string);
        }
    }

    fn merge(&mut self, other: &Seen) {
        if self.count == 0 || other.first < self.first {
            self.first.clone_from(&other.first);
        }
        if other.last > self.last {
            self.last.clone_from(&other.last);
        }
        self.count += other.count;
        self.ports.extend(&other.ports);
        self.any_port |= other.any_port || self.ports.len() > MAX_PORTS;
        for (exe, n) in &other.processes {
            if self.processes.len() < MAX_PROCESSES || self.processes.contains_key(exe) {
                *self.processes.entry(exe.clone()).or_default() += n;
            } else {
                self.other_processes += n;
            }
        }
        self.other_processes += other.other_processes;
        if self.via.is_none() {
            self.via.clone_from(&other.via);
        }
    }

    /// The ports as config ranges, or none when any port is the honest answer.
    pub fn port_ranges(&self) -> Option<Ports> {
        if self.any_port || self.ports.is_empty() {
            return None;
        }
        let mut ranges: Ports = Vec::new();
        for &p in &self.ports {
            match ranges.last_mut() {
                Some((_, last)) if u32::from(*last) + 1 == u32::from(p) => *last = p,
                _ => ranges.push((p, p)),
            }
        }
        (ranges.len() <= MAX_PORT_RANGES).then_some(ranges)
    }
}

/// What the records said beside the destinations: the report at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub records: u64,
    /// Connection ends and refused DNS queries: what the suggestion is made of.
    pub used: u64,
    /// Start events (their end record counts), allowed DNS queries (their
    /// connections count), loopback (decided by `loopback`, not rules), undecided,
    /// records of no agent, or of an agent not asked for.
    pub ignored: u64,
    /// Records the daemon said it lost (`audit_drops`): the log is incomplete.
    pub lost_by_daemon: u64,
    /// Destinations past [`MAX_DESTINATIONS`], counted only.
    pub untracked: u64,
}

#[derive(Debug, Default)]
struct AgentTally {
    allowed: HashMap<Target, Seen>,
    blocked: HashMap<Target, Seen>,
}

#[derive(Debug, Default)]
pub struct Learner {
    options: Options,
    agents: BTreeMap<String, AgentTally>,
    destinations: usize,
    pub stats: Stats,
}

/// One entry of a suggested rule: a domain pattern or an address, with its evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// As the config writes it: `=host`, `domain` (and its subdomains), or an IP.
    pub pattern: String,
    /// The names a collapsed entry stands for.
    pub hosts: Vec<String>,
    pub seen: Seen,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SuggestedRule {
    pub name: String,
    /// Domain patterns, or addresses (a rule cannot AND them: two rules).
    pub by_address: bool,
    pub ports: Option<Ports>,
    pub outbound: String,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentSuggestion {
    /// The configured cgroup path, as records name it.
    pub cgroup: String,
    /// The name under `services.agentEgress.agents`.
    pub nix_name: String,
    pub rules: Vec<SuggestedRule>,
    pub blocked: Vec<Entry>,
    /// Entries seen fewer than `--min-count` times.
    pub rare: Vec<Entry>,
}

impl Learner {
    pub fn new(options: Options) -> Learner {
        Learner {
            options,
            ..Learner::default()
        }
    }

    pub fn feed(&mut self, record: &LogRecord<'_>) {
        self.stats.records += 1;
        if record.event == Event::AuditDrops {
            self.stats.lost_by_daemon += record.dropped.unwrap_or(0);
        }
        let blocked = match (record.event, record.verdict) {
            (Event::End, Verdict::Allow | Verdict::WouldBlock | Verdict::Error) => false,
            (Event::End | Event::Dns, Verdict::Block) => true,
            _ => return self.stats.ignored += 1,
        };
        let Some(agent) = record
            .agent
            .as_deref()
            .map(one_exec)
            .filter(|a| self.wanted(a))
        else {
            return self.stats.ignored += 1;
        };
        let dst = record.dst.parse::<SocketAddr>().ok();
        if dst.is_some_and(|d| d.ip().to_canonical().is_loopback()) && record.event == Event::End {
            return self.stats.ignored += 1;
        }
        let name = record.host.as_deref().or(record.resolved_name.as_deref());
        let target = match (name, dst) {
            (Some(name), _) => Target::Name(name.to_string()),
            (None, Some(d)) => Target::Ip(d.ip().to_canonical()),
            (None, None) => return self.stats.ignored += 1,
        };
        let port = (record.event == Event::End)
            .then(|| dst.map(|d| d.port()))
            .flatten();
        let via = if blocked {
            record.rule.as_deref()
        } else {
            record
                .outbound
                .as_deref()
                .filter(|_| record.verdict != Verdict::WouldBlock)
        };
        let tally = self.agents.entry(agent.to_string()).or_default();
        let map = if blocked {
            &mut tally.blocked
        } else {
            &mut tally.allowed
        };
        if !map.contains_key(&target) {
            if self.destinations >= MAX_DESTINATIONS {
                return self.stats.untracked += 1;
            }
            self.destinations += 1;
        }
        self.stats.used += 1;
        map.entry(target).or_default().note(record, port, via);
    }

    fn wanted(&self, agent: &str) -> bool {
        self.options
            .agent
            .as_deref()
            .is_none_or(|want| want == agent || want == nix_name(agent))
    }

    pub fn finish(self) -> Vec<AgentSuggestion> {
        let min_count = self.options.min_count;
        self.agents
            .into_iter()
            .map(|(cgroup, tally)| {
                let nix_name = nix_name(&cgroup);
                let (kept, rare): (Vec<Entry>, Vec<Entry>) = collapse(tally.allowed)
                    .into_iter()
                    .partition(|e| e.seen.count >= min_count);
                let mut blocked: Vec<Entry> = tally.blocked.into_iter().map(exact).collect();
                blocked.sort_by(|a, b| a.pattern.cmp(&b.pattern));
                AgentSuggestion {
                    rules: group(&nix_name, kept),
                    cgroup,
                    nix_name,
                    blocked,
                    rare,
                }
            })
            .collect()
    }
}

fn exact((target, seen): (Target, Seen)) -> Entry {
    match target {
        Target::Name(host) => Entry {
            pattern: format!("={host}"),
            hosts: vec![host],
            seen,
        },
        Target::Ip(ip) => Entry {
            pattern: ip.to_string(),
            hosts: Vec::new(),
            seen,
        },
    }
}

/// Names of one registrable domain collapse to it when there are two or more of
/// them; a lone name stays exact. A public suffix (`github.io`) is never a
/// registrable domain, so its users' names stay apart.
fn collapse(allowed: HashMap<Target, Seen>) -> Vec<Entry> {
    let mut by_domain: BTreeMap<String, Vec<(String, Seen)>> = BTreeMap::new();
    let mut entries = Vec::new();
    for (target, seen) in allowed {
        match target {
            Target::Name(host) => match psl::domain_str(&host) {
                Some(domain) => by_domain
                    .entry(domain.to_string())
                    .or_default()
                    .push((host, seen)),
                None => entries.push(exact((Target::Name(host), seen))),
            },
            ip @ Target::Ip(_) => entries.push(exact((ip, seen))),
        }
    }
    for (domain, mut hosts) in by_domain {
        if hosts.len() == 1 {
            let (host, seen) = hosts.remove(0);
            entries.push(exact((Target::Name(host), seen)));
            continue;
        }
        hosts.sort_by(|a, b| a.0.cmp(&b.0));
        let mut seen = Seen::default();
        for (_, s) in &hosts {
            seen.merge(s);
        }
        entries.push(Entry {
            pattern: domain,
            hosts: hosts.into_iter().map(|(h, _)| h).collect(),
            seen,
        });
    }
    entries.sort_by(|a, b| {
        a.pattern
            .trim_start_matches('=')
            .cmp(b.pattern.trim_start_matches('='))
    });
    entries
}

/// One rule per (names or addresses, outbound, ports): fewest rules, each as narrow
/// as what was seen.
fn group(agent: &str, entries: Vec<Entry>) -> Vec<SuggestedRule> {
    type Key = (bool, String, Option<Ports>);
    let mut rules: BTreeMap<Key, Vec<Entry>> = BTreeMap::new();
    for entry in entries {
        let by_address = entry.hosts.is_empty();
        let outbound = entry
            .seen
            .via
            .clone()
            .unwrap_or_else(|| "direct".to_string());
        rules
            .entry((by_address, outbound, entry.seen.port_ranges()))
            .or_default()
            .push(entry);
    }
    rules
        .into_iter()
        .map(|((by_address, outbound, ports), entries)| {
            let ports_part = match &ports {
                Some(ranges) => ranges
                    .iter()
                    .map(|&(a, b)| port_text(a, b))
                    .collect::<Vec<_>>()
                    .join(","),
                None => "any-port".to_string(),
            };
            let kind = if by_address { "ips/" } else { "" };
            let via = if outbound == "direct" {
                String::new()
            } else {
                format!("/{outbound}")
            };
            SuggestedRule {
                name: format!("suggest/{agent}/{kind}{ports_part}{via}"),
                by_address,
                ports,
                outbound,
                entries,
            }
        })
        .collect()
}

/// What `exec` runs are learnt as: each makes a cgroup of its own
/// (`agent-egress-exec-PID`) that no later run has, so their records are one agent
/// whose rules name no cgroup (an `exec --config` applies them to its command).
pub const EXEC_AGENT: &str = "agent-egress-exec";

fn one_exec(cgroup: &str) -> &str {
    match cgroup.strip_prefix("agent-egress-exec-") {
        Some(pid) if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) => EXEC_AGENT,
        _ => cgroup,
    }
}

/// `443`, or `8000-8100`.
pub fn port_text(first: u16, last: u16) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// The agent's name under `services.agentEgress.agents`: the module puts agent
/// NAME in slice `<top>-NAME.slice` (dashes escaped `\x2d`) below `<top>.slice`;
/// another cgroup is named by its last slice or unit, cleaned to what the module
/// accepts (letters, digits, `_`, `-`).
pub fn nix_name(cgroup: &str) -> String {
    let parts: Vec<&str> = cgroup.split('/').filter(|p| !p.is_empty()).collect();
    let slices: Vec<(usize, &str)> = parts
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.strip_suffix(".slice").map(|s| (i, s)))
        .collect();
    let raw = match slices.as_slice() {
        [.., (_, parent), (_, own)] if own.starts_with(&format!("{parent}-")) => {
            own[parent.len() + 1..].replace("\\x2d", "-")
        }
        _ => parts
            .last()
            .map(|p| {
                p.trim_end_matches(".slice")
                    .trim_end_matches(".service")
                    .to_string()
            })
            .unwrap_or_default(),
    };
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "agent".to_string()
    } else {
        clean
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `rules` for the config, with the evidence beside them.
    Json,
    /// Values for `services.agentEgress.agents.<name>`.
    Nix,
}

/// Reads the files, prints the suggestion on standard output and a report on
/// standard error. Non-zero only when nothing usable was read.
pub fn run(files: &[PathBuf], format: Format, options: Options) -> i32 {
    let mut learner = Learner::new(options);
    let totals = audit_read::read_files(files, |r| learner.feed(r));
    let stats = learner.stats.clone();
    let suggestions = learner.finish();
    let (first, last) = suggestions
        .iter()
        .flat_map(|a| {
            a.rules
                .iter()
                .flat_map(|r| &r.entries)
                .chain(&a.blocked)
                .chain(&a.rare)
        })
        .fold((None::<&str>, None::<&str>), |(f, l), e| {
            (
                Some(f.map_or(&*e.seen.first, |f| f.min(&e.seen.first))),
                Some(l.map_or(&*e.seen.last, |l| l.max(&e.seen.last))),
            )
        });
    let header = format!(
        "agent-egress suggest: {} connection(s) and refused DNS queries of {} record(s), {} to {}\n\
         Each value drops into services.agentEgress.agents.<name>. The module's allow lists\n\
         match names and addresses: the ports and processes seen are in the comments.",
        stats.used,
        stats.records,
        first.unwrap_or("-"),
        last.unwrap_or("-"),
    );
    match format {
        Format::Json => print!("{}", render::json(&suggestions)),
        Format::Nix => print!("{}", render::nix(&suggestions, &header)),
    }
    eprintln!(
        "agent-egress suggest: {} record(s) read, {} used, {} not about an allowlist; \
         {} bad line(s), {} unreadable file(s)",
        totals.records, stats.used, stats.ignored, totals.bad_lines, totals.bad_files
    );
    if stats.lost_by_daemon > 0 {
        eprintln!(
            "agent-egress suggest: the daemon lost {} record(s) (audit_drops): the suggestion may miss destinations",
            stats.lost_by_daemon
        );
    }
    if stats.untracked > 0 {
        eprintln!(
            "agent-egress suggest: {} record(s) to destinations past the first {MAX_DESTINATIONS} left out",
            stats.untracked
        );
    }
    if stats.used == 0 {
        eprintln!("agent-egress suggest: nothing usable was read");
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learn(lines: &[&str], options: Options) -> Vec<AgentSuggestion> {
        let mut learner = Learner::new(options);
        for line in lines {
            learner.feed(&LogRecord::parse(line).expect("record"));
        }
        learner.finish()
    }

    fn end(host: &str, port: u16, ts: &str) -> String {
        format!(
            r#"{{"ts":"{ts}","event":"end","agent":"a.slice","exe":"/usr/bin/curl","dst":"192.0.2.1:{port}","host":"{host}","verdict":"would_block","outbound":"block"}}"#
        )
    }

    fn patterns(s: &AgentSuggestion) -> Vec<Vec<&str>> {
        s.rules
            .iter()
            .map(|r| r.entries.iter().map(|e| e.pattern.as_str()).collect())
            .collect()
    }

    #[test]
    fn names_collapse_only_to_a_registrable_domain_seen_twice() {
        let lines = [
            end("api.github.com", 443, "t1"),
            end("codeload.github.com", 443, "t2"),
            end("alice.github.io", 443, "t3"),
            end("bob.github.io", 443, "t4"),
            end("crates.io", 443, "t5"),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let out = learn(&lines, Options::default());
        assert_eq!(
            patterns(&out[0]),
            [[
                "=alice.github.io",
                "=bob.github.io",
                "=crates.io",
                "github.com"
            ]]
        );
        let github = &out[0].rules[0].entries[3];
        assert_eq!(github.hosts, ["api.github.com", "codeload.github.com"]);
        assert_eq!(
            (github.seen.count, &*github.seen.first, &*github.seen.last),
            (2, "t1", "t2")
        );
    }

    #[test]
    fn ports_split_rules_and_many_ports_allow_any() {
        let mut lines = vec![
            end("a.test", 443, "t"),
            end("b.other", 22, "t"),
            end("b.other", 443, "t"),
        ];
        lines.extend((1000..1100).map(|p| end("c.test", p, "t")));
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let out = learn(&lines, Options::default());
        let rules: Vec<(&str, Option<Ports>)> = out[0]
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r.ports.clone()))
            .collect();
        assert_eq!(
            rules,
            [
                ("suggest/a/any-port", None),
                ("suggest/a/22,443", Some(vec![(22, 22), (443, 443)])),
                ("suggest/a/443", Some(vec![(443, 443)])),
            ]
        );
    }

    #[test]
    fn min_count_and_agent_filter() {
        let lines = [
            end("a.test", 443, "t"),
            end("a.test", 443, "t"),
            end("b.test", 443, "t"),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let out = learn(
            &lines,
            Options {
                agent: Some("a".into()),
                min_count: 2,
            },
        );
        assert_eq!(patterns(&out[0]), [["=a.test"]]);
        assert_eq!(out[0].rare[0].pattern, "=b.test");
        assert!(learn(
            &lines,
            Options {
                agent: Some("b".into()),
                min_count: 1
            }
        )
        .is_empty());
    }

    #[test]
    fn exec_runs_are_one_agent() {
        let lines: Vec<String> = [("17149", "a.test"), ("20001", "b.test")]
            .iter()
            .map(|(pid, host)| {
                end(host, 443, "t").replace("a.slice", &format!("agent-egress-exec-{pid}"))
            })
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let out = learn(&lines, Options::default());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].cgroup, EXEC_AGENT);
        assert_eq!(patterns(&out[0]), [["=a.test", "=b.test"]]);
        let json: serde_json::Value = serde_json::from_str(&render::json(&out)).expect("JSON");
        assert!(json["rules"][0].get("agents").is_none(), "{json}");
    }

    #[test]
    fn nix_names_of_module_slices_and_others() {
        assert_eq!(
            nix_name("agent.slice/agent-egress.slice/agent-egress-agents.slice/agent-egress-agents-open\\x2dclaw.slice"),
            "open-claw"
        );
        assert_eq!(
            nix_name("agent.slice/agent-egress.slice/agent-egress-agents.slice/agent-egress-agents-bot.slice/bot.service"),
            "bot"
        );
        assert_eq!(nix_name("agents.slice"), "agents");
        assert_eq!(
            nix_name("user.slice/user-1000.slice/user@1000.service/app.slice/x y.scope"),
            "x_y_scope"
        );
    }
}
