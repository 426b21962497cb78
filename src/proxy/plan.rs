// SPDX-License-Identifier: GPL-3.0-or-later
//! What a session does with a connection, decided without sockets: from what
//! is known after sniffing (the name, the original destination, the agent's
//! lookups, the process as far as it is read, the config and policy in force)
//! to a [`Plan`], which the session then carries out. Pure so that every
//! branch can be tested without a network, and the clock is the loop's
//! (`now` is passed in).

use super::Runtime;
use crate::agent_dns::names::ResolvedNames;
use crate::audit::{Dial, Verdict};
use crate::config::{Credentials, DomainDial, Mode, Outbound};
use crate::loopback::{self, Listener};
use crate::outbound::{DialOptions, Target};
use crate::policy::{self, Process, Query};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The longest a decision by a rule on the process waits for it to be read
/// (typically under 1 ms; hashing a large executable the first time, more).
pub const PROCESS_WAIT: Duration = Duration::from_secs(1);

/// What is known of the client when its connection is decided.
#[derive(Clone, Copy, Debug)]
pub struct Conn<'a> {
    pub original_dst: SocketAddr,
    pub agent: Option<&'a str>,
    pub uid: Option<u32>,
    /// The process that connected, as far as it is read.
    pub process: Process<'a>,
    pub search: Search,
}

/// How far the search for the client's process went: what the record says
/// when a rule on the process could not match for want of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    /// No process to look for (no socket owner or agent, or attribution off).
    None,
    /// Looked for after accept.
    Looked,
    /// The wait for it (`PROCESS_WAIT`) ended first.
    WaitOver,
}

/// What the agent's own lookups (through our DNS handler) say of the
/// address it connected to; the session writes it into the record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lookups {
    /// Some lookup gave the address.
    pub resolved: bool,
    /// The connection named no host: it takes the name last resolved to the address.
    pub adopted: Option<String>,
    /// The connection's name is none of the names resolved to the address.
    pub mismatch: bool,
    /// The name last resolved to the address.
    pub latest: Option<String>,
}

/// The outcome of [`decide`].
#[derive(Debug)]
pub struct Plan {
    /// `None` when the DNS handler does not record lookups (`dns.capture` off).
    pub lookups: Option<Lookups>,
    pub next: Next,
}

#[derive(Debug)]
pub enum Next {
    /// A rule on the process decides and the process is still being read:
    /// decide again once it is, or at `until`.
    AwaitProcess {
        until: Instant,
    },
    Decided(Box<Decided>),
}

/// A decision: what the record says of it, and what to do.
#[derive(Debug, PartialEq)]
pub struct Decided {
    pub rule: String,
    pub outbound: String,
    pub verdict: Verdict,
    /// How the upstream is dialled, when known now (after DNS otherwise).
    pub dial: Option<Dial>,
    pub error: Option<String>,
    /// Why no rule on the process could match, when one might have.
    pub attribution: Option<String>,
    pub dial_options: DialOptions,
    pub action: Action,
}

#[derive(Debug, PartialEq)]
pub enum Action {
    /// Refuse where the protocol allows (TLS alert, HTTP 403, else a reset),
    /// naming the rule.
    Refuse,
    /// Reset at once.
    Reset,
    /// Resolve `host` with our resolver, then [`dial_resolved`].
    Resolve { host: String, port: u16 },
    /// Connect to the first of `to` that answers.
    Connect { to: Vec<SocketAddr>, via: Via },
    /// Hold, nothing dialled, until a supervisor answers (or the fallback);
    /// an allow then dials as `direct`, by name when a domain rule matched.
    Ask { matched_domain: bool },
}

/// How the upstream connection is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    Direct,
    /// Through an upstream proxy, asking it for `target`.
    Proxy {
        target: Target,
        proxy: Proxy,
    },
}

/// The handshake an upstream proxy speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proxy {
    Socks5(Option<Credentials>),
    HttpConnect(Option<Credentials>),
}

/// A dial the proxy must not make, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub dial: Dial,
    pub reason: String,
}

/// Where to connect once our resolver answered for a name.
#[derive(Debug, PartialEq, Eq)]
pub enum Dialing {
    Refuse(Refusal),
    Connect { dial: Dial, to: Vec<SocketAddr> },
}

