// SPDX-License-Identifier: GPL-3.0-or-later
//! Runtime rules: added and removed by a supervisor over the control API,
//! asked before the config's rules, kept in a state file (written atomically
//! and fsynced, so a crash leaves the old file or the new one) that survives
//! restarts and reloads. A rule may expire.
//!
//! A rule is kept as the JSON it was given (its rule fields) plus its own keys
//! (`id`, `created`, `expires`, `by`), and checked again against each config
//! that comes: a reload whose config a runtime rule no longer fits (an
//! outbound or agent gone) is refused, like a bad config.

use crate::config::{Config, ConfigError, ConfigErrors, Rule};
use serde_json::{json, Map, Value};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The state file's name in `state_dir`.
pub const STATE_FILE: &str = "runtime-rules.json";
/// Runtime rules at most (the policy still decides in O(labels) with them).
pub const MAX_RULES: usize = 10_000;
/// The longest a `ttl` may be: a year.
const MAX_TTL_S: u64 = 366 * 24 * 3600;
/// The keys a runtime rule has besides a config rule's.
const STORED_KEYS: [&str; 4] = ["id", "created", "expires", "by"];
const REQUEST_KEYS: [&str; 2] = ["ttl", "expires"];

#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeRule {
    pub id: u64,
    pub rule: Rule,
    /// The rule fields as given (`name`, `domains`, ..., `outbound`).
    spec: Map<String, Value>,
    /// Unix seconds.
    pub created: u64,
    pub expires: Option<u64>,
    /// Who added it (uid, pid, exe), as recorded then.
    by: Value,
}

impl RuntimeRule {
    /// As the API and the state file show it.
    pub fn to_json(&self) -> Value {
        let mut out = self.spec.clone();
        out.insert("id".into(), json!(self.id));
        out.insert("created".into(), json!(self.created));
        out.insert("expires".into(), json!(self.expires));
        out.insert("by".into(), self.by.clone());
        Value::Object(out)
    }

    fn expired(&self, now_ms: u64) -> bool {
        self.expires
            .is_some_and(|e| now_ms >= e.saturating_mul(1000))
    }
}

/// The runtime rules in force, in the order they are asked (newest first:
/// a supervisor's latest word wins).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSet {
    next_id: u64,
    rules: Vec<RuntimeRule>,
}

/// Why the state file's rules could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    Read { path: PathBuf, source: io::Error },
    Invalid { path: PathBuf, errors: ConfigErrors },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            LoadError::Invalid { path, errors } => write!(
                f,
                "{}: {} error(s):\n{errors}",
                path.display(),
                errors.0.len()
            ),
        }
    }
}

impl std::error::Error for LoadError {}

/// Why a request to add a rule was refused.
#[derive(Debug, PartialEq)]
pub enum AddError {
    Invalid(ConfigErrors),
    Full,
}

