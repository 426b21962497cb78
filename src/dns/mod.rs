//! Our own DNS client: non-blocking, driven by the caller's mio event loop.
//!
//! A static glibc binary must not call getaddrinfo (NSS), and an event loop
//! must never wait on a lookup, so names are resolved here: A and AAAA queries
//! over UDP to the configured servers, one server after another. Each server
//! gets `timeout`; what it has not answered halfway through is sent to it
//! once more, so one lost datagram does not fail a lookup.
//!
//! Every lookup in flight (a "transaction": both questions for one name) has its
//! own UDP socket, so each gets a fresh kernel-chosen random source port on top
//! of its random query ids; the socket is connected to the server, so the
//! kernel drops datagrams from anyone else. A question whose answer comes back
//! truncated is asked again over TCP. Those sockets live in an epoll set of our
//! own, and that one fd is what the caller registers: readiness of any socket
//! wakes the caller, and we learn which transaction from our own set. A socket
//! leaves the set when it is closed (dropped): none is ever duplicated.

pub(crate) mod cache;
mod tcp;
mod wire;

use cache::Cache;
use hickory_proto::rr::{Name, RecordType};
use mio::net::UdpSocket;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use tcp::TcpQuery;
use wire::Answer;

/// Names kept in the cache at most.
pub const CACHE_ENTRIES: usize = 4096;
/// Lookups in flight at most (each holds a UDP socket, and a TCP one per
/// truncated answer); more are refused.
pub const MAX_IN_FLIGHT: usize = 256;
/// Bounds on how long an answer is believed, whatever TTL it carries.
pub const MIN_TTL: Duration = Duration::from_secs(5);
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// How long "no such name" and "no address" are remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Larger than any answer to our EDNS payload size, so none is cut short.
const RECEIVE_BUFFER: usize = 4096;
const EVENTS_PER_POLL: usize = 64;

/// Identifies one `lookup` call; its result comes back under this id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueryId(u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Known without asking: from the cache, an IP literal, or refused at once.
    Cached(Result<Vec<IpAddr>, DnsError>),
    /// The result will come from `on_readable` or `on_timer`.
    Pending(QueryId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    InvalidName(String),
    NoSuchName,
    NoAddresses,
    /// No server gave a usable answer: what each one did.
    Unanswered(Vec<(SocketAddr, Failure)>),
    /// MAX_IN_FLIGHT lookups are already waiting.
    Busy,
    /// The resolver was replaced (a reload changed `dns`) while it waited.
    Reconfigured,
}

/// Why one server gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    TimedOut(Duration),
    /// An answer that settles nothing (SERVFAIL, REFUSED, truncated...).
    Answered(String),
    /// The socket failed, e.g. "connection refused" from an ICMP error.
    Io(String),
}

impl DnsError {
    /// True when every server tried stayed silent.
    pub fn is_timeout(&self) -> bool {
        matches!(self, DnsError::Unanswered(failures)
            if failures.iter().all(|(_, f)| matches!(f, Failure::TimedOut(_))))
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::InvalidName(reason) => write!(f, "cannot look up: {reason}"),
            DnsError::NoSuchName => write!(f, "no such name"),
            DnsError::Reconfigured => write!(f, "resolver reconfigured"),
            DnsError::NoAddresses => write!(f, "the name has no IPv4 or IPv6 address"),
            DnsError::Unanswered(failures) => {
                write!(f, "no usable DNS answer:")?;
                for (i, (server, failure)) in failures.iter().enumerate() {
                    let sep = if i == 0 { " " } else { "; " };
                    write!(f, "{sep}{server} {failure}")?;
                }
                Ok(())
            }
            DnsError::Busy => write!(f, "{MAX_IN_FLIGHT} DNS lookups already in flight"),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::TimedOut(after) => write!(f, "timed out after {} ms", after.as_millis()),
            Failure::Answered(what) => write!(f, "{what}"),
            Failure::Io(e) => write!(f, "failed: {e}"),
        }
    }
}

impl std::error::Error for DnsError {}

pub type LookupResult = Result<Vec<IpAddr>, DnsError>;

/// One event-loop thread's resolver.
pub struct Resolver {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    /// The epoll set of the in-flight sockets; its fd is what the caller polls.
    poll: Poll,
    events: Events,
    in_flight: HashMap<Token, Transaction>,
    /// Concurrent lookups of one name share its transaction.
    by_name: HashMap<String, Token>,
    next_token: usize,
    next_query_id: u64,
    cache: Cache<LookupResult>,
    buffer: Vec<u8>,
}

