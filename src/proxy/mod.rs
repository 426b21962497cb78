//! The proxy: TPROXY listeners, one mio event loop per worker thread, and the
//! per-connection state machine that sniffs, decides, dials and relays.

mod held;
pub(crate) mod listener;
mod plan;
mod relay;
mod session;
mod timers;
mod worker;

/// For benches/relay/, which measures the splice relay against the kernel's.
#[doc(hidden)]
pub use relay::{shutdown_write, Flow, Pump};

use crate::agent_dns::names::ResolvedNames;
use crate::agent_index::AgentIndex;
use crate::audit::{AuditLog, Record, Verdict};
use crate::config::Config;
use crate::config::Rule;
use crate::connect_log::ConnectLog;
use crate::policy::Policy;
use crate::procinfo::{OwnerQuery, ProcessNeeds, SocketOwner};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// One config and its compiled policy. A connection keeps the one it was
/// accepted under, so a reload never changes an established connection.
pub struct Runtime {
    pub config: Config,
    pub policy: Policy,
}

impl Runtime {
    pub fn new(config: Config) -> Arc<Runtime> {
        Runtime::with_rules(config, &[])
    }

    /// The config with runtime rules (checked against it) asked first.
    pub fn with_rules(config: Config, runtime_rules: &[Rule]) -> Arc<Runtime> {
        let policy = Policy::with_runtime(&config, runtime_rules);
        Arc::new(Runtime { config, policy })
    }
}

/// One live connection, for the control API.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ConnectionInfo {
    pub id: u64,
    pub agent: Option<String>,
    pub uid: Option<u32>,
    pub pid: Option<u32>,
    pub exe: Option<String>,
    pub src: String,
    pub dst: String,
    pub host: Option<String>,
    pub rule: Option<String>,
    pub outbound: String,
    pub verdict: Verdict,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub age_ms: u64,
}

/// What the control API asks of a worker; answered on its next wake-up, so
/// the data path takes no lock for it.
pub enum WorkerRequest {
    Connections(mpsc::Sender<Vec<ConnectionInfo>>),
    /// Close the connection with this id, if the worker has it; say whether.
    Close {
        id: u64,
        why: String,
        reply: mpsc::Sender<bool>,
    },
    /// A supervisor answered this question: its held sessions go on.
    Answered(u64),
}

/// How long the control API waits for a worker's answer.
const WORKER_ANSWER: Duration = Duration::from_secs(2);

/// A cheap, clonable handle on the running proxy: reload it, ask its workers.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
    wakers: Vec<Arc<mio::Waker>>,
    workers: Vec<(mpsc::Sender<WorkerRequest>, Arc<mio::Waker>)>,
}

impl ProxyHandle {
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

    fn ask(&self, request: impl Fn() -> WorkerRequest) {
        for (tx, waker) in &self.workers {
            if tx.send(request()).is_ok() {
                let _ = waker.wake();
            }
        }
    }

