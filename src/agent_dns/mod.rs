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
//! Queries over TCP (a resolver retrying an answer truncated over UDP) come
//! to the same handler on the same port and are forwarded over TCP
//! ([`stream`]).
//!
//! One thread, one mio loop, bounded: at most [`MAX_PENDING`] forwarded
//! queries wait at a time (more get SERVFAIL at once) and [`MAX_CLIENTS`]
//! TCP connections are open.

pub mod limits;
pub mod names;
pub mod question;
mod stream;
mod transparent;

use crate::audit::{AttributionDone, Event, PendingRecord, Proto, Record, Verdict};
use crate::config::{Mode, Outbound};
use crate::dns::cache::Cache;
use crate::procinfo::{OwnerQuery, SockDiag};
use crate::proxy::Shared;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use limits::Limiter;
use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use question::{NameVerdict, Plan};
use slab::Slab;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use stream::Conn;
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
/// Tokens: the UDP listeners above LISTENER_BASE, the TCP ones above
/// TCP_LISTENER_BASE, the agents' TCP connections from CLIENT_BASE, and the
/// pending queries' upstream sockets below, by their slab keys.
const LISTENER_BASE: usize = usize::MAX - 16;
const TCP_LISTENER_BASE: usize = usize::MAX - 32;
const CLIENT_BASE: usize = 1 << 40;
/// Agents' TCP connections open at once at most; more are closed at once.
pub const MAX_CLIENTS: usize = 64;
/// A TCP connection with nothing to do this long is closed.
const CLIENT_IDLE: Duration = Duration::from_secs(10);

/// Who asked, and where the answer goes.
#[derive(Clone, Copy)]
struct Asker {
    agent: SocketAddr,
    /// The address the agent asked: a UDP answer comes from there.
    asked: SocketAddr,
    via: Via,
}

#[derive(Clone, Copy)]
enum Via {
    Udp,
    /// The agent's TCP connection: its slab key, and the serial of the
    /// connection that asked (a key may be reused by the time an answer comes).
    Tcp {
        key: usize,
        serial: u64,
    },
}

/// The socket a forwarded query waits on: UDP for a UDP query, TCP for a
/// TCP one (its answer may be too large for a datagram).
enum Upstream {
    Udp(UdpSocket),
    Tcp(Conn),
}

/// An agent's TCP connection to the handler.
struct Client {
    conn: Conn,
    agent: SocketAddr,
    asked: SocketAddr,
    serial: u64,
    last_active: Instant,
}

