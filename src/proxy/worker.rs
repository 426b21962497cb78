//! One event-loop thread: its own listeners (SO_REUSEPORT), sessions, DNS
//! client and socket-owner lookups.

use super::held::Held;
use super::session::{set_linger_zero, Ctx, Readiness, Session, Step};
use super::timers::Timers;
use super::{Runtime, Shared, WorkerRequest};
use crate::audit::{AttributionDone, Event, PendingRecord, Proto, Record};
use crate::cgroup;
use crate::dns::{QueryId, Resolver};
use crate::loopback::Listener;
use crate::procinfo::SockDiag;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tokens above this are the loop's own; below, 2×session (+1 for upstream).
const WAKER: Token = Token(usize::MAX - 1);
const RESOLVER: Token = Token(usize::MAX - 2);
const LISTENER_BASE: usize = usize::MAX - 64;
/// The longest the loop sleeps with no deadline near.
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// How long to wait before polling again after a failed poll.
const POLL_RETRY: Duration = Duration::from_millis(50);
/// How often held refusals are looked at when no wake-up comes.
const HOLD_POLL: Duration = Duration::from_millis(1);
/// How long to stop accepting after running out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub struct Worker {
    poll: Poll,
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    waker: Arc<Waker>,
    sessions: Slab<Session>,
    /// The sessions' deadlines (sniff, resolve, connect, refusal, idle).
    timers: Timers,
    runtime: Arc<Runtime>,
    resolver: Option<Resolver>,
    waiting_dns: HashMap<QueryId, Vec<usize>>,
    sock_diag: Option<SockDiag>,
    /// Work left over from a byte budget, run before sleeping again.
    again: Vec<usize>,
    /// Sessions holding a refusal until their client's process is named.
    holding: Vec<usize>,
    /// Worker threads in all (counted once: `available_parallelism` reads
    /// cgroup files, too slow for every accept).
    workers: usize,
    accept_paused_until: Option<Instant>,
    /// Held so that accept can still take (and refuse) a connection when the
    /// process runs out of fds: close it, accept, reset, reopen.
    spare_fd: Option<OwnedFd>,
    /// The control API's questions, with a wake-up each.
    requests: mpsc::Receiver<WorkerRequest>,
    /// This worker's place among them (a question's answer wakes by it).
    index: usize,
    /// Sessions held for a supervisor's answer (`ask`).
    held: Held,
}

