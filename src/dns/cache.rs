//! A bounded map from names to results that expire (our own lookups, and the
//! DNS handler's answers to the agents).

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub(crate) struct Cache<V> {
    entries: HashMap<String, (V, Instant)>,
    capacity: usize,
}

impl<V: Clone> Cache<V> {
    pub(crate) fn new(capacity: usize) -> Cache<V> {
        Cache {
            entries: HashMap::new(),
            capacity,
        }
    }

    pub(crate) fn get(&mut self, name: &str, now: Instant) -> Option<V> {
        match self.entries.get(name) {
            Some((value, expires)) if *expires > now => Some(value.clone()),
            Some(_) => {
                self.entries.remove(name);
                None
            }
            None => None,
        }
    }

    pub(crate) fn insert(&mut self, name: String, value: V, ttl: Duration, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&name) {
            self.entries.retain(|_, (_, expires)| *expires > now);
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&name) {
            // Still full of live entries: the one closest to expiry goes first.
            let soonest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, expires))| *expires)
                .map(|(n, _)| n.clone());
            if let Some(soonest) = soonest {
                self.entries.remove(&soonest);
            }
        }
        self.entries.insert(name, (value, now + ttl));
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
    }
}
