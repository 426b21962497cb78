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

mod around;
mod error;
mod install;
mod keeper;
mod programs;
mod status;

pub use error::CaptureError;
pub use status::{DelegatedAgent, SetMember, Status};

use crate::agent_index::AgentIndex;
use crate::audit::AuditLog;
use crate::cgroup::{self, Change, Watcher};
use crate::config::{BackstopMode, Config};
use crate::connect_log::ConnectLog;
use crate::netfilter::{self, CgroupMatch, TableMonitor, TablePlan};
use crate::routing::{self, RoutePlan, RuleMonitor};
use around::{captured_paths, Around};
use install::Installing;
use keeper::{DropReport, Keeper, CONTROL};
use mio::{Poll, Waker};
use programs::{detach_everywhere, detach_unlinked_connect_log, load_backstop, start_connect_log};
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

pub(super) enum Control {
    Update(Box<Config>),
    Stop { remove: bool },
}

/// What the capture hands on while it runs, to whoever attributes connections.
pub struct Handles {
    /// Kept current with the captured cgroups and everything below them.
    pub agents: Arc<AgentIndex>,
    /// Set once the kernel takes the program.
    pub connect_log: Arc<OnceLock<ConnectLog>>,
    /// Where the agents' dropped packets are reported.
    pub audit: AuditLog,
}

pub struct Capture {
    control: mpsc::Sender<Control>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

pub(super) fn table_plan(config: &Config, members: Vec<CgroupMatch>) -> TablePlan {
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

pub(super) fn route_plan(config: &Config) -> RoutePlan {
    RoutePlan {
        mark: config.interception.mark,
        table: config.interception.route_table,
        priority: config.interception.rule_priority,
    }
}

impl Capture {
    /// Install everything, or nothing and an error that says what is missing.
    pub fn start(config: &Config, handles: Handles) -> Result<Capture, CaptureError> {
        netfilter::check_kernel_support().map_err(CaptureError::KernelSupport)?;
        let backstop = load_backstop(config)?;
        let root = cgroup::cgroup2_root().map_err(CaptureError::Cgroup)?;
        let mut watcher = Watcher::new(&root, config.interception.cgroups.iter().cloned())
            .map_err(CaptureError::WatchingCgroups)?;
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
        let mut installing = Installing::table_and_routing(&plan, &route)?;
        let table_monitor = TableMonitor::new(&plan.table).map_err(CaptureError::WatchingTable)?;
        let rule_monitor = RuleMonitor::new(&route).map_err(CaptureError::WatchingRules)?;
        if let Some(b) = &backstop {
            installing.backstop(b, &root, &around.fenced(&members))?;
        }
        start_connect_log(&handles.connect_log, &root, &captured);
        let poll = Poll::new().map_err(CaptureError::Keeper)?;
        let waker = Arc::new(Waker::new(poll.registry(), CONTROL).map_err(CaptureError::Keeper)?);
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
            handles,
            drops: DropReport::default(),
            backstop,
        };
        keeper.publish_agents();
        keeper.register().map_err(CaptureError::WatchingKernel)?;
        let (control, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kernel-keeper".into())
            .spawn(move || keeper.run(rx))
            .map_err(CaptureError::Keeper)?;
        installing.keep();
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
    pub fn remove_for(config: &Config) -> Result<(), CaptureError> {
        let table = netfilter::remove(&config.interception.table);
        let route = routing::remove(&route_plan(config));
        // Whatever `auto` decided when the daemon started: detaching none is no error.
        let backstop_on = config.interception.backstop != BackstopMode::Off;
        let (backstop, connects) = match cgroup::cgroup2_root() {
            Ok(root) => {
                let paths = captured_paths(&root, config);
                let backstop = if backstop_on {
                    detach_everywhere(&root, paths.iter())
                } else {
                    Ok(())
                };
                (backstop, detach_unlinked_connect_log(&root, paths.iter()))
            }
            // Said once: as the backstop's when it is on, which is said first.
            Err(e) if backstop_on => (Err(CaptureError::RemoveBackstop(e)), Ok(())),
            Err(e) => (Ok(()), Err(CaptureError::Cgroup(e))),
        };
        table.map_err(|source| CaptureError::RemoveTable {
            table: config.interception.table.clone(),
            source: Box::new(source),
        })?;
        route.map_err(CaptureError::RemoveRouting)?;
        backstop?;
        connects
    }

    pub fn status(config: &Config) -> Result<Status, CaptureError> {
        status::read(config)
    }
}

impl Drop for Capture {
    /// Dropped without a decision (an error path): keep the lockdown.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop(false);
        }
    }
}

/// cgroup id → (configured path, level).
pub(super) type Members = BTreeMap<u64, (String, u32)>;

pub(super) fn apply_changes(
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

pub(super) fn member_list(members: &Members) -> Vec<CgroupMatch> {
    members
        .iter()
        .map(|(id, (_, level))| CgroupMatch {
            id: *id,
            level: *level,
        })
        .collect()
}