    /// Every worker's open connections, oldest first; a worker that does not
    /// answer in time is left out.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let (reply, answers) = mpsc::channel();
        self.ask(|| WorkerRequest::Connections(reply.clone()));
        drop(reply);
        let deadline = std::time::Instant::now() + WORKER_ANSWER;
        let mut all = Vec::new();
        for _ in 0..self.workers.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match answers.recv_timeout(left) {
                Ok(some) => all.extend(some),
                Err(_) => break,
            }
        }
        let ids = all.iter().map(|c| c.id).collect();
        let found: HashMap<u64, crate::procinfo::ProcessInfo> = self
            .shared
            .audit
            .processes(ids, WORKER_ANSWER)
            .into_iter()
            .collect();
        for c in &mut all {
            if let Some(p) = found.get(&c.id) {
                c.pid = Some(p.pid);
                c.exe.clone_from(&p.exe);
            }
        }
        all.sort_by_key(|c| std::cmp::Reverse(c.age_ms));
        all
    }

    /// Wake `workers` (their indices, as the questions keep them) for the
    /// answer to `question`.
    pub fn deliver_answer(&self, question: u64, workers: &[usize]) {
        for (tx, waker) in workers.iter().filter_map(|i| self.workers.get(*i)) {
            if tx.send(WorkerRequest::Answered(question)).is_ok() {
                if let Err(e) = waker.wake() {
                    log::warn!("cannot wake a worker for an answer: {e}");
                }
            }
        }
    }

    /// Close connection `id`; false if no worker has it.
    pub fn close(&self, id: u64, why: &str) -> bool {
        let (reply, answers) = mpsc::channel();
        self.ask(|| WorkerRequest::Close {
            id,
            why: why.to_string(),
            reply: reply.clone(),
        });
        drop(reply);
        let deadline = std::time::Instant::now() + WORKER_ANSWER;
        for _ in 0..self.workers.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match answers.recv_timeout(left) {
                Ok(true) => return true,
                Ok(false) => {}
                Err(_) => break,
            }
        }
        false
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
    by_host: BTreeMap<(String, Verdict), u64>,
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
    /// Kept current by the capture.
    pub agents: Arc<AgentIndex>,
    pub audit: AuditLog,
    pub stats: Stats,
    /// The cgroup2 mount, for finding an agent's processes; None without cgroup2.
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Which pid connected each agent socket; set by the capture when the
    /// kernel takes the programs.
    pub connect_log: Arc<OnceLock<ConnectLog>>,
    /// Which names each agent resolved each address for (the DNS handler's answers).
    pub resolved: ResolvedNames,
    /// The questions in flight (`ask`), answered over the control API.
    pub questions: crate::ask::Questions,
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

    /// What the kernel said of the socket behind a connection (uid, cgroup,
    /// agent) into `record`, and where the audit writer finds its process;
    /// `None` outside every agent.
    /// `needs`: what the policy's rules ask of the process.
    pub fn attribute_connection(
        &self,
        owner: SocketOwner,
        record: &mut Record,
        needs: ProcessNeeds,
    ) -> Option<OwnerQuery> {
        let query = self.attribute(owner, record, ConnectLog::take)?;
        Some(OwnerQuery { needs, ..query })
    }

    /// The same for a DNS query, whose socket may ask again; no rule waits
    /// for its process, which only its record names.
    pub fn attribute_query(&self, owner: SocketOwner, record: &mut Record) -> Option<OwnerQuery> {
        self.attribute(owner, record, ConnectLog::peek)
    }

    fn attribute(
        &self,
        owner: SocketOwner,
        record: &mut Record,
        connector_of: fn(&ConnectLog, u64) -> io::Result<Option<u32>>,
    ) -> Option<OwnerQuery> {
        record.uid = Some(owner.uid);
        record.cgroup_id = owner.cgroup_id;
        let belongs = owner
            .cgroup_id
            .and_then(|id| self.agents.agent_of(id))
            .unwrap_or_default();
        record.agent = belongs.agent;
        record.subtree = belongs.subtree;
        // A process outside its agent's cgroup is searched for where it went.
        let scope = record.subtree.as_ref().or(record.agent.as_ref())?;
        let connector = self.connect_log.get().and_then(|connects| {
            connector_of(connects, owner.cookie)
                .map_err(|e| log::debug!("reading the connect log: {e}"))
                .ok()
                .flatten()
        });
        Some(OwnerQuery {
            owner,
            scope: scope.clone(),
            needs: ProcessNeeds::default(),
            connector,
        })
    }

    /// True once the daemon is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
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
    handle: ProxyHandle,
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
        let questions = crate::ask::Questions::new(audit.clone());
        let shared = Arc::new(Shared {
            runtime: RwLock::new(runtime),
            agents: Arc::default(),
            audit,
            stats: Stats::default(),
            cgroup_root: crate::cgroup::cgroup2_root().ok(),
            connect_log: Arc::default(),
            resolved: ResolvedNames::default(),
            questions,
            stop: AtomicBool::new(false),
            summary_enabled: AtomicBool::new(false),
            summary: Mutex::new(Summary::default()),
        });
        let mut wakers = Vec::new();
        let mut lines = Vec::new();
        let mut handles = Vec::new();
        let dns = &shared.runtime().config.dns;
        if dns.capture {
            let handler = crate::agent_dns::Handler::new(shared.clone(), dns.port)?;
            wakers.push(handler.waker());
            handles.push(
                std::thread::Builder::new()
                    .name("dns".into())
                    .spawn(move || handler.run())?,
            );
        }
        for (i, listeners) in sockets.into_iter().enumerate() {
            let (tx, requests) = mpsc::channel();
            let mut w = worker::Worker::new(shared.clone(), listeners, requests, i)?;
            wakers.push(w.waker());
            lines.push((tx, w.waker()));
            let handle = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || w.run())?;
            handles.push(handle);
        }
        Ok(Proxy {
            handle: ProxyHandle {
                shared,
                wakers,
                workers: lines,
            },
            workers: handles,
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    pub fn handle(&self) -> &ProxyHandle {
        &self.handle
    }

    /// New connections use `runtime` from now on; open ones keep theirs.
    pub fn reload(&self, runtime: Arc<Runtime>) {
        self.handle.reload(runtime);
    }

    /// Stop accepting, end every open connection with an audit record, and
    /// wait for the workers.
    pub fn stop(self) {
        self.handle.shared.stop.store(true, Ordering::SeqCst);
        self.handle.wake_all();
        for h in self.workers {
            if h.join().is_err() {
                log::error!("a worker thread panicked");
            }
        }
    }
}
