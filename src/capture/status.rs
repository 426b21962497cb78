//! `agent-egress status`: what is installed, read from the kernel and the
//! cgroup tree, as text or JSON.

use super::{route_plan, CaptureError};
use crate::cgroup::{self, Delegation};
use crate::config::Config;
use crate::netfilter;
use crate::routing;
use serde::Serialize;
use std::collections::BTreeMap;

/// What a daemon with this config has installed, read from the kernel.
pub fn read(config: &Config) -> Result<Status, CaptureError> {
    let table = &config.interception.table;
    let root = cgroup::cgroup2_root().map_err(CaptureError::Cgroup)?;
    let members = netfilter::agent_ids(table).map_err(CaptureError::ReadingTable)?;
    let configured: Vec<(String, Option<u64>)> = config
        .interception
        .cgroups
        .iter()
        .map(|p| {
            let id = cgroup::resolve(&root, p).ok().flatten().map(|c| c.id);
            (p.clone(), id)
        })
        .collect();
    let delegations: Vec<(String, Delegation)> = configured
        .iter()
        .filter(|(_, id)| id.is_some())
        .filter_map(|(p, _)| {
            let found = cgroup::delegated_ancestor(&root, p).ok().flatten()?;
            Some((p.clone(), found))
        })
        .filter(|(_, d)| !configured.iter().any(|(_, id)| *id == Some(d.ancestor.id)))
        .collect();
    let parents: Vec<cgroup::CgroupRef> = config
        .interception
        .cgroups
        .iter()
        .filter_map(|p| {
            cgroup::agent_only_parent(&root, p, &config.interception.cgroups)
                .ok()
                .flatten()
        })
        .collect();
    let in_set = |id: u64| members.as_ref().is_some_and(|m| m.contains(&id));
    let delegated = delegations
        .iter()
        .map(|(agent, d)| DelegatedAgent {
            agent: agent.clone(),
            subtree: d.ancestor.path.clone(),
            writer: d.writer.to_string(),
            handling: config.interception.delegated_subtrees.name(),
            captured: in_set(d.ancestor.id),
        })
        .collect();
    let set = members.as_ref().map(|m| {
        m.iter()
            .map(|id| SetMember {
                id: *id,
                path: configured
                    .iter()
                    .find(|(_, configured_id)| *configured_id == Some(*id))
                    .map(|(p, _)| p.clone())
                    .or_else(|| {
                        delegations
                            .iter()
                            .find(|(_, d)| d.ancestor.id == *id)
                            .map(|(_, d)| d.ancestor.path.clone())
                    })
                    .or_else(|| parents.iter().find(|c| c.id == *id).map(|c| c.path.clone())),
            })
            .collect()
    });
    let drops = netfilter::counters(table).ok();
    let listener = config
        .listen
        .addresses
        .iter()
        .map(|ip| {
            let addr = std::net::SocketAddr::new(*ip, config.listen.port);
            (addr.to_string(), listening(addr))
        })
        .collect();
    Ok(Status {
        table: table.clone(),
        table_installed: members.is_some(),
        agents_set: set.unwrap_or_default(),
        configured_cgroups: configured.into_iter().collect(),
        delegated,
        routing_installed: routing::is_installed(&route_plan(config)).unwrap_or(false),
        dropped_packets: drops.as_ref().map_or(0, |d| d.packets),
        dropped_bytes: drops.as_ref().map_or(0, |d| d.bytes),
        listener,
    })
}

/// Whether a socket listens on `addr` (or on the wildcard of its family, at
/// its port), from /proc/net/tcp{,6}: a test connection would be accepted and
/// recorded by the proxy as if an agent had made it.
fn listening(addr: std::net::SocketAddr) -> bool {
    let (file, wanted) = match addr.ip() {
        std::net::IpAddr::V4(a) => ("/proc/net/tcp", proc_net_hex(&a.octets())),
        std::net::IpAddr::V6(a) => ("/proc/net/tcp6", proc_net_hex(&a.octets())),
    };
    let wildcard = "0".repeat(wanted.len());
    let port = format!("{:04X}", addr.port());
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            Some((local.split_once(':')?, state == "0A"))
        })
        .any(|((ip, p), listen)| listen && p == port && (ip == wanted || ip == wildcard))
}

/// An address as /proc/net/tcp writes it: each 32-bit word in host order, in hex.
fn proc_net_hex(octets: &[u8]) -> String {
    octets
        .chunks(4)
        .map(|word| {
            let value = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
            format!("{value:08X}")
        })
        .collect()
}

#[derive(Serialize)]
pub struct SetMember {
    pub id: u64,
    pub path: Option<String>,
}

#[derive(Serialize)]
pub struct DelegatedAgent {
    pub agent: String,
    /// The topmost ancestor whose `cgroup.procs` `writer` may write.
    pub subtree: String,
    pub writer: String,
    /// `interception.delegated_subtrees`.
    pub handling: &'static str,
    /// Whether the subtree's id is in the agents set.
    pub captured: bool,
}

#[derive(Serialize)]
pub struct Status {
    pub table: String,
    pub table_installed: bool,
    pub agents_set: Vec<SetMember>,
    pub configured_cgroups: BTreeMap<String, Option<u64>>,
    /// Agent cgroups whose processes may move themselves elsewhere in a subtree.
    pub delegated: Vec<DelegatedAgent>,
    pub routing_installed: bool,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    pub listener: BTreeMap<String, bool>,
}

impl Status {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn to_text(&self) -> String {
        let yes = |b: bool| if b { "installed" } else { "MISSING" };
        let mut out = format!(
            "table inet {}: {}\npolicy routing: {}\n",
            self.table,
            yes(self.table_installed),
            yes(self.routing_installed)
        );
        out.push_str("agents set:\n");
        if self.agents_set.is_empty() {
            out.push_str("  (empty)\n");
        }
        for m in &self.agents_set {
            let path = m.path.as_deref().unwrap_or("(not a configured cgroup)");
            out.push_str(&format!("  id {}  {}\n", m.id, path));
        }
        for (path, id) in &self.configured_cgroups {
            if id.is_none() {
                out.push_str(&format!("  {path}: does not exist yet\n"));
            }
        }
        for d in &self.delegated {
            let how = if d.captured {
                "captured whole".to_string()
            } else {
                format!(
                    "NOT captured (delegated_subtrees: {}): its processes may leave the capture",
                    d.handling
                )
            };
            out.push_str(&format!(
                "  {} lies in delegated subtree {} (cgroup.procs writable by {}): {how}\n",
                d.agent, d.subtree, d.writer
            ));
        }
        out.push_str(&format!(
            "dropped (non-DNS UDP and other): {} packets, {} bytes\nlistener:\n",
            self.dropped_packets, self.dropped_bytes
        ));
        for (addr, up) in &self.listener {
            let state = if *up { "accepting" } else { "NOT LISTENING" };
            out.push_str(&format!("  {addr}: {state}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_seen_without_connecting_to_it() {
        for local in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(local) else {
                continue; // no IPv6 here
            };
            let addr = listener.local_addr().unwrap();
            assert!(listening(addr), "{addr}");
            drop(listener);
            assert!(!listening(addr), "{addr} after close");
        }
    }
}
