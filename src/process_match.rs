//! Rules by process: a rule's `process`, `comm`, `user`, `ancestor`,
//! `cgroup` and `exe_sha256`, compiled once and matched against what is known
//! of the connecting process.
//!
//! `user` is the socket owner's uid, which the kernel gives with the socket
//! (sock_diag), so it is known at once. The others need the process read from
//! /proc (off the event loop): until that is done a connection's process is
//! [`Process::Pending`], and a rule that asks for it may match; the session
//! then waits (bounded) and decides again with what was read, or with
//! [`Process::Unknown`], against which those selectors never match.

use crate::config::{ProcessSelectors, UserSpec};
use crate::procinfo::{ProcessInfo, ProcessNeeds};
use std::path::Path;

/// What is known of the process behind a connection when it is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process<'a> {
    /// Still being read: selectors on it may match.
    Pending,
    Known(&'a ProcessInfo),
    /// Could not be read (gone before it was, not an agent's, timed out).
    Unknown,
}

#[derive(Debug)]
pub struct CompiledSelectors {
    process: Vec<String>,
    comm: Vec<String>,
    /// The uids of `user`; a name /etc/passwd did not know adds none.
    uids: Vec<u32>,
    /// `user` was given (so an empty `uids` matches nobody).
    by_user: bool,
    ancestor: Vec<String>,
    cgroup: Vec<String>,
    exe_sha256: Vec<String>,
}

impl CompiledSelectors {
    /// None when the rule asks nothing of the process. `uid_of` names users.
    pub fn compile(
        selectors: &ProcessSelectors,
        uid_of: &mut impl FnMut(&str) -> Option<u32>,
    ) -> Option<CompiledSelectors> {
        if selectors.is_empty() {
            return None;
        }
        let uids = selectors
            .user
            .iter()
            .filter_map(|user| match user {
                UserSpec::Uid(uid) => Some(*uid),
                UserSpec::Name(name) => {
                    let uid = uid_of(name);
                    if uid.is_none() {
                        log::warn!(
                            "a rule names user {name:?}, whom /etc/passwd does not know: it matches nobody"
                        );
                    }
                    uid
                }
            })
            .collect();
        Some(CompiledSelectors {
            process: selectors.process.clone(),
            comm: selectors.comm.clone(),
            uids,
            by_user: !selectors.user.is_empty(),
            ancestor: selectors.ancestor.clone(),
            cgroup: selectors.cgroup.clone(),
            exe_sha256: selectors.exe_sha256.clone(),
        })
    }

    /// It asks for something only /proc tells (all but `user`).
    pub fn needs_process(&self) -> bool {
        !(self.process.is_empty()
            && self.comm.is_empty()
            && self.ancestor.is_empty()
            && self.cgroup.is_empty()
            && self.exe_sha256.is_empty())
    }

    /// What it asks of the process beyond what every record carries.
    pub fn needs(&self) -> ProcessNeeds {
        ProcessNeeds {
            exe_sha256: !self.exe_sha256.is_empty(),
            cgroup: !self.cgroup.is_empty(),
        }
    }

    /// Every selector given matches (`agent`: the connection's configured
    /// cgroup, which `cgroup` paths are relative to).
    pub fn matches(&self, uid: Option<u32>, agent: Option<&str>, process: Process) -> bool {
        if self.by_user && !uid.is_some_and(|u| self.uids.contains(&u)) {
            return false;
        }
        if !self.needs_process() {
            return true;
        }
        match process {
            Process::Pending => true,
            Process::Unknown => false,
            Process::Known(info) => self.why(agent, info).is_some(),
        }
    }

