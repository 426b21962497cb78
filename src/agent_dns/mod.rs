//! The agents' DNS, answered under the policy (`dns.capture`).
//!
//! The table hands every UDP datagram an agent sends to port 53, whatever the
//! address (a loopback resolver too), to this handler's transparent sockets.
//! Each query is decided before anything leaves the host ([`question`]): a
//! name the policy refuses, or a query type not forwarded (TXT, NULL: what
//! tunnels ride on), is answered at once; an allowed one is forwarded to
//! `dns.servers` ([`forward`]), and the answer goes back to the agent from the
//! address it asked ([`transparent`]). Every query leaves an audit record.
//!
//! Queries over TCP (a resolver retrying an answer truncated over UDP) come
//! to the same handler on the same port ([`clients`]) and are forwarded over
//! TCP ([`stream`]).
//!
//! One thread, one mio loop, bounded: at most [`MAX_PENDING`] forwarded
//! queries wait at a time (more get SERVFAIL at once) and [`MAX_CLIENTS`]
//! TCP connections are open.

mod clients;
mod forward;
pub mod limits;
pub mod names;
mod pool;
pub mod question;
mod stream;
mod transparent;

use crate::audit::{AttributionDone, Event, PendingRecord, Proto, Record, Verdict};
use crate::config::{Mode, Outbound};
use crate::dns::cache::Cache;
use crate::procinfo::{OwnerQuery, SockDiag};
use crate::proxy::Shared;
use clients::Client;
use forward::{Kept, Pending};
use hickory_proto::op::ResponseCode;
use limits::Limiter;
use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use pool::Pool;
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
/// The longest sleep with nothing due (a stop wakes the loop anyway).
const MAX_SLEEP: Duration = Duration::from_secs(1);
const WAKER: Token = Token(usize::MAX - 1);
/// Tokens: the UDP listeners above LISTENER_BASE, the TCP ones above
/// TCP_LISTENER_BASE, the agents' TCP connections from CLIENT_BASE, and the
/// pending queries' upstream sockets below, by their slab keys.
const LISTENER_BASE: usize = usize::MAX - 16;
const TCP_LISTENER_BASE: usize = usize::MAX - 32;
const CLIENT_BASE: usize = 1 << 40;
/// The shared upstream sockets' tokens, above every pending key.
const POOL_BASE: usize = 1 << 39;
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
    pool: Pool,
    /// Upstream sockets whose read budget ran out (they hold more).
    pool_unread: Vec<usize>,
    sock_diag: Option<SockDiag>,
    limiter: Limiter,
    cache: Cache<Kept>,
    buf: Vec<u8>,
}

/// A listener made by `open` on 127.0.0.1 and ::1 at `port` each, registered
/// from token `base` on; `what` names its protocol in an error.
fn on_loopback<S: mio::event::Source>(
    poll: &Poll,
    port: u16,
    base: usize,
    what: &str,
    open: impl Fn(SocketAddr) -> io::Result<S>,
) -> io::Result<Vec<S>> {
    [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, ip)| {
        let addr = SocketAddr::new(ip, port);
        let mut socket = open(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("dns handler on {what}{addr}: {e}")))?;
        poll.registry()
            .register(&mut socket, Token(base + i), Interest::READABLE)?;
        Ok(socket)
    })
    .collect()
}

impl Handler {
    /// Binds the transparent sockets on 127.0.0.1 and ::1 at `port` and the
    /// raw sockets for answers: a start fails here, not in the loop.
    pub fn new(shared: Arc<Shared>, port: u16) -> io::Result<Handler> {
        let poll = Poll::new()?;
        let listeners = on_loopback(&poll, port, LISTENER_BASE, "", transparent::listener)?;
        let tcp_listeners = on_loopback(
            &poll,
            port,
            TCP_LISTENER_BASE,
            "tcp ",
            crate::proxy::listener::transparent_listener,
        )?;
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
            pool: Pool::new(POOL_BASE),
            pool_unread: Vec::new(),
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
            let timeout = if unread.is_empty() && self.pool_unread.is_empty() {
                self.next_deadline()
                    .map_or(MAX_SLEEP, |at| at.saturating_duration_since(Instant::now()))
                    .min(MAX_SLEEP)
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
                    Token(t) if t >= POOL_BASE => self.pool_unread.push(t - POOL_BASE),
                    Token(key) => self.read_answer(key),
                }
            }
            self.pool_unread.sort_unstable();
            self.pool_unread.dedup();
            for slot in std::mem::take(&mut self.pool_unread) {
                if self.read_pooled(slot) {
                    self.pool_unread.push(slot);
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
            // Whatever queries this turn asked for, at once.
            self.shared.audit.wake_for_early();
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
                let audited = config.mode == Mode::Audit
                    && !name.as_deref().is_some_and(crate::names::never_resolves);
                if let (true, Some(name), Some(qtype)) = (audited, &name, qtype) {
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
                        record.error = Some(why.to_string());
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

    /// When the loop must look again: a forwarded query's timeout, or an
    /// idle TCP connection's end.
    fn next_deadline(&self) -> Option<Instant> {
        let queries = self.pending.iter().map(|(_, p)| p.deadline);
        let clients = self
            .clients
            .iter()
            .map(|(_, c)| c.last_active + CLIENT_IDLE);
        queries.chain(clients).min()
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

    /// A forwarded query's process is found now, while it surely exists: it
    /// may be gone by the time the answer comes and the record is written.
    fn attribute_early(&self, record: &Record, owner: &Option<OwnerQuery>) {
        if let (Some(query), Some(id)) = (owner, record.conn_id) {
            let done = AttributionDone::new(self.waker.clone());
            self.shared.audit.attribute_early(id, query.clone(), done);
        }
    }

    /// The query's one record. One answered at once was not attributed early:
    /// the writer finds its process at the end of this turn, as it would
    /// have for an early attribution (the asker may exit once answered).
    fn finish(&self, mut record: Record, owner: Option<OwnerQuery>, started: Instant) {
        record.duration_ms = started.elapsed().as_millis() as u64;
        self.shared
            .audit
            .submit_soon(PendingRecord { record, owner });
    }
}
