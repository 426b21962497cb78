//! Agents' TCP connections to the host's own loopback, decided by who listens
//! there: every service on the host's loopback (a local SOCKS or HTTP proxy,
//! `kubectl proxy`, a browser's DevTools port, a database) would otherwise be
//! an exit outside the policy. These are decided at once, without sniffing:
//! many local protocols have the server speak first.

use crate::config::{Loopback, LoopbackRule};
use std::path::Path;

/// The socket listening where an agent connected, as sock_diag and cgroupfs name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listener {
    pub uid: u32,
    pub cgroup_id: Option<u64>,
    /// Its cgroup relative to the cgroup2 root; `None` when the kernel would
    /// not say (no CAP_DAC_READ_SEARCH): then no rule by listener matches.
    pub cgroup: Option<String>,
    /// The configured agent whose cgroup it listens in.
    pub agent: Option<String>,
}

/// The rule names a loopback decision records besides the configured ones.
pub const OWN_LISTENER_RULE: &str = "loopback:own";
pub const REFUSED_RULE: &str = "loopback:default";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'c> {
    pub allowed: bool,
    pub rule: &'c str,
}

/// `listener` is `None` when nothing listens on the port (the dial will be refused).
pub fn decide<'c>(
    config: &'c Loopback,
    port: u16,
    agent: Option<&str>,
    listener: Option<&Listener>,
) -> Decision<'c> {
    let own = listener
        .and_then(|l| l.agent.as_deref())
        .is_some_and(|owner| Some(owner) == agent);
    if own && config.own_listeners {
        return Decision {
            allowed: true,
            rule: OWN_LISTENER_RULE,
        };
    }
    match config
        .allow
        .iter()
        .find(|rule| matches(rule, port, agent, listener))
    {
        Some(rule) => Decision {
            allowed: true,
            rule: &rule.name,
        },
        None => Decision {
            allowed: false,
            rule: REFUSED_RULE,
        },
    }
}

/// What `explain` says of a connection to loopback.
pub fn explain(
    config: &Loopback,
    port: u16,
    agent: Option<&str>,
    listener: Option<&Listener>,
) -> String {
    let decision = decide(config, port, agent, listener);
    let verdict = if decision.allowed {
        "allowed"
    } else {
        "refused (a TCP reset)"
    };
    let whose = match listener.and_then(|l| l.cgroup.as_deref()) {
        Some(cgroup) => format!("listener in {cgroup}"),
        None => "listener unknown (give --listener CGROUP)".into(),
    };
    let why = match decision.rule {
        OWN_LISTENER_RULE => "the listener is in the agent's own cgroup".to_string(),
        REFUSED_RULE => {
            "no loopback.allow rule matches, and the listener is not the agent's own".into()
        }
        name => format!("loopback.allow rule {name:?} matches"),
    };
    format!(
        "loopback port {port}, agent {}, {whose}: decided by the listener, not by rules\n{verdict} by {}: {why}",
        agent.unwrap_or("(unknown)"),
        decision.rule
    )
}

fn matches(
    rule: &LoopbackRule,
    port: u16,
    agent: Option<&str>,
    listener: Option<&Listener>,
) -> bool {
    let port_ok = rule.ports.is_empty() || rule.ports.iter().any(|r| r.contains(port));
    let agent_ok =
        rule.agents.is_empty() || agent.is_some_and(|a| rule.agents.iter().any(|r| r == a));
    let listener_ok = rule.listeners.is_empty()
        || listener
            .and_then(|l| l.cgroup.as_deref())
            .is_some_and(|cgroup| rule.listeners.iter().any(|l| listener_matches(l, cgroup)));
    port_ok && agent_ok && listener_ok
}

