//! One intercepted connection, from accept to its audit record.
//!
//! Sniffing → deciding → (resolving) → connecting → (upstream handshake) →
//! relaying; or a refusal that says why where the protocol allows.

use super::plan::{self, Action, Conn, Decided, Dialing, Next, Proxy, Search, Via};
use super::relay::{write_fd, Flow, Pump};
use super::Runtime;
use crate::agent_dns::names::ResolvedNames;
use crate::audit::{AttributionDone, Proto, Record, Verdict};
use crate::config::Mode;
use crate::dns::{Lookup, LookupResult, QueryId, Resolver};
use crate::loopback::Listener;
use crate::names::normalize_host;
use crate::outbound::{
    self, DialOptions, Handshake, HttpConnectHandshake, Progress, RequestError, Socks5Handshake,
};
use crate::policy::Process;
use crate::procinfo::OwnerQuery;
use crate::sniff::{self, RequestStream, Sniff, Sniffed};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes moved per session per event before others get a turn.
const RELAY_BUDGET: usize = 1 << 20;
/// How long a refused client may take to read our refusal before we reset.
const LINGER_AFTER_REFUSAL: Duration = Duration::from_secs(1);
/// The longest a refusal waits for the client's process to be named.
const HOLD_REFUSAL: Duration = Duration::from_millis(100);
/// A relay idle this long gives its pipes back.
const RELEASE_PIPES_AFTER: Duration = Duration::from_secs(5);

/// What the worker does with the session after a step.
pub enum Step {
    Continue,
    /// Work is left that no readiness event will announce (byte budget).
    Again,
    /// Waiting for a DNS answer to this query.
    AwaitDns(QueryId),
    /// A refusal, or a decision by a rule on the process, is held: call
    /// `poll_hold` until it goes on.
    Hold,
    /// Done: the record is final, the sockets are closed on drop.
    Close,
    /// The policy said `ask`: the worker's held sessions (`held`) take it,
    /// to ask, or at its deadline to fall back.
    Ask,
}

enum Phase {
    Sniffing,
    /// A connection to loopback, decided by who listens there at the first event.
    ToLoopback {
        listener: Option<Listener>,
    },
    /// Waiting for `query`: an answer to any other query is not ours (the
    /// worker's slot may have been reused since that query was sent).
    Resolving {
        host: String,
        port: u16,
        query: QueryId,
    },
    Connecting {
        candidates: Vec<SocketAddr>,
        via: Via,
    },
    Handshaking {
        shake: Box<dyn Handshake + Send>,
    },
    Relaying,
    /// A rule on the process may decide: wait for the audit writer to read
    /// it (at most `PROCESS_WAIT`), then decide again.
    AwaitingProcess,
    /// A refusal waits for the audit writer to name the client's process
    /// (at most `HOLD_REFUSAL`): once refused, the client may close at once.
    Holding {
        rule: String,
    },
    /// A refusal was written; wait for the client to close, briefly.
    Refused,
    /// Held, nothing dialled, until a supervisor answers `question` (None:
    /// not asked yet) or its deadline; then as `direct` or `block`.
    Asking {
        question: Option<u64>,
        matched_domain: bool,
        rule: String,
        since: Instant,
    },
}

pub struct Session {
    client: TcpStream,
    upstream: Option<TcpStream>,
    original_dst: SocketAddr,
    runtime: Arc<Runtime>,
    phase: Phase,
    started: Instant,
    last_activity: Instant,
    /// Deadline of the current phase (sniff, resolve, connect, refusal).
    deadline: Option<Instant>,
    sniffed: Vec<u8>,
    up: Flow,
    down: Flow,
    dial_options: DialOptions,
    pub record: Record,
    /// Where the audit writer finds the owning process.
    pub owner: Option<OwnerQuery>,
    /// Set when the writer has looked for the owning process.
    pub attribution: Option<AttributionDone>,
    /// Set when the policy decided, until the worker has seen it.
    decided: bool,
    /// Whether each socket is registered for writability: only while a
    /// write waits (or a connect completes), since every ACK that frees send
    /// space would otherwise wake the loop for nothing.
    client_watches_writes: bool,
    upstream_watches_writes: bool,
    /// The wait for the process is over without it.
    process_wait_over: bool,
}