/// Decide a sniffed connection; `host` is its name so far (normalised, an IP
/// literal is none), `resolved` the agents' lookups, read as of `now`.
pub fn decide(
    runtime: &Runtime,
    conn: &Conn,
    host: Option<&str>,
    resolved: &ResolvedNames,
    now: Instant,
) -> Plan {
    let config = &runtime.config;
    let lookups = config.dns.capture.then(|| {
        let names = resolved.lookup(conn.agent, conn.original_dst.ip(), now);
        name_by_lookups(host, &names)
    });
    let named_itself = host.is_some();
    let adopted = lookups.as_ref().and_then(|l| l.adopted.as_deref());
    let host = host.or(adopted);
    let query = query(conn, host, conn.original_dst);
    let decision = runtime.policy.decide(&query);
    if decision.awaits_process {
        return Plan {
            lookups,
            next: Next::AwaitProcess {
                until: now + PROCESS_WAIT,
            },
        };
    }
    let mut attribution = None;
    if query.process == Process::Unknown && runtime.policy.needs_process() {
        let pending = Query {
            process: Process::Pending,
            ..query
        };
        if runtime.policy.decide(&pending).awaits_process {
            attribution = Some(why_no_process(conn.search));
        }
    }
    let mut decided = Decided {
        rule: decision.rule_name.to_string(),
        outbound: decision.outbound.to_string(),
        verdict: Verdict::Block,
        dial: None,
        error: None,
        attribution,
        dial_options: DialOptions::default(),
        action: Action::Refuse,
    };
    let unresolved = lookups.as_ref().is_some_and(|l| !l.resolved);
    // A hard-coded address: only a rule by address may let it through.
    if config.dns.require_dns && !named_itself && unresolved && !decision.by_address {
        decided.outbound = "block".into();
        decided.dial = Some(Dial::RefusedUnresolved);
        decided.error = Some(format!(
            "{} was never resolved through agent-egress, and no rule by address allows it (dns.require_dns)",
            conn.original_dst.ip()
        ));
        return Plan {
            lookups,
            next: Next::Decided(Box::new(decided)),
        };
    }
    let Some(outbound) = config.outbounds.get(decision.outbound) else {
        // Validated configs name only existing outbounds; refuse if not.
        decided.error = Some(format!("no outbound named {:?}", decision.outbound));
        decided.action = Action::Reset;
        return Plan {
            lookups,
            next: Next::Decided(Box::new(decided)),
        };
    };
    let original = || Action::Connect {
        to: vec![conn.original_dst],
        via: Via::Direct,
    };
    // A name that never resolves reaches nothing: refused in audit mode too.
    if config.mode == Mode::Audit && !host.is_some_and(crate::names::never_resolves) {
        decided.verdict = match outbound {
            Outbound::Block => Verdict::WouldBlock,
            _ => Verdict::Allow,
        };
        decided.dial = Some(Dial::Original);
        decided.action = original();
        return Plan {
            lookups,
            next: Next::Decided(Box::new(decided)),
        };
    }
    let name = host.filter(|_| decision.matched_domain);
    match outbound {
        Outbound::Block => {}
        Outbound::Ask => {
            decided.action = Action::Ask {
                matched_domain: decision.matched_domain,
            };
        }
        _ => out_through(&mut decided, outbound, name, conn.original_dst),
    }
    Plan {
        lookups,
        next: Next::Decided(Box::new(decided)),
    }
}

/// Let through by `outbound` (one that lets traffic through): by `name`
/// when a domain rule matched it, else to the original address.
fn out_through(
    decided: &mut Decided,
    outbound: &Outbound,
    name: Option<&str>,
    original_dst: SocketAddr,
) {
    match outbound {
        Outbound::Block | Outbound::Ask => {}
        Outbound::Direct { interface, mark } => {
            direct(decided, interface, *mark, name, original_dst)
        }
        Outbound::Socks5 { server, auth } | Outbound::Http { server, auth } => {
            decided.verdict = Verdict::Allow;
            // The upstream resolves a name it is given: the agent's choice
            // of IP is not trusted when a domain rule let it through.
            let target = match name {
                Some(host) => {
                    decided.dial = Some(Dial::UpstreamResolves);
                    Target::Name(host.to_string(), original_dst.port())
                }
                None => {
                    decided.dial = Some(Dial::Original);
                    Target::Addr(original_dst)
                }
            };
            let proxy = match outbound {
                Outbound::Socks5 { .. } => Proxy::Socks5(auth.clone()),
                _ => Proxy::HttpConnect(auth.clone()),
            };
            decided.action = Action::Connect {
                to: vec![*server],
                via: Via::Proxy { target, proxy },
            };
        }
    }
}

/// Out as a `direct` outbound: by `name` through our resolver when a domain
/// rule matched it, else to the original address.
fn direct(
    decided: &mut Decided,
    interface: &Option<String>,
    mark: Option<u32>,
    name: Option<&str>,
    original_dst: SocketAddr,
) {
    decided.verdict = Verdict::Allow;
    decided.dial_options = DialOptions {
        interface: interface.clone(),
        mark,
    };
    decided.action = match name {
        Some(host) => Action::Resolve {
            host: host.to_string(),
            port: original_dst.port(),
        },
        None => {
            decided.dial = Some(Dial::Original);
            Action::Connect {
                to: vec![original_dst],
                via: Via::Direct,
            }
        }
    };
}

