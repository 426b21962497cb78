//! Forwarding an allowed query to `dns.servers`: over a socket of its own (a
//! fresh random port, a fresh random id, connected to the server so nobody
//! else can answer), one server after another on timeouts, the answer checked
//! against the question, kept for others who ask the same, and passed on.

use super::pool::{Arrival, Pool, Ticket};
use super::stream::Conn;
use super::{question, Asker, Handler, Via, MAX_PENDING, READS_PER_EVENT};
use crate::audit::{Record, Verdict};
use crate::procinfo::OwnerQuery;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use mio::{Interest, Token};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The socket a forwarded query waits on: UDP for a UDP query, TCP for a
/// TCP one (its answer may be too large for a datagram).
pub(super) enum Upstream {
    /// Waiting on one of the shared sockets.
    Udp(Ticket),
    Tcp(Conn),
}

/// One forwarded query waiting for a server.
pub(super) struct Pending {
    pub(super) upstream: Upstream,
    /// The query as sent: the agent's bytes with our id.
    pub(super) query: Vec<u8>,
    pub(super) our_id: u16,
    pub(super) agent_id: u16,
    pub(super) name: String,
    pub(super) qtype: RecordType,
    pub(super) asker: Asker,
    /// Index into `dns.servers` of the server asked now.
    pub(super) server: usize,
    pub(super) started: Instant,
    pub(super) deadline: Instant,
    pub(super) record: Record,
    pub(super) owner: Option<OwnerQuery>,
    pub(super) failures: Vec<String>,
}

/// An answer kept for others who ask the same (name, type).
#[derive(Clone)]
pub(super) struct Kept {
    pub(super) response: Vec<u8>,
    pub(super) stored: Instant,
    pub(super) rcode: ResponseCode,
    pub(super) answers: Vec<String>,
    pub(super) addresses: Vec<(IpAddr, u32)>,
}

/// Answers are kept at most this long, whatever their TTL.
const MAX_KEPT: Duration = Duration::from_secs(300);

fn cache_key(name: &str, qtype: RecordType) -> String {
    format!("{name}/{qtype}")
}

impl Handler {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &mut self,
        query: &[u8],
        name: String,
        qtype: RecordType,
        asker: Asker,
        mut record: Record,
        owner: Option<OwnerQuery>,
        started: Instant,
    ) {
        self.attribute_early(&record, &owner);
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
        let mut ours = query.to_vec();
        record.upstream = None;
        let entry = self.pending.vacant_entry();
        let key = entry.key();
        let timeout = Duration::from_millis(runtime.config.dns.timeout_ms);
        let registry = self.poll.registry();
        match ask(
            &mut self.pool,
            registry,
            key,
            servers[0],
            &mut ours,
            asker.via,
        ) {
            Ok((upstream, our_id)) => {
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

    /// A shared upstream socket is ready: the answers it holds go to the
    /// queries waiting for them. True when its read budget ran out first.
    pub(super) fn read_pooled(&mut self, slot: usize) -> bool {
        for _ in 0..READS_PER_EVENT {
            match self.pool.receive(slot, &mut self.buf) {
                Arrival::Answer { key, len } => {
                    let answer = self.buf[..len].to_vec();
                    self.on_answer(key, &answer);
                }
                Arrival::Stray => {}
                Arrival::Drained => return false,
                // An ICMP error from the server: the next one, now.
                Arrival::Failed { keys, why } => {
                    for key in keys {
                        self.next_server(key, why.clone());
                    }
                    return false;
                }
            }
        }
        true
    }

    /// A query's TCP connection to its server is ready: the answer, if it came.
    pub(super) fn read_answer(&mut self, key: usize) {
        for _ in 0..READS_PER_EVENT {
            let Some(pending) = self.pending.get_mut(key) else {
                return;
            };
            let Upstream::Tcp(conn) = &mut pending.upstream else {
                return;
            };
            if let Err(e) = conn.flush().and_then(|()| conn.fill()) {
                return self.next_server(key, format!("over tcp: {e}"));
            }
            let answer = match conn.next_message() {
                Some(message) => message,
                None if conn.closed || conn.overfull() => {
                    return self.next_server(key, "over tcp: closed without an answer".into())
                }
                None => return,
            };
            if self.on_answer(key, &answer) {
                return;
            }
        }
    }

    /// The query no longer waits: out of the pending set, and off its socket.
    fn settle(&mut self, key: usize) -> Pending {
        let pending = self.pending.remove(key);
        if let Upstream::Udp(ticket) = pending.upstream {
            self.pool.release(ticket);
        }
        pending
    }

    /// `answer` came for pending query `key`; true when it settled it.
    /// Another id or question (late, stray or forged) settles nothing.
    pub(super) fn on_answer(&mut self, key: usize, answer: &[u8]) -> bool {
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
        let pending = self.settle(key);
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

    /// Answers `query` from the cache if an answer to the same (name, type)
    /// is kept; true when it did.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn answer_from_cache(
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
    pub(super) fn next_server(&mut self, key: usize, why: String) {
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
        if let Upstream::Udp(ticket) = pending.upstream {
            self.pool.release(ticket);
        }
        while pending.server + 1 < servers.len() {
            pending.server += 1;
            let server = servers[pending.server];
            let via = pending.asker.via;
            let registry = self.poll.registry();
            match ask(
                &mut self.pool,
                registry,
                key,
                server,
                &mut pending.query,
                via,
            ) {
                Ok((upstream, our_id)) => {
                    // An old TCP connection leaves the epoll set as it closes.
                    pending.upstream = upstream;
                    pending.our_id = our_id;
                    pending.deadline = Instant::now() + timeout;
                    pending.record.upstream = Some(server.to_string());
                    return;
                }
                Err(e) => pending.failures.push(format!("{server} {e}")),
            }
        }
        let pending = self.settle(key);
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

    pub(super) fn fail_all(&mut self, why: &str) {
        for pending in self.pending.drain().collect::<Vec<_>>() {
            let mut record = pending.record;
            record.error = Some(why.to_string());
            self.finish(record, pending.owner, pending.started);
        }
    }
}

/// The query to `server` for pending query `key`, with a fresh id (written
/// into `query`, and returned): UDP on a shared socket, TCP for a TCP query
/// (its answer may be too large for a datagram) on a connection of its own.
fn ask(
    pool: &mut Pool,
    registry: &mio::Registry,
    key: usize,
    server: SocketAddr,
    query: &mut [u8],
    via: Via,
) -> io::Result<(Upstream, u16)> {
    let Via::Tcp { .. } = via else {
        let ticket = pool.send(registry, server, query, key)?;
        return Ok((Upstream::Udp(ticket), ticket.id));
    };
    let id = rand::random::<u16>();
    if let Some(at) = query.get_mut(..2) {
        at.copy_from_slice(&id.to_be_bytes());
    }
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
    Ok((Upstream::Tcp(conn), id))
}