/// One readiness event, for [`Session::note_readiness`].
pub struct Readiness {
    /// The upstream socket (else the client's).
    pub upstream: bool,
    /// Readable, read-closed or in error.
    pub readable: bool,
    /// Read-closed or in error.
    pub read_closed: bool,
    /// Writable, write-closed or in error.
    pub writable: bool,
}

impl Readiness {
    pub fn of(event: &mio::event::Event, upstream: bool) -> Readiness {
        Readiness {
            upstream,
            readable: event.is_readable() || event.is_read_closed() || event.is_error(),
            read_closed: event.is_read_closed() || event.is_error(),
            writable: event.is_writable() || event.is_write_closed() || event.is_error(),
        }
    }
}

/// What a step may touch besides the session itself.
pub struct Ctx<'a> {
    pub registry: &'a Registry,
    pub resolver: Option<&'a mut Resolver>,
    pub now: Instant,
    pub upstream_token: Token,
    /// The names the agents resolved addresses for, through the DNS handler.
    pub resolved: &'a ResolvedNames,
}

impl Session {
    pub fn new(
        client: TcpStream,
        original_dst: SocketAddr,
        runtime: Arc<Runtime>,
        record: Record,
        now: Instant,
    ) -> Session {
        let sniff_timeout = Duration::from_millis(runtime.config.limits.sniff_timeout_ms);
        Session {
            client,
            upstream: None,
            original_dst,
            runtime,
            phase: Phase::Sniffing,
            started: now,
            last_activity: now,
            deadline: Some(now + sniff_timeout),
            sniffed: Vec::new(),
            up: Flow::new(Vec::new()),
            down: Flow::new(Vec::new()),
            dial_options: DialOptions::default(),
            record,
            owner: None,
            attribution: None,
            decided: false,
            client_watches_writes: false,
            upstream_watches_writes: false,
            process_wait_over: false,
        }
    }

    /// The connection goes to the host's loopback: it is decided by the
    /// listener found there (`None`: nothing listens), not by a sniffed name.
    pub fn decide_by_listener(&mut self, listener: Option<Listener>) {
        self.phase = Phase::ToLoopback { listener };
        self.deadline = None;
    }

