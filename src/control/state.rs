// SPDX-License-Identifier: GPL-3.0-or-later
//! The policy in force: the config and the runtime rules, compiled together
//! and handed to the proxy. Every change (a rule added, removed or expired, a
//! reload) goes through here under one lock, is persisted before it is
//! applied, and leaves an audit record (`event: "policy"`) naming who.

use super::rules::{AddError, RuleSet, RuntimeRule, STATE_FILE};
use super::socket::Peer;
use crate::audit::{AuditLog, Event, PolicyAction, PolicyChange, Record};
use crate::config::{Answerer, Config, ConfigErrors};
use crate::proxy::{ProxyHandle, Runtime};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A config file's text, parsed, and its SHA-256 (what `sha256sum` prints).
pub struct LoadedConfig {
    pub config: Config,
    pub hash: String,
}

impl LoadedConfig {
    pub fn load(path: &Path) -> Result<LoadedConfig, ConfigErrors> {
        LoadedConfig::load_for(path, Answerer::ControlApi)
    }

    /// A config whose `ask` questions `answerer` answers.
    pub fn load_for(path: &Path, answerer: Answerer) -> Result<LoadedConfig, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![crate::config::ConfigError {
                path: String::new(),
                reason: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        Ok(LoadedConfig {
            config: Config::from_json_for(&text, answerer)?,
            hash: sha256_hex(text.as_bytes()),
        })
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The state file of a config's `state_dir`.
pub fn state_file(config: &Config) -> PathBuf {
    config.state_dir.join(STATE_FILE)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a change was refused, for the API's status code.
#[derive(Debug)]
pub enum Refusal {
    Invalid(ConfigErrors),
    Full,
    NotFound,
    /// Persisting failed: nothing changed.
    Storage(String),
}

struct Inner {
    config: Config,
    hash: String,
    rules: RuleSet,
    stopping: bool,
}

pub struct PolicyState {
    inner: Mutex<Inner>,
    /// Signalled on every change and on stop, for the expiry thread.
    changed: Condvar,
    proxy: ProxyHandle,
    audit: AuditLog,
    /// The state file; none: the rules are kept in memory only (`exec`'s,
    /// for one run).
    path: Option<PathBuf>,
}

impl PolicyState {
    /// The rules in the state file must fit `loaded`; the proxy is given the
    /// combined policy at once.
    pub fn start(
        loaded: LoadedConfig,
        rules: RuleSet,
        proxy: ProxyHandle,
        audit: AuditLog,
    ) -> Arc<PolicyState> {
        let path = Some(state_file(&loaded.config));
        PolicyState::keeping(loaded, rules, proxy, audit, path)
    }

    /// No runtime rules at first, and those added kept in memory only: for
    /// `exec`, whose policy lasts one run.
    pub fn in_memory(
        loaded: LoadedConfig,
        proxy: ProxyHandle,
        audit: AuditLog,
    ) -> Arc<PolicyState> {
        PolicyState::keeping(loaded, RuleSet::default(), proxy, audit, None)
    }

    fn keeping(
        loaded: LoadedConfig,
        rules: RuleSet,
        proxy: ProxyHandle,
        audit: AuditLog,
        path: Option<PathBuf>,
    ) -> Arc<PolicyState> {
        let state = Arc::new(PolicyState {
            inner: Mutex::new(Inner {
                config: loaded.config,
                hash: loaded.hash,
                rules,
                stopping: false,
            }),
            changed: Condvar::new(),
            proxy,
            audit,
            path,
        });
        state.publish(&state.lock());
        state
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Compile and hand over; expired rules are left out.
    fn publish(&self, inner: &Inner) -> Arc<Runtime> {
        let runtime = Runtime::with_rules(inner.config.clone(), &inner.rules.in_force(now_ms()));
        self.proxy.reload(runtime.clone());
        runtime
    }

    fn record(&self, inner: &Inner, action: PolicyAction, rule: Option<Value>, by: Option<&Peer>) {
        self.record_with(inner, action, rule, by, None);
    }

    fn record_with(
        &self,
        inner: &Inner,
        action: PolicyAction,
        rule: Option<Value>,
        by: Option<&Peer>,
        conn_id: Option<u64>,
    ) {
        self.audit.submit(
            Record {
                event: Event::Policy,
                conn_id,
                uid: by.map(|p| p.uid),
                pid: by.map(|p| p.pid),
                exe: by.and_then(|p| p.exe.clone()),
                policy: Some(PolicyChange {
                    action,
                    rule,
                    config_hash: inner.hash.clone(),
                    runtime_rules: inner.rules.rules().len(),
                }),
                ..Record::default()
            }
            .into(),
        );
    }

    pub fn config_hash(&self) -> String {
        self.lock().hash.clone()
    }

    pub fn rules_json(&self) -> Value {
        let inner = self.lock();
        Value::Array(
            inner
                .rules
                .rules()
                .iter()
                .map(RuntimeRule::to_json)
                .collect(),
        )
    }

    /// Persist `next` in place of the current rules, then apply it.
    fn commit(&self, inner: &mut Inner, next: RuleSet) -> Result<(), Refusal> {
        if let Some(path) = &self.path {
            next.save(path)
                .map_err(|e| Refusal::Storage(format!("{}: {e}", path.display())))?;
        }
        inner.rules = next;
        self.publish(inner);
        self.changed.notify_all();
        Ok(())
    }

    pub fn add_rule(&self, body: &Value, by: &Peer) -> Result<Value, Refusal> {
        let mut inner = self.lock();
        let mut next = inner.rules.clone();
        let who = serde_json::to_value(by).unwrap_or(Value::Null);
        let added = match next.add(body, &inner.config, now_ms() / 1000, who) {
            Ok(rule) => rule.to_json(),
            Err(AddError::Invalid(e)) => return Err(Refusal::Invalid(e)),
            Err(AddError::Full) => return Err(Refusal::Full),
        };
        self.commit(&mut inner, next)?;
        self.record(
            &inner,
            PolicyAction::RuleAdded,
            Some(added.clone()),
            Some(by),
        );
        Ok(added)
    }

    pub fn remove_rule(&self, id: u64, by: &Peer) -> Result<Value, Refusal> {
        let mut inner = self.lock();
        let mut next = inner.rules.clone();
        let removed = next.remove(id).ok_or(Refusal::NotFound)?.to_json();
        self.commit(&mut inner, next)?;
        self.record(
            &inner,
            PolicyAction::RuleRemoved,
            Some(removed.clone()),
            Some(by),
        );
        Ok(removed)
    }

    /// A supervisor closed a live connection: on record like a policy change.
    pub fn note_closed(&self, conn_id: u64, by: &Peer) {
        let inner = self.lock();
        self.record_with(
            &inner,
            PolicyAction::ConnectionClosed,
            None,
            Some(by),
            Some(conn_id),
        );
    }

    /// A reloaded config, if the runtime rules fit it; `by` is None for SIGHUP.
    pub fn replace_config(
        &self,
        loaded: LoadedConfig,
        by: Option<&Peer>,
    ) -> Result<Arc<Runtime>, ConfigErrors> {
        let mut inner = self.lock();
        inner.rules.check(&loaded.config).map_err(|mut e| {
            if let Some(path) = &self.path {
                for error in &mut e.0 {
                    error.path = format!("{} {}", path.display(), error.path);
                }
            }
            e
        })?;
        inner.config = loaded.config;
        inner.hash = loaded.hash;
        let runtime = self.publish(&inner);
        self.record(&inner, PolicyAction::Reloaded, None, by);
        Ok(runtime)
    }

    /// Take out rules as they expire, until `stop`.
    pub fn run_expiry(&self) {
        let mut inner = self.lock();
        loop {
            if inner.stopping {
                return;
            }
            let now = now_ms();
            let mut next = inner.rules.clone();
            let gone = next.expire(now);
            if !gone.is_empty() {
                match self.commit(&mut inner, next) {
                    Ok(()) => {
                        for rule in gone {
                            log::info!("runtime rule {} ({}) expired", rule.id, rule.rule.name);
                            self.record(
                                &inner,
                                PolicyAction::RuleExpired,
                                Some(rule.to_json()),
                                None,
                            );
                        }
                    }
                    // Applied anyway (a policy leaves expired rules out);
                    // the file is tried again.
                    Err(e) => {
                        log::error!("runtime rules: {e:?}");
                        self.publish(&inner);
                    }
                }
            }
            let wait = inner
                .rules
                .next_expiry_ms()
                .map_or(Duration::from_secs(3600), |at| {
                    Duration::from_millis(at.saturating_sub(now_ms()).clamp(1, 1000))
                });
            inner = match self.changed.wait_timeout(inner, wait) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    pub fn stop(&self) {
        self.lock().stopping = true;
        self.changed.notify_all();
    }
}
