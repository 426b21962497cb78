//! The kernel side of interception, kept in place while the daemon runs.
//!
//! Installs the nftables table and the policy routing, then a keeper thread
//! watches three things and repairs them at once: the table (someone flushed
//! the ruleset or deleted it), the ip rules and routes, and the agents'
//! cgroups (a restarted unit gets a new cgroup id, which must join the set
//! within milliseconds; systemd units close even that window with `NFTSet=`,
//! and agents whose parent holds nothing else with that parent in the set:
//! see [`cgroup::agent_only_parent`]).
//!
//! Every captured cgroup gets the connect log (see [`crate::connect_log`]),
//! which names the process behind each connection for the audit records;
//! with `interception.backstop`, also the kernel backstop (see
//! [`crate::backstop`]), which stays when the daemon stops without cleaning
//! up, dies or is frozen.

use crate::audit::{Event, Proto, Record, Verdict};
use crate::backstop::{self, Backstop};
use crate::bpf::BpfError;
use crate::cgroup::{self, Change, Delegation, Watcher};
use crate::config::{BackstopMode, Config, DelegatedSubtrees};
use crate::connect_log::{self, ConnectLog};
use crate::netfilter::{self, CgroupMatch, TableMonitor, TablePlan};
use crate::proxy::{CapturedSubtree, Shared};
use crate::routing::{self, RoutePlan, RuleMonitor};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TABLE_EVENTS: Token = Token(0);
const RULE_EVENTS: Token = Token(1);
const CGROUP_EVENTS: Token = Token(2);
const CONTROL: Token = Token(3);
/// Checks that need no event (routes lost with a downed `lo` send none).
const PERIODIC: Duration = Duration::from_secs(2);
/// Drops are summarised at most this often (log line and audit records).
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Destinations named per drop report, most dropped first.
const DROP_REPORT_DESTINATIONS: usize = 32;
/// Bound on the cgroup tree walk that maps socket cgroups to agents.
const MAX_INDEXED_CGROUPS: usize = 65_536;

enum Control {
    Update(Box<Config>),
    Stop { remove: bool },
}

pub struct Capture {
    control: mpsc::Sender<Control>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

fn table_plan(config: &Config, members: Vec<CgroupMatch>) -> TablePlan {
    TablePlan {
        table: config.interception.table.clone(),
        mark: config.interception.mark,
        port: config.listen.port,
        cgroups: members,
        dns_servers: config.dns.servers.iter().map(|s| s.ip()).collect(),
        dns_port: config.dns.capture.then_some(config.dns.port),
        bypass: config
            .interception
            .bypass
            .iter()
            .map(|c| (c.addr, c.prefix))
            .collect(),
    }
}

fn route_plan(config: &Config) -> RoutePlan {
    RoutePlan {
        mark: config.interception.mark,
        table: config.interception.route_table,
        priority: config.interception.rule_priority,
    }
}

impl Capture {
    /// Install everything, or nothing and an error that says what is missing.
    pub fn start(config: &Config, shared: Arc<Shared>) -> Result<Capture, String> {
        netfilter::check_kernel_support().map_err(|e| format!("kernel support: {e}"))?;
        let backstop = load_backstop(config)?;
        let root = cgroup::cgroup2_root().map_err(|e| e.to_string())?;
        let mut watcher = Watcher::new(&root, config.interception.cgroups.iter().cloned())
            .map_err(|e| format!("watching cgroups: {e}"))?;
        let mut members = BTreeMap::new();
        apply_changes(&mut members, watcher.poll_changes());
        for path in &config.interception.cgroups {
            if !members.values().any(|(p, _): &(String, u32)| p == path) {
                log::warn!(
                    "cgroup {path} does not exist yet: it is captured as soon as it appears"
                );
            }
        }
        let around = Around::look(
            config.interception.delegated_subtrees,
            &root,
            &config.interception.cgroups,
            &members,
        )?;
        let captured = around.with_agents(&members);
        let plan = table_plan(config, member_list(&captured));
        let route = route_plan(config);
        netfilter::install(&plan).map_err(|e| format!("installing nftables table: {e}"))?;
        if let Err(e) = routing::install(&route) {
            let _ = netfilter::remove(&plan.table);
            return Err(format!("installing policy routing: {e}"));
        }
        let monitors = TableMonitor::new(&plan.table)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                RuleMonitor::new(&route)
                    .map(|r| (t, r))
                    .map_err(|e| e.to_string())
            });
        let (table_monitor, rule_monitor) = match monitors {
            Ok(m) => m,
            Err(e) => {
                let _ = routing::remove(&route);
                let _ = netfilter::remove(&plan.table);
                return Err(format!("watching the kernel state: {e}"));
            }
        };
        if let Some(b) = &backstop {
            if let Err(e) = attach_everywhere(b, &root, &captured) {
                let _ = routing::remove(&route);
                let _ = netfilter::remove(&plan.table);
                return Err(e);
            }
        }
        start_connect_log(&shared, &root, &captured);
        let poll = Poll::new().map_err(|e| e.to_string())?;
        let waker = Arc::new(Waker::new(poll.registry(), CONTROL).map_err(|e| e.to_string())?);
        let mut keeper = Keeper {
            poll,
            root,
            configured: config.interception.cgroups.clone(),
            members,
            around,
            plan,
            route,
            watcher,
            table_monitor,
            rule_monitor,
            shared,
            drops: DropReport::default(),
            backstop,
        };
        keeper.publish_agents();
        keeper
            .register()
            .map_err(|e| format!("watching the kernel state: {e}"))?;
        let (control, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kernel-keeper".into())
            .spawn(move || keeper.run(rx))
            .map_err(|e| e.to_string())?;
        log::info!(
            "capturing cgroups [{}] with table inet {}",
            config.interception.cgroups.join(", "),
            config.interception.table
        );
        Ok(Capture {
            control,
            waker,
            thread: Some(thread),
        })
    }