/// A held connection's answer: refused (`why` for the record), or out
/// through `ask.outbound`, by name when the asking rule matched one.
pub fn answered(
    runtime: &Runtime,
    original_dst: SocketAddr,
    host: Option<&str>,
    rule: &str,
    matched_domain: bool,
    allow: bool,
    why: Option<String>,
) -> Decided {
    let mut decided = Decided {
        rule: rule.to_string(),
        outbound: "block".into(),
        verdict: Verdict::Block,
        dial: None,
        error: why,
        attribution: None,
        dial_options: DialOptions::default(),
        action: Action::Refuse,
    };
    if !allow {
        return decided;
    }
    let name = &runtime.config.ask.outbound;
    match runtime.config.outbounds.get(name) {
        Some(
            outbound @ (Outbound::Direct { .. } | Outbound::Socks5 { .. } | Outbound::Http { .. }),
        ) => {
            decided.outbound = name.clone();
            let name = host.filter(|_| matched_domain);
            out_through(&mut decided, outbound, name, original_dst);
        }
        // The config's check refuses both; if one slipped through, fail closed.
        _ => decided.error = Some(format!("ask.outbound {name:?} lets nothing through")),
    }
    decided
}

/// What the policy is asked of this connection, to `dst`.
fn query<'q>(conn: &Conn<'q>, host: Option<&'q str>, dst: SocketAddr) -> Query<'q> {
    Query {
        host,
        ip: dst.ip(),
        port: dst.port(),
        agent: conn.agent,
        uid: conn.uid,
        process: conn.process,
    }
}

/// The record's `attribution`: why no process could be asked.
fn why_no_process(search: Search) -> String {
    match search {
        Search::WaitOver => format!(
            "the process was not read within {} ms: rules on the process did not match",
            PROCESS_WAIT.as_millis()
        ),
        Search::Looked => "the process was gone, or its executable unreadable, when it was read after accept: rules on the process did not match".into(),
        Search::None => "no process to read (no socket owner or agent found, or attribution off): rules on the process did not match".into(),
    }
}

/// A connection without a name of its own takes the name its address was
/// resolved for (the latest); one whose name is none of those is marked.
fn name_by_lookups(host: Option<&str>, names: &[String]) -> Lookups {
    let Some(latest) = names.first() else {
        return Lookups::default();
    };
    Lookups {
        resolved: true,
        adopted: host.is_none().then(|| latest.clone()),
        mismatch: host.is_some_and(|h| !names.iter().any(|n| n == h)),
        latest: Some(latest.clone()),
    }
}

/// A connection to the host's loopback, decided by the listener found there
/// (`None`: nothing listens), not by a sniffed name.
pub fn decide_loopback(runtime: &Runtime, conn: &Conn, listener: Option<&Listener>) -> Decided {
    let config = &runtime.config;
    let mut decided = Decided {
        rule: loopback::REFUSED_RULE.into(),
        outbound: "block".into(),
        verdict: Verdict::Block,
        dial: Some(Dial::Original),
        error: None,
        attribution: None,
        dial_options: DialOptions::default(),
        action: Action::Refuse,
    };
    if let Some(refusal) = own_listener(runtime, conn.original_dst) {
        decided.dial = Some(refusal.dial);
        decided.error = Some(refusal.reason);
        return decided;
    }
    let decision = loopback::decide(
        &config.loopback,
        conn.original_dst.port(),
        conn.agent,
        listener,
    );
    decided.rule = decision.rule.to_string();
    let enforce = config.mode == Mode::Enforce;
    decided.verdict = match (decision.allowed, enforce) {
        (true, _) => Verdict::Allow,
        (false, true) => Verdict::Block,
        (false, false) => Verdict::WouldBlock,
    };
    if decision.allowed || !enforce {
        decided.outbound = "direct".into();
        decided.action = Action::Connect {
            to: vec![conn.original_dst],
            via: Via::Direct,
        };
    }
    decided
}

/// Dial a name (decided by a domain rule) as our resolver sees it, per
/// `dns.domain_dial`: `addrs` is its non-empty answer.
pub fn dial_resolved(
    runtime: &Runtime,
    conn: &Conn,
    host: &str,
    port: u16,
    addrs: &[IpAddr],
) -> Dialing {
    let original = conn.original_dst.ip();
    if addrs.contains(&original) {
        if let Some(refusal) = dial_refusal(runtime, conn, conn.original_dst) {
            return Dialing::Refuse(refusal);
        }
        return Dialing::Connect {
            dial: Dial::OriginalVerified,
            to: vec![conn.original_dst],
        };
    }
    match runtime.config.dns.domain_dial {
        DomainDial::Verify => Dialing::Refuse(Refusal {
            dial: Dial::RefusedMismatch,
            reason: format!(
                "{original} is not an address of {host} (our resolver gives {})",
                list(addrs)
            ),
        }),
        DomainDial::Resolve => {
            let mut refusals = Vec::new();
            let mut candidates: Vec<SocketAddr> = addrs
                .iter()
                .map(|ip| SocketAddr::new(*ip, port))
                .filter(|addr| match dial_refusal(runtime, conn, *addr) {
                    Some(refusal) => {
                        refusals.push(refusal);
                        false
                    }
                    None => true,
                })
                .collect();
            if candidates.is_empty() {
                if let Some(refusal) = refusals.into_iter().next() {
                    return Dialing::Refuse(refusal);
                }
            }
            // Same family first: the agent's stack chose it for a reason.
            candidates.sort_by_key(|a| a.is_ipv4() != original.is_ipv4());
            Dialing::Connect {
                dial: Dial::Resolved,
                to: candidates,
            }
        }
    }
}

