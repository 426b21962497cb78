//! Limits on what one agent may ask, against exfiltration through names the
//! policy allows: `<data-1>.allowed.example`, `<data-2>.allowed.example`, …
//! each answered, each carrying data to whoever runs allowed.example's
//! servers. Two bounds per agent: queries per second (a token bucket), and
//! distinct names below one parent domain per minute. Over either, the query
//! is refused (REFUSED) and its record says `rate_limited`.
//!
//! Bounded: at most [`MAX_TRACKED`] (agent, parent) pairs are remembered;
//! when full, those whose minute is over go first, else the oldest window.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

pub const MAX_TRACKED: usize = 4096;
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub queries_per_second: u32,
    /// Queries an idle agent may send at once.
    pub burst: u32,
    /// Distinct names below one parent domain in a minute.
    pub names_per_parent: u32,
}

#[derive(Default)]
pub struct Limiter {
    buckets: HashMap<Option<String>, Bucket>,
    parents: HashMap<(Option<String>, String), Names>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The distinct names seen below one parent in the current window.
struct Names {
    since: Instant,
    seen: HashSet<String>,
}

/// Which limit a query hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverLimit {
    QueriesPerSecond(u32),
    NamesPerParent { limit: u32, parent: String },
}

impl fmt::Display for OverLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OverLimit::QueriesPerSecond(n) => {
                write!(f, "over {n} queries a second (dns.rate_limit.queries_per_second)")
            }
            OverLimit::NamesPerParent { limit, parent } => write!(
                f,
                "over {limit} distinct names below {parent} in a minute (dns.rate_limit.names_per_parent)"
            ),
        }
    }
}

impl std::error::Error for OverLimit {}

impl Limiter {
    /// Whether `agent` may ask for `name` now; `Err` says which limit it hit.
    pub fn admit(
        &mut self,
        limits: &RateLimits,
        agent: Option<&str>,
        name: &str,
        now: Instant,
    ) -> Result<(), OverLimit> {
        let agent_key = agent.map(String::from);
        let bucket = self.buckets.entry(agent_key.clone()).or_insert(Bucket {
            tokens: f64::from(limits.burst),
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64()
            * f64::from(limits.queries_per_second);
        bucket.tokens = (bucket.tokens + refill).min(f64::from(limits.burst));
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(OverLimit::QueriesPerSecond(limits.queries_per_second));
        }
        bucket.tokens -= 1.0;
        let Some((_, parent)) = name.split_once('.') else {
            return Ok(());
        };
        let key = (agent_key, parent.to_string());
        // Work beyond the lookup only when a new pair finds the map full.
        if !self.parents.contains_key(&key) && self.parents.len() >= MAX_TRACKED {
            self.parents
                .retain(|_, names| now.saturating_duration_since(names.since) < WINDOW);
            if self.parents.len() >= MAX_TRACKED {
                let oldest = self
                    .parents
                    .iter()
                    .min_by_key(|(_, names)| names.since)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    self.parents.remove(&oldest);
                }
            }
        }
        let names = self.parents.entry(key).or_insert(Names {
            since: now,
            seen: HashSet::new(),
        });
        if now.saturating_duration_since(names.since) >= WINDOW {
            names.since = now;
            names.seen.clear();
        }
        if names.seen.contains(name) {
            return Ok(());
        }
        if names.seen.len() >= limits.names_per_parent as usize {
            return Err(OverLimit::NamesPerParent {
                limit: limits.names_per_parent,
                parent: parent.to_string(),
            });
        }
        names.seen.insert(name.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RateLimits = RateLimits {
        queries_per_second: 10,
        burst: 20,
        names_per_parent: 5,
    };

    #[test]
    fn distinct_names_below_one_parent_are_bounded_per_minute() {
        let mut limiter = Limiter::default();
        let t0 = Instant::now();
        for i in 0..5 {
            let name = format!("chunk{i}.allowed.example");
            assert!(limiter.admit(&LIMITS, Some("a"), &name, t0).is_ok());
        }
        let over = limiter.admit(&LIMITS, Some("a"), "chunk5.allowed.example", t0);
        assert!(over
            .unwrap_err()
            .to_string()
            .contains("below allowed.example"));
        // A name already seen, another parent, another agent: not this limit.
        assert!(limiter
            .admit(&LIMITS, Some("a"), "chunk1.allowed.example", t0)
            .is_ok());
        assert!(limiter
            .admit(&LIMITS, Some("a"), "www.other.example", t0)
            .is_ok());
        assert!(limiter
            .admit(&LIMITS, Some("b"), "chunk5.allowed.example", t0)
            .is_ok());
        // A minute later the window starts again.
        let later = t0 + WINDOW;
        assert!(limiter
            .admit(&LIMITS, Some("a"), "chunk5.allowed.example", later)
            .is_ok());
    }

    #[test]
    fn queries_per_second_are_a_bucket_with_a_burst() {
        let mut limiter = Limiter::default();
        let t0 = Instant::now();
        let ask = |l: &mut Limiter, at| l.admit(&LIMITS, Some("a"), "allowed.example", at);
        for _ in 0..20 {
            assert!(ask(&mut limiter, t0).is_ok());
        }
        assert!(ask(&mut limiter, t0)
            .unwrap_err()
            .to_string()
            .contains("queries a second"));
        // 10 a second refill: after 100 ms, one more.
        let soon = t0 + Duration::from_millis(100);
        assert!(ask(&mut limiter, soon).is_ok());
        assert!(ask(&mut limiter, soon).is_err());
    }

    #[test]
    fn tracked_parents_are_bounded() {
        let mut limiter = Limiter::default();
        let t0 = Instant::now();
        let generous = RateLimits {
            queries_per_second: 1_000_000,
            burst: 1_000_000,
            ..LIMITS
        };
        for i in 0..(MAX_TRACKED + 100) {
            let name = format!("x.p{i}.example");
            assert!(limiter.admit(&generous, Some("a"), &name, t0).is_ok());
        }
        assert!(limiter.parents.len() <= MAX_TRACKED);
    }
}
