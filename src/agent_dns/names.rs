//! What each agent learnt through the handler: address → the names it was
//! resolved for, as long as the answers' TTLs last. A later connection that
//! names nothing (SSH to github.com:22, a client without SNI) is decided and
//! audited under the name its address was resolved for; one to an address
//! the agent never resolved through us is marked so.
//!
//! Bounded: at most [`MAX_ENTRIES`] (agent, address) entries, the oldest
//! forgotten first, and [`MAX_NAMES_PER_ADDRESS`] names on one address (a
//! CDN's address serves many names: the most recent are kept).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const MAX_ENTRIES: usize = 100_000;
pub const MAX_NAMES_PER_ADDRESS: usize = 4;
/// Bounds on how long an answer names its addresses, whatever its TTL: a
/// connection often follows its lookup after the record expired (a TTL of 0,
/// a slow start), and no name should stick for hours.
pub const MIN_TTL: Duration = Duration::from_secs(60);
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// An agent by its place in [`Inner::agents`]: a few of them, named by many entries.
type AgentId = u16;
type Key = (AgentId, IpAddr);

/// One address's names, most recent first, each with when it expires (seconds
/// since [`Inner::base`]). One name, the common case, takes no allocation of its own.
enum Names {
    One(Box<str>, u32),
    Many(Vec<(Box<str>, u32)>),
}

impl Names {
    fn list(self) -> Vec<(Box<str>, u32)> {
        match self {
            Names::One(name, until) => vec![(name, until)],
            Names::Many(list) => list,
        }
    }

    fn from_list(mut list: Vec<(Box<str>, u32)>) -> Option<Names> {
        match list.len() {
            0 => None,
            1 => list.pop().map(|(name, until)| Names::One(name, until)),
            _ => Some(Names::Many(list)),
        }
    }

    fn current(&self, now: u32) -> Vec<String> {
        let slice: &[(Box<str>, u32)] = match self {
            Names::One(name, until) => {
                return if *until > now {
                    vec![name.to_string()]
                } else {
                    Vec::new()
                }
            }
            Names::Many(list) => list,
        };
        slice
            .iter()
            .filter(|(_, until)| *until > now)
            .map(|(name, _)| name.to_string())
            .collect()
    }
}

struct Inner {
    agents: Vec<Option<Arc<str>>>,
    /// Expiries count seconds from here.
    base: Instant,
    names: HashMap<Key, Names>,
    /// Keys in the order they were first added, for eviction.
    order: VecDeque<Key>,
}

impl Inner {
    fn seconds(&self, at: Instant) -> u32 {
        u32::try_from(at.saturating_duration_since(self.base).as_secs()).unwrap_or(u32::MAX)
    }

    fn agent_id(&mut self, agent: Option<&str>) -> Option<AgentId> {
        if let Some(id) = self.find_agent(agent) {
            return Some(id);
        }
        let id = AgentId::try_from(self.agents.len()).ok()?;
        self.agents.push(agent.map(Arc::from));
        Some(id)
    }

    fn find_agent(&self, agent: Option<&str>) -> Option<AgentId> {
        let at = self.agents.iter().position(|a| a.as_deref() == agent)?;
        AgentId::try_from(at).ok()
    }
}

pub struct ResolvedNames {
    inner: Mutex<Inner>,
}