/// Why the proxy must not dial `addr` for a name, if it must not: its own
/// listener (a loop), an address a rule by address refuses, or an internal
/// one (loopback, link-local and metadata, private) that no rule by
/// address allows. A name an agent may reach can resolve to anything.
fn dial_refusal(runtime: &Runtime, conn: &Conn, addr: SocketAddr) -> Option<Refusal> {
    if let Some(refusal) = own_listener(runtime, addr) {
        return Some(refusal);
    }
    let ip = addr.ip().to_canonical();
    let query = query(conn, None, SocketAddr::new(ip, addr.port()));
    match runtime.policy.decide_address(&query) {
        Some(decision) => match runtime.config.outbounds.get(decision.outbound) {
            Some(Outbound::Block) | None => Some(Refusal {
                dial: Dial::RefusedIpRule,
                reason: format!("{ip} is refused by rule {:?}", decision.rule_name),
            }),
            Some(_) => None,
        },
        None => policy::internal_range(ip).map(|range| Refusal {
            dial: Dial::RefusedPrivate,
            reason: format!("{ip} is a {range} address, which a name reaches only through a rule by address (ips)"),
        }),
    }
}

/// Dialling `addr` would connect the proxy to itself (a loop).
fn own_listener(runtime: &Runtime, addr: SocketAddr) -> Option<Refusal> {
    let ip = addr.ip().to_canonical();
    let listen = &runtime.config.listen;
    let listener = listen.addresses.iter().any(|a| a.to_canonical() == ip);
    (addr.port() == listen.port && (listener || ip.is_loopback())).then(|| Refusal {
        dial: Dial::RefusedSelf,
        reason: format!("{addr} is this proxy's listener"),
    })
}