/// One forwarded query waiting for a server.
struct Pending {
    upstream: Upstream,
    /// The query as sent: the agent's bytes with our id.
    query: Vec<u8>,
    our_id: u16,
    agent_id: u16,
    name: String,
    qtype: RecordType,
    asker: Asker,
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
    tcp_listeners: Vec<TcpListener>,
    clients: Slab<Client>,
    next_serial: u64,
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
        let mut tcp_listeners = Vec::new();
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let addr = SocketAddr::new(ip, port);
            let mut listener = crate::proxy::listener::transparent_listener(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("dns handler on tcp {addr}: {e}")))?;
            poll.registry().register(
                &mut listener,
                Token(TCP_LISTENER_BASE + tcp_listeners.len()),
                Interest::READABLE,
            )?;
            tcp_listeners.push(listener);
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
            tcp_listeners,
            clients: Slab::new(),
            next_serial: 0,
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
                    Token(t) if t >= TCP_LISTENER_BASE => {
                        self.accept_clients(t - TCP_LISTENER_BASE)
                    }
                    Token(t) if t >= CLIENT_BASE => self.on_client(t - CLIENT_BASE),
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
                    let asker = Asker {
                        agent: datagram.from,
                        asked: datagram.to,
                        via: Via::Udp,
                    };
                    self.on_query(&query, asker);
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

    fn on_query(&mut self, query: &[u8], asker: Asker) {
        let Asker { agent, asked, via } = asker;
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
            .and_then(|d| match via {
                Via::Udp => d.lookup_udp(agent, asked).ok().flatten(),
                Via::Tcp { .. } => d.lookup(agent, asked).ok().flatten(),
            })
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
        let is_block = |o: &str| matches!(config.outbounds.get(o), Some(Outbound::Block) | None);
        let plan = question::plan(query, &config.dns, |name| {
            let decision = runtime
                .policy
                .decide_name(name, agent_name.as_deref(), is_block);
            NameVerdict {
                allowed: !is_block(decision.outbound),
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
                    return self.forward(query, name, qtype, asker, record, owner, started);
                }
                record.host = name;
                record.rcode = Some(question::mnemonic(rcode));
                record.verdict = Verdict::Block;
                record.error = Some(why);
                if let Err(e) = self.reply(asker, &response) {
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
                            let _ = self.reply(asker, &refusal);
                        }
                        record.error = Some(why);
                        return self.finish(record, owner, started);
                    }
                    record.verdict = Verdict::WouldBlock;
                    return self.forward(query, name, qtype, asker, record, owner, started);
                }
                if self.answer_from_cache(query, &name, qtype, asker, &mut record, started) {
                    return self.finish(record, owner, started);
                }
                record.verdict = Verdict::Allow;
                self.forward(query, name, qtype, asker, record, owner, started);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        query: &[u8],
        name: String,
        qtype: RecordType,
        asker: Asker,
        mut record: Record,
        owner: Option<OwnerQuery>,
        started: Instant,
    ) {
        // One read of the config for the query (no copy of the server list).
        let runtime = self.shared.runtime();
        let servers = &runtime.config.dns.servers;
        let give_up = |this: &mut Handler, mut record: Record, why: String| {
            if let Some(failure) = question::server_failure(query) {
                let _ = this.reply(asker, &failure);
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
        let timeout = Duration::from_millis(runtime.config.dns.timeout_ms);
        match ask(self.poll.registry(), key, servers[0], &ours, asker.via) {
            Ok(upstream) => {
                record.upstream = Some(servers[0].to_string());
                entry.insert(Pending {
                    upstream,
                    query: ours,
                    our_id,
                    agent_id,
                    name,
                    qtype,
                    asker,
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

    /// An upstream socket is ready: its answers, if one is ours.
    fn read_answer(&mut self, key: usize) {
        for _ in 0..READS_PER_EVENT {
            let Some(pending) = self.pending.get_mut(key) else {
                return;
            };
            let answer = match &mut pending.upstream {
                Upstream::Udp(socket) => match socket.recv(&mut self.buf) {
                    Ok(n) => self.buf[..n].to_vec(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    // An ICMP error from the server: try the next one now.
                    Err(e) => return self.next_server(key, e.to_string()),
                },
                Upstream::Tcp(conn) => {
                    if let Err(e) = conn.flush().and_then(|()| conn.fill()) {
                        return self.next_server(key, format!("over tcp: {e}"));
                    }
                    match conn.next_message() {
                        Some(message) => message,
                        None if conn.closed || conn.overfull() => {
                            return self
                                .next_server(key, "over tcp: closed without an answer".into())
                        }
                        None => return,
                    }
                }
            };
            if self.on_answer(key, &answer) {
                return;
            }
        }
    }

    /// `answer` came for pending query `key`; true when it settled it.
    /// Another id or question (late, stray or forged) settles nothing.
    fn on_answer(&mut self, key: usize, answer: &[u8]) -> bool {
        let Some(pending) = self.pending.get(key) else {
            return true;
        };
        let Some(mut summary) =
            question::read_answer(answer, pending.our_id, &pending.name, pending.qtype)
        else {
            return false;
        };
        let mut response = answer.to_vec();
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
        if let Err(e) = self.reply(pending.asker, &response) {
            record.error = Some(format!("answering {}: {e}", pending.asker.agent));
        }
        self.finish(record, pending.owner, pending.started);
        true
    }

    /// `message` to the agent: a datagram from the address it asked, or on
    /// its TCP connection if that is still the one that asked.
    fn reply(&mut self, asker: Asker, message: &[u8]) -> io::Result<()> {
        match asker.via {
            Via::Udp => self.replier.send(asker.asked, asker.agent, message),
            Via::Tcp { key, serial } => match self.clients.get_mut(key) {
                Some(client) if client.serial == serial => {
                    client.last_active = Instant::now();
                    client.conn.send(message)
                }
                _ => Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the agent closed its connection",
                )),
            },
        }
    }

    /// A TCP listener is ready: take its connections (at most MAX_CLIENTS open).
    fn accept_clients(&mut self, index: usize) {
        loop {
            let Some(listener) = self.tcp_listeners.get(index) else {
                return;
            };
            let (stream, agent) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("dns: accepting a tcp query: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                log::warn!("dns: {MAX_CLIENTS} tcp connections open: closing {agent}'s");
                continue;
            }
            let Ok(asked) = stream.local_addr() else {
                continue;
            };
            let entry = self.clients.vacant_entry();
            let key = entry.key();
            let mut conn = Conn::new(stream);
            if let Err(e) = self.poll.registry().register(
                &mut conn.stream,
                Token(CLIENT_BASE + key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("dns: watching {agent}'s tcp connection: {e}");
                continue;
            }
            self.next_serial += 1;
            entry.insert(Client {
                conn,
                agent,
                asked,
                serial: self.next_serial,
                last_active: Instant::now(),
            });
            self.on_client(key);
        }
    }

    /// An agent's TCP connection is ready: its queries, and what waits to be written.
    fn on_client(&mut self, key: usize) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        if client
            .conn
            .flush()
            .and_then(|()| client.conn.fill())
            .is_err()
        {
            self.clients.remove(key);
            return;
        }
        let asker = Asker {
            agent: client.agent,
            asked: client.asked,
            via: Via::Tcp {
                key,
                serial: client.serial,
            },
        };
        let mut queries = Vec::new();
        while let Some(query) = client.conn.next_message() {
            queries.push(query);
        }
        if !queries.is_empty() {
            client.last_active = Instant::now();
        }
        // A peer that closed its side may still read: answers to queries
        // just taken go out before it is dropped (or the idle timeout).
        let done = client.conn.overfull()
            || (client.conn.closed && client.conn.drained() && queries.is_empty());
        for query in queries {
            self.on_query(&query, asker);
        }
        if done {
            self.clients.remove(key);
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
        asker: Asker,
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
        if let Err(e) = self.reply(asker, &response) {
            record.error = Some(format!("answering {}: {e}", asker.agent));
        }
        true
    }

    /// The server asked did not answer in time or refused the datagram: the
    /// next one gets the query, or the agent gets SERVFAIL.
    fn next_server(&mut self, key: usize, why: String) {
        let runtime = self.shared.runtime();
        let servers = &runtime.config.dns.servers;
        let timeout = Duration::from_millis(runtime.config.dns.timeout_ms);
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
            match ask(
                self.poll.registry(),
                key,
                server,
                &pending.query,
                pending.asker.via,
            ) {
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
            let _ = self.reply(pending.asker, &failure);
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
        if !late.is_empty() {
            let timeout = self.shared.runtime().config.dns.timeout_ms;
            for key in late {
                self.next_server(key, format!("timed out after {timeout} ms"));
            }
        }
        self.clients
            .retain(|_, client| now.saturating_duration_since(client.last_active) < CLIENT_IDLE);
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

/// The query on a fresh socket to `server`, registered under `key`: UDP for a
/// UDP query, TCP for a TCP one.
fn ask(
    registry: &mio::Registry,
    key: usize,
    server: SocketAddr,
    query: &[u8],
    via: Via,
) -> io::Result<Upstream> {
    if let Via::Tcp { .. } = via {
        let mut conn = Conn::new(mio::net::TcpStream::connect(server)?);
        registry.register(
            &mut conn.stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        // Queued until the connection is up: the first writable event sends it.
        conn.send(query).or_else(|e| {
            if e.kind() == io::ErrorKind::NotConnected {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        return Ok(Upstream::Tcp(conn));
    }
    let local = match server {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let mut socket = UdpSocket::bind(local)?;
    socket.connect(server)?;
    socket.send(query)?;
    registry.register(&mut socket, Token(key), Interest::READABLE)?;
    Ok(Upstream::Udp(socket))
}