    /// True once, after the policy decided (for a "start" audit record).
    pub fn take_decided(&mut self) -> bool {
        std::mem::take(&mut self.decided)
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.client, token, Interest::READABLE)
    }

    /// Watch each socket for writability exactly while something waits to
    /// be written to it (or its connect to complete). Edge-triggered: a
    /// socket registered again while writable reports it at once.
    pub fn watch_writes(
        &mut self,
        registry: &Registry,
        client_token: Token,
        upstream_token: Token,
    ) -> io::Result<()> {
        let relaying = matches!(self.phase, Phase::Relaying);
        let client_wants = relaying && self.down.waits_to_write();
        let upstream_wants = match self.phase {
            Phase::Connecting { .. } | Phase::Handshaking { .. } => true,
            Phase::Relaying => self.up.waits_to_write(),
            _ => false,
        };
        let interest = |writes: bool| match writes {
            true => Interest::READABLE | Interest::WRITABLE,
            false => Interest::READABLE,
        };
        if client_wants != self.client_watches_writes {
            registry.reregister(&mut self.client, client_token, interest(client_wants))?;
            self.client_watches_writes = client_wants;
        }
        if let Some(up) = self.upstream.as_mut() {
            if upstream_wants != self.upstream_watches_writes {
                registry.reregister(up, upstream_token, interest(upstream_wants))?;
                self.upstream_watches_writes = upstream_wants;
            }
        }
        Ok(())
    }

    /// What the event loop reported for one of the two sockets; the relay
    /// tries a side again only once it is reported ready.
    pub fn note_readiness(&mut self, readiness: Readiness) {
        // client→upstream reads the client and writes the upstream; the
        // other flow the reverse.
        let (reading, writing) = if readiness.upstream {
            (&mut self.down, &mut self.up)
        } else {
            (&mut self.up, &mut self.down)
        };
        if readiness.readable {
            reading.source_readable(readiness.read_closed);
        }
        if readiness.writable {
            writing.dest_writable();
        }
    }

    /// A readiness event on either socket, or a retry.
    pub fn on_event(&mut self, ctx: &mut Ctx) -> Step {
        let step = match self.phase {
            Phase::Sniffing => self.sniff(ctx),
            Phase::ToLoopback { ref mut listener } => {
                let listener = listener.take();
                self.decide_loopback(ctx, listener)
            }
            Phase::Resolving { .. } => Step::Continue,
            Phase::Connecting { .. } => self.check_connected(ctx),
            Phase::Handshaking { .. } => self.handshake(ctx),
            Phase::Relaying => self.relay(ctx.now),
            Phase::Holding { .. } | Phase::AwaitingProcess => Step::Continue,
            Phase::Refused => self.drain_refused(),
            Phase::Asking { .. } => self.held_client_closed(),
        };
        self.record_bytes();
        step
    }

    /// When [`Session::on_tick`] next has something to do, as of `now`: the
    /// phase's deadline, and while relaying the idle timeout and the pipes'
    /// release (until they are released).
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let phase = match self.phase {
            Phase::ToLoopback { .. } => None,
            _ => self.deadline,
        };
        let Phase::Relaying = self.phase else {
            return phase;
        };
        let idle_timeout = Duration::from_secs(self.runtime.config.limits.idle_timeout_s);
        let idle = self.last_activity.checked_add(idle_timeout);
        let release = Some(self.last_activity + RELEASE_PIPES_AFTER).filter(|at| *at > now);
        [phase, idle, release].into_iter().flatten().min()
    }

    /// The phase deadline or the idle timeout passed?
    pub fn on_tick(&mut self, ctx: &mut Ctx) -> Step {
        let now = ctx.now;
        if let Some(deadline) = self.deadline {
            if now >= deadline {
                return match self.phase {
                    Phase::Sniffing => self.decide(ctx, Some("sniff timeout")),
                    Phase::ToLoopback { .. } => Step::Continue,
                    Phase::Resolving { ref host, .. } => {
                        let e = format!("dns: no answer for {host} in time");
                        self.fail(e)
                    }
                    Phase::Connecting { .. } | Phase::Handshaking { .. } => {
                        self.fail("upstream connect timed out".into())
                    }
                    Phase::Holding { .. } | Phase::AwaitingProcess => self.poll_hold(ctx),
                    Phase::Refused | Phase::Relaying => Step::Close,
                    Phase::Asking { .. } => Step::Ask,
                };
            }
        }
        if let Phase::Relaying = self.phase {
            let idle = now.saturating_duration_since(self.last_activity);
            if idle >= Duration::from_secs(self.runtime.config.limits.idle_timeout_s) {
                self.record.error = Some("idle timeout".into());
                return self.abort();
            }
            if idle >= RELEASE_PIPES_AFTER {
                self.up.release_idle();
                self.down.release_idle();
            }
        }
        Step::Continue
    }

    /// The DNS answer this session waited for.
    pub fn on_resolved(&mut self, ctx: &mut Ctx, query: QueryId, answer: LookupResult) -> Step {
        let Phase::Resolving {
            ref host,
            port,
            query: awaited,
        } = self.phase
        else {
            return Step::Continue;
        };
        if awaited != query {
            return Step::Continue;
        }
        match answer {
            Ok(addrs) if !addrs.is_empty() => {
                let host = host.clone();
                self.dial_resolved(ctx, &host, port, &addrs)
            }
            Ok(_) => {
                let e = format!("dns: {host} has no addresses");
                self.fail(e)
            }
            Err(e) => {
                let e = format!("dns: {host}: {e}");
                self.fail(e)
            }
        }
    }

    /// What the control API shows of this connection (its process is the
    /// audit writer's to tell).
    pub fn snapshot(&self, now: Instant) -> super::ConnectionInfo {
        let r = &self.record;
        super::ConnectionInfo {
            id: r.conn_id.unwrap_or(0),
            agent: r.agent.clone(),
            uid: r.uid,
            pid: None,
            exe: None,
            src: r.src.clone(),
            dst: r.dst.clone(),
            host: r.host.clone(),
            rule: r.rule.clone(),
            outbound: r.outbound.clone(),
            verdict: r.verdict,
            bytes_up: self.up.delivered,
            bytes_down: self.down.delivered,
            age_ms: now.saturating_duration_since(self.started).as_millis() as u64,
        }
    }

    /// Closed on a supervisor's request: a reset, the record says by whom.
    pub fn close_by_request(&mut self, why: String) {
        self.record.error = Some(why);
        self.abort();
        self.finish_record();
    }

    /// Ending on a shutdown of the daemon.
    pub fn shutdown(&mut self) {
        if self.record.error.is_none() && !matches!(self.phase, Phase::Refused) {
            self.record.error = Some("proxy shutting down".into());
        }
        self.finish_record();
    }

    pub fn finish_record(&mut self) {
        self.record_bytes();
        self.record.duration_ms = self.started.elapsed().as_millis() as u64;
    }

    fn record_bytes(&mut self) {
        self.record.bytes_up = self.up.delivered;
        self.record.bytes_down = self.down.delivered;
    }

    // ---- sniffing and deciding -------------------------------------------------

    fn sniff(&mut self, ctx: &mut Ctx) -> Step {
        let max = self.runtime.config.limits.sniff_bytes;
        let mut chunk = [0u8; 4096];
        loop {
            let room = max.saturating_sub(self.sniffed.len()).min(chunk.len());
            if room == 0 {
                break;
            }
            match read(&self.client, &mut chunk[..room]) {
                Ok(0) => {
                    if self.sniffed.is_empty() {
                        self.record.error = Some("client closed before sending anything".into());
                        return Step::Close;
                    }
                    break;
                }
                Ok(n) => {
                    self.sniffed.extend_from_slice(&chunk[..n]);
                    // Less than asked: the socket is drained, and bytes that
                    // come later raise a new edge. No EAGAIN probe needed.
                    if n < room {
                        self.up.source_drained();
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.up.source_drained();
                    break;
                }
                Err(e) => {
                    self.record.error = Some(format!("client: {e}"));
                    return Step::Close;
                }
            }
        }
        if self.sniffed.is_empty() {
            return Step::Continue;
        }
        match sniff::sniff(&self.sniffed, max) {
            Sniff::NeedMore => Step::Continue,
            Sniff::Done(found) => {
                self.apply_sniffed(found);
                self.decide(ctx, None)
            }
        }
    }

    fn apply_sniffed(&mut self, found: Sniffed) {
        let raw = match found {
            Sniffed::Tls { sni, ech } => {
                self.record.proto = Proto::Tls;
                self.record.ech = ech;
                self.record.sni = sni.clone();
                sni
            }
            Sniffed::Http { host } => {
                self.record.proto = Proto::Http;
                self.record.http_host = Some(host.clone());
                Some(host)
            }
            Sniffed::Unnamed { reason } => {
                self.record.proto = Proto::Tcp;
                self.record.sniff = Some(reason.to_string());
                None
            }
        };
        // An IP literal names no host: it gets IP rules only.
        self.record.host =
            raw.filter(|h| h.parse::<IpAddr>().is_err())
                .and_then(|h| match normalize_host(&h) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        self.record.sniff = Some(format!("name not usable: {e}"));
                        None
                    }
                });
    }

    fn decide(&mut self, ctx: &mut Ctx, sniff_ended: Option<&str>) -> Step {
        if let Some(why) = sniff_ended {
            self.record.proto = if self.sniffed.is_empty() {
                Proto::Tcp
            } else {
                self.record.proto
            };
            self.record.sniff = Some(why.to_string());
        }
        self.deadline = None;
        let runtime = self.runtime.clone();
        let host = self.record.host.clone();
        let plan = plan::decide(
            &runtime,
            &self.conn(),
            host.as_deref(),
            ctx.resolved,
            ctx.now,
        );
        if let Some(lookups) = plan.lookups {
            self.record.resolved = Some(lookups.resolved);
            if let Some(name) = lookups.adopted {
                self.record.host = Some(name);
            }
            if lookups.mismatch {
                self.record.name_mismatch = Some(true);
            }
            if let Some(latest) = lookups.latest {
                self.record.resolved_name = Some(latest);
            }
        }
        match plan.next {
            Next::AwaitProcess { until } => self.await_process(ctx, until),
            Next::Decided(decided) => self.carry_out(ctx, *decided),
        }
    }

    /// What the plan is told of this connection now.
    fn conn(&self) -> Conn<'_> {
        let process = match &self.attribution {
            None => Process::Unknown,
            // No executable read: gone (or hidden) by the time it was read.
            Some(done) if done.is_done() => match done.process() {
                Some(info) if info.exe.is_some() => Process::Known(info),
                _ => Process::Unknown,
            },
            Some(_) if self.process_wait_over => Process::Unknown,
            Some(_) => Process::Pending,
        };
        let search = match &self.attribution {
            _ if self.process_wait_over => Search::WaitOver,
            Some(_) => Search::Looked,
            None => Search::None,
        };
        Conn {
            original_dst: self.original_dst,
            agent: self.record.agent.as_deref(),
            uid: self.record.uid,
            process,
            search,
        }
    }

    /// Hold the decision until the process is read (the loop is woken then)
    /// or `until`.
    fn await_process(&mut self, ctx: &mut Ctx, until: Instant) -> Step {
        let done_already = self.attribution.as_ref().is_none_or(AttributionDone::watch);
        if done_already {
            // Between the decision and the watch: decide with it now.
            return self.decide(ctx, None);
        }
        self.phase = Phase::AwaitingProcess;
        self.deadline = Some(until);
        Step::Hold
    }

    /// Write a decision into the record, then act on it.
    fn carry_out(&mut self, ctx: &mut Ctx, decided: Decided) -> Step {
        self.decided = true;
        self.execute(ctx, decided)
    }

    /// The record says what was decided; then it is done.
    fn execute(&mut self, ctx: &mut Ctx, decided: Decided) -> Step {
        let record = &mut self.record;
        if decided.attribution.is_some() {
            record.attribution = decided.attribution;
        }
        record.rule = Some(decided.rule);
        record.outbound = decided.outbound;
        record.verdict = decided.verdict;
        if decided.dial.is_some() {
            record.dial = decided.dial;
        }
        if decided.error.is_some() {
            record.error = decided.error;
        }
        self.dial_options = decided.dial_options;
        match decided.action {
            Action::Refuse => {
                let rule = self.record.rule.clone().unwrap_or_default();
                self.refuse_politely(&rule)
            }
            Action::Reset => self.abort(),
            Action::Resolve { host, port } => self.resolve(ctx, host, port),
            Action::Connect { to, via } => self.connect(ctx, to, via),
            Action::Ask { matched_domain } => {
                let rule = self.record.rule.clone().unwrap_or_default();
                self.ask(ctx.now, &rule, matched_domain)
            }
        }
    }

    fn decide_loopback(&mut self, ctx: &mut Ctx, listener: Option<Listener>) -> Step {
        self.record.sniff = Some("loopback: decided by its listener, not sniffed".into());
        let runtime = self.runtime.clone();
        let decided = plan::decide_loopback(&runtime, &self.conn(), listener.as_ref());
        self.carry_out(ctx, decided)
    }

    fn resolve(&mut self, ctx: &mut Ctx, host: String, port: u16) -> Step {
        let Some(resolver) = ctx.resolver.as_deref_mut() else {
            return self.fail(format!(
                "dns: no dns.servers configured to resolve {host} (domain rules dial the name, not the agent's IP)"
            ));
        };
        let lookup = resolver.lookup(&host, ctx.now);
        let timeout = Duration::from_millis(self.runtime.config.dns.timeout_ms) * 2;
        match lookup {
            Lookup::Cached(Ok(addrs)) => self.dial_resolved(ctx, &host, port, &addrs),
            Lookup::Cached(Err(e)) => self.fail(format!("dns: {host}: {e}")),
            Lookup::Pending(id) => {
                self.phase = Phase::Resolving {
                    host,
                    port,
                    query: id,
                };
                self.deadline = Some(ctx.now + timeout);
                Step::AwaitDns(id)
            }
        }
    }

    /// Dial a name as our resolver sees it, per `dns.domain_dial`.
    fn dial_resolved(&mut self, ctx: &mut Ctx, host: &str, port: u16, addrs: &[IpAddr]) -> Step {
        let runtime = self.runtime.clone();
        match plan::dial_resolved(&runtime, &self.conn(), host, port, addrs) {
            Dialing::Refuse(refusal) => {
                self.record.dial = Some(refusal.dial);
                self.record.verdict = Verdict::Block;
                self.record.error = Some(refusal.reason);
                let rule = self.record.rule.clone().unwrap_or_default();
                self.refuse_politely(&rule)
            }
            Dialing::Connect { dial, to } => {
                self.record.dial = Some(dial);
                self.connect(ctx, to, Via::Direct)
            }
        }
    }

    // ---- connecting ----------------------------------------------------------------

    fn connect(&mut self, ctx: &mut Ctx, mut candidates: Vec<SocketAddr>, via: Via) -> Step {
        candidates.reverse(); // popped from the end
        self.phase = Phase::Connecting { candidates, via };
        self.deadline =
            Some(ctx.now + Duration::from_millis(self.runtime.config.limits.connect_timeout_ms));
        self.try_next_candidate(ctx, None)
    }

    fn try_next_candidate(&mut self, ctx: &mut Ctx, last_error: Option<String>) -> Step {
        if let Some(mut old) = self.upstream.take() {
            let _ = ctx.registry.deregister(&mut old);
        }
        let Phase::Connecting { candidates, .. } = &mut self.phase else {
            return Step::Continue;
        };
        let Some(addr) = candidates.pop() else {
            return self.fail(last_error.unwrap_or_else(|| "no address to dial".into()));
        };
        match outbound::dial(addr, &self.dial_options) {
            Ok(mut stream) => {
                if let Err(e) = ctx.registry.register(
                    &mut stream,
                    ctx.upstream_token,
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    return self.fail(format!("upstream {addr}: {e}"));
                }
                self.record.upstream = Some(addr.to_string());
                self.upstream = Some(stream);
                self.upstream_watches_writes = true;
                Step::Continue
            }
            Err(e) => self.try_next_candidate(ctx, Some(format!("upstream {addr}: {e}"))),
        }
    }

    fn check_connected(&mut self, ctx: &mut Ctx) -> Step {
        let Some(up) = self.upstream.as_ref() else {
            return Step::Continue;
        };
        match outbound::connect_outcome(up) {
            Ok(true) => {}
            Ok(false) => return Step::Continue,
            Err(e) => {
                let addr = self.record.upstream.clone().unwrap_or_default();
                return self.try_next_candidate(ctx, Some(format!("upstream {addr}: {e}")));
            }
        }
        let Phase::Connecting { via, .. } = std::mem::replace(&mut self.phase, Phase::Relaying)
        else {
            return Step::Continue;
        };
        match via {
            Via::Direct => self.start_relay(ctx.now, Vec::new()),
            Via::Proxy { target, proxy } => {
                let shake: Result<Box<dyn Handshake + Send>, RequestError> = match proxy {
                    Proxy::Socks5(auth) => {
                        Socks5Handshake::new(target, auth.as_ref()).map(|h| Box::new(h) as _)
                    }
                    Proxy::HttpConnect(auth) => {
                        HttpConnectHandshake::new(target, auth.as_ref()).map(|h| Box::new(h) as _)
                    }
                };
                match shake {
                    Ok(shake) => {
                        self.phase = Phase::Handshaking { shake };
                        self.handshake(ctx)
                    }
                    Err(e) => self.fail(e.to_string()),
                }
            }
        }
    }

    fn handshake(&mut self, ctx: &mut Ctx) -> Step {
        let Some(up) = self.upstream.as_ref() else {
            return Step::Continue;
        };
        let fd = up.as_raw_fd();
        let Phase::Handshaking { shake } = &mut self.phase else {
            return Step::Continue;
        };
        let progress = loop {
            let out = shake.bytes_to_send();
            if !out.is_empty() {
                match write_fd(fd, out) {
                    Ok(n) => {
                        shake.sent(n);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                    Err(e) => break Progress::Failed(format!("upstream proxy: {e}")),
                }
            }
            let mut buf = [0u8; 1024];
            match read(up, &mut buf) {
                Ok(0) => break Progress::Failed(shake.closed()),
                Ok(n) => match shake.received(&buf[..n]) {
                    Progress::NeedMore | Progress::Send => {}
                    done => break done,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                Err(e) => break Progress::Failed(format!("upstream proxy: {e}")),
            }
        };
        match progress {
            Progress::Open { leftover } => self.start_relay(ctx.now, leftover),
            Progress::Failed(reason) => self.fail(reason),
            Progress::NeedMore | Progress::Send => Step::Continue,
        }
    }

    // ---- relaying --------------------------------------------------------------------

    fn start_relay(&mut self, now: Instant, to_client: Vec<u8>) -> Step {
        self.phase = Phase::Relaying;
        self.deadline = None;
        self.last_activity = now;
        // Everything read while sniffing goes out first, unchanged.
        let sniffed = std::mem::take(&mut self.sniffed);
        // What the sniffer and the events since told of the client's socket.
        let sniffer = std::mem::replace(&mut self.up, Flow::new(Vec::new()));
        self.down = Flow::new(to_client);
        // A plain-HTTP connection carries requests for its one host only.
        // (An IP literal is the host it is held to.)
        let host = self.record.host.as_ref().or(self.record.http_host.as_ref());
        let inspect = match (self.record.proto, host) {
            (Proto::Http, Some(host)) if self.runtime.config.mode != Mode::Audit => Some(
                RequestStream::new(host, self.runtime.config.limits.sniff_bytes),
            ),
            _ => None,
        };
        self.up = match inspect {
            Some(inspect) => match Flow::inspected(sniffed, inspect) {
                Ok(flow) => flow,
                Err(why) => return self.refuse_request(why.to_string()),
            },
            None => Flow::new(sniffed),
        };
        self.up.keep_source_state(&sniffer);
        self.relay(now)
    }

    /// A request that must not pass on a connection already relayed: a 403 to
    /// the client, the connection ended.
    fn refuse_request(&mut self, why: String) -> Step {
        self.record.verdict = Verdict::Block;
        self.record.error = Some(why);
        let rule = self.record.rule.clone().unwrap_or_default();
        self.send_refusal(&rule)
    }

    fn relay(&mut self, now: Instant) -> Step {
        let Some(up) = self.upstream.as_ref() else {
            return Step::Continue;
        };
        let (client, upstream) = (self.client.as_raw_fd(), up.as_raw_fd());
        let before = self.up.delivered + self.down.delivered;
        let mut budget = RELAY_BUDGET;
        let down_finished = self.down.is_finished();
        let result = self
            .up
            .pump(client, upstream, &mut budget, down_finished)
            .map_err(|e| ("client→upstream", e))
            .and_then(|a| {
                let up_finished = self.up.is_finished();
                self.down
                    .pump(upstream, client, &mut budget, up_finished)
                    .map(|b| (a, b))
                    .map_err(|e| ("upstream→client", e))
            });
        if self.up.delivered + self.down.delivered != before {
            self.last_activity = now;
        }
        match result {
            Err((dir, e)) => {
                self.record.error = Some(format!("{dir}: {e}"));
                self.abort()
            }
            Ok((Pump::Refused, _)) => {
                let why = self.up.refusal.take().unwrap_or_default();
                self.refuse_request(why)
            }
            Ok((Pump::Finished, Pump::Finished)) => Step::Close,
            Ok((a, b)) if a == Pump::Budget || b == Pump::Budget => Step::Again,
            Ok(_) => Step::Continue,
        }
    }

    // ---- endings -----------------------------------------------------------------------

    /// Refuse saying why where the protocol allows: a TLS access_denied alert
    /// before any ServerHello, an HTTP 403, else a reset. Held first, briefly,
    /// until the audit writer has named the client's process.
    fn refuse_politely(&mut self, rule: &str) -> Step {
        if self.attribution.as_ref().is_some_and(|a| !a.watch()) {
            self.phase = Phase::Holding {
                rule: rule.to_string(),
            };
            self.deadline = Some(Instant::now() + HOLD_REFUSAL);
            return Step::Hold;
        }
        self.send_refusal(rule)
    }

    /// A held refusal goes out once the process is named or the hold is
    /// over; a held decision is made then.
    pub fn poll_hold(&mut self, ctx: &mut Ctx) -> Step {
        let now = ctx.now;
        if let Phase::AwaitingProcess = self.phase {
            let named = self
                .attribution
                .as_ref()
                .is_none_or(AttributionDone::is_done);
            if !named && self.deadline.is_some_and(|d| now < d) {
                return Step::Hold;
            }
            self.process_wait_over = !named;
            return self.decide(ctx, None);
        }
        let Phase::Holding { ref rule } = self.phase else {
            return Step::Continue;
        };
        let named = self.attribution.as_ref().is_none_or(|a| a.is_done());
        if !named && self.deadline.is_some_and(|d| now < d) {
            return Step::Hold;
        }
        let rule = rule.clone();
        self.send_refusal(&rule)
    }

    fn send_refusal(&mut self, rule: &str) -> Step {
        let message = match self.record.proto {
            Proto::Tls => outbound::tls_access_denied_alert().to_vec(),
            Proto::Http => {
                outbound::http_forbidden(rule, self.record.host.as_deref().unwrap_or(""))
            }
            _ => return self.abort(),
        };
        // A fresh socket's send buffer takes these few bytes whole.
        if write_fd(self.client.as_raw_fd(), &message).is_err() {
            return self.abort();
        }
        let _ = self.client.shutdown(std::net::Shutdown::Write);
        self.phase = Phase::Refused;
        self.deadline = Some(Instant::now() + LINGER_AFTER_REFUSAL);
        self.drain_refused()
    }

    /// Read and discard until the client closes: closing with unread bytes
    /// would reset the connection before the client reads our refusal.
    fn drain_refused(&mut self) -> Step {
        let mut buf = [0u8; 4096];
        loop {
            match read(&self.client, &mut buf) {
                Ok(0) => return Step::Close,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                Err(_) => return Step::Close,
            }
        }
    }

    /// An upstream failure: the client gets a reset at once, the record says why.
    fn fail(&mut self, error: String) -> Step {
        if self.record.verdict != Verdict::Block {
            self.record.verdict = Verdict::Error;
        }
        self.record.error = Some(error);
        self.abort()
    }

    /// Close the client with RST rather than FIN.
    fn abort(&mut self) -> Step {
        set_linger_zero(self.client.as_raw_fd());
        Step::Close
    }
}

/// The `ask` verdict's hook: the session holds itself; the worker's `held`
/// asks, wakes it with the outcome and times it out.
impl Session {
    /// Held as an idle connection is, plus the sniffed prefix (kept to the
    /// byte): no upstream, no buffers, no pipes.
    fn ask(&mut self, now: Instant, rule: &str, matched_domain: bool) -> Step {
        self.phase = Phase::Asking {
            question: None,
            matched_domain,
            rule: rule.to_string(),
            since: now,
        };
        self.deadline = None;
        self.sniffed.shrink_to_fit();
        Step::Ask
    }

    /// The config it was accepted under.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn original_dst(&self) -> SocketAddr {
        self.original_dst
    }

    /// The question it is held on; None before it asked, and after.
    pub fn held_on(&self) -> Option<u64> {
        match self.phase {
            Phase::Asking { question, .. } => question,
            _ => None,
        }
    }

    /// Whether it waits to be asked (the policy said `ask` just now).
    pub fn wants_to_ask(&self) -> bool {
        matches!(self.phase, Phase::Asking { question: None, .. })
    }

    /// Held on `question` until `until` at the latest.
    pub fn hold_for(&mut self, question: u64, until: Instant) {
        if let Phase::Asking { question: q, .. } = &mut self.phase {
            *q = Some(question);
            self.deadline = Some(until);
        }
    }

    /// The answer (or the fallback): dial as `direct` would, or refuse.
    pub fn answered(&mut self, ctx: &mut Ctx, settled: &crate::ask::Settled) -> Step {
        let Phase::Asking {
            matched_domain,
            ref rule,
            since,
            ..
        } = self.phase
        else {
            return Step::Continue;
        };
        let rule = rule.clone();
        let mut asked = settled.asked.clone();
        asked.waited_ms = ctx.now.saturating_duration_since(since).as_millis() as u64;
        self.record.asked = Some(Box::new(asked));
        self.deadline = None;
        let decided = plan::answered(
            &self.runtime,
            self.original_dst,
            self.record.host.as_deref(),
            &rule,
            matched_domain,
            settled.allow,
            settled.why.clone().filter(|_| !settled.allow),
        );
        self.execute(ctx, decided)
    }

    /// A held client that hangs up is closed (its question may go on for
    /// others); bytes it sends meanwhile wait in the socket for the relay.
    fn held_client_closed(&mut self) -> Step {
        let mut byte = [0u8; 1];
        match self.client.peek(&mut byte) {
            Ok(0) => {
                self.record.error = Some("the client closed while its question waited".into());
                Step::Close
            }
            Ok(_) => Step::Continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Continue,
            Err(e) => {
                self.record.error = Some(format!("client: {e}"));
                Step::Close
            }
        }
    }
}

fn read(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    let mut s: &TcpStream = stream;
    s.read(buf)
}

/// Make the coming close send RST rather than FIN.
pub(super) fn set_linger_zero(fd: i32) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: linger lives for the call; failure only means a FIN instead of a RST.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
