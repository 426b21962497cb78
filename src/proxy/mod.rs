//! The proxy: TPROXY listeners, one mio event loop per worker thread, and the
//! per-connection state machine that sniffs, decides, dials and relays.

mod listener;
mod relay;
mod session;
mod worker;

use crate::audit::{AuditLog, Record};
use crate::cgroup;
use crate::config::Config;
use crate::connect_log::ConnectLog;
use crate::policy::Policy;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;

/// One config and its compiled policy. A connection keeps the one it was
/// accepted under, so a reload never changes an established connection.
pub struct Runtime {
    pub config: Config,
    pub policy: Policy,
}

impl Runtime {
    pub fn new(config: Config) -> Arc<Runtime> {
        let policy = Policy::compile(&config);
        Arc::new(Runtime { config, policy })
    }
}

/// Which configured agent (cgroup path) a socket's cgroup id belongs to; kept
/// current by whoever watches the cgroups, and asked of the kernel for a cgroup
/// made since (an agent unit that connects as soon as it starts).
#[derive(Default)]
pub struct AgentIndex {
    ids: RwLock<HashMap<u64, String>>,
    /// The configured cgroups that exist, and the cgroup2 root they are under.
    agents: RwLock<(PathBuf, Vec<String>)>,
}

impl AgentIndex {
    pub fn replace(&self, root: &Path, agents: Vec<String>, ids: HashMap<u64, String>) {
        if let Ok(mut guard) = self.agents.write() {
            *guard = (root.to_path_buf(), agents);
        }
        if let Ok(mut guard) = self.ids.write() {
            *guard = ids;
        }
    }

    pub fn agent_of(&self, cgroup_id: u64) -> Option<String> {
        if let Some(agent) = self.ids.read().ok()?.get(&cgroup_id) {
            return Some(agent.clone());
        }
        let agent = {
            let guard = self.agents.read().ok()?;
            let (root, agents) = &*guard;
            let under: Vec<&str> = agents.iter().map(String::as_str).collect();
            let path = cgroup::path_of_id(root, &under, cgroup_id)?;
            cgroup::innermost(agents, &path)?.to_string()
        };
        if let Ok(mut guard) = self.ids.write() {
            guard.insert(cgroup_id, agent.clone());
        }
        Some(agent)
    }
}

/// Counters a status report or a test can read.
#[derive(Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub refused_over_limit: AtomicU64,
    pub active: AtomicU64,
}

/// Verdicts per host, for the short report `exec` prints at the end.
#[derive(Default, Clone)]
pub struct Summary {
    by_host: BTreeMap<(String, &'static str), u64>,
}

impl Summary {
    fn add(&mut self, record: &Record) {
        let host = record.host.clone().unwrap_or_else(|| record.dst.clone());
        *self.by_host.entry((host, record.verdict)).or_default() += 1;
    }

    pub fn render(&self) -> String {
        if self.by_host.is_empty() {
            return "agent-egress: no connections\n".into();
        }
        let mut out = String::from("agent-egress: connections by host\n");
        for ((host, verdict), n) in &self.by_host {
            out.push_str(&format!("  {verdict:11} {n:5}  {host}\n"));
        }
        out
    }
}

/// What the worker threads share.
pub struct Shared {
    runtime: RwLock<Arc<Runtime>>,
    pub agents: AgentIndex,
    pub audit: AuditLog,
    pub stats: Stats,
    /// The cgroup2 mount, for finding an agent's processes; None without cgroup2.
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Which pid connected each agent socket; set by the capture when the
    /// kernel takes the programs.
    pub connect_log: OnceLock<ConnectLog>,
    stop: AtomicBool,
    summary_enabled: AtomicBool,
    summary: Mutex<Summary>,
}

impl Shared {
    pub fn enable_summary(&self) {
        self.summary_enabled.store(true, Ordering::SeqCst);
    }

    pub fn summary(&self) -> Summary {
        match self.summary.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn count(&self, record: &Record) {
        if !self.summary_enabled.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(mut s) = self.summary.lock() {
            s.add(record);
        }
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        match self.runtime.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The running proxy: its workers and the handle to reload or stop them.
pub struct Proxy {
    shared: Arc<Shared>,
    wakers: Vec<Arc<mio::Waker>>,
    workers: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Bind the listeners (all of them, before any worker runs, so a bad
    /// address fails the start) and start the workers.
    pub fn start(runtime: Arc<Runtime>, audit: AuditLog) -> io::Result<Proxy> {
        let workers = runtime.config.workers();
        let addrs: Vec<SocketAddr> = runtime
            .config
            .listen
            .addresses
            .iter()
            .map(|ip| SocketAddr::new(*ip, runtime.config.listen.port))
            .collect();
        let mut sockets = Vec::with_capacity(workers);
        for _ in 0..workers {
            let listeners = addrs
                .iter()
                .map(|a| listener::transparent_listener(*a))
                .collect::<io::Result<Vec<_>>>()?;
            sockets.push(listeners);
        }
        let shared = Arc::new(Shared {
            runtime: RwLock::new(runtime),
            agents: AgentIndex::default(),
            audit,
            stats: Stats::default(),
            cgroup_root: crate::cgroup::cgroup2_root().ok(),
            connect_log: OnceLock::new(),
            stop: AtomicBool::new(false),
            summary_enabled: AtomicBool::new(false),
            summary: Mutex::new(Summary::default()),
        });
        let mut wakers = Vec::new();
        let mut handles = Vec::new();
        for (i, listeners) in sockets.into_iter().enumerate() {
            let mut w = worker::Worker::new(shared.clone(), listeners)?;
            wakers.push(w.waker());
            let handle = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || w.run())?;
            handles.push(handle);
        }
        Ok(Proxy {
            shared,
            wakers,
            workers: handles,
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// New connections use `runtime` from now on; open ones keep theirs.
    pub fn reload(&self, runtime: Arc<Runtime>) {
        match self.shared.runtime.write() {
            Ok(mut r) => *r = runtime,
            Err(poisoned) => *poisoned.into_inner() = runtime,
        }
        self.wake_all();
    }

    fn wake_all(&self) {
        for w in &self.wakers {
            if let Err(e) = w.wake() {
                log::warn!("cannot wake a worker: {e}");
            }
        }
    }

    /// Stop accepting, end every open connection with an audit record, and
    /// wait for the workers.
    pub fn stop(self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.wake_all();
        for h in self.workers {
            if h.join().is_err() {
                log::error!("a worker thread panicked");
            }
        }
    }
}
