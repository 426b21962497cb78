//! A bounded map from names to results that expire (our own lookups, and the
//! DNS handler's answers to the agents).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Full, an insert makes room in O(log n): expired entries first, then the
/// one closest to expiry, found in the expiry index rather than by a scan
/// (a scan per insert was most of the DNS handler's time once a flood of
/// new names had filled it).
pub(crate) struct Cache<V> {
    entries: HashMap<String, (V, Instant)>,
    /// (expiry, name) of every entry, soonest first.
    by_expiry: BTreeSet<(Instant, String)>,
    capacity: usize,
}

impl<V: Clone> Cache<V> {
    pub(crate) fn new(capacity: usize) -> Cache<V> {
        Cache {
            entries: HashMap::new(),
            by_expiry: BTreeSet::new(),
            capacity,
        }
    }

    pub(crate) fn get(&mut self, name: &str, now: Instant) -> Option<V> {
        match self.entries.get(name) {
            Some((value, expires)) if *expires > now => Some(value.clone()),
            Some(_) => {
                self.remove(name);
                None
            }
            None => None,
        }
    }

    pub(crate) fn insert(&mut self, name: String, value: V, ttl: Duration, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        if self.remove(&name).is_none() {
            while self.entries.len() >= self.capacity {
                // Expired or not, the soonest to expire goes first.
                let Some((_, soonest)) = self.by_expiry.pop_first() else {
                    break;
                };
                self.entries.remove(&soonest);
            }
        }
        let expires = now + ttl;
        self.by_expiry.insert((expires, name.clone()));
        self.entries.insert(name, (value, expires));
    }

    fn remove(&mut self, name: &str) -> Option<V> {
        let (value, expires) = self.entries.remove(name)?;
        self.by_expiry.remove(&(expires, name.to_string()));
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::Cache;
    use std::time::{Duration, Instant};

    #[test]
    fn entries_expire() {
        let now = Instant::now();
        let mut c = Cache::new(4);
        c.insert("a".into(), 1, Duration::from_secs(5), now);
        assert_eq!(c.get("a", now + Duration::from_secs(4)), Some(1));
        assert_eq!(c.get("a", now + Duration::from_secs(5)), None);
        assert_eq!(c.entries.len(), 0, "an expired entry is dropped when seen");
        assert!(c.by_expiry.is_empty());
    }

    #[test]
    fn capacity_is_kept_by_dropping_expired_then_soonest() {
        let now = Instant::now();
        let mut c = Cache::new(2);
        c.insert("short".into(), 1, Duration::from_secs(1), now);
        c.insert("long".into(), 2, Duration::from_secs(100), now);
        c.insert("mid".into(), 3, Duration::from_secs(50), now);
        assert_eq!(c.entries.len(), 2);
        assert_eq!(c.get("short", now), None);
        assert_eq!(c.get("long", now), Some(2));
        assert_eq!(c.get("mid", now), Some(3));
        let later = now + Duration::from_secs(60);
        c.insert("new".into(), 4, Duration::from_secs(10), later);
        assert_eq!(c.get("mid", later), None, "expired, so it made room");
        assert_eq!(c.get("long", later), Some(2));
        // Replacing a present name never evicts another.
        c.insert("long".into(), 5, Duration::from_secs(10), later);
        assert_eq!(c.get("new", later), Some(4));
        assert_eq!(c.get("long", later), Some(5));
        assert_eq!(c.by_expiry.len(), c.entries.len());
    }

    #[test]
    fn a_full_cache_takes_new_names_without_growing() {
        let now = Instant::now();
        let mut c = Cache::new(100);
        for i in 0..10_000u64 {
            c.insert(format!("n{i}"), i, Duration::from_secs(300 + i), now);
        }
        assert_eq!(c.entries.len(), 100);
        assert_eq!(c.by_expiry.len(), 100);
        // The latest to expire stayed.
        assert_eq!(c.get("n9999", now), Some(9999));
        assert_eq!(c.get("n0", now), None);
    }
}
