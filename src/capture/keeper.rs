//! The keeper thread: repairs the table and the routing when someone removes
//! them, follows the agents' cgroups, and reports the agents' dropped packets.

use super::around::{
    agent_only_parents, around_agents, find_delegations, report, subtrees_to_capture, Around,
};
use super::programs::{attach_connect_log, detach_everywhere};
use super::{apply_changes, member_list, table_plan, Control, Handles, Members};
use crate::audit::{Event, Proto, Record, Verdict};
use crate::backstop::Backstop;
use crate::cgroup::Watcher;
use crate::config::Config;
use crate::netfilter::{self, CgroupMatch, TableMonitor, TablePlan};
use crate::routing::{self, RoutePlan, RuleMonitor};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TABLE_EVENTS: Token = Token(0);
const RULE_EVENTS: Token = Token(1);
const CGROUP_EVENTS: Token = Token(2);
pub(super) const CONTROL: Token = Token(3);
/// Checks that need no event (routes lost with a downed `lo` send none).
const PERIODIC: Duration = Duration::from_secs(2);
/// Drops are summarised at most this often (log line and audit records).
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Destinations named per drop report, most dropped first.
const DROP_REPORT_DESTINATIONS: usize = 32;
/// Bound on the cgroup tree walk that maps socket cgroups to agents.
const MAX_INDEXED_CGROUPS: usize = 65_536;

pub(super) struct Keeper {
    pub(super) poll: Poll,
    pub(super) root: PathBuf,
    pub(super) configured: Vec<String>,
    pub(super) members: Members,
    pub(super) around: Around,
    pub(super) plan: TablePlan,
    pub(super) route: RoutePlan,
    pub(super) watcher: Watcher,
    pub(super) table_monitor: TableMonitor,
    pub(super) rule_monitor: RuleMonitor,
    pub(super) handles: Handles,
    pub(super) drops: DropReport,
    pub(super) backstop: Option<Backstop>,
}

/// What the last drop report covered, so the next one says what is new.
#[derive(Default)]
pub(super) struct DropReport {
    total: u64,
    by_destination: HashMap<std::net::SocketAddr, u64>,
    next: Option<Instant>,
}

impl Keeper {
    pub(super) fn register(&mut self) -> std::io::Result<()> {
        let registry = self.poll.registry();
        let table_fd = self.table_monitor.as_raw_fd();
        let rule_fd = self.rule_monitor.as_raw_fd();
        let cgroup_fd = self.watcher.as_raw_fd();
        registry.register(&mut SourceFd(&table_fd), TABLE_EVENTS, Interest::READABLE)?;
        registry.register(&mut SourceFd(&rule_fd), RULE_EVENTS, Interest::READABLE)?;
        registry.register(&mut SourceFd(&cgroup_fd), CGROUP_EVENTS, Interest::READABLE)
    }

    pub(super) fn run(mut self, control: mpsc::Receiver<Control>) {
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
                attach_connect_log(&self.handles.connect_log, &self.root.join(path));
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
        let (wanted, parents) = around_agents(
            subtrees_to_capture(self.around.mode, &found),
            agent_only_parents(&self.root, &self.configured, &self.members),
        );
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
            self.around.parents = parents;
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
        let fenced_before = self.fenced_paths();
        // Taken before released: no moment with neither in the set.
        if let Err(e) = netfilter::add_cgroups(&self.plan.table, &taken) {
            log::error!("adding cgroups around the agents to the agents set: {e}");
        }
        if let Err(e) = netfilter::remove_cgroups(&self.plan.table, &released) {
            log::error!("removing cgroups around the agents from the agents set: {e}");
        }
        self.around.captured = wanted;
        self.around.parents = parents;
        self.update_connect_log(&before);
        self.update_backstop(self.backstop.is_some(), &fenced_before);
    }

    /// The agents' cgroups and the subtrees captured around them.
    fn captured(&self) -> Members {
        self.around.with_agents(&self.members)
    }

    fn update(&mut self, config: &Config) {
        let before = self.member_paths();
        let fenced_before = self.fenced_paths();
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
        self.update_backstop(config.backstop_wanted().unwrap_or(false), &fenced_before);
        self.update_connect_log(&before);
        self.publish_agents();
    }

    /// After a reload: the connect log on every member, off released cgroups.
    fn update_connect_log(&self, before: &[String]) {
        let now = self.member_paths();
        // Attached before detached: a parent released keeps logging until its
        // agents log themselves.
        for path in &now {
            attach_connect_log(&self.handles.connect_log, &self.root.join(path));
        }
        if let Some(connects) = self.handles.connect_log.get() {
            for released in before.iter().filter(|p| !now.contains(p)) {
                connects.detach(&self.root.join(released));
            }
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
            self.handles.audit.submit(
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

    /// The cgroups the backstop is on.
    fn fenced_paths(&self) -> Vec<String> {
        self.around
            .fenced(&self.members)
            .into_values()
            .map(|(p, _)| p)
            .collect()
    }

    fn attach_backstop(&self, path: &str) {
        if let Some(b) = &self.backstop {
            if let Err(e) = b.attach(&self.root.join(path)) {
                log::error!("kernel backstop: {e}");
            }
        }
    }

    /// After a reload: the backstop on (or off) as configured, on every
    /// fenced cgroup, and off those no longer fenced (`before`: the fenced
    /// paths before the change).
    fn update_backstop(&mut self, wanted: bool, before: &[String]) {
        if wanted && self.backstop.is_none() {
            match Backstop::load() {
                Ok(b) => self.backstop = Some(b),
                Err(e) => log::error!("interception.backstop: {e}"),
            }
        }
        let now = self.fenced_paths();
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
            if let Err(e) = detach_everywhere(&self.root, self.fenced_paths().iter()) {
                log::error!("{e}");
            }
        }
        // The connect log's links close with this process.
    }

    /// Map every cgroup below the captured ones to its agent, so the proxy
    /// can tell which agent a socket belongs to from its cgroup id.
    pub(super) fn publish_agents(&self) {
        let mut cgroups = Vec::new();
        for (id, (path, _)) in self.captured() {
            walk_descendants(&self.root, &path, &mut cgroups);
            cgroups.push((id, path));
        }
        let agents = self.members.values().map(|(p, _)| p.clone()).collect();
        self.handles.agents.replace(
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
