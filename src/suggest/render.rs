// SPDX-License-Identifier: GPL-3.0-or-later
//! The two forms of a suggestion. JSON: `rules` is an array `check` accepts as the
//! config's `rules` (the config refuses unknown keys, so the evidence — counts,
//! first and last seen, names, processes — sits beside it in `evidence`, keyed by
//! rule name, and the refused destinations in `blocked`). Nix: one attribute per
//! agent whose value drops into `services.agentEgress.agents.<name>`; the module's
//! allow lists hold names and addresses only, so ports, processes and counts are
//! comments there.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::{port_text, AgentSuggestion, Entry, Seen, EXEC_AGENT};

#[derive(Serialize)]
struct JsonRule<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    domains: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ips: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ports: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agents: Option<[&'a str; 1]>,
    outbound: &'a str,
}

#[derive(Serialize)]
struct JsonEntry<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<&'a str>,
    pattern: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    hosts: &'a [String],
    count: u64,
    first_seen: &'a str,
    last_seen: &'a str,
    /// Ports seen, `"any"` past what could be kept; absent: none (DNS only).
    #[serde(skip_serializing_if = "Option::is_none")]
    ports: Option<Value>,
    processes: &'a BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "is_zero")]
    other_processes: u64,
    /// For a refusal: the rule that refused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct JsonSuggestion<'a> {
    rules: Vec<JsonRule<'a>>,
    evidence: BTreeMap<&'a str, Vec<JsonEntry<'a>>>,
    blocked: Vec<JsonEntry<'a>>,
    /// Seen fewer than `--min-count` times.
    left_out: Vec<JsonEntry<'a>>,
}

fn port_values(ranges: &[(u16, u16)]) -> Vec<Value> {
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                Value::from(a)
            } else {
                Value::from(port_text(a, b))
            }
        })
        .collect()
}

fn seen_ports(seen: &Seen) -> Option<Value> {
    match seen.port_ranges() {
        Some(ranges) => Some(Value::Array(port_values(&ranges))),
        None if seen.any_port || !seen.ports.is_empty() => Some(Value::from("any")),
        None => None,
    }
}

fn json_entry<'a>(agent: Option<&'a str>, entry: &'a Entry, refused: bool) -> JsonEntry<'a> {
    JsonEntry {
        agent,
        pattern: &entry.pattern,
        hosts: if entry.hosts.len() > 1 {
            &entry.hosts
        } else {
            &[]
        },
        count: entry.seen.count,
        first_seen: &entry.seen.first,
        last_seen: &entry.seen.last,
        ports: seen_ports(&entry.seen),
        processes: &entry.seen.processes,
        other_processes: entry.seen.other_processes,
        rule: entry.seen.via.as_deref().filter(|_| refused),
    }
}

pub fn json(suggestions: &[AgentSuggestion]) -> String {
    let mut out = JsonSuggestion {
        rules: Vec::new(),
        evidence: BTreeMap::new(),
        blocked: Vec::new(),
        left_out: Vec::new(),
    };
    for agent in suggestions {
        for rule in &agent.rules {
            let patterns = rule.entries.iter().map(|e| e.pattern.as_str()).collect();
            let (domains, ips) = if rule.by_address {
                (Vec::new(), patterns)
            } else {
                (patterns, Vec::new())
            };
            out.rules.push(JsonRule {
                name: &rule.name,
                domains,
                ips,
                ports: rule.ports.as_deref().map(port_values),
                agents: (agent.cgroup != EXEC_AGENT).then_some([agent.cgroup.as_str()]),
                outbound: &rule.outbound,
            });
            out.evidence.insert(
                &rule.name,
                rule.entries
                    .iter()
                    .map(|e| json_entry(None, e, false))
                    .collect(),
            );
        }
        let cgroup = Some(agent.cgroup.as_str());
        out.blocked
            .extend(agent.blocked.iter().map(|e| json_entry(cgroup, e, true)));
        out.left_out
            .extend(agent.rare.iter().map(|e| json_entry(cgroup, e, false)));
    }
    // Serialising plain structs of strings and numbers cannot fail.
    let mut text = serde_json::to_string_pretty(&out).unwrap_or_default();
    text.push('\n');
    text
}