    /// For a process these selectors match: which value of each did (for
    /// `explain`); None when one does not match.
    pub fn why(&self, agent: Option<&str>, info: &ProcessInfo) -> Option<Vec<String>> {
        let mut reasons = Vec::new();
        let exe = info.exe.as_deref();
        if !self.process.is_empty() {
            let exe = exe?;
            let glob = self.process.iter().find(|g| glob_matches(g, exe))?;
            reasons.push(format!("  process: {glob} matches {exe}"));
        }
        if !self.comm.is_empty() {
            let comm = info.comm.as_deref()?;
            let glob = self.comm.iter().find(|g| glob_matches(g, comm))?;
            reasons.push(format!("  comm: {glob} matches {comm}"));
        }
        if !self.ancestor.is_empty() {
            let (glob, exe) = info.ancestry.iter().find_map(|a| {
                let exe = a.exe.as_deref()?;
                Some((self.ancestor.iter().find(|g| glob_matches(g, exe))?, exe))
            })?;
            reasons.push(format!("  ancestor: {glob} matches {exe}"));
        }
        if !self.cgroup.is_empty() {
            let below = Path::new(info.cgroup.as_deref()?)
                .strip_prefix(agent?)
                .ok()?;
            let sub = self.cgroup.iter().find(|c| below.starts_with(c))?;
            reasons.push(format!("  cgroup: {sub} holds {}", below.display()));
        }
        if !self.exe_sha256.is_empty() {
            let hash = info.exe_sha256.as_deref()?;
            if !self.exe_sha256.iter().any(|h| h == hash) {
                return None;
            }
            reasons.push(format!("  exe_sha256: {hash}"));
        }
        Some(reasons)
    }

    /// `explain`'s line for `user`, when it matched.
    pub fn user_reason(&self, uid: Option<u32>) -> Option<String> {
        let uid = uid.filter(|u| self.by_user && self.uids.contains(u))?;
        Some(format!("  user: uid {uid}"))
    }
}