fn list(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::procinfo::ProcessInfo;
    use std::sync::Arc;

    const API: &str = r#"{"name": "api", "domains": ["api.test"], "outbound": "direct"}"#;

    fn runtime(json: &str) -> Arc<Runtime> {
        Runtime::new(Config::from_json(json).expect("valid config"))
    }

    /// A client whose process is not asked for, connecting to `dst`.
    fn conn(dst: &str) -> Conn<'static> {
        Conn {
            original_dst: dst.parse().unwrap(),
            agent: None,
            uid: None,
            process: Process::Unknown,
            search: Search::None,
        }
    }

    fn decided(runtime: &Runtime, conn: &Conn, host: Option<&str>) -> Decided {
        decided_with(runtime, conn, host, &ResolvedNames::default())
    }

    fn decided_with(
        runtime: &Runtime,
        conn: &Conn,
        host: Option<&str>,
        resolved: &ResolvedNames,
    ) -> Decided {
        match decide(runtime, conn, host, resolved, Instant::now()).next {
            Next::Decided(decided) => *decided,
            Next::AwaitProcess { .. } => panic!("awaits the process"),
        }
    }

    fn addrs(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_block_rule_refuses_naming_the_rule() {
        let rt = runtime(
            r#"{"default": "direct", "rules": [{"name": "no-evil", "domains": ["evil.test"], "outbound": "block"}]}"#,
        );
        let d = decided(&rt, &conn("198.51.100.7:443"), Some("evil.test"));
        assert_eq!((d.rule.as_str(), d.outbound.as_str()), ("no-evil", "block"));
        assert_eq!(d.verdict, Verdict::Block);
        assert_eq!(d.action, Action::Refuse);
        assert_eq!((d.dial, d.error), (None, None));
    }

    #[test]
    fn an_ask_rule_holds_without_dialling_and_remembers_a_domain_match() {
        let rt = runtime(
            r#"{"control": {"enable": true}, "default": "ask",
                "rules": [{"name": "pkgs", "domains": ["pypi.test"], "outbound": "ask"}]}"#,
        );
        let d = decided(&rt, &conn("203.0.113.66:443"), Some("pypi.test"));
        assert_eq!((d.rule.as_str(), d.outbound.as_str()), ("pkgs", "ask"));
        assert_eq!(
            d.action,
            Action::Ask {
                matched_domain: true
            }
        );
        assert_eq!(d.dial, None, "nothing is dialled before the answer");
        let d = decided(&rt, &conn("203.0.113.66:443"), Some("other.test"));
        assert_eq!(
            d.action,
            Action::Ask {
                matched_domain: false
            }
        );
    }

    #[test]
    fn an_answer_refuses_or_dials_as_direct_by_the_name_a_domain_rule_matched() {
        let rt = runtime(
            r#"{"control": {"enable": true}, "outbounds": {"direct": {"type": "direct", "mark": 9}},
                "rules": [{"name": "pkgs", "domains": ["pypi.test"], "outbound": "ask"}]}"#,
        );
        let dst: SocketAddr = "203.0.113.66:443".parse().unwrap();
        let denied = answered(
            &rt,
            dst,
            Some("pypi.test"),
            "pkgs",
            true,
            false,
            Some("no".into()),
        );
        assert_eq!(
            (denied.verdict, denied.outbound.as_str()),
            (Verdict::Block, "block")
        );
        assert_eq!(
            (denied.action, denied.error.as_deref()),
            (Action::Refuse, Some("no"))
        );
        let by_name = answered(&rt, dst, Some("pypi.test"), "pkgs", true, true, None);
        assert_eq!(
            (by_name.verdict, by_name.outbound.as_str()),
            (Verdict::Allow, "direct")
        );
        assert_eq!(by_name.dial_options.mark, Some(9));
        assert_eq!(
            by_name.action,
            Action::Resolve {
                host: "pypi.test".into(),
                port: 443
            }
        );
        let by_address = answered(&rt, dst, Some("pypi.test"), "default", false, true, None);
        assert_eq!(by_address.dial, Some(Dial::Original));
        assert_eq!(
            by_address.action,
            Action::Connect {
                to: vec![dst],
                via: Via::Direct
            }
        );
    }

    /// Where the agents' allowed traffic leaves through another egress, an
    /// allowed answer does too (`ask.outbound`), never straight out.
    #[test]
    fn an_allowed_answer_leaves_through_ask_outbound() {
        let rt = runtime(
            r#"{"control": {"enable": true},
                "outbounds": {"corp": {"type": "socks5", "server": "192.0.2.9:1080"}},
                "ask": {"outbound": "corp"},
                "rules": [{"name": "pkgs", "domains": ["pypi.test"], "outbound": "ask"}]}"#,
        );
        let dst: SocketAddr = "203.0.113.66:443".parse().unwrap();
        let allowed = answered(&rt, dst, Some("pypi.test"), "pkgs", true, true, None);
        assert_eq!(
            (allowed.verdict, allowed.outbound.as_str(), allowed.dial),
            (Verdict::Allow, "corp", Some(Dial::UpstreamResolves))
        );
        assert!(
            matches!(&allowed.action, Action::Connect { to, via: Via::Proxy { target: Target::Name(host, 443), .. } }
                if to == &vec!["192.0.2.9:1080".parse::<SocketAddr>().unwrap()] && host == "pypi.test"),
            "{:?}",
            allowed.action
        );
    }

    #[test]
    fn a_direct_outbound_without_a_domain_rule_dials_the_original_address_its_way() {
        let rt = runtime(
            r#"{"outbounds": {"wan2": {"type": "direct", "interface": "wan2", "mark": 7}},
                "rules": [{"name": "net", "ips": ["198.51.100.0/24"], "outbound": "wan2"}]}"#,
        );
        let d = decided(&rt, &conn("198.51.100.7:443"), Some("api.test"));
        assert_eq!(d.verdict, Verdict::Allow);
        assert_eq!(d.dial, Some(Dial::Original));
        assert_eq!(
            d.dial_options,
            DialOptions {
                interface: Some("wan2".into()),
                mark: Some(7)
            }
        );
        assert_eq!(
            d.action,
            Action::Connect {
                to: vec!["198.51.100.7:443".parse().unwrap()],
                via: Via::Direct
            }
        );
    }

    #[test]
    fn a_domain_rule_resolves_the_name_instead_of_trusting_the_address() {
        let rt = runtime(&format!(r#"{{"rules": [{API}]}}"#));
        let d = decided(&rt, &conn("203.0.113.66:8443"), Some("api.test"));
        assert_eq!((d.rule.as_str(), d.verdict), ("api", Verdict::Allow));
        assert_eq!(d.dial, None, "how it is dialled is known after DNS");
        assert_eq!(
            d.action,
            Action::Resolve {
                host: "api.test".into(),
                port: 8443
            }
        );
    }

    #[test]
    fn a_socks5_upstream_is_asked_for_the_name_a_domain_rule_matched() {
        let rt = runtime(
            r#"{"outbounds": {"tor": {"type": "socks5", "server": "127.0.0.1:9050", "username": "u", "password": "p"}},
                "rules": [{"domains": ["api.test"], "outbound": "tor"}]}"#,
        );
        let d = decided(&rt, &conn("203.0.113.66:443"), Some("api.test"));
        assert_eq!(d.dial, Some(Dial::UpstreamResolves));
        let auth = Credentials {
            username: "u".into(),
            password: "p".into(),
        };
        assert_eq!(
            d.action,
            Action::Connect {
                to: vec!["127.0.0.1:9050".parse().unwrap()],
                via: Via::Proxy {
                    target: Target::Name("api.test".into(), 443),
                    proxy: Proxy::Socks5(Some(auth)),
                },
            }
        );
        assert_eq!(d.dial_options, DialOptions::default());
    }

    #[test]
    fn an_http_upstream_without_a_domain_rule_is_asked_for_the_original_address() {
        let rt = runtime(
            r#"{"outbounds": {"corp": {"type": "http", "server": "10.0.0.1:3128"}}, "default": "corp"}"#,
        );
        let d = decided(&rt, &conn("198.51.100.7:443"), Some("api.test"));
        assert_eq!((d.rule.as_str(), d.dial), ("default", Some(Dial::Original)));
        assert_eq!(
            d.action,
            Action::Connect {
                to: vec!["10.0.0.1:3128".parse().unwrap()],
                via: Via::Proxy {
                    target: Target::Addr("198.51.100.7:443".parse().unwrap()),
                    proxy: Proxy::HttpConnect(None),
                },
            }
        );
    }

    #[test]
    fn audit_mode_dials_the_original_address_of_what_it_would_block() {
        let rt = runtime(
            r#"{"mode": "audit", "outbounds": {"wan2": {"type": "direct", "mark": 7}},
                "rules": [{"name": "api", "domains": ["api.test"], "outbound": "wan2"}]}"#,
        );
        let original = || Action::Connect {
            to: vec!["198.51.100.7:443".parse().unwrap()],
            via: Via::Direct,
        };
        let blocked = decided(&rt, &conn("198.51.100.7:443"), Some("other.test"));
        assert_eq!(
            (blocked.rule.as_str(), blocked.outbound.as_str()),
            ("default", "block")
        );
        assert_eq!(blocked.verdict, Verdict::WouldBlock);
        assert_eq!(blocked.dial, Some(Dial::Original));
        assert_eq!(blocked.action, original());
        // Not through the rule's outbound, nor resolving the name.
        let allowed = decided(&rt, &conn("198.51.100.7:443"), Some("api.test"));
        assert_eq!(allowed.verdict, Verdict::Allow);
        assert_eq!(allowed.dial_options, DialOptions::default());
        assert_eq!(allowed.action, original());
    }

    #[test]
    fn audit_mode_still_refuses_a_name_that_never_resolves() {
        let rt = runtime(r#"{"mode": "audit"}"#);
        let d = decided(
            &rt,
            &conn("198.51.100.7:443"),
            Some("doctor.agent-egress.invalid"),
        );
        assert_eq!(d.verdict, Verdict::Block);
        assert_eq!(d.action, Action::Refuse);
    }

    #[test]
    fn require_dns_refuses_an_address_no_lookup_gave_unless_a_rule_names_it() {
        let rt = runtime(
            r#"{"default": "direct", "dns": {"require_dns": true},
                "rules": [{"name": "lan", "ips": ["10.0.0.5/32"], "outbound": "direct"}]}"#,
        );
        let d = decided(&rt, &conn("198.51.100.7:443"), None);
        assert_eq!((d.rule.as_str(), d.outbound.as_str()), ("default", "block"));
        assert_eq!(
            (d.verdict, d.dial),
            (Verdict::Block, Some(Dial::RefusedUnresolved))
        );
        assert!(
            d.error
                .unwrap()
                .starts_with("198.51.100.7 was never resolved"),
            "names the address"
        );
        let by_address = decided(&rt, &conn("10.0.0.5:443"), None);
        assert_eq!(
            (by_address.rule.as_str(), by_address.verdict),
            ("lan", Verdict::Allow)
        );
        // A connection that names its host is held to the name, not the lookups.
        let named = decided(&rt, &conn("198.51.100.7:443"), Some("api.test"));
        assert_eq!(named.verdict, Verdict::Allow);
    }

    #[test]
    fn require_dns_needs_lookups_recorded() {
        let rt =
            runtime(r#"{"default": "direct", "dns": {"require_dns": true, "capture": false}}"#);
        let plan = decide(
            &rt,
            &conn("198.51.100.7:443"),
            None,
            &ResolvedNames::default(),
            Instant::now(),
        );
        assert_eq!(plan.lookups, None);
        let Next::Decided(d) = plan.next else {
            panic!("decided")
        };
        assert_eq!(d.verdict, Verdict::Allow);
    }

    #[test]
    fn a_connection_without_a_name_takes_the_one_its_address_was_resolved_for() {
        let rt = runtime(&format!(r#"{{"rules": [{API}]}}"#));
        let resolved = ResolvedNames::default();
        let ip: IpAddr = "203.0.113.66".parse().unwrap();
        resolved.insert(None, "api.test", &[(ip, 60)], Instant::now());
        let c = conn("203.0.113.66:443");
        let plan = decide(&rt, &c, None, &resolved, Instant::now());
        let lookups = plan.lookups.clone().unwrap();
        assert_eq!(lookups.adopted.as_deref(), Some("api.test"));
        assert!(lookups.resolved && !lookups.mismatch);
        let Next::Decided(d) = plan.next else {
            panic!("decided")
        };
        assert_eq!(d.rule, "api", "the domain rule decides by the adopted name");
        // A name of its own that the address was not resolved for is marked.
        let plan = decide(&rt, &c, Some("other.test"), &resolved, Instant::now());
        let lookups = plan.lookups.unwrap();
        assert_eq!(lookups.adopted, None);
        assert!(lookups.mismatch);
        assert_eq!(lookups.latest.as_deref(), Some("api.test"));
    }

    #[test]
    fn a_rule_on_a_process_still_being_read_waits_for_it() {
        let rt = runtime(
            r#"{"default": "direct", "rules": [{"name": "no-python", "process": ["*/python3"], "outbound": "block"}]}"#,
        );
        let now = Instant::now();
        let pending = Conn {
            process: Process::Pending,
            search: Search::Looked,
            ..conn("198.51.100.7:443")
        };
        let plan = decide(&rt, &pending, None, &ResolvedNames::default(), now);
        let Next::AwaitProcess { until } = plan.next else {
            panic!("decided without the process");
        };
        assert_eq!(until, now + PROCESS_WAIT);
        let python = ProcessInfo {
            exe: Some("/usr/bin/python3".into()),
            ..ProcessInfo::default()
        };
        let known = Conn {
            process: Process::Known(&python),
            ..pending
        };
        let d = decided(&rt, &known, None);
        assert_eq!((d.rule.as_str(), d.verdict), ("no-python", Verdict::Block));
        assert_eq!(d.attribution, None);
    }

    #[test]
    fn a_rule_on_a_process_not_read_in_time_does_not_match_and_the_record_says_why() {
        let rt = runtime(
            r#"{"default": "direct", "rules": [{"name": "no-python", "process": ["*/python3"], "outbound": "block"}]}"#,
        );
        let note = |search| {
            let c = Conn {
                search,
                ..conn("198.51.100.7:443")
            };
            let d = decided(&rt, &c, None);
            assert_eq!((d.rule.as_str(), d.verdict), ("default", Verdict::Allow));
            d.attribution.unwrap()
        };
        assert!(note(Search::WaitOver).contains("not read within 1000 ms"));
        assert!(note(Search::Looked).contains("was gone"));
        assert!(note(Search::None).starts_with("no process to read"));
        // No rule on the process: nothing to explain.
        let plain = runtime(r#"{"default": "direct"}"#);
        assert_eq!(
            decided(&plain, &conn("198.51.100.7:443"), None).attribution,
            None
        );
    }

    #[test]
    fn a_runtime_rule_cannot_let_through_what_a_locked_rule_refuses() {
        let config = Config::from_json(
            r#"{"default": "direct", "rules": [
                {"name": "pinned", "domains": ["evil.test"], "outbound": "block", "locked": true},
                {"name": "open", "domains": ["meh.test"], "outbound": "block"}]}"#,
        )
        .unwrap();
        // As the control API would add it: widening both rules.
        let runtime_rules = Config::from_json(
            r#"{"rules": [{"name": "supervisor", "domains": ["evil.test", "meh.test"], "outbound": "direct"}]}"#,
        )
        .unwrap()
        .rules;
        let rt = Runtime::with_rules(config, &runtime_rules);
        let d = decided(&rt, &conn("198.51.100.7:443"), Some("evil.test"));
        assert_eq!((d.rule.as_str(), d.verdict), ("pinned", Verdict::Block));
        let d = decided(&rt, &conn("198.51.100.7:443"), Some("meh.test"));
        assert_eq!((d.rule.as_str(), d.verdict), ("supervisor", Verdict::Allow));
    }

    #[test]
    fn an_outbound_missing_from_the_config_resets() {
        let mut config = Config::from_json(r#"{"default": "direct"}"#).unwrap();
        config.outbounds.remove("direct");
        let rt = Runtime::new(config);
        let d = decided(&rt, &conn("198.51.100.7:443"), None);
        assert_eq!((d.verdict, d.action), (Verdict::Block, Action::Reset));
        assert_eq!(d.error.as_deref(), Some("no outbound named \"direct\""));
    }

    #[test]
    fn loopback_is_decided_by_its_listener_and_never_reaches_the_proxy_itself() {
        let rt = runtime(r#"{"loopback": {"allow": [{"name": "dev", "ports": [3000]}]}}"#);
        let own = decide_loopback(&rt, &conn("127.0.0.1:15001"), None);
        assert_eq!(own.rule, loopback::REFUSED_RULE);
        assert_eq!(
            (own.dial, own.action),
            (Some(Dial::RefusedSelf), Action::Refuse)
        );
        let allowed = decide_loopback(&rt, &conn("127.0.0.1:3000"), None);
        assert_eq!(
            (allowed.rule.as_str(), allowed.outbound.as_str()),
            ("dev", "direct")
        );
        assert!(matches!(
            allowed.action,
            Action::Connect {
                via: Via::Direct,
                ..
            }
        ));
        let refused = decide_loopback(&rt, &conn("127.0.0.1:5432"), None);
        assert_eq!(
            (refused.verdict, refused.action),
            (Verdict::Block, Action::Refuse)
        );
        assert_eq!(refused.dial, Some(Dial::Original));
        let audit = runtime(r#"{"mode": "audit"}"#);
        let would = decide_loopback(&audit, &conn("127.0.0.1:5432"), None);
        assert_eq!(would.verdict, Verdict::WouldBlock);
        assert!(matches!(would.action, Action::Connect { .. }));
    }

    #[test]
    fn a_resolved_name_is_dialled_at_the_original_address_when_it_is_one_of_its() {
        let rt = runtime(&format!(r#"{{"rules": [{API}]}}"#));
        let c = conn("203.0.113.66:443");
        assert_eq!(
            dial_resolved(
                &rt,
                &c,
                "api.test",
                443,
                &addrs(&["192.0.2.1", "203.0.113.66"])
            ),
            Dialing::Connect {
                dial: Dial::OriginalVerified,
                to: vec![c.original_dst]
            }
        );
    }

    #[test]
    fn verify_refuses_an_address_the_name_does_not_have() {
        let rt = runtime(&format!(
            r#"{{"dns": {{"domain_dial": "verify"}}, "rules": [{API}]}}"#
        ));
        let got = dial_resolved(
            &rt,
            &conn("203.0.113.66:443"),
            "api.test",
            443,
            &addrs(&["192.0.2.1", "192.0.2.2"]),
        );
        assert_eq!(
            got,
            Dialing::Refuse(Refusal {
                dial: Dial::RefusedMismatch,
                reason: "203.0.113.66 is not an address of api.test (our resolver gives 192.0.2.1, 192.0.2.2)".into(),
            })
        );
    }

    #[test]
    fn resolve_dials_the_names_public_addresses_same_family_first() {
        let rt = runtime(&format!(r#"{{"rules": [{API}]}}"#));
        let got = dial_resolved(
            &rt,
            &conn("[2001:db8::9]:443"),
            "api.test",
            443,
            &addrs(&["192.0.2.1", "10.0.0.1", "2001:db8::1"]),
        );
        assert_eq!(
            got,
            Dialing::Connect {
                dial: Dial::Resolved,
                to: vec![
                    "[2001:db8::1]:443".parse().unwrap(),
                    "192.0.2.1:443".parse().unwrap()
                ],
            }
        );
    }

    #[test]
    fn a_name_leading_only_to_internal_or_refused_addresses_is_refused() {
        let rt = runtime(&format!(
            r#"{{"rules": [{API}, {{"name": "no-doc", "ips": ["192.0.2.0/24"], "outbound": "block"}},
                {{"name": "lan", "ips": ["10.0.0.5/32"], "outbound": "direct"}}]}}"#
        ));
        let c = conn("203.0.113.66:443");
        let refused = |list: &[&str]| match dial_resolved(&rt, &c, "api.test", 443, &addrs(list)) {
            Dialing::Refuse(refusal) => refusal,
            other => panic!("{other:?}"),
        };
        let private = refused(&["169.254.169.254"]);
        assert_eq!(private.dial, Dial::RefusedPrivate);
        assert!(private.reason.contains("link-local"), "{}", private.reason);
        assert_eq!(refused(&["192.0.2.1"]).dial, Dial::RefusedIpRule);
        assert_eq!(refused(&["127.0.0.1"]).dial, Dial::RefusedPrivate);
        let own = dial_resolved(
            &rt,
            &conn("203.0.113.66:15001"),
            "api.test",
            15001,
            &addrs(&["127.0.0.1"]),
        );
        assert!(matches!(
            own,
            Dialing::Refuse(Refusal {
                dial: Dial::RefusedSelf,
                ..
            })
        ));
        // A rule by address lets a name reach an internal address.
        assert!(matches!(
            dial_resolved(&rt, &c, "api.test", 443, &addrs(&["10.0.0.5"])),
            Dialing::Connect {
                dial: Dial::Resolved,
                ..
            }
        ));
    }
}
