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

type Key = (Option<Arc<str>>, IpAddr);

#[derive(Default)]
struct Inner {
    /// Most recent name first.
    names: HashMap<Key, Vec<(Arc<str>, Instant)>>,
    /// Keys in the order they were first added, for eviction.
    order: VecDeque<Key>,
}

#[derive(Default)]
pub struct ResolvedNames {
    inner: Mutex<Inner>,
}

impl ResolvedNames {
    /// `agent` resolved `name` to `addrs` (each with its answer's TTL, seconds).
    pub fn insert(&self, agent: Option<&str>, name: &str, addrs: &[(IpAddr, u32)], now: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let agent: Option<Arc<str>> = agent.map(Arc::from);
        let name: Arc<str> = Arc::from(name);
        for (addr, ttl) in addrs {
            let ttl = Duration::from_secs(u64::from(*ttl)).clamp(MIN_TTL, MAX_TTL);
            let key = (agent.clone(), addr.to_canonical());
            let is_new = !inner.names.contains_key(&key);
            let names = inner.names.entry(key.clone()).or_default();
            names.retain(|(n, until)| *n != name && *until > now);
            names.insert(0, (name.clone(), now + ttl));
            names.truncate(MAX_NAMES_PER_ADDRESS);
            if is_new {
                inner.order.push_back(key);
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
        let key = (agent.map(Arc::from), addr.to_canonical());
        inner
            .names
            .get(&key)
            .map(|names| {
                names
                    .iter()
                    .filter(|(_, until)| *until > now)
                    .map(|(n, _)| n.to_string())
                    .collect()
            })
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