impl Worker {
    pub fn new(
        shared: Arc<Shared>,
        mut listeners: Vec<TcpListener>,
        requests: mpsc::Receiver<WorkerRequest>,
        index: usize,
    ) -> io::Result<Worker> {
        let poll = Poll::new()?;
        for (i, l) in listeners.iter_mut().enumerate() {
            poll.registry()
                .register(l, Token(LISTENER_BASE + i), Interest::READABLE)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let runtime = shared.runtime();
        let sock_diag = SockDiag::open()
            .map_err(|e| log::warn!("socket owner lookups unavailable: {e}"))
            .ok();
        let mut worker = Worker {
            poll,
            shared,
            listeners,
            waker,
            sessions: Slab::new(),
            timers: Timers::default(),
            runtime: runtime.clone(),
            resolver: None,
            waiting_dns: HashMap::new(),
            sock_diag,
            again: Vec::new(),
            holding: Vec::new(),
            workers: runtime.config.workers(),
            accept_paused_until: None,
            spare_fd: open_spare_fd(),
            requests,
            index,
            held: Held::default(),
        };
        worker.rebuild_resolver(None);
        Ok(worker)
    }

    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    pub fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.sleep_for(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("event loop: {e}");
                    std::thread::sleep(POLL_RETRY);
                }
                continue;
            }
            if self.shared.stopping() {
                break;
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => {
                        self.follow_runtime();
                        self.answer_requests();
                    }
                    RESOLVER => self.on_dns_readable(),
                    Token(t) if t >= LISTENER_BASE => self.accept(t - LISTENER_BASE),
                    Token(t) => {
                        if let Some(session) = self.sessions.get_mut(t / 2) {
                            session.note_readiness(Readiness::of(event, t % 2 == 1));
                        }
                        self.on_session_event(t / 2);
                    }
                }
            }
            for key in std::mem::take(&mut self.again) {
                self.on_session_event(key);
            }
            self.poll_holds();
            self.on_deadlines(Instant::now());
            // Whatever accepted connections this turn asked for, at once.
            self.shared.audit.wake_for_early();
        }
        self.shutdown();
    }

    /// At once with work left over; else until the next deadline (a
    /// session's, the resolver's, the end of an accept pause), capped, and
    /// briefly while a refusal is held.
    fn sleep_for(&self, now: Instant) -> Duration {
        if !self.again.is_empty() {
            return Duration::ZERO;
        }
        let next = [
            self.timers.next(),
            self.resolver.as_ref().and_then(Resolver::next_deadline),
            self.accept_paused_until,
        ]
        .into_iter()
        .flatten()
        .min();
        let until_next = next.map_or(MAX_SLEEP, |at| at.saturating_duration_since(now));
        if self.holding.is_empty() {
            until_next.min(MAX_SLEEP)
        } else {
            // Holds are a few milliseconds: look again soon.
            until_next.min(HOLD_POLL)
        }
    }

    fn ctx_parts(&mut self, key: usize) -> (Ctx<'_>, &mut Slab<Session>) {
        let ctx = Ctx {
            registry: self.poll.registry(),
            resolver: self.resolver.as_mut(),
            now: Instant::now(),
            upstream_token: upstream_token(key),
            resolved: &self.shared.resolved,
        };
        (ctx, &mut self.sessions)
    }

    fn on_session_event(&mut self, key: usize) {
        self.step(key, Session::on_event);
    }

    /// One step of session `key` in the loop's context, then what it asks for.
    fn step(&mut self, key: usize, step: impl FnOnce(&mut Session, &mut Ctx) -> Step) {
        let (mut ctx, sessions) = self.ctx_parts(key);
        let Some(session) = sessions.get_mut(key) else {
            return;
        };
        let now = ctx.now;
        let next = step(session, &mut ctx);
        self.after(key, next, now);
    }

    /// What a step asks for, then the session's next deadline on the timers.
    fn after(&mut self, key: usize, mut step: Step, now: Instant) {
        if let Some(session) = self.sessions.get_mut(key) {
            if !matches!(step, Step::Close) {
                let registry = self.poll.registry();
                if let Err(e) =
                    session.watch_writes(registry, client_token(key), upstream_token(key))
                {
                    session.record.error = Some(format!("watching the connection: {e}"));
                    step = Step::Close;
                }
            }
            if session.take_decided() {
                let audit = &self.shared.audit;
                let streamed = audit.events().watched();
                if self.runtime.config.audit.start_events || streamed {
                    let mut record = session.record.clone();
                    record.event = Event::Start;
                    if self.runtime.config.audit.start_events {
                        audit.submit(record.into());
                    } else {
                        audit.stream(record);
                    }
                }
            }
        }
        match step {
            Step::Continue => {}
            Step::Again => self.again.push(key),
            Step::AwaitDns(id) => self.waiting_dns.entry(id).or_default().push(key),
            Step::Hold => {
                if !self.holding.contains(&key) {
                    self.holding.push(key);
                    self.shared.audit.hurry();
                }
            }
            Step::Close => self.close(key),
            Step::Ask => self.on_ask(key, now),
        }
        if let Some(at) = self.sessions.get(key).and_then(|s| s.next_deadline(now)) {
            self.timers.schedule(key, at);
        }
    }

    /// A session asks, or its question's deadline came: hold it, or let it
    /// take its outcome.
    fn on_ask(&mut self, key: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let questions = &self.shared.questions;
        if let Some(settled) = self.held.on_ask(questions, self.index, key, session, now) {
            self.step(key, |s, ctx| s.answered(ctx, &settled));
        }
    }

    /// A supervisor answered `question`: its sessions held here go on.
    fn on_answer(&mut self, question: u64) {
        let now = Instant::now();
        for (key, settled) in self.held.answered(&self.shared.questions, question, now) {
            self.step(key, |s, ctx| s.answered(ctx, &settled));
        }
    }

    fn poll_holds(&mut self) {
        for key in std::mem::take(&mut self.holding) {
            self.step(key, Session::poll_hold);
        }
    }

    fn close(&mut self, key: usize) {
        if !self.sessions.contains(key) {
            return;
        }
        // Closing the sockets (when the session drops) takes them out of the
        // epoll set: no deregister calls needed.
        let mut session = self.sessions.remove(key);
        self.held.closing(&self.shared.questions, key, &session);
        self.timers.forget(key);
        session.finish_record();
        self.shared.stats.active.fetch_sub(1, Ordering::Relaxed);
        self.shared.count(&session.record);
        let mut record = std::mem::take(&mut session.record);
        record.event = Event::End;
        self.shared.audit.submit(PendingRecord {
            record,
            owner: session.owner.take(),
        });
    }

    fn on_deadlines(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            for i in 0..self.listeners.len() {
                self.accept(i);
            }
        }
        if let Some(resolver) = self.resolver.as_mut() {
            if resolver.next_deadline().is_some_and(|d| now >= d) {
                let answers = resolver.on_timer(now);
                self.deliver_dns(answers);
            }
        }
        for key in self.timers.due(now) {
            self.step(key, Session::on_tick);
        }
    }

    fn accept(&mut self, index: usize) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    self.refuse_without_fds(index);
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and friends concern one connection only.
                    log::debug!("accept: {e}");
                }
            }
        }
    }

    /// Out of fds: free the spare, take the waiting connection and reset it,
    /// then pause accepting briefly instead of spinning on EMFILE.
    fn refuse_without_fds(&mut self, index: usize) {
        log::warn!("out of file descriptors: refusing new connections for {ACCEPT_BACKOFF:?}");
        self.spare_fd = None;
        if let Some(listener) = self.listeners.get(index) {
            if let Ok((stream, _)) = listener.accept() {
                reset(&stream);
                self.shared
                    .stats
                    .refused_over_limit
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.spare_fd = open_spare_fd();
        self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
    }

    fn admit(&mut self, stream: mio::net::TcpStream, peer: SocketAddr) {
        self.shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let runtime = self.shared.runtime();
        let limit = runtime.config.limits.connections;
        let per_worker = limit.div_ceil(self.workers).max(1);
        if self.sessions.len() >= per_worker {
            self.shared
                .stats
                .refused_over_limit
                .fetch_add(1, Ordering::Relaxed);
            log::warn!("connection limit ({limit}) reached: refusing {peer}");
            reset(&stream);
            return;
        }
        // With TPROXY the accepted socket's local address is where the agent
        // was going.
        let original_dst = match stream.local_addr() {
            Ok(a) => a,
            Err(e) => {
                log::debug!("accepted socket has no local address: {e}");
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let now = Instant::now();
        let audit = &self.shared.audit;
        let mut record = Record {
            conn_id: Some(audit.next_conn_id()),
            src: peer.to_string(),
            dst: original_dst.to_string(),
            proto: Proto::Tcp,
            ..Record::default()
        };
        let mut owner_query = None;
        let mut attribution = None;
        if let Some(owner) = self
            .sock_diag
            .as_mut()
            .and_then(|d| d.lookup(peer, original_dst).ok().flatten())
        {
            let policy = &runtime.policy;
            let attributed =
                self.shared
                    .attribute_connection(owner, &mut record, policy.process_needs());
            if let Some(query) = attributed {
                // Now, while the agent's process surely still exists.
                if let Some(id) = record.conn_id {
                    let waker = self.waker.clone();
                    let done = if policy.needs_process() {
                        AttributionDone::wanting_process(waker)
                    } else {
                        AttributionDone::new(waker)
                    };
                    audit.attribute_early(id, query.clone(), done.clone());
                    attribution = Some(done);
                }
                owner_query = Some(query);
            }
        }
        let listener = if original_dst.ip().to_canonical().is_loopback() {
            let listener = self.loopback_listener(original_dst);
            record.listener = listener.as_ref().and_then(|l| l.cgroup.clone());
            Some(listener)
        } else {
            None
        };
        let entry = self.sessions.vacant_entry();
        let key = entry.key();
        let mut session = Session::new(stream, original_dst, runtime, record, now);
        if let Some(listener) = listener {
            session.decide_by_listener(listener);
        }
        session.owner = owner_query;
        session.attribution = attribution;
        if let Err(e) = session.register(self.poll.registry(), client_token(key)) {
            log::warn!("cannot watch connection from {peer}: {e}");
            return;
        }
        entry.insert(session);
        self.shared.stats.active.fetch_add(1, Ordering::Relaxed);
        // Clients that speak first usually have bytes waiting already.
        self.on_session_event(key);
    }

    /// Who listens where an agent connected on loopback: the socket a
    /// connection from nowhere (unspecified address, port 0) to `dst` would
    /// reach, which sock_diag's exact lookup finds among the listeners.
    fn loopback_listener(&mut self, dst: SocketAddr) -> Option<Listener> {
        let nowhere = match dst.ip().to_canonical() {
            IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let owner = self
            .sock_diag
            .as_mut()?
            .lookup(dst, nowhere)
            .map_err(|e| log::debug!("looking up the listener on {dst}: {e}"))
            .ok()??;
        let cgroup = match (owner.cgroup_id, &self.shared.cgroup_root) {
            (Some(id), Some(root)) => cgroup::path_of_any_id(root, id),
            _ => None,
        };
        Some(Listener {
            uid: owner.uid,
            cgroup_id: owner.cgroup_id,
            // Only in the agent's own cgroup: the rest of a captured delegated
            // subtree (the user's other programs) is not the agent's to reach.
            agent: owner
                .cgroup_id
                .and_then(|id| self.shared.agents.agent_of(id))
                .filter(|found| found.subtree.is_none())
                .and_then(|found| found.agent),
            cgroup,
        })
    }

    fn answer_requests(&mut self) {
        while let Ok(request) = self.requests.try_recv() {
            match request {
                WorkerRequest::Connections(reply) => {
                    let now = Instant::now();
                    let all = self.sessions.iter().map(|(_, s)| s.snapshot(now)).collect();
                    let _ = reply.send(all);
                }
                WorkerRequest::Close { id, why, reply } => {
                    let key = self
                        .sessions
                        .iter()
                        .find(|(_, s)| s.record.conn_id == Some(id))
                        .map(|(k, _)| k);
                    if let Some(key) = key {
                        if let Some(session) = self.sessions.get_mut(key) {
                            session.close_by_request(why);
                        }
                        self.close(key);
                    }
                    let _ = reply.send(key.is_some());
                }
                WorkerRequest::Answered(question) => self.on_answer(question),
            }
        }
    }

    /// A reload may have changed the DNS servers.
    fn follow_runtime(&mut self) {
        let current = self.shared.runtime();
        if Arc::ptr_eq(&current, &self.runtime) {
            return;
        }
        let old = std::mem::replace(&mut self.runtime, current);
        self.rebuild_resolver(Some(&old));
    }

    fn rebuild_resolver(&mut self, old: Option<&Runtime>) {
        let runtime = self.runtime.clone();
        let dns = &runtime.config.dns;
        if old.is_some_and(|o| o.config.dns == *dns) {
            return;
        }
        // Sessions waiting on the old resolver get an error: their answer is gone.
        let waiting: Vec<_> = self.waiting_dns.drain().collect();
        for (id, keys) in waiting {
            for key in keys {
                self.deliver_one(key, id, Err(crate::dns::DnsError::Reconfigured));
            }
        }
        self.resolver = None;
        if dns.servers.is_empty() {
            return;
        }
        let made =
            Resolver::new(&dns.servers, Duration::from_millis(dns.timeout_ms)).and_then(|mut r| {
                r.register(self.poll.registry(), RESOLVER)?;
                Ok(r)
            });
        match made {
            Ok(r) => self.resolver = Some(r),
            Err(e) => log::error!("cannot start the DNS client: {e}"),
        }
    }

    fn on_dns_readable(&mut self) {
        let Some(resolver) = self.resolver.as_mut() else {
            return;
        };
        let answers = resolver.on_readable(Instant::now());
        self.deliver_dns(answers);
    }

    fn deliver_dns(&mut self, answers: Vec<(QueryId, crate::dns::LookupResult)>) {
        for (id, answer) in answers {
            for key in self.waiting_dns.remove(&id).unwrap_or_default() {
                self.deliver_one(key, id, answer.clone());
            }
        }
    }

    fn deliver_one(&mut self, key: usize, id: QueryId, answer: crate::dns::LookupResult) {
        self.step(key, |session, ctx| session.on_resolved(ctx, id, answer));
    }

    fn shutdown(&mut self) {
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for key in keys {
            if let Some(s) = self.sessions.get_mut(key) {
                s.shutdown();
            }
            self.close(key);
        }
    }
}

/// A session's two tokens: its client socket's and its upstream socket's.
fn client_token(key: usize) -> Token {
    Token(key * 2)
}

fn upstream_token(key: usize) -> Token {
    Token(key * 2 + 1)
}

fn reset(stream: &mio::net::TcpStream) {
    set_linger_zero(stream.as_raw_fd());
}

fn open_spare_fd() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}
