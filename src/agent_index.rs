//! Which agent a socket's cgroup belongs to: kept current by the capture,
//! which follows the cgroups, and read by the proxy and the DNS handler for
//! every connection and query.

use crate::cgroup;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Whose a socket's cgroup is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentMatch {
    /// The configured agent cgroup (the innermost, when they nest).
    pub agent: Option<String>,
    /// The delegated subtree the cgroup was captured through, when it lies in no
    /// agent's cgroup: a process that moved itself out of its agent's.
    pub subtree: Option<String>,
}

/// A delegated subtree captured whole, and the configured agents inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedSubtree {
    pub path: String,
    pub agents: Vec<String>,
}

/// The cgroups that are captured, under the cgroup2 root.
#[derive(Default)]
struct Scopes {
    root: PathBuf,
    agents: Vec<String>,
    subtrees: Vec<CapturedSubtree>,
}

impl Scopes {
    /// A cgroup outside every agent's but in a captured subtree is the one agent's
    /// there (it follows that agent's rules, so moving gains it nothing); with
    /// several agents in the subtree it is nobody's.
    fn attribute(&self, path: &str) -> Option<AgentMatch> {
        if let Some(agent) = cgroup::innermost(&self.agents, path) {
            return Some(AgentMatch {
                agent: Some(agent.to_string()),
                subtree: None,
            });
        }
        let subtree = self
            .subtrees
            .iter()
            .find(|s| Path::new(path).starts_with(&s.path))?;
        let agent = match subtree.agents.as_slice() {
            [only] => Some(only.clone()),
            _ => None,
        };
        Some(AgentMatch {
            agent,
            subtree: Some(subtree.path.clone()),
        })
    }
}

/// Which configured agent (cgroup path) a socket's cgroup id belongs to; kept
/// current by whoever watches the cgroups, and asked of the kernel for a cgroup
/// made since (an agent unit that connects as soon as it starts).
#[derive(Default)]
pub struct AgentIndex {
    ids: RwLock<HashMap<u64, AgentMatch>>,
    scopes: RwLock<Scopes>,
}

impl AgentIndex {
    /// The captured cgroups that exist, and every cgroup at or below them as
    /// (id, path relative to `root`).
    pub fn replace(
        &self,
        root: &Path,
        agents: Vec<String>,
        subtrees: Vec<CapturedSubtree>,
        cgroups: Vec<(u64, String)>,
    ) {
        let scopes = Scopes {
            root: root.to_path_buf(),
            agents,
            subtrees,
        };
        let ids = cgroups
            .into_iter()
            .filter_map(|(id, path)| Some((id, scopes.attribute(&path)?)))
            .collect();
        if let Ok(mut guard) = self.scopes.write() {
            *guard = scopes;
        }
        if let Ok(mut guard) = self.ids.write() {
            *guard = ids;
        }
    }

    pub fn agent_of(&self, cgroup_id: u64) -> Option<AgentMatch> {
        if let Some(found) = self.ids.read().ok()?.get(&cgroup_id) {
            return Some(found.clone());
        }
        let found = {
            let scopes = self.scopes.read().ok()?;
            let under: Vec<&str> = scopes
                .agents
                .iter()
                .map(String::as_str)
                .chain(scopes.subtrees.iter().map(|s| s.path.as_str()))
                .collect();
            let path = cgroup::path_of_id(&scopes.root, &under, cgroup_id)?;
            scopes.attribute(&path)?
        };
        if let Ok(mut guard) = self.ids.write() {
            guard.insert(cgroup_id, found.clone());
        }
        Some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(agents: &[&str], subtrees: &[(&str, &[&str])]) -> Scopes {
        Scopes {
            root: PathBuf::from("/sys/fs/cgroup"),
            agents: agents.iter().map(|a| a.to_string()).collect(),
            subtrees: subtrees
                .iter()
                .map(|(path, agents)| CapturedSubtree {
                    path: path.to_string(),
                    agents: agents.iter().map(|a| a.to_string()).collect(),
                })
                .collect(),
        }
    }

    fn agent(agent: Option<&str>, subtree: Option<&str>) -> Option<AgentMatch> {
        Some(AgentMatch {
            agent: agent.map(str::to_string),
            subtree: subtree.map(str::to_string),
        })
    }

    #[test]
    fn an_escapee_is_its_subtrees_only_agent() {
        let user = "user.slice/user@1000.service";
        let gateway = "user.slice/user@1000.service/app.slice/gateway.service";
        let one = scopes(&[gateway, "agents.slice"], &[(user, &[gateway])]);
        assert_eq!(
            one.attribute(&format!("{gateway}/child")),
            agent(Some(gateway), None)
        );
        assert_eq!(
            one.attribute(&format!("{user}/app.slice/escape")),
            agent(Some(gateway), Some(user))
        );
        assert_eq!(one.attribute(user), agent(Some(gateway), Some(user)));
        assert_eq!(one.attribute("user.slice/user@1001.service"), None);
        // A name that only starts like the subtree is not in it.
        assert_eq!(one.attribute("user.slice/user@1000.serviceX"), None);

        let other = "user.slice/user@1000.service/app.slice/other.service";
        let two = scopes(&[gateway, other], &[(user, &[gateway, other])]);
        assert_eq!(
            two.attribute(&format!("{user}/escape")),
            agent(None, Some(user))
        );
        assert_eq!(two.attribute(other), agent(Some(other), None));
    }
}