    /// A reloaded config: new cgroups, resolvers or bypass networks.
    pub fn update(&self, config: &Config) {
        self.send(Control::Update(Box::new(config.clone())));
    }

    /// Remove the table and the routing (the agents are uncaptured after).
    pub fn remove(mut self) {
        self.stop(true);
    }

    /// Stop watching but keep the table: with no listener behind it, the
    /// agents' connections are refused until `down` or the next start.
    pub fn leave_lockdown(mut self) {
        self.stop(false);
    }

    fn stop(&mut self, remove: bool) {
        self.send(Control::Stop { remove });
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the kernel keeper thread panicked");
            }
        }
    }

    fn send(&self, c: Control) {
        if self.control.send(c).is_ok() {
            if let Err(e) = self.waker.wake() {
                log::error!("cannot wake the kernel keeper: {e}");
            }
        }
    }

    /// `agent-egress down`: remove what a daemon with this config installed.
    pub fn remove_for(config: &Config) -> Result<(), String> {
        let table = netfilter::remove(&config.interception.table);
        let route = routing::remove(&route_plan(config));
        let root = cgroup::cgroup2_root().map_err(|e| e.to_string());
        let paths = root
            .as_ref()
            .map(|root| captured_paths(root, config))
            .unwrap_or_default();
        let connects = root
            .clone()
            .and_then(|root| detach_unlinked_connect_log(&root, paths.iter()));
        // Whatever `auto` decided when the daemon started: detaching none is no error.
        let backstop = if config.interception.backstop != BackstopMode::Off {
            root.map_err(|e| format!("removing the kernel backstop: {e}"))
                .and_then(|root| detach_everywhere(&root, paths.iter()))
        } else {
            Ok(())
        };
        table.map_err(|e| format!("removing table inet {}: {e}", config.interception.table))?;
        route.map_err(|e| format!("removing policy routing: {e}"))?;
        backstop?;
        connects
    }

    pub fn status(config: &Config) -> Result<Status, String> {
        let table = &config.interception.table;
        let root = cgroup::cgroup2_root().map_err(|e| e.to_string())?;
        let members = netfilter::agent_ids(table).map_err(|e| e.to_string())?;
        let configured: Vec<(String, Option<u64>)> = config
            .interception
            .cgroups
            .iter()
            .map(|p| {
                let id = cgroup::resolve(&root, p).ok().flatten().map(|c| c.id);
                (p.clone(), id)
            })
            .collect();
        let delegations: Vec<(String, Delegation)> = configured
            .iter()
            .filter(|(_, id)| id.is_some())
            .filter_map(|(p, _)| {
                let found = cgroup::delegated_ancestor(&root, p).ok().flatten()?;
                Some((p.clone(), found))
            })
            .filter(|(_, d)| !configured.iter().any(|(_, id)| *id == Some(d.ancestor.id)))
            .collect();
        let parents: Vec<cgroup::CgroupRef> = config
            .interception
            .cgroups
            .iter()
            .filter_map(|p| {
                cgroup::agent_only_parent(&root, p, &config.interception.cgroups)
                    .ok()
                    .flatten()
            })
            .collect();
        let in_set = |id: u64| members.as_ref().is_some_and(|m| m.contains(&id));
        let delegated = delegations
            .iter()
            .map(|(agent, d)| DelegatedAgent {
                agent: agent.clone(),
                subtree: d.ancestor.path.clone(),
                writer: d.writer.to_string(),
                handling: config.interception.delegated_subtrees.name(),
                captured: in_set(d.ancestor.id),
            })
            .collect();
        let set = members.as_ref().map(|m| {
            m.iter()
                .map(|id| SetMember {
                    id: *id,
                    path: configured
                        .iter()
                        .find(|(_, configured_id)| *configured_id == Some(*id))
                        .map(|(p, _)| p.clone())
                        .or_else(|| {
                            delegations
                                .iter()
                                .find(|(_, d)| d.ancestor.id == *id)
                                .map(|(_, d)| d.ancestor.path.clone())
                        })
                        .or_else(|| parents.iter().find(|c| c.id == *id).map(|c| c.path.clone())),
                })
                .collect()
        });
        let drops = netfilter::counters(table).ok();
        let listener = config
            .listen
            .addresses
            .iter()
            .map(|ip| {
                let addr = std::net::SocketAddr::new(*ip, config.listen.port);
                (addr.to_string(), listening(addr))
            })
            .collect();
        Ok(Status {
            table: table.clone(),
            table_installed: members.is_some(),
            agents_set: set.unwrap_or_default(),
            configured_cgroups: configured.into_iter().collect(),
            delegated,
            routing_installed: routing::is_installed(&route_plan(config)).unwrap_or(false),
            dropped_packets: drops.as_ref().map_or(0, |d| d.packets),
            dropped_bytes: drops.as_ref().map_or(0, |d| d.bytes),
            listener,
        })
    }
}