impl Default for ResolvedNames {
    fn default() -> Self {
        ResolvedNames {
            inner: Mutex::new(Inner {
                agents: Vec::new(),
                base: Instant::now(),
                names: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }
}

impl ResolvedNames {
    /// `agent` resolved `name` to `addrs` (each with its answer's TTL, seconds).
    pub fn insert(&self, agent: Option<&str>, name: &str, addrs: &[(IpAddr, u32)], now: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(agent) = inner.agent_id(agent) else {
            return;
        };
        let now_s = inner.seconds(now);
        for (addr, ttl) in addrs {
            let ttl = Duration::from_secs(u64::from(*ttl)).clamp(MIN_TTL, MAX_TTL);
            let until = inner.seconds(now + ttl);
            let key = (agent, addr.to_canonical());
            let mut list = match inner.names.remove(&key) {
                Some(names) => names.list(),
                None => {
                    inner.order.push_back(key);
                    Vec::new()
                }
            };
            list.retain(|(n, until)| **n != *name && *until > now_s);
            list.insert(0, (name.into(), until));
            list.truncate(MAX_NAMES_PER_ADDRESS);
            if let Some(names) = Names::from_list(list) {
                inner.names.insert(key, names);
            }
        }
        while inner.order.len() > MAX_ENTRIES {
            if let Some(oldest) = inner.order.pop_front() {
                inner.names.remove(&oldest);
            }
        }
    }

    /// The names `agent` resolved `addr` for that are still current, most
    /// recent first; empty when it never did (or they expired).
    pub fn lookup(&self, agent: Option<&str>, addr: IpAddr, now: Instant) -> Vec<String> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(agent) = inner.find_agent(agent) else {
            return Vec::new();
        };
        let now_s = inner.seconds(now);
        inner
            .names
            .get(&(agent, addr.to_canonical()))
            .map(|names| names.current(now_s))
            .unwrap_or_default()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .names
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_are_per_agent_most_recent_first_and_expire() {
        let names = ResolvedNames::default();
        let t0 = Instant::now();
        names.insert(Some("a"), "github.com", &[(ip("192.0.2.7"), 60)], t0);
        names.insert(Some("a"), "api.github.com", &[(ip("192.0.2.7"), 600)], t0);
        names.insert(Some("b"), "other.test", &[(ip("192.0.2.7"), 60)], t0);
        assert_eq!(
            names.lookup(Some("a"), ip("192.0.2.7"), t0),
            ["api.github.com", "github.com"]
        );
        assert_eq!(names.lookup(Some("b"), ip("192.0.2.7"), t0), ["other.test"]);
        assert!(names.lookup(None, ip("192.0.2.7"), t0).is_empty());
        // v4-mapped is the same address.
        assert_eq!(
            names.lookup(Some("b"), ip("::ffff:192.0.2.7"), t0),
            ["other.test"]
        );
        // A TTL of 0 still names the address for the minimum; then it is gone.
        names.insert(Some("c"), "zero.test", &[(ip("192.0.2.8"), 0)], t0);
        assert_eq!(
            names.lookup(Some("c"), ip("192.0.2.8"), t0 + MIN_TTL / 2),
            ["zero.test"]
        );
        assert!(names
            .lookup(Some("c"), ip("192.0.2.8"), t0 + MIN_TTL * 2)
            .is_empty());
        let later = t0 + Duration::from_secs(120);
        assert_eq!(
            names.lookup(Some("a"), ip("192.0.2.7"), later),
            ["api.github.com"]
        );
    }

    #[test]
    fn bounded_in_entries_and_in_names_per_address() {
        let names = ResolvedNames::default();
        let t0 = Instant::now();
        for i in 0..(MAX_NAMES_PER_ADDRESS + 3) {
            names.insert(
                Some("a"),
                &format!("n{i}.test"),
                &[(ip("192.0.2.9"), 60)],
                t0,
            );
        }
        let kept = names.lookup(Some("a"), ip("192.0.2.9"), t0);
        assert_eq!(kept.len(), MAX_NAMES_PER_ADDRESS);
        assert_eq!(kept[0], format!("n{}.test", MAX_NAMES_PER_ADDRESS + 2));
        let addrs: Vec<(IpAddr, u32)> = (0..(MAX_ENTRIES as u32 + 10))
            .map(|i| (IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + i)), 60))
            .collect();
        names.insert(Some("b"), "many.test", &addrs, t0);
        assert!(names.len() <= MAX_ENTRIES);
        // The oldest went first: the first address of agent a.
        assert!(names.lookup(Some("a"), ip("192.0.2.9"), t0).is_empty());
        let last = IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + MAX_ENTRIES as u32 + 9));
        assert_eq!(names.lookup(Some("b"), last, t0), ["many.test"]);
    }
}