/// A shell-style glob over the whole text: `*` any run of characters, `/`
/// included (`*/git` is any `git`); `?` one character; all else literal.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was and the text position it now stands for.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The uid of `name` in the passwd file's text (`name:x:uid:...` lines).
pub fn uid_in_passwd(passwd: &str, name: &str) -> Option<u32> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procinfo::Ancestor;

    #[test]
    fn globs() {
        assert!(glob_matches("*/git", "/usr/bin/git"));
        assert!(!glob_matches("*/git", "/usr/bin/gitk"));
        assert!(glob_matches("/usr/bin/python3*", "/usr/bin/python3.13"));
        assert!(glob_matches("/usr/bin/curl", "/usr/bin/curl"));
        assert!(!glob_matches("/usr/bin/curl", "/usr/bin/curl2"));
        assert!(glob_matches("py?hon*", "python3"));
        assert!(glob_matches("*", ""));
        assert!(glob_matches("a*b*c", "aXXbYYbc"));
        assert!(!glob_matches("a*b*c", "aXXbYYb"));
        assert!(!glob_matches("", "x"));
    }

    #[test]
    fn passwd_lookup() {
        let passwd =
            "root:x:0:0:root:/root:/bin/sh\n#bad\nagent:x:990:990::/var/empty:/bin/false\n";
        assert_eq!(uid_in_passwd(passwd, "agent"), Some(990));
        assert_eq!(uid_in_passwd(passwd, "root"), Some(0));
        assert_eq!(uid_in_passwd(passwd, "nobody"), None);
        assert_eq!(uid_in_passwd(passwd, "x"), None);
    }

    fn curl_from_git() -> ProcessInfo {
        ProcessInfo {
            pid: 30,
            exe: Some("/usr/bin/curl".into()),
            comm: Some("curl".into()),
            cgroup: Some("agents.slice/tools.scope/git".into()),
            exe_sha256: Some("ab".repeat(32)),
            ancestry: vec![
                Ancestor {
                    pid: 20,
                    exe: Some("/usr/lib/git-core/git".into()),
                    cmdline: None,
                    cmdline_truncated: false,
                },
                Ancestor {
                    pid: 10,
                    exe: Some("/usr/bin/bash".into()),
                    cmdline: None,
                    cmdline_truncated: false,
                },
            ],
            ..ProcessInfo::default()
        }
    }

    fn compiled(selectors: ProcessSelectors) -> CompiledSelectors {
        let mut users = |name: &str| (name == "agent").then_some(990);
        CompiledSelectors::compile(&selectors, &mut users).expect("selectors")
    }

    #[test]
    fn each_selector_and_their_and() {
        let info = curl_from_git();
        let known = Process::Known(&info);
        let agent = Some("agents.slice");
        let matches = |s: ProcessSelectors| compiled(s).matches(Some(990), agent, known);
        let sel = ProcessSelectors::default;
        assert!(matches(ProcessSelectors {
            process: vec!["*/curl".into()],
            ..sel()
        }));
        assert!(!matches(ProcessSelectors {
            process: vec!["*/python3*".into()],
            ..sel()
        }));
        assert!(matches(ProcessSelectors {
            comm: vec!["cur?".into()],
            ..sel()
        }));
        assert!(matches(ProcessSelectors {
            ancestor: vec!["*/git".into()],
            ..sel()
        }));
        assert!(matches(ProcessSelectors {
            ancestor: vec!["*/bash".into()],
            ..sel()
        }));
        assert!(!matches(ProcessSelectors {
            ancestor: vec!["*/curl".into()],
            ..sel()
        }));
        assert!(matches(ProcessSelectors {
            cgroup: vec!["tools.scope".into()],
            ..sel()
        }));
        assert!(matches(ProcessSelectors {
            cgroup: vec!["tools.scope/git".into()],
            ..sel()
        }));
        assert!(!matches(ProcessSelectors {
            cgroup: vec!["tools".into()],
            ..sel()
        }));
        assert!(!matches(ProcessSelectors {
            cgroup: vec!["browser.scope".into()],
            ..sel()
        }));
        assert!(matches(ProcessSelectors {
            exe_sha256: vec!["ab".repeat(32)],
            ..sel()
        }));
        assert!(!matches(ProcessSelectors {
            exe_sha256: vec!["cd".repeat(32)],
            ..sel()
        }));
        assert!(matches(ProcessSelectors {
            user: vec![UserSpec::Name("agent".into())],
            ..sel()
        }));
        assert!(matches(ProcessSelectors {
            user: vec![UserSpec::Uid(990)],
            ..sel()
        }));
        assert!(!matches(ProcessSelectors {
            user: vec![UserSpec::Uid(0)],
            ..sel()
        }));
        assert!(!matches(ProcessSelectors {
            user: vec![UserSpec::Name("nobody".into())],
            ..sel()
        }));
        // Fields AND: one failing field fails the rule.
        assert!(!matches(ProcessSelectors {
            process: vec!["*/curl".into()],
            ancestor: vec!["*/node".into()],
            ..sel()
        }));
        // A cgroup selector needs to know the agent it is relative to.
        let cgroup = compiled(ProcessSelectors {
            cgroup: vec!["tools.scope".into()],
            ..sel()
        });
        assert!(!cgroup.matches(Some(990), None, known));
        assert!(!cgroup.matches(Some(990), Some("other.slice"), known));
    }

    #[test]
    fn pending_may_match_unknown_never_does_and_user_needs_no_process() {
        let by_exe = compiled(ProcessSelectors {
            process: vec!["*/curl".into()],
            ..ProcessSelectors::default()
        });
        assert!(by_exe.needs_process());
        assert!(by_exe.matches(None, None, Process::Pending));
        assert!(!by_exe.matches(None, None, Process::Unknown));
        let gone = ProcessInfo {
            pid: 4,
            ..ProcessInfo::default()
        };
        assert!(
            !by_exe.matches(None, None, Process::Known(&gone)),
            "no exe read"
        );
        let by_user = compiled(ProcessSelectors {
            user: vec![UserSpec::Uid(990)],
            ..ProcessSelectors::default()
        });
        assert!(!by_user.needs_process());
        assert!(by_user.matches(Some(990), None, Process::Unknown));
        assert!(
            !by_user.matches(None, None, Process::Pending),
            "no socket owner known"
        );
        assert!(CompiledSelectors::compile(&ProcessSelectors::default(), &mut |_| None).is_none());
    }
}