/// Whether a socket listens on `addr` (or on the wildcard of its family, at
/// its port), from /proc/net/tcp{,6}: a test connection would be accepted and
/// recorded by the proxy as if an agent had made it.
fn listening(addr: std::net::SocketAddr) -> bool {
    let (file, wanted) = match addr.ip() {
        std::net::IpAddr::V4(a) => ("/proc/net/tcp", proc_net_hex(&a.octets())),
        std::net::IpAddr::V6(a) => ("/proc/net/tcp6", proc_net_hex(&a.octets())),
    };
    let wildcard = "0".repeat(wanted.len());
    let port = format!("{:04X}", addr.port());
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            Some((local.split_once(':')?, state == "0A"))
        })
        .any(|((ip, p), listen)| listen && p == port && (ip == wanted || ip == wildcard))
}

/// An address as /proc/net/tcp writes it: each 32-bit word in host order, in hex.
fn proc_net_hex(octets: &[u8]) -> String {
    octets
        .chunks(4)
        .map(|word| {
            let value = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
            format!("{value:08X}")
        })
        .collect()
}

impl Drop for Capture {
    /// Dropped without a decision (an error path): keep the lockdown.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop(false);
        }
    }
}

#[derive(Serialize)]
pub struct SetMember {
    pub id: u64,
    pub path: Option<String>,
}

#[derive(Serialize)]
pub struct DelegatedAgent {
    pub agent: String,
    /// The topmost ancestor whose `cgroup.procs` `writer` may write.
    pub subtree: String,
    pub writer: String,
    /// `interception.delegated_subtrees`.
    pub handling: &'static str,
    /// Whether the subtree's id is in the agents set.
    pub captured: bool,
}

#[derive(Serialize)]
pub struct Status {
    pub table: String,
    pub table_installed: bool,
    pub agents_set: Vec<SetMember>,
    pub configured_cgroups: BTreeMap<String, Option<u64>>,
    /// Agent cgroups whose processes may move themselves elsewhere in a subtree.
    pub delegated: Vec<DelegatedAgent>,
    pub routing_installed: bool,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    pub listener: BTreeMap<String, bool>,
}

impl Status {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn to_text(&self) -> String {
        let yes = |b: bool| if b { "installed" } else { "MISSING" };
        let mut out = format!(
            "table inet {}: {}\npolicy routing: {}\n",
            self.table,
            yes(self.table_installed),
            yes(self.routing_installed)
        );
        out.push_str("agents set:\n");
        if self.agents_set.is_empty() {
            out.push_str("  (empty)\n");
        }
        for m in &self.agents_set {
            let path = m.path.as_deref().unwrap_or("(not a configured cgroup)");
            out.push_str(&format!("  id {}  {}\n", m.id, path));
        }
        for (path, id) in &self.configured_cgroups {
            if id.is_none() {
                out.push_str(&format!("  {path}: does not exist yet\n"));
            }
        }
        for d in &self.delegated {
            let how = if d.captured {
                "captured whole".to_string()
            } else {
                format!(
                    "NOT captured (delegated_subtrees: {}): its processes may leave the capture",
                    d.handling
                )
            };
            out.push_str(&format!(
                "  {} lies in delegated subtree {} (cgroup.procs writable by {}): {how}\n",
                d.agent, d.subtree, d.writer
            ));
        }
        out.push_str(&format!(
            "dropped (non-DNS UDP and other): {} packets, {} bytes\nlistener:\n",
            self.dropped_packets, self.dropped_bytes
        ));
        for (addr, up) in &self.listener {
            let state = if *up { "accepting" } else { "NOT LISTENING" };
            out.push_str(&format!("  {addr}: {state}\n"));
        }
        out
    }
}

