//! What is captured around the agents' own cgroups: the delegated subtrees
//! they lie in and their agent-only parents.

use super::{CaptureError, Members};
use crate::agent_index::CapturedSubtree;
use crate::cgroup::{self, Delegation};
use crate::config::{Config, DelegatedSubtrees};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What is captured around the agents' own cgroups: the delegated subtrees they
/// lie in (`interception.delegated_subtrees: "capture"`) and their agent-only
/// parents (see [`cgroup::agent_only_parent`]).
pub(super) struct Around {
    pub(super) mode: DelegatedSubtrees,
    /// Agent path → its topmost delegated ancestor, as last reported.
    pub(super) found: BTreeMap<String, Delegation>,
    /// The cgroups in the agents set besides the agents' own.
    pub(super) captured: Members,
    /// Which of them are there only as agent-only parents: in the set, but
    /// without the backstop (detaching it again, once something else
    /// appears there, would take opening systemd's programs by id).
    pub(super) parents: BTreeSet<u64>,
}

impl Around {
    /// At start: says what it finds, or refuses it (`refuse`).
    pub(super) fn look(
        mode: DelegatedSubtrees,
        root: &Path,
        configured: &[String],
        members: &Members,
    ) -> Result<Around, CaptureError> {
        let found = find_delegations(root, members);
        if mode == DelegatedSubtrees::Refuse && !found.is_empty() {
            let refusals: Vec<String> = found.iter().map(|(a, d)| refusal(a, d)).collect();
            return Err(CaptureError::DelegatedRefused(refusals));
        }
        for (agent, d) in &found {
            report(mode, agent, d);
        }
        let (captured, parents) = around_agents(
            subtrees_to_capture(mode, &found),
            agent_only_parents(root, configured, members),
        );
        Ok(Around {
            mode,
            captured,
            found,
            parents,
        })
    }

    pub(super) fn with_agents(&self, members: &Members) -> Members {
        let mut all = members.clone();
        all.extend(self.captured.clone());
        all
    }

    /// What the backstop covers: the agents' cgroups and the delegated
    /// subtrees, not the agent-only parents.
    pub(super) fn fenced(&self, members: &Members) -> Members {
        let mut all = self.with_agents(members);
        all.retain(|id, _| !self.parents.contains(id));
        all
    }

    /// The captured subtrees with the configured agents inside each.
    pub(super) fn subtrees(&self, configured: &[String]) -> Vec<CapturedSubtree> {
        self.captured
            .values()
            .map(|(path, _)| CapturedSubtree {
                path: path.clone(),
                agents: configured
                    .iter()
                    .filter(|agent| Path::new(agent.as_str()).starts_with(path))
                    .cloned()
                    .collect(),
            })
            .collect()
    }
}

/// The delegated subtrees and the agent-only parents in one, and which ids
/// are there only as parents.
pub(super) fn around_agents(subtrees: Members, parents: Members) -> (Members, BTreeSet<u64>) {
    let only_parents = parents
        .keys()
        .filter(|id| !subtrees.contains_key(id))
        .copied()
        .collect();
    let mut captured = subtrees;
    captured.extend(parents);
    (captured, only_parents)
}

/// The agent-only parents of the configured cgroups that are not captured
/// already as agents.
pub(super) fn agent_only_parents(root: &Path, configured: &[String], members: &Members) -> Members {
    configured
        .iter()
        .filter_map(
            |path| match cgroup::agent_only_parent(root, path, configured) {
                Ok(parent) => parent,
                Err(e) => {
                    log::warn!("looking at the parent of cgroup {path}: {e}");
                    None
                }
            },
        )
        .filter(|parent| !members.contains_key(&parent.id))
        .map(|parent| (parent.id, (parent.path, parent.level)))
        .collect()
}

/// Each agent cgroup's topmost delegated ancestor, for those that have one that
/// is not itself an agent's cgroup (captured whole already).
pub(super) fn find_delegations(root: &Path, members: &Members) -> BTreeMap<String, Delegation> {
    members
        .values()
        .filter_map(|(path, _)| match cgroup::delegated_ancestor(root, path) {
            Ok(found) => Some((path.clone(), found?)),
            Err(e) => {
                log::warn!("looking for a delegated subtree around {path}: {e}");
                None
            }
        })
        .filter(|(_, d)| !members.contains_key(&d.ancestor.id))
        .collect()
}

/// In `capture`, the subtrees found.
pub(super) fn subtrees_to_capture(
    mode: DelegatedSubtrees,
    found: &BTreeMap<String, Delegation>,
) -> Members {
    if mode != DelegatedSubtrees::Capture {
        return Members::new();
    }
    found
        .values()
        .map(|d| (d.ancestor.id, (d.ancestor.path.clone(), d.ancestor.level)))
        .collect()
}

fn escapable(agent: &str, d: &Delegation) -> String {
    format!(
        "agent cgroup {agent} lies in the delegated subtree {subtree} (its cgroup.procs is writable by {writer}): \
         a process of that user may move itself to any cgroup below {subtree}, out of the capture",
        subtree = d.ancestor.path,
        writer = d.writer
    )
}

fn refusal(agent: &str, d: &Delegation) -> String {
    format!(
        "{}. interception.delegated_subtrees is \"refuse\": either capture the whole subtree \
         (interception.delegated_subtrees: \"capture\"), or run the agent where its user may not write \
         the cgroup.procs of any of its cgroup's ancestors (a system service or slice, outside {})",
        escapable(agent, d),
        d.ancestor.path
    )
}

/// Said once each time an agent cgroup is found in a delegated subtree.
pub(super) fn report(mode: DelegatedSubtrees, agent: &str, d: &Delegation) {
    match mode {
        DelegatedSubtrees::Capture => log::warn!(
            "{}; capturing all of {} (id {}) with it (interception.delegated_subtrees: \"capture\")",
            escapable(agent, d),
            d.ancestor.path,
            d.ancestor.id
        ),
        DelegatedSubtrees::Refuse => log::error!(
            "{}; until then only {agent} itself is captured",
            refusal(agent, d)
        ),
        DelegatedSubtrees::Ignore => log::warn!(
            "{}; only {agent} itself is captured (interception.delegated_subtrees: \"ignore\")",
            escapable(agent, d)
        ),
    }
}

/// What `down` detaches from: the configured cgroups and, when captured whole,
/// the delegated subtrees they lie in. (Agent-only parents get no backstop,
/// and the connect log's links go with the daemon.)
pub(super) fn captured_paths(root: &Path, config: &Config) -> Vec<String> {
    let mut paths = config.interception.cgroups.clone();
    if config.interception.delegated_subtrees == DelegatedSubtrees::Capture {
        for path in &config.interception.cgroups {
            if let Ok(Some(d)) = cgroup::delegated_ancestor(root, path) {
                if !paths.contains(&d.ancestor.path) {
                    paths.push(d.ancestor.path);
                }
            }
        }
    }
    paths
}
