//! The agents' DNS, answered under the policy (`dns.capture`).
//!
//! The table hands every UDP datagram an agent sends to port 53, whatever the
//! address (a loopback resolver too), to this handler's transparent sockets.
//! Each query is decided before anything leaves the host ([`question`]): a
//! name the policy refuses, or a query type not forwarded (TXT, NULL: what
//! tunnels ride on), is answered at once; an allowed one is forwarded to
//! `dns.servers` over a socket of its own (a fresh random port, a fresh
//! random id, connected to the server so nobody else can answer), one server
//! after another on timeouts, and the answer goes back to the agent from the
//! address it asked ([`transparent`]). Every query leaves an audit record.
//!
//! One thread, one mio loop, bounded: at most [`MAX_PENDING`] forwarded
//! queries wait at a time; more get SERVFAIL at once, counted.

pub mod limits;
pub mod names;
pub mod question;
mod transparent;

use crate::audit::{AttributionDone, Event, PendingRecord, Proto, Record, Verdict};
use crate::config::{Mode, Outbound};
use crate::dns::cache::Cache;
use crate::procinfo::{OwnerQuery, SockDiag};
use crate::proxy::Shared;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use limits::Limiter;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use question::{NameVerdict, Plan};
use slab::Slab;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use transparent::Replier;

/// Forwarded queries waiting for a server at most.
pub const MAX_PENDING: usize = 256;
/// Larger than any query we take and any answer we pass on (EDNS sizes).
const MAX_DATAGRAM: usize = 4096;
/// Datagrams read from one socket per wake-up before the others get a turn.
const READS_PER_EVENT: usize = 64;
const EVENTS_PER_POLL: usize = 128;
/// How often deadlines are looked at when nothing else wakes the loop.
const TICK: Duration = Duration::from_millis(50);
const WAKER: Token = Token(usize::MAX - 1);
const LISTENER_BASE: usize = usize::MAX - 16;

/// One forwarded query waiting for a server.
struct Pending {
    upstream: UdpSocket,
    /// The query as sent: the agent's bytes with our id.
    query: Vec<u8>,
    our_id: u16,
    agent_id: u16,
    name: String,
    qtype: RecordType,
    /// The agent's socket, and the address it asked (the answer comes from there).
    agent: SocketAddr,
    asked: SocketAddr,
    /// Index into `dns.servers` of the server asked now.
    server: usize,
    started: Instant,
    deadline: Instant,
    record: Record,
    owner: Option<OwnerQuery>,
    failures: Vec<String>,
}

pub struct Handler {
    poll: Poll,
    shared: Arc<Shared>,
    listeners: Vec<UdpSocket>,
    replier: Replier,
    waker: Arc<Waker>,
    pending: Slab<Pending>,
    sock_diag: Option<SockDiag>,
    limiter: Limiter,
    cache: Cache<Kept>,
    buf: Vec<u8>,
}

/// An answer kept for others who ask the same (name, type).
#[derive(Clone)]
struct Kept {
    response: Vec<u8>,
    stored: Instant,
    rcode: ResponseCode,
    answers: Vec<String>,
    addresses: Vec<(IpAddr, u32)>,
}

/// Answers are kept at most this long, whatever their TTL.
const MAX_KEPT: Duration = Duration::from_secs(300);

fn cache_key(name: &str, qtype: RecordType) -> String {
    format!("{name}/{qtype}")
}