/// cgroup id → (configured path, level).
type Members = BTreeMap<u64, (String, u32)>;

fn apply_changes(
    members: &mut Members,
    changes: Vec<Change>,
) -> (Vec<CgroupMatch>, Vec<CgroupMatch>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for change in changes {
        match change {
            Change::Appeared(c) => {
                added.push(CgroupMatch {
                    id: c.id,
                    level: c.level,
                });
                members.insert(c.id, (c.path, c.level));
            }
            Change::Gone { id, .. } => {
                if let Some((_, level)) = members.remove(&id) {
                    removed.push(CgroupMatch { id, level });
                }
            }
        }
    }
    (added, removed)
}

/// What is captured around the agents' own cgroups: the delegated subtrees they
/// lie in (`interception.delegated_subtrees: "capture"`) and their agent-only
/// parents (see [`cgroup::agent_only_parent`]).
struct Around {
    mode: DelegatedSubtrees,
    /// Agent path → its topmost delegated ancestor, as last reported.
    found: BTreeMap<String, Delegation>,
    /// The cgroups in the agents set besides the agents' own.
    captured: Members,
}

impl Around {
    /// At start: says what it finds, or refuses it (`refuse`).
    fn look(
        mode: DelegatedSubtrees,
        root: &Path,
        configured: &[String],
        members: &Members,
    ) -> Result<Around, String> {
        let found = find_delegations(root, members);
        if mode == DelegatedSubtrees::Refuse && !found.is_empty() {
            let refusals: Vec<String> = found.iter().map(|(a, d)| refusal(a, d)).collect();
            return Err(refusals.join("\n"));
        }
        for (agent, d) in &found {
            report(mode, agent, d);
        }
        let mut captured = subtrees_to_capture(mode, &found);
        captured.extend(agent_only_parents(root, configured, members));
        Ok(Around {
            mode,
            captured,
            found,
        })
    }

    fn with_agents(&self, members: &Members) -> Members {
        let mut all = members.clone();
        all.extend(self.captured.clone());
        all
    }

    /// The captured subtrees with the configured agents inside each.
    fn subtrees(&self, configured: &[String]) -> Vec<CapturedSubtree> {
        self.captured
            .values()
            .map(|(path, _)| CapturedSubtree {
                path: path.clone(),
                agents: configured
                    .iter()
                    .filter(|agent| Path::new(agent.as_str()).starts_with(path))
                    .cloned()
                    .collect(),
            })
            .collect()
    }
}

/// The agent-only parents of the configured cgroups that are not captured
/// already as agents.
fn agent_only_parents(root: &Path, configured: &[String], members: &Members) -> Members {
    configured
        .iter()
        .filter_map(
            |path| match cgroup::agent_only_parent(root, path, configured) {
                Ok(parent) => parent,
                Err(e) => {
                    log::warn!("looking at the parent of cgroup {path}: {e}");
                    None
                }
            },
        )
        .filter(|parent| !members.contains_key(&parent.id))
        .map(|parent| (parent.id, (parent.path, parent.level)))
        .collect()
}

/// Each agent cgroup's topmost delegated ancestor, for those that have one that
/// is not itself an agent's cgroup (captured whole already).
fn find_delegations(root: &Path, members: &Members) -> BTreeMap<String, Delegation> {
    members
        .values()
        .filter_map(|(path, _)| match cgroup::delegated_ancestor(root, path) {
            Ok(found) => Some((path.clone(), found?)),
            Err(e) => {
                log::warn!("looking for a delegated subtree around {path}: {e}");
                None
            }
        })
        .filter(|(_, d)| !members.contains_key(&d.ancestor.id))
        .collect()
}

/// In `capture`, the subtrees found.
fn subtrees_to_capture(mode: DelegatedSubtrees, found: &BTreeMap<String, Delegation>) -> Members {
    if mode != DelegatedSubtrees::Capture {
        return Members::new();
    }
    found
        .values()
        .map(|d| (d.ancestor.id, (d.ancestor.path.clone(), d.ancestor.level)))
        .collect()
}

fn escapable(agent: &str, d: &Delegation) -> String {
    format!(
        "agent cgroup {agent} lies in the delegated subtree {subtree} (its cgroup.procs is writable by {writer}): \
         a process of that user may move itself to any cgroup below {subtree}, out of the capture",
        subtree = d.ancestor.path,
        writer = d.writer
    )
}