/// A unit name matches any component of the listener's cgroup path; a path
/// matches its own subtree.
fn listener_matches(pattern: &str, cgroup: &str) -> bool {
    if pattern.contains('/') {
        Path::new(cgroup).starts_with(pattern)
    } else {
        cgroup.split('/').any(|component| component == pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(json: &str) -> Config {
        Config::from_json(json).expect("valid config")
    }

    fn listener(cgroup: &str, agent: Option<&str>) -> Listener {
        Listener {
            uid: 0,
            cgroup_id: Some(1),
            cgroup: Some(cgroup.into()),
            agent: agent.map(String::from),
        }
    }

    const AGENTS: &str =
        r#""interception": {"cgroups": ["agents.slice/a.scope", "agents.slice/b.scope"]}"#;

    #[test]
    fn own_listeners_are_reachable_and_only_the_agents_own() {
        let c = config(&format!("{{{AGENTS}}}"));
        let own = listener("agents.slice/a.scope/dev", Some("agents.slice/a.scope"));
        let d = decide(&c.loopback, 3000, Some("agents.slice/a.scope"), Some(&own));
        assert_eq!((d.allowed, d.rule), (true, OWN_LISTENER_RULE));
        // Another agent's listener is not the caller's own.
        let d = decide(&c.loopback, 3000, Some("agents.slice/b.scope"), Some(&own));
        assert_eq!((d.allowed, d.rule), (false, REFUSED_RULE));
        // Unknown callers own nothing, even a listener of no agent.
        let d = decide(
            &c.loopback,
            3000,
            None,
            Some(&listener("system.slice/x.service", None)),
        );
        assert!(!d.allowed);
    }

    #[test]
    fn own_listeners_can_be_refused_too() {
        let c = config(&format!(
            r#"{{{AGENTS}, "loopback": {{"own_listeners": false}}}}"#
        ));
        let own = listener("agents.slice/a.scope", Some("agents.slice/a.scope"));
        let d = decide(&c.loopback, 3000, Some("agents.slice/a.scope"), Some(&own));
        assert!(!d.allowed);
    }

    #[test]
    fn host_listeners_need_a_rule_by_port_unit_path_and_agent() {
        let c = config(&format!(
            r#"{{{AGENTS}, "loopback": {{"allow": [
                {{"name": "pg", "ports": [5432], "listeners": ["postgresql.service"]}},
                {{"ports": ["8000-8010"], "agents": ["agents.slice/b.scope"]}},
                {{"name": "tree", "listeners": ["system.slice/tools.slice"]}}
            ]}}}}"#
        ));
        let a = Some("agents.slice/a.scope");
        let b = Some("agents.slice/b.scope");
        let pg = listener("system.slice/postgresql.service", None);
        let other = listener("system.slice/socks.service", None);
        let lb = &c.loopback;
        assert_eq!(decide(lb, 5432, a, Some(&pg)).rule, "pg");
        // The port alone is not enough when the rule names the listener.
        assert!(!decide(lb, 5432, a, Some(&other)).allowed);
        // A unit name matches whole components only.
        let lookalike = listener("system.slice/postgresql.service-evil", None);
        assert!(!decide(lb, 5432, a, Some(&lookalike)).allowed);
        assert_eq!(decide(lb, 8005, b, Some(&other)).rule, "loopback.allow[1]");
        assert!(!decide(lb, 8005, a, Some(&other)).allowed);
        assert!(!decide(lb, 8011, b, Some(&other)).allowed);
        let tool = listener("system.slice/tools.slice/x.service", None);
        assert_eq!(decide(lb, 1, a, Some(&tool)).rule, "tree");
        let sibling = listener("system.slice/tools.slicex/x.service", None);
        assert!(!decide(lb, 1, a, Some(&sibling)).allowed);
        // A listener whose cgroup the kernel would not name matches no rule by listener.
        let unnamed = Listener {
            cgroup: None,
            ..pg.clone()
        };
        assert!(!decide(lb, 5432, a, Some(&unnamed)).allowed);
        // Nothing listening: only a rule by port alone applies.
        assert!(decide(lb, 8001, b, None).allowed);
        assert!(!decide(lb, 5432, a, None).allowed);
    }

    #[test]
    fn rules_that_would_open_everything_are_refused() {
        for (json, path) in [
            (
                r#"{"loopback": {"allow": [{"name": "all"}]}}"#,
                "loopback.allow[0]",
            ),
            (
                r#"{"loopback": {"allow": [{"ports": []}]}}"#,
                "loopback.allow[0].ports",
            ),
            (
                r#"{"loopback": {"allow": [{"listeners": ["../x"]}]}}"#,
                "loopback.allow[0].listeners[0]",
            ),
            (
                r#"{"loopback": {"allow": [{"ports": [22], "agents": ["nope"]}]}}"#,
                "loopback.allow[0].agents[0]",
            ),
            (
                r#"{"loopback": {"own_listeners": "yes"}}"#,
                "loopback.own_listeners",
            ),
            (r#"{"loopback": {"deny": []}}"#, "loopback.deny"),
        ] {
            let errors = Config::from_json(json).expect_err(json);
            assert!(errors.0.iter().any(|e| e.path == path), "{json}: {errors}");
        }
    }
}