impl Handler {
    /// Binds the transparent sockets on 127.0.0.1 and ::1 at `port` and the
    /// raw sockets for answers: a start fails here, not in the loop.
    pub fn new(shared: Arc<Shared>, port: u16) -> io::Result<Handler> {
        let poll = Poll::new()?;
        let mut listeners = Vec::new();
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let addr = SocketAddr::new(ip, port);
            let mut socket = transparent::listener(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("dns handler on {addr}: {e}")))?;
            poll.registry().register(
                &mut socket,
                Token(LISTENER_BASE + listeners.len()),
                Interest::READABLE,
            )?;
            listeners.push(socket);
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let sock_diag = SockDiag::open()
            .map_err(|e| log::warn!("dns: socket owner lookups unavailable: {e}"))
            .ok();
        let cache_entries = shared.runtime().config.dns.cache_entries;
        Ok(Handler {
            poll,
            shared,
            listeners,
            replier: Replier::new()?,
            waker,
            pending: Slab::new(),
            sock_diag,
            limiter: Limiter::default(),
            cache: Cache::new(cache_entries),
            buf: vec![0; MAX_DATAGRAM],
        })
    }

    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        // Listeners whose read budget ran out: they hold more, and being
        // edge-triggered they will not say so again.
        let mut unread: Vec<usize> = Vec::new();
        loop {
            let timeout = if unread.is_empty() {
                TICK
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("dns handler: poll: {e}");
                    return;
                }
            }
            if self.shared.stopping() {
                self.fail_all("proxy shutting down");
                return;
            }
            let mut ready: Vec<usize> = std::mem::take(&mut unread);
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    Token(t) if t >= LISTENER_BASE => ready.push(t - LISTENER_BASE),
                    Token(key) => self.read_answer(key),
                }
            }
            ready.sort_unstable();
            ready.dedup();
            for index in ready {
                if self.read_queries(index) {
                    unread.push(index);
                }
            }
            self.expire(Instant::now());
        }
    }

    /// Reads queries off one listener; true when its budget ran out first.
    fn read_queries(&mut self, index: usize) -> bool {
        for _ in 0..READS_PER_EVENT {
            let Some(socket) = self.listeners.get(index) else {
                return false;
            };
            match transparent::receive(socket, &mut self.buf) {
                Ok(datagram) => {
                    let query = self.buf[..datagram.len].to_vec();
                    self.on_query(&query, datagram.from, datagram.to);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => log::debug!("dns: {e}"),
                Err(e) => {
                    log::warn!("dns: reading a query: {e}");
                    return false;
                }
            }
        }
        true
    }

    fn on_query(&mut self, query: &[u8], agent: SocketAddr, asked: SocketAddr) {
        let started = Instant::now();
        let audit = &self.shared.audit;
        let mut record = Record {
            event: Event::Dns,
            conn_id: Some(audit.next_conn_id()),
            src: agent.to_string(),
            dst: asked.to_string(),
            proto: Proto::Dns,
            ..Record::default()
        };
        let owner = self
            .sock_diag
            .as_mut()
            .and_then(|d| d.lookup_udp(agent, asked).ok().flatten())
            .and_then(|owner| self.shared.attribute_query(owner, &mut record));
        // Now, while the process that asked surely still exists: a refused
        // client may be gone by the time the record is written.
        if let (Some(query), Some(id)) = (&owner, record.conn_id) {
            let done = AttributionDone::new(self.waker.clone());
            audit.attribute_early(id, query.clone(), done);
        }
        let runtime = self.shared.runtime();
        let config = &runtime.config;
        let agent_name = record.agent.clone();
        let plan = question::plan(query, &config.dns, |name| {
            let decision = runtime
                .policy
                .decide_name(name, agent_name.as_deref(), |o| {
                    matches!(config.outbounds.get(o), Some(Outbound::Block) | None)
                });
            NameVerdict {
                allowed: !matches!(
                    config.outbounds.get(decision.outbound),
                    Some(Outbound::Block) | None
                ),
                rule: decision.rule_name.to_string(),
                outbound: decision.outbound.to_string(),
            }
        });
        match plan {
            Plan::Drop(why) => {
                record.verdict = Verdict::Block;
                record.error = Some(why);
                self.finish(record, owner, started);
            }
            Plan::Answer {
                response,
                name,
                qtype,
                verdict,
                rcode,
                why,
            } => {
                record.qtype = qtype.map(|t| t.to_string());
                record.outbound = "block".into();
                if let Some(verdict) = verdict {
                    record.rule = Some(verdict.rule);
                    record.outbound = verdict.outbound;
                }
                // Audit mode: a question the policy would refuse goes out all
                // the same, and its record says what enforce would have done.
                if let (Mode::Audit, Some(name), Some(qtype)) = (config.mode, &name, qtype) {
                    record.host = Some(name.clone());
                    record.verdict = Verdict::WouldBlock;
                    let name = name.clone();
                    return self.forward(query, name, qtype, agent, asked, record, owner, started);
                }
                record.host = name;
                record.rcode = Some(question::mnemonic(rcode));
                record.verdict = Verdict::Block;
                record.error = Some(why);
                if let Err(e) = self.replier.send(asked, agent, &response) {
                    record.error = Some(format!(
                        "{}; answering {agent}: {e}",
                        record.error.unwrap_or_default()
                    ));
                }
                self.finish(record, owner, started);
            }
            Plan::Forward {
                name,
                qtype,
                verdict,
            } => {
                record.host = Some(name.clone());
                record.qtype = Some(qtype.to_string());
                record.rule = Some(verdict.rule);
                record.outbound = verdict.outbound;
                let limited = self.limiter.admit(
                    &config.dns.rate_limit,
                    record.agent.as_deref(),
                    &name,
                    started,
                );
                if let Err(why) = limited {
                    record.rate_limited = Some(true);
                    if config.mode == Mode::Enforce {
                        record.verdict = Verdict::Block;
                        record.rcode = Some(question::mnemonic(ResponseCode::Refused));
                        if let Some(refusal) = question::refused(query) {
                            let _ = self.replier.send(asked, agent, &refusal);
                        }
                        record.error = Some(why);
                        return self.finish(record, owner, started);
                    }
                    record.verdict = Verdict::WouldBlock;
                    return self.forward(query, name, qtype, agent, asked, record, owner, started);
                }
                if self.answer_from_cache(query, &name, qtype, agent, asked, &mut record, started) {
                    return self.finish(record, owner, started);
                }
                record.verdict = Verdict::Allow;
                self.forward(query, name, qtype, agent, asked, record, owner, started);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        query: &[u8],
        name: String,
        qtype: RecordType,
        agent: SocketAddr,
        asked: SocketAddr,
        mut record: Record,
        owner: Option<OwnerQuery>,
        started: Instant,
    ) {
        let servers = self.shared.runtime().config.dns.servers.clone();
        let give_up = |this: &mut Handler, mut record: Record, why: String| {
            if let Some(failure) = question::server_failure(query) {
                let _ = this.replier.send(asked, agent, &failure);
            }
            record.rcode = Some(question::mnemonic(ResponseCode::ServFail));
            record.error = Some(why);
            this.finish(record, owner.clone(), started);
        };
        if servers.is_empty() {
            return give_up(self, record, "no dns.servers to forward to".into());
        }
        if self.pending.len() >= MAX_PENDING {
            return give_up(
                self,
                record,
                format!("{MAX_PENDING} queries already wait for a server"),
            );
        }
        // A query the plan forwards was decoded whole: it has its header.
        let Some(&[high, low]) = query.get(..2).and_then(|id| <&[u8; 2]>::try_from(id).ok()) else {
            return give_up(self, record, "a query without its id".into());
        };
        let agent_id = u16::from_be_bytes([high, low]);
        let our_id = rand::random::<u16>();
        let mut ours = query.to_vec();
        ours[..2].copy_from_slice(&our_id.to_be_bytes());
        record.upstream = None;
        let entry = self.pending.vacant_entry();
        let key = entry.key();
        let timeout = Duration::from_millis(self.shared.runtime().config.dns.timeout_ms);
        match ask(self.poll.registry(), key, servers[0], &ours) {
            Ok(upstream) => {
                record.upstream = Some(servers[0].to_string());
                entry.insert(Pending {
                    upstream,
                    query: ours,
                    our_id,
                    agent_id,
                    name,
                    qtype,
                    agent,
                    asked,
                    server: 0,
                    started,
                    deadline: started + timeout,
                    record,
                    owner,
                    failures: Vec::new(),
                });
            }
            Err(e) => give_up(self, record, format!("asking {}: {e}", servers[0])),
        }
    }

    fn read_answer(&mut self, key: usize) {
        let Some(pending) = self.pending.get(key) else {
            return;
        };
        for _ in 0..READS_PER_EVENT {
            let n = match pending.upstream.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // An ICMP error from the server: try the next one now.
                    let why = format!("{}", e);
                    return self.next_server(key, why);
                }
            };
            // Another id or question: late, stray or forged; wait on.
            let Some(mut summary) =
                question::read_answer(&self.buf[..n], pending.our_id, &pending.name, pending.qtype)
            else {
                continue;
            };
            let mut response = self.buf[..n].to_vec();
            if self.shared.runtime().config.dns.strip_ech {
                if let Some((stripped, dropped)) = question::strip_ech(&response) {
                    response = stripped;
                    summary
                        .answers
                        .push(format!("(ech taken out of {dropped} record(s))"));
                }
            }
            let to_keep = response.clone();
            response[..2].copy_from_slice(&pending.agent_id.to_be_bytes());
            let pending = self.pending.remove(key);
            let mut record = pending.record;
            // Only what enforce lets the agent learn names its addresses.
            if record.verdict == Verdict::Allow && !summary.addresses.is_empty() {
                self.shared.resolved.insert(
                    record.agent.as_deref(),
                    &pending.name,
                    &summary.addresses,
                    Instant::now(),
                );
            }
            record.rcode = Some(question::mnemonic(summary.rcode));
            let keep = summary
                .ttl
                .map(|ttl| Duration::from_secs(u64::from(ttl)).min(MAX_KEPT))
                .filter(|ttl| !ttl.is_zero() && !summary.truncated);
            if let Some(ttl) = keep {
                let now = Instant::now();
                let kept = Kept {
                    response: to_keep,
                    stored: now,
                    rcode: summary.rcode,
                    answers: summary.answers.clone(),
                    addresses: summary.addresses.clone(),
                };
                self.cache
                    .insert(cache_key(&pending.name, pending.qtype), kept, ttl, now);
            }
            record.answers = Some(summary.answers);
            if summary.truncated {
                record.error = Some("truncated: the agent may ask again over TCP".into());
            }
            if let Err(e) = self.replier.send(pending.asked, pending.agent, &response) {
                record.error = Some(format!("answering {}: {e}", pending.agent));
            }
            return self.finish(record, pending.owner, pending.started);
        }
    }

    /// Answers `query` from the cache if an answer to the same (name, type)
    /// is kept; true when it did.
    #[allow(clippy::too_many_arguments)]
    fn answer_from_cache(
        &mut self,
        query: &[u8],
        name: &str,
        qtype: RecordType,
        agent: SocketAddr,
        asked: SocketAddr,
        record: &mut Record,
        now: Instant,
    ) -> bool {
        let Some(kept) = self.cache.get(&cache_key(name, qtype), now) else {
            return false;
        };
        let age = now.saturating_duration_since(kept.stored);
        let Some(response) = question::from_cache(&kept.response, query, age) else {
            return false;
        };
        record.cached = Some(true);
        record.rcode = Some(question::mnemonic(kept.rcode));
        record.answers = Some(kept.answers);
        if record.verdict == Verdict::Allow && !kept.addresses.is_empty() {
            self.shared
                .resolved
                .insert(record.agent.as_deref(), name, &kept.addresses, now);
        }
        if let Err(e) = self.replier.send(asked, agent, &response) {
            record.error = Some(format!("answering {agent}: {e}"));
        }
        true
    }

    /// The server asked did not answer in time or refused the datagram: the
    /// next one gets the query, or the agent gets SERVFAIL.
    fn next_server(&mut self, key: usize, why: String) {
        let servers = self.shared.runtime().config.dns.servers.clone();
        let timeout = Duration::from_millis(self.shared.runtime().config.dns.timeout_ms);
        let Some(pending) = self.pending.get_mut(key) else {
            return;
        };
        let failed = servers
            .get(pending.server)
            .map(|s| s.to_string())
            .unwrap_or_default();
        pending.failures.push(format!("{failed} {why}"));
        while pending.server + 1 < servers.len() {
            pending.server += 1;
            let server = servers[pending.server];
            match ask(self.poll.registry(), key, server, &pending.query) {
                Ok(upstream) => {
                    // The old socket leaves the epoll set as it closes.
                    pending.upstream = upstream;
                    pending.deadline = Instant::now() + timeout;
                    pending.record.upstream = Some(server.to_string());
                    return;
                }
                Err(e) => pending.failures.push(format!("{server} {e}")),
            }
        }
        let pending = self.pending.remove(key);
        let mut record = pending.record;
        if let Some(failure) = question::server_failure(&pending.query) {
            let mut failure = failure;
            failure[..2].copy_from_slice(&pending.agent_id.to_be_bytes());
            let _ = self.replier.send(pending.asked, pending.agent, &failure);
        }
        record.rcode = Some(question::mnemonic(ResponseCode::ServFail));
        record.error = Some(format!(
            "no server answered: {}",
            pending.failures.join("; ")
        ));
        self.finish(record, pending.owner, pending.started);
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            let timeout = self.shared.runtime().config.dns.timeout_ms;
            self.next_server(key, format!("timed out after {timeout} ms"));
        }
    }

    fn fail_all(&mut self, why: &str) {
        for pending in self.pending.drain().collect::<Vec<_>>() {
            let mut record = pending.record;
            record.error = Some(why.to_string());
            self.finish(record, pending.owner, pending.started);
        }
    }

    fn finish(&self, mut record: Record, owner: Option<OwnerQuery>, started: Instant) {
        record.duration_ms = started.elapsed().as_millis() as u64;
        self.shared.audit.submit(PendingRecord { record, owner });
    }
}

/// The query on a fresh socket connected to `server`, registered under `key`.
fn ask(
    registry: &mio::Registry,
    key: usize,
    server: SocketAddr,
    query: &[u8],
) -> io::Result<UdpSocket> {
    let local = match server {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let mut socket = UdpSocket::bind(local)?;
    socket.connect(server)?;
    socket.send(query)?;
    registry.register(&mut socket, Token(key), Interest::READABLE)?;
    Ok(socket)
}