/// Both questions about one name, asked of one server at a time.
struct Transaction {
    name: String,
    qname: Name,
    /// Index into `servers` of the server asked now.
    server: usize,
    socket: Option<UdpSocket>,
    deadline: Instant,
    /// When to send the questions still waiting once more (to the same server,
    /// same ids): one lost datagram should not fail a lookup.
    resend_at: Option<Instant>,
    questions: [Question; 2],
    /// What the servers asked before this one did.
    failures: Vec<(SocketAddr, Failure)>,
    waiters: Vec<QueryId>,
}

struct Question {
    qtype: RecordType,
    state: QuestionState,
}

enum QuestionState {
    /// To be sent to the current server.
    ToAsk,
    Waiting {
        id: u16,
    },
    /// Asked again over TCP after a truncated answer.
    OverTcp {
        id: u16,
        query: TcpQuery,
    },
    Settled(Answer),
}

enum Verdict {
    Wait,
    NextServer,
    /// The result, and how long to cache it (None: not at all).
    Done(LookupResult, Option<Duration>),
}

impl Resolver {
    /// `timeout` is how long each server gets before the next one is asked.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> io::Result<Resolver> {
        if servers.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no DNS servers configured (dns.servers)",
            ));
        }
        Ok(Resolver {
            servers: servers.to_vec(),
            timeout,
            poll: Poll::new()?,
            events: Events::with_capacity(EVENTS_PER_POLL),
            in_flight: HashMap::new(),
            by_name: HashMap::new(),
            next_token: 0,
            next_query_id: 0,
            cache: Cache::new(CACHE_ENTRIES),
            buffer: vec![0; RECEIVE_BUFFER],
        })
    }

    /// Registers the resolver's one fd: when it is readable, call `on_readable`.
    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(
            &mut SourceFd(&self.poll.as_raw_fd()),
            token,
            Interest::READABLE,
        )
    }

    pub fn lookup(&mut self, name: &str, now: Instant) -> Lookup {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Lookup::Cached(Ok(vec![ip]));
        }
        // Keys are normalised names, so a hit on the name as given is a true
        // hit, found without the cost of normalising it.
        if let Some(result) = self.cache.get(name, now) {
            return Lookup::Cached(result);
        }
        let name = match crate::names::normalize_host(name) {
            Ok(n) => n,
            Err(reason) => return Lookup::Cached(Err(DnsError::InvalidName(reason.to_string()))),
        };
        if let Some(result) = self.cache.get(&name, now) {
            return Lookup::Cached(result);
        }
        if let Some(&token) = self.by_name.get(&name) {
            let id = self.new_query_id();
            if let Some(transaction) = self.in_flight.get_mut(&token) {
                transaction.waiters.push(id);
                return Lookup::Pending(id);
            }
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return Lookup::Cached(Err(DnsError::Busy));
        }
        let qname = match Name::from_ascii(format!("{name}.")) {
            Ok(q) => q,
            Err(e) => return Lookup::Cached(Err(DnsError::InvalidName(e.to_string()))),
        };
        let id = self.new_query_id();
        let token = Token(self.next_token);
        self.next_token = self.next_token.wrapping_add(1);
        let fresh = |qtype| Question {
            qtype,
            state: QuestionState::ToAsk,
        };
        let transaction = Transaction {
            name: name.clone(),
            qname,
            server: 0,
            socket: None,
            deadline: now,
            resend_at: None,
            questions: [fresh(RecordType::A), fresh(RecordType::AAAA)],
            failures: Vec::new(),
            waiters: vec![id],
        };
        self.by_name.insert(name, token);
        self.in_flight.insert(token, transaction);
        self.ask_current_server(token, now);
        let mut finished = Vec::new();
        self.settle(token, now, &mut finished);
        match finished.pop() {
            // No server could even be asked.
            Some((_, result)) => Lookup::Cached(result),
            None => Lookup::Pending(id),
        }
    }

    /// Reads every answer that has arrived; returns the lookups they finish.
    pub fn on_readable(&mut self, now: Instant) -> Vec<(QueryId, LookupResult)> {
        let mut finished = Vec::new();
        loop {
            if let Err(e) = self.poll.poll(&mut self.events, Some(Duration::ZERO)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("dns: cannot poll the resolver's sockets: {e}");
                break;
            }
            if self.events.is_empty() {
                break;
            }
            let ready: Vec<Token> = self.events.iter().map(|e| e.token()).collect();
            for token in ready {
                self.receive(token);
                self.settle(token, now, &mut finished);
            }
        }
        finished
    }

    /// Resends unanswered questions halfway through a server's time, and moves
    /// on from servers whose time is up; call at `next_deadline`.
    pub fn on_timer(&mut self, now: Instant) -> Vec<(QueryId, LookupResult)> {
        let mut finished = Vec::new();
        let due: Vec<Token> = self
            .in_flight
            .iter()
            .filter(|(_, t)| t.next_deadline() <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in due {
            if let Some(transaction) = self.in_flight.get_mut(&token) {
                if transaction.deadline <= now {
                    transaction.give_up_waiting(Failure::TimedOut(self.timeout));
                } else {
                    transaction.resend_at = None;
                    if let Err(e) = transaction.send_waiting() {
                        transaction.give_up_waiting(Failure::Io(e.to_string()));
                    }
                }
            }
            self.settle(token, now, &mut finished);
        }
        finished
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.in_flight
            .values()
            .map(Transaction::next_deadline)
            .min()
    }

    fn new_query_id(&mut self) -> QueryId {
        self.next_query_id += 1;
        QueryId(self.next_query_id)
    }

    /// Sends the transaction's questions to ask to its current server, on a
    /// fresh socket: a new random source port and new random ids.
    fn ask_current_server(&mut self, token: Token, now: Instant) {
        let Some(transaction) = self.in_flight.get_mut(&token) else {
            return;
        };
        transaction.socket = None;
        transaction.deadline = now + self.timeout;
        transaction.resend_at = Some(now + self.timeout / 2);
        for q in &mut transaction.questions {
            if matches!(q.state, QuestionState::ToAsk) {
                q.state = QuestionState::Waiting {
                    id: rand::random::<u16>(),
                };
            }
        }
        let server = self.servers[transaction.server];
        let asked = open_socket(server).and_then(|mut socket| {
            self.poll
                .registry()
                .register(&mut socket, token, Interest::READABLE)?;
            transaction.socket = Some(socket);
            transaction.send_waiting()
        });
        if let Err(e) = asked {
            transaction.give_up_waiting(Failure::Io(e.to_string()));
        }
    }

    /// Drains one transaction's sockets, settling the questions they answer.
    fn receive(&mut self, token: Token) {
        let Some(transaction) = self.in_flight.get_mut(&token) else {
            return;
        };
        let server = self.servers[transaction.server];
        let registry = self.poll.registry();
        while let Some(socket) = &transaction.socket {
            let (n, from) = match socket.recv_from(&mut self.buffer) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // An ICMP error on a connected socket: nobody serves DNS
                    // there over UDP. Questions gone over TCP carry on.
                    for q in &mut transaction.questions {
                        if matches!(q.state, QuestionState::Waiting { .. }) {
                            q.state =
                                QuestionState::Settled(Answer::Failed(Failure::Io(e.to_string())));
                        }
                    }
                    break;
                }
            };
            if from != server {
                continue;
            }
            let Some(response) = wire::decode_response(&self.buffer[..n]) else {
                continue;
            };
            for q in &mut transaction.questions {
                let QuestionState::Waiting { id } = q.state else {
                    continue;
                };
                q.state = match wire::answer_to(&response, id, &transaction.qname, q.qtype) {
                    None => continue,
                    Some(Answer::Truncated) => {
                        match ask_over_tcp(server, id, &transaction.qname, q.qtype, registry, token)
                        {
                            Ok(query) => QuestionState::OverTcp { id, query },
                            Err(e) => QuestionState::Settled(Answer::Failed(Failure::Io(format!(
                                "over TCP: {e}"
                            )))),
                        }
                    }
                    Some(answer) => QuestionState::Settled(answer),
                };
            }
        }
        transaction.advance_tcp(server);
    }

    /// Finishes the transaction, moves it on to the next server, or leaves it.
    fn settle(&mut self, token: Token, now: Instant, finished: &mut Vec<(QueryId, LookupResult)>) {
        loop {
            let Some(transaction) = self.in_flight.get_mut(&token) else {
                return;
            };
            match transaction.verdict(&self.servers) {
                Verdict::Wait => return,
                Verdict::NextServer => {
                    transaction.failures = transaction.failures_so_far(&self.servers);
                    for q in &mut transaction.questions {
                        if matches!(q.state, QuestionState::Settled(Answer::Failed(_))) {
                            q.state = QuestionState::ToAsk;
                        }
                    }
                    transaction.server += 1;
                    self.ask_current_server(token, now);
                }
                Verdict::Done(result, ttl) => {
                    let Some(transaction) = self.in_flight.remove(&token) else {
                        return;
                    };
                    self.by_name.remove(&transaction.name);
                    if let Some(ttl) = ttl {
                        self.cache
                            .insert(transaction.name, result.clone(), ttl, now);
                    }
                    for waiter in transaction.waiters {
                        finished.push((waiter, result.clone()));
                    }
                    return;
                }
            }
        }
    }
}