impl RuleSet {
    /// The state file at `path`; none there is no rules. Every rule is checked
    /// against `config`, every error named by its JSON path in the file.
    pub fn load(path: &Path, config: &Config) -> Result<RuleSet, LoadError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(RuleSet::default()),
            Err(source) => {
                return Err(LoadError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        RuleSet::parse(&text, config).map_err(|errors| LoadError::Invalid {
            path: path.to_path_buf(),
            errors,
        })
    }

    pub fn parse(text: &str, config: &Config) -> Result<RuleSet, ConfigErrors> {
        let one = |path: &str, reason: String| {
            ConfigErrors(vec![ConfigError {
                path: path.into(),
                reason,
            }])
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| one("", format!("not valid JSON: {e}")))?;
        let Some(top) = value.as_object() else {
            return Err(one("", "expected an object".into()));
        };
        let next_id = top.get("next_id").and_then(Value::as_u64).unwrap_or(1);
        let Some(items) = top.get("rules").and_then(Value::as_array) else {
            return Err(one("rules", "expected an array".into()));
        };
        let mut set = RuleSet {
            next_id,
            rules: Vec::with_capacity(items.len()),
        };
        let mut errors = Vec::new();
        for (i, item) in items.iter().enumerate().take(MAX_RULES) {
            match stored_rule(&format!("rules[{i}]"), item, config) {
                Ok(rule) => {
                    set.next_id = set.next_id.max(rule.id + 1);
                    set.rules.push(rule);
                }
                Err(e) => errors.extend(e.0),
            }
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Whether every rule still fits `config` (for a reload).
    pub fn check(&self, config: &Config) -> Result<(), ConfigErrors> {
        let errors: Vec<ConfigError> = self
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| stored_rule(&format!("rules[{i}]"), &r.to_json(), config).err())
            .flat_map(|e| e.0)
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Add the rule a request asked for (`body`: rule fields, and `ttl`
    /// seconds or `expires` unix seconds); errors name the body's fields.
    pub fn add(
        &mut self,
        body: &Value,
        config: &Config,
        now_s: u64,
        by: Value,
    ) -> Result<&RuntimeRule, AddError> {
        let rule = config
            .runtime_rule("", body, &REQUEST_KEYS)
            .map_err(AddError::Invalid)?;
        let map = body.as_object().cloned().unwrap_or_default();
        let invalid = |path: &str, reason: &str| {
            AddError::Invalid(ConfigErrors(vec![ConfigError {
                path: path.into(),
                reason: reason.into(),
            }]))
        };
        if rule.domains.is_empty() && rule.ips.is_empty() {
            return Err(invalid(
                "domains",
                "a runtime rule names domains or ips (one matching every host is a config change)",
            ));
        }
        let expires = match (map.get("ttl"), map.get("expires")) {
            (Some(_), Some(_)) => return Err(invalid("ttl", "give ttl or expires, not both")),
            (Some(ttl), None) => match ttl.as_u64() {
                Some(t) if (1..=MAX_TTL_S).contains(&t) => Some(now_s + t),
                _ => return Err(invalid("ttl", "expected seconds, 1 to a year")),
            },
            (None, Some(at)) => match at.as_u64() {
                Some(t) if t > now_s && t - now_s <= MAX_TTL_S => Some(t),
                _ => {
                    return Err(invalid(
                        "expires",
                        "expected unix seconds in the future, within a year",
                    ))
                }
            },
            (None, None) => None,
        };
        if self.rules.len() >= MAX_RULES {
            return Err(AddError::Full);
        }
        let id = self.next_id.max(1);
        self.next_id = id + 1;
        let mut spec: Map<String, Value> = map
            .into_iter()
            .filter(|(k, _)| !REQUEST_KEYS.contains(&k.as_str()))
            .collect();
        let mut rule = rule;
        if !spec.contains_key("name") {
            // Called after its id, in the API, the state file and audit records.
            rule.name = format!("runtime-{id}");
            spec.insert("name".into(), json!(rule.name));
        }
        let rule = RuntimeRule {
            id,
            rule,
            spec,
            created: now_s,
            expires,
            by,
        };
        self.rules.insert(0, rule);
        Ok(&self.rules[0])
    }

    pub fn remove(&mut self, id: u64) -> Option<RuntimeRule> {
        let at = self.rules.iter().position(|r| r.id == id)?;
        Some(self.rules.remove(at))
    }

    /// Take out the rules expired at `now_ms` (unix milliseconds).
    pub fn expire(&mut self, now_ms: u64) -> Vec<RuntimeRule> {
        let (gone, kept) = std::mem::take(&mut self.rules)
            .into_iter()
            .partition(|r| r.expired(now_ms));
        self.rules = kept;
        gone
    }

    /// The earliest expiry, unix milliseconds.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.rules
            .iter()
            .filter_map(|r| r.expires)
            .min()
            .map(|e| e.saturating_mul(1000))
    }

    /// The rules for the policy, those expired at `now_ms` left out.
    pub fn in_force(&self, now_ms: u64) -> Vec<Rule> {
        self.rules
            .iter()
            .filter(|r| !r.expired(now_ms))
            .map(|r| r.rule.clone())
            .collect()
    }

    pub fn rules(&self) -> &[RuntimeRule] {
        &self.rules
    }

    pub fn to_json(&self) -> Value {
        json!({
            "next_id": self.next_id,
            "rules": self.rules.iter().map(RuntimeRule::to_json).collect::<Vec<_>>(),
        })
    }

    /// Replace the file at `path` atomically: a temporary file beside it,
    /// fsynced, renamed over it, and the directory fsynced.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(dir)?;
        let mut text = serde_json::to_vec_pretty(&self.to_json()).map_err(io::Error::other)?;
        text.push(b'\n');
        let tmp = temporary(path);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    }
}

fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// One rule of the state file, at `path`.
fn stored_rule(path: &str, value: &Value, config: &Config) -> Result<RuntimeRule, ConfigErrors> {
    let rule = config.runtime_rule(path, value, &STORED_KEYS)?;
    let map = value.as_object().cloned().unwrap_or_default();
    let number = |key: &str| map.get(key).and_then(Value::as_u64);
    let Some(id) = number("id").filter(|id| *id > 0) else {
        return Err(ConfigErrors(vec![ConfigError {
            path: format!("{path}.id"),
            reason: "expected a positive number".into(),
        }]));
    };
    let by = map.get("by").cloned().unwrap_or(Value::Null);
    let spec: Map<String, Value> = map
        .iter()
        .filter(|(k, _)| !STORED_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(RuntimeRule {
        id,
        rule,
        created: number("created").unwrap_or(0),
        expires: number("expires"),
        spec,
        by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_json(r#"{"rules": [{"domains": ["a.test"], "outbound": "block"}]}"#).unwrap()
    }

    fn fields(e: AddError) -> Vec<String> {
        match e {
            AddError::Invalid(errors) => errors.0.into_iter().map(|e| e.path).collect(),
            AddError::Full => vec!["(full)".into()],
        }
    }

    #[test]
    fn added_rules_come_first_are_named_and_round_trip() {
        let config = config();
        let mut set = RuleSet::default();
        let body = json!({"domains": ["b.test"], "outbound": "direct", "ttl": 60});
        let added = set.add(&body, &config, 1000, json!({"uid": 0})).unwrap();
        assert_eq!((added.id, added.expires), (1, Some(1060)));
        assert_eq!(added.rule.name, "runtime-1");
        let body = json!({"name": "c", "ips": ["192.0.2.0/24"], "outbound": "block"});
        set.add(&body, &config, 1000, Value::Null).unwrap();
        assert_eq!(set.rules()[0].rule.name, "c");
        let text = serde_json::to_string(&set.to_json()).unwrap();
        assert_eq!(RuleSet::parse(&text, &config).unwrap(), set);
        assert_eq!(set.in_force(1_060_000).len(), 1);
        assert_eq!(set.next_expiry_ms(), Some(1_060_000));
        assert_eq!(set.expire(1_059_999).len(), 0);
        assert_eq!(set.expire(1_060_000)[0].id, 1);
        assert_eq!(set.remove(2).map(|r| r.id), Some(2));
        assert!(set.rules().is_empty());
    }

    #[test]
    fn bad_requests_name_their_fields() {
        let config = config();
        let mut set = RuleSet::default();
        let cases = [
            (
                json!({"domains": ["b.test"], "outbound": "direct", "color": 1}),
                "color",
            ),
            (
                json!({"domains": ["b..test"], "outbound": "direct"}),
                "domains[0]",
            ),
            (
                json!({"domains": ["b.test"], "outbound": "nowhere"}),
                "outbound",
            ),
            (json!({"domains": ["b.test"]}), "outbound"),
            (json!({"outbound": "direct"}), "domains"),
            (
                json!({"domains": ["b.test"], "outbound": "direct", "locked": true}),
                "locked",
            ),
            (
                json!({"domains": ["b.test"], "outbound": "direct", "ttl": 0}),
                "ttl",
            ),
            (
                json!({"domains": ["b.test"], "outbound": "direct", "expires": 10}),
                "expires",
            ),
            (
                json!({"domains": ["b.test"], "outbound": "direct", "ttl": 5, "expires": 5000}),
                "ttl",
            ),
            (json!([1]), ""),
        ];
        for (body, field) in cases {
            let e = set.add(&body, &config, 1000, Value::Null).unwrap_err();
            assert_eq!(fields(e), vec![field.to_string()], "{body}");
        }
        assert!(set.rules().is_empty());
    }

    #[test]
    fn a_state_file_that_no_longer_fits_the_config_is_refused_by_path() {
        let mut set = RuleSet::default();
        let body = json!({"domains": ["b.test"], "outbound": "tor"});
        let with_tor = Config::from_json(
            r#"{"outbounds": {"tor": {"type": "socks5", "server": "127.0.0.1:9050"}}}"#,
        )
        .unwrap();
        set.add(&body, &with_tor, 1000, Value::Null).unwrap();
        let errors = set.check(&config()).unwrap_err();
        assert_eq!(errors.0[0].path, "rules[0].outbound");
        let text = serde_json::to_string(&set.to_json()).unwrap();
        assert!(RuleSet::parse(&text, &config()).is_err());
    }

    #[test]
    fn saving_replaces_the_file_whole() {
        let dir = std::env::temp_dir().join(format!("ae-rules-{}", std::process::id()));
        let path = dir.join(STATE_FILE);
        let config = config();
        let mut set = RuleSet::default();
        set.save(&path).unwrap();
        let body = json!({"domains": ["b.test"], "outbound": "direct"});
        set.add(&body, &config, 1, Value::Null).unwrap();
        set.save(&path).unwrap();
        assert_eq!(RuleSet::load(&path, &config).unwrap(), set);
        assert!(!temporary(&path).exists());
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(RuleSet::load(&path, &config).unwrap(), RuleSet::default());
    }
}