fn refusal(agent: &str, d: &Delegation) -> String {
    format!(
        "{}. interception.delegated_subtrees is \"refuse\": either capture the whole subtree \
         (interception.delegated_subtrees: \"capture\"), or run the agent where its user may not write \
         the cgroup.procs of any of its cgroup's ancestors (a system service or slice, outside {})",
        escapable(agent, d),
        d.ancestor.path
    )
}

/// Said once each time an agent cgroup is found in a delegated subtree.
fn report(mode: DelegatedSubtrees, agent: &str, d: &Delegation) {
    match mode {
        DelegatedSubtrees::Capture => log::warn!(
            "{}; capturing all of {} (id {}) with it (interception.delegated_subtrees: \"capture\")",
            escapable(agent, d),
            d.ancestor.path,
            d.ancestor.id
        ),
        DelegatedSubtrees::Refuse => log::error!(
            "{}; until then only {agent} itself is captured",
            refusal(agent, d)
        ),
        DelegatedSubtrees::Ignore => log::warn!(
            "{}; only {agent} itself is captured (interception.delegated_subtrees: \"ignore\")",
            escapable(agent, d)
        ),
    }
}

/// What `down` detaches from: the configured cgroups, their parents (agent-only
/// ones were captured; whether they still are nobody knows with the daemon
/// gone) and, when captured whole, the delegated subtrees they lie in.
fn captured_paths(root: &Path, config: &Config) -> Vec<String> {
    let mut paths = config.interception.cgroups.clone();
    for path in &config.interception.cgroups {
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !paths.iter().any(|p| p == parent) {
                paths.push(parent.to_string());
            }
        }
    }
    if config.interception.delegated_subtrees == DelegatedSubtrees::Capture {
        for path in &config.interception.cgroups {
            if let Ok(Some(d)) = cgroup::delegated_ancestor(root, path) {
                if !paths.contains(&d.ancestor.path) {
                    paths.push(d.ancestor.path);
                }
            }
        }
    }
    paths
}

/// The backstop program if the config wants it: `true` requires it, `auto`
/// does without it where the kernel (or our capabilities) refuse, and says so.
fn load_backstop(config: &Config) -> Result<Option<Backstop>, String> {
    match config.backstop_wanted() {
        Ok(false) => Ok(None),
        Err(why) => {
            log::warn!(
                "kernel backstop off (interception.backstop \"auto\"): {why}, which the agents could not reach through lo only; while the table is repaired (tens of ms) their packets are not captured"
            );
            Ok(None)
        }
        Ok(true) => match (Backstop::load(), config.interception.backstop) {
            (Ok(b), _) => Ok(Some(b)),
            (Err(e), BackstopMode::On) => Err(format!("interception.backstop: {e}")),
            (Err(e), _) => {
                log::warn!("kernel backstop off (interception.backstop \"auto\"): {e}");
                Ok(None)
            }
        },
    }
}

/// Attach the backstop to every member, or to none and an error.
fn attach_everywhere(b: &Backstop, root: &Path, members: &Members) -> Result<(), String> {
    for (path, _) in members.values() {
        if let Err(e) = b.attach(&root.join(path)) {
            let _ = detach_everywhere(root, members.values().map(|(p, _)| p));
            return Err(format!("interception.backstop: {e}"));
        }
    }
    if !members.is_empty() {
        log::info!(
            "kernel backstop on {} cgroup(s): their packets leave only through lo (ifindex {})",
            members.len(),
            b.lo_ifindex()
        );
    }
    Ok(())
}

/// Load the connect log into `shared` (once per process) and attach it to
/// every member. Without it, attribution falls back to searching /proc.
fn start_connect_log(shared: &Shared, root: &Path, members: &Members) {
    if shared.connect_log.get().is_none() {
        match ConnectLog::load() {
            Ok(connects) => {
                let _ = shared.connect_log.set(connects);
            }
            Err(e) => {
                log::warn!("{e}; audit records find processes by searching /proc instead");
                return;
            }
        }
    }
    for (path, _) in members.values() {
        attach_connect_log(shared, &root.join(path));
    }
}

fn attach_connect_log(shared: &Shared, dir: &Path) {
    if let Some(connects) = shared.connect_log.get() {
        if let Err(e) = connects.attach(dir) {
            log::warn!("{e}; audit records find its processes by searching /proc instead");
        }
    }
}

/// Detach from these cgroups the connect log a daemon attached before it used
/// links (a running daemon's links go when it exits), as many as can be.
fn detach_unlinked_connect_log<'a>(
    root: &Path,
    paths: impl Iterator<Item = &'a String>,
) -> Result<(), String> {
    detach_from_all(root, paths, connect_log::detach_unlinked)
}

/// Detach the backstop from these configured cgroups, as many as can be.
fn detach_everywhere<'a>(
    root: &Path,
    paths: impl Iterator<Item = &'a String>,
) -> Result<(), String> {
    detach_from_all(root, paths, backstop::detach)
}