impl Transaction {
    fn next_deadline(&self) -> Instant {
        self.resend_at.unwrap_or(self.deadline).min(self.deadline)
    }

    /// Sends the questions waiting for an answer on the current socket.
    fn send_waiting(&self) -> io::Result<()> {
        let Some(socket) = &self.socket else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no socket"));
        };
        for q in &self.questions {
            if let QuestionState::Waiting { id } = q.state {
                let packet = wire::encode_query(id, &self.qname, q.qtype)?;
                socket.send(&packet)?;
            }
        }
        Ok(())
    }

    /// Settles every question not answered yet (sent or not) as failed.
    fn give_up_waiting(&mut self, failure: Failure) {
        for q in &mut self.questions {
            if !matches!(q.state, QuestionState::Settled(_)) {
                q.state = QuestionState::Settled(Answer::Failed(failure.clone()));
            }
        }
    }

    /// Moves the questions asked over TCP on as far as their sockets allow.
    fn advance_tcp(&mut self, server: SocketAddr) {
        for q in &mut self.questions {
            let QuestionState::OverTcp { id, query } = &mut q.state else {
                continue;
            };
            let answer = match query.advance() {
                Ok(None) => continue,
                Ok(Some(message)) => match wire::decode_response(message)
                    .and_then(|r| wire::answer_to(&r, *id, &self.qname, q.qtype))
                {
                    Some(Answer::Truncated) => Answer::Failed(Failure::Answered(
                        "answered with a truncated message over TCP".into(),
                    )),
                    Some(answer) => answer,
                    None => Answer::Failed(Failure::Answered(format!(
                        "answered something else than our question over TCP ({server})"
                    ))),
                },
                Err(e) => Answer::Failed(Failure::Io(format!("over TCP: {e}"))),
            };
            q.state = QuestionState::Settled(answer);
        }
    }

    /// The failures of the servers before this one, and this one's.
    fn failures_so_far(&self, servers: &[SocketAddr]) -> Vec<(SocketAddr, Failure)> {
        let mut failures = self.failures.clone();
        for q in &self.questions {
            if let QuestionState::Settled(Answer::Failed(f)) = &q.state {
                let entry = (servers[self.server], f.clone());
                if !failures.contains(&entry) {
                    failures.push(entry);
                }
            }
        }
        failures
    }

    /// A and AAAA answers combine: any address is success, a question that
    /// failed is asked again of the next server, and only negative answers to
    /// both make a negative result.
    fn verdict(&self, servers: &[SocketAddr]) -> Verdict {
        let mut answers = Vec::with_capacity(self.questions.len());
        for q in &self.questions {
            match &q.state {
                QuestionState::ToAsk
                | QuestionState::Waiting { .. }
                | QuestionState::OverTcp { .. } => return Verdict::Wait,
                QuestionState::Settled(answer) => answers.push(answer),
            }
        }
        let mut addrs = Vec::new();
        let mut ttl = u32::MAX;
        for answer in &answers {
            if let Answer::Addresses { addrs: a, ttl: t } = answer {
                addrs.extend_from_slice(a);
                ttl = ttl.min(*t);
            }
        }
        if !addrs.is_empty() {
            let ttl = Duration::from_secs(ttl.into()).clamp(MIN_TTL, MAX_TTL);
            return Verdict::Done(Ok(addrs), Some(ttl));
        }
        if answers.iter().any(|a| matches!(a, Answer::Failed(_))) {
            if self.server + 1 < servers.len() {
                return Verdict::NextServer;
            }
            return Verdict::Done(
                Err(DnsError::Unanswered(self.failures_so_far(servers))),
                None,
            );
        }
        if answers.iter().any(|a| matches!(a, Answer::NoSuchName)) {
            Verdict::Done(Err(DnsError::NoSuchName), Some(NEGATIVE_TTL))
        } else {
            Verdict::Done(Err(DnsError::NoAddresses), Some(NEGATIVE_TTL))
        }
    }
}

fn ask_over_tcp(
    server: SocketAddr,
    id: u16,
    qname: &Name,
    qtype: RecordType,
    registry: &Registry,
    token: Token,
) -> io::Result<TcpQuery> {
    let packet = wire::encode_query(id, qname, qtype)?;
    TcpQuery::start(server, &packet, registry, token)
}

fn open_socket(server: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // Port 0: the kernel picks a random free port.
    let socket = UdpSocket::bind(local)?;
    socket.connect(server)?;
    Ok(socket)
}