/// A Nix string literal: `"`, `\` and `${` escaped.
fn nix_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '$' if chars.peek() == Some(&'{') => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Text for a comment: one line, whatever a process was named.
fn comment_text(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn evidence_comment(entry: &Entry, refused: bool) -> String {
    let seen = &entry.seen;
    let mut parts = vec![format!(
        "{} time{}",
        seen.count,
        if seen.count == 1 { "" } else { "s" }
    )];
    if entry.hosts.len() > 1 {
        parts.push(entry.hosts.join(" "));
    }
    match seen.port_ranges() {
        Some(r) => {
            let ports: Vec<String> = r.iter().map(|&(a, b)| port_text(a, b)).collect();
            parts.push(format!("port {}", ports.join(" ")));
        }
        None if seen.ports.is_empty() && !seen.any_port => parts.push("DNS".to_string()),
        None => parts.push("many ports".to_string()),
    }
    match &seen.via {
        Some(rule) if refused => parts.push(format!("rule {rule}")),
        // The module gives the agent's own outbound: say when it was another.
        Some(via) if via != "direct" => parts.push(format!("was via {via}")),
        _ => {}
    }
    let mut processes: Vec<String> = seen.processes.keys().cloned().collect();
    if seen.other_processes > 0 {
        processes.push(format!("+{} unnamed or more", seen.other_processes));
    }
    parts.push(processes.join(" "));
    parts.push(format!("{} to {}", seen.first, seen.last));
    comment_text(&parts.join("; "))
}

pub fn nix(suggestions: &[AgentSuggestion], header: &str) -> String {
    let mut by_name: BTreeMap<&str, Vec<&AgentSuggestion>> = BTreeMap::new();
    for agent in suggestions {
        by_name.entry(&agent.nix_name).or_default().push(agent);
    }
    let mut out = String::new();
    for line in header.lines() {
        out.push_str(&format!("# {}\n", comment_text(line)));
    }
    out.push_str("{\n");
    for (name, agents) in by_name {
        out.push_str(&format!("  {} = {{\n", nix_string(name)));
        let cgroups: Vec<&str> = agents.iter().map(|a| a.cgroup.as_str()).collect();
        out.push_str(&format!(
            "    # cgroup {}\n",
            comment_text(&cgroups.join(", "))
        ));
        for (field, by_address) in [("domains", false), ("ips", true)] {
            let mut entries: Vec<&Entry> = agents
                .iter()
                .flat_map(|a| &a.rules)
                .filter(|r| r.by_address == by_address)
                .flat_map(|r| &r.entries)
                .collect();
            entries.sort_by_key(|e| e.pattern.trim_start_matches('='));
            if entries.is_empty() {
                continue;
            }
            out.push_str(&format!("    allow.{field} = [\n"));
            for entry in entries {
                out.push_str(&format!(
                    "      {} # {}\n",
                    nix_string(&entry.pattern),
                    evidence_comment(entry, false)
                ));
            }
            out.push_str("    ];\n");
        }
        for (title, refused, list) in [
            (
                "refused, not allowed here:",
                true,
                agents.iter().flat_map(|a| &a.blocked).collect::<Vec<_>>(),
            ),
            (
                "seen fewer than --min-count times, left out:",
                false,
                agents.iter().flat_map(|a| &a.rare).collect(),
            ),
        ] {
            if list.is_empty() {
                continue;
            }
            out.push_str(&format!("    # {title}\n"));
            for entry in list {
                out.push_str(&format!(
                    "    #   {} ({})\n",
                    comment_text(&entry.pattern),
                    evidence_comment(entry, refused)
                ));
            }
        }
        out.push_str("  };\n");
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::nix_string;

    #[test]
    fn nix_strings_are_escaped() {
        assert_eq!(nix_string(r#"a"b\c${d}$e"#), r#""a\"b\\c\${d}$e""#);
    }
}