/// `detach` on every cgroup, going on past failures; every failure said.
fn detach_from_all<'a>(
    root: &Path,
    paths: impl Iterator<Item = &'a String>,
    detach: fn(&Path) -> Result<usize, BpfError>,
) -> Result<(), String> {
    let errors: Vec<String> = paths
        .filter_map(|p| detach(&root.join(p)).err())
        .map(|e| format!("removing {e}"))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn member_list(members: &Members) -> Vec<CgroupMatch> {
    members
        .iter()
        .map(|(id, (_, level))| CgroupMatch {
            id: *id,
            level: *level,
        })
        .collect()
}

struct Keeper {
    poll: Poll,
    root: PathBuf,
    configured: Vec<String>,
    members: Members,
    around: Around,
    plan: TablePlan,
    route: RoutePlan,
    watcher: Watcher,
    table_monitor: TableMonitor,
    rule_monitor: RuleMonitor,
    shared: Arc<Shared>,
    drops: DropReport,
    backstop: Option<Backstop>,
}

/// What the last drop report covered, so the next one says what is new.
#[derive(Default)]
struct DropReport {
    total: u64,
    by_destination: HashMap<std::net::SocketAddr, u64>,
    next: Option<Instant>,
}

impl Keeper {
    fn register(&mut self) -> std::io::Result<()> {
        let registry = self.poll.registry();
        let table_fd = self.table_monitor.as_raw_fd();
        let rule_fd = self.rule_monitor.as_raw_fd();
        let cgroup_fd = self.watcher.as_raw_fd();
        registry.register(&mut SourceFd(&table_fd), TABLE_EVENTS, Interest::READABLE)?;
        registry.register(&mut SourceFd(&rule_fd), RULE_EVENTS, Interest::READABLE)?;
        registry.register(&mut SourceFd(&cgroup_fd), CGROUP_EVENTS, Interest::READABLE)
    }

    fn run(mut self, control: mpsc::Receiver<Control>) {
        let mut events = Events::with_capacity(16);
        let mut next_periodic = Instant::now() + PERIODIC;
        loop {
            let timeout = next_periodic.saturating_duration_since(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("kernel keeper: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    TABLE_EVENTS => self.on_table_events(),
                    RULE_EVENTS => self.on_rule_events(),
                    CGROUP_EVENTS => self.on_cgroup_events(),
                    _ => {}
                }
            }
            while let Ok(c) = control.try_recv() {
                match c {
                    Control::Update(config) => self.update(&config),
                    Control::Stop { remove } => {
                        if remove {
                            self.remove();
                        }
                        return;
                    }
                }
            }
            if Instant::now() >= next_periodic {
                self.ensure_routing();
                // Ownership changes and processes joining a parent send no
                // inotify event.
                self.look_around();
                self.publish_agents();
                self.report_drops();
                next_periodic = Instant::now() + PERIODIC;
            }
        }
    }

    fn on_table_events(&mut self) {
        match self.table_monitor.read_events() {
            Ok(false) => {}
            Ok(true) => {
                let started = Instant::now();
                self.plan.cgroups = member_list(&self.captured());
                match netfilter::install(&self.plan) {
                    Ok(()) => log::warn!(
                        "table inet {} was deleted or flushed: re-installed in {:?}",
                        self.plan.table,
                        started.elapsed()
                    ),
                    Err(e) => log::error!(
                        "table inet {} was deleted and cannot be re-installed: {e}",
                        self.plan.table
                    ),
                }
            }
            Err(e) => log::error!("reading nftables events: {e}"),
        }
    }

    fn on_rule_events(&mut self) {
        match self.rule_monitor.read_events() {
            Ok(false) => {}
            Ok(true) => self.ensure_routing(),
            Err(e) => log::error!("reading routing events: {e}"),
        }
    }

    fn ensure_routing(&mut self) {
        if routing::is_installed(&self.route).unwrap_or(false) {
            return;
        }
        let started = Instant::now();
        match routing::install(&self.route) {
            Ok(()) => log::warn!(
                "policy routing (fwmark {:#x} table {}) was removed: re-installed in {:?}",
                self.route.mark,
                self.route.table,
                started.elapsed()
            ),
            Err(e) => log::error!("policy routing was removed and cannot be re-installed: {e}"),
        }
    }

    fn on_cgroup_events(&mut self) {
        let (added, removed) = apply_changes(&mut self.members, self.watcher.poll_changes());
        if !added.is_empty() {
            if let Err(e) = netfilter::add_cgroups(&self.plan.table, &added) {
                log::error!("adding cgroups to the agents set: {e}");
            }
        }
        if !removed.is_empty() {
            if let Err(e) = netfilter::remove_cgroups(&self.plan.table, &removed) {
                log::error!("removing cgroups from the agents set: {e}");
            }
        }
        for m in &added {
            if let Some((path, _)) = self.members.get(&m.id) {
                log::info!("cgroup {path} (id {}) captured", m.id);
                attach_connect_log(&self.shared, &self.root.join(path));
                self.attach_backstop(path);
            }
        }
        self.look_around();
        self.publish_agents();
    }

    /// What is captured around the agent cgroups, looked at again: new
    /// delegations are said, and the captured subtrees and parents follow.
    fn look_around(&mut self) {
        let found = find_delegations(&self.root, &self.members);
        for (agent, d) in &found {
            if self.around.found.get(agent) != Some(d) {
                report(self.around.mode, agent, d);
            }
        }
        let mut wanted = subtrees_to_capture(self.around.mode, &found);
        wanted.extend(agent_only_parents(
            &self.root,
            &self.configured,
            &self.members,
        ));
        self.around.found = found;
        let matches = |from: &Members, not_in: &Members| -> Vec<CgroupMatch> {
            from.iter()
                .filter(|(id, _)| !not_in.contains_key(id))
                .map(|(id, (_, level))| CgroupMatch {
                    id: *id,
                    level: *level,
                })
                .collect()
        };
        let released = matches(&self.around.captured, &wanted);
        let taken = matches(&wanted, &self.around.captured);
        if released.is_empty() && taken.is_empty() {
            return;
        }
        for (id, (path, _)) in &wanted {
            if !self.around.captured.contains_key(id) {
                log::info!("cgroup {path} (id {id}) captured around the agents");
            }
        }
        for (id, (path, _)) in &self.around.captured {
            if !wanted.contains_key(id) {
                log::info!("cgroup {path} (id {id}) no longer captured around the agents");
            }
        }
        let before = self.member_paths();
        // Taken before released: no moment with neither in the set.
        if let Err(e) = netfilter::add_cgroups(&self.plan.table, &taken) {
            log::error!("adding cgroups around the agents to the agents set: {e}");
        }
        if let Err(e) = netfilter::remove_cgroups(&self.plan.table, &released) {
            log::error!("removing cgroups around the agents from the agents set: {e}");
        }
        self.around.captured = wanted;
        self.update_connect_log(&before);
        self.update_backstop(self.backstop.is_some(), &before);
    }

    /// The agents' cgroups and the subtrees captured around them.
    fn captured(&self) -> Members {
        self.around.with_agents(&self.members)
    }

    fn update(&mut self, config: &Config) {
        let before = self.member_paths();
        if config.interception.delegated_subtrees != self.around.mode {
            self.around.mode = config.interception.delegated_subtrees;
            // Said again, as the new setting handles it.
            self.around.found.clear();
        }
        if config.interception.cgroups != self.configured {
            match Watcher::new(&self.root, config.interception.cgroups.iter().cloned()) {
                Ok(mut w) => {
                    let registry = self.poll.registry();
                    let _ = registry.deregister(&mut SourceFd(&self.watcher.as_raw_fd()));
                    self.members.clear();
                    apply_changes(&mut self.members, w.poll_changes());
                    if let Err(e) = registry.register(
                        &mut SourceFd(&w.as_raw_fd()),
                        CGROUP_EVENTS,
                        Interest::READABLE,
                    ) {
                        log::error!("watching the new cgroups: {e}");
                    }
                    self.watcher = w;
                    self.configured = config.interception.cgroups.clone();
                }
                Err(e) => log::error!("watching the new cgroups: {e}; keeping the old ones"),
            }
        }
        self.look_around();
        let plan = table_plan(config, member_list(&self.captured()));
        if plan != self.plan {
            match netfilter::install(&plan) {
                Ok(()) => self.plan = plan,
                Err(e) => log::error!("re-installing the table for the new config: {e}"),
            }
        }
        self.update_backstop(config.backstop_wanted().unwrap_or(false), &before);
        self.update_connect_log(&before);
        self.publish_agents();
    }

    /// After a reload: the connect log on every member, off released cgroups.
    fn update_connect_log(&self, before: &[String]) {
        let now = self.member_paths();
        if let Some(connects) = self.shared.connect_log.get() {
            for released in before.iter().filter(|p| !now.contains(p)) {
                connects.detach(&self.root.join(released));
            }
        }
        for path in &now {
            attach_connect_log(&self.shared, &self.root.join(path));
        }
    }

    /// The agents' dropped non-TCP traffic since the last report: one log
    /// line, and an audit record per destination that had new drops.
    fn report_drops(&mut self) {
        let now = Instant::now();
        if self.drops.next.is_some_and(|t| now < t) {
            return;
        }
        let counters = match netfilter::counters(&self.plan.table) {
            Ok(c) => c,
            Err(e) => {
                log::debug!("reading drop counters: {e}");
                return;
            }
        };
        // A re-installed table starts its counters again from zero.
        let new_total = counters.packets.saturating_sub(self.drops.total);
        self.drops.total = counters.packets;
        if new_total == 0 {
            return;
        }
        self.drops.next = Some(now + DROP_REPORT_INTERVAL);
        let mut fresh: Vec<(std::net::SocketAddr, u64)> = counters
            .by_udp_destination
            .iter()
            .map(|d| {
                let seen = self.drops.by_destination.get(&d.addr).copied().unwrap_or(0);
                (d.addr, d.packets.saturating_sub(seen))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        fresh.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        self.drops.by_destination = counters
            .by_udp_destination
            .iter()
            .map(|d| (d.addr, d.packets))
            .collect();
        let named: Vec<String> = fresh
            .iter()
            .take(DROP_REPORT_DESTINATIONS)
            .map(|(a, n)| format!("{a} ×{n}"))
            .collect();
        log::warn!(
            "dropped {new_total} non-TCP packet(s) from agents (UDP by destination: {})",
            if named.is_empty() {
                "none".into()
            } else {
                named.join(", ")
            }
        );
        for (addr, packets) in fresh.into_iter().take(DROP_REPORT_DESTINATIONS) {
            self.shared.audit.submit(
                Record {
                    event: Event::Drops,
                    dst: addr.to_string(),
                    proto: Proto::Udp,
                    verdict: Verdict::Block,
                    dropped: Some(packets),
                    ..Record::default()
                }
                .into(),
            );
        }
    }

    fn member_paths(&self) -> Vec<String> {
        self.captured().into_values().map(|(p, _)| p).collect()
    }

    fn attach_backstop(&self, path: &str) {
        if let Some(b) = &self.backstop {
            if let Err(e) = b.attach(&self.root.join(path)) {
                log::error!("kernel backstop: {e}");
            }
        }
    }

    /// After a reload: the backstop on (or off) as configured, on every
    /// member, and off the cgroups that are no longer captured.
    fn update_backstop(&mut self, wanted: bool, before: &[String]) {
        if wanted && self.backstop.is_none() {
            match Backstop::load() {
                Ok(b) => self.backstop = Some(b),
                Err(e) => log::error!("interception.backstop: {e}"),
            }
        }
        let now = self.member_paths();
        if self.backstop.is_some() {
            let released = before.iter().filter(|p| !wanted || !now.contains(p));
            if let Err(e) = detach_everywhere(&self.root, released) {
                log::error!("{e}");
            }
        }
        if !wanted {
            self.backstop = None;
        }
        for path in &now {
            self.attach_backstop(path);
        }
    }

    fn remove(&mut self) {
        // Stop listening first: our own removal is not an attack to repair.
        if let Err(e) = routing::remove(&self.route) {
            log::error!("removing policy routing: {e}");
        }
        if let Err(e) = netfilter::remove(&self.plan.table) {
            log::error!("removing table inet {}: {e}", self.plan.table);
        }
        if self.backstop.is_some() {
            if let Err(e) = detach_everywhere(&self.root, self.member_paths().iter()) {
                log::error!("{e}");
            }
        }
        // The connect log's links close with this process.
    }

    /// Map every cgroup below the captured ones to its agent, so the proxy
    /// can tell which agent a socket belongs to from its cgroup id.
    fn publish_agents(&self) {
        let mut cgroups = Vec::new();
        for (id, (path, _)) in self.captured() {
            walk_descendants(&self.root, &path, &mut cgroups);
            cgroups.push((id, path));
        }
        let agents = self.members.values().map(|(p, _)| p.clone()).collect();
        self.shared.agents.replace(
            &self.root,
            agents,
            self.around.subtrees(&self.configured),
            cgroups,
        );
    }
}

/// (id, path relative to `root`) of every cgroup below `root/rel`, bounded.
fn walk_descendants(root: &Path, rel: &str, found: &mut Vec<(u64, String)>) {
    use std::os::unix::fs::MetadataExt;
    let mut stack = vec![rel.to_string()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&d)) else {
            continue;
        };
        for entry in entries.flatten() {
            if found.len() >= MAX_INDEXED_CGROUPS {
                return;
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                let path = format!("{d}/{}", entry.file_name().to_string_lossy());
                found.push((meta.ino(), path.clone()));
                stack.push(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_seen_without_connecting_to_it() {
        for local in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(local) else {
                continue; // no IPv6 here
            };
            let addr = listener.local_addr().unwrap();
            assert!(listening(addr), "{addr}");
            drop(listener);
            assert!(!listening(addr), "{addr} after close");
        }
    }
}
