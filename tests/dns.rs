//! The resolver against a real dnsmasq on loopback, driven by a mio loop as
//! the proxy drives it.

mod local_servers;

use agent_egress::dns::{DnsError, Lookup, LookupResult, QueryId, Resolver, MAX_IN_FLIGHT};
use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use local_servers::{free_port, tool, Scratch, Server};
use mio::{Events, Poll, Token};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

const ALLOWED_V4: &str = "198.51.100.10";
const ALLOWED_V6: &str = "2001:db8:100::10";
const V4_ONLY: &str = "198.51.100.20";
const RESOLVER: Token = Token(7);

/// dnsmasq answering `allowed.test` (A and AAAA), `v4only.test` (A only) and
/// NXDOMAIN for `missing.test`; it refuses every other name.
struct Dnsmasq {
    addr: SocketAddr,
    log: std::path::PathBuf,
    _server: Server,
    _scratch: Scratch,
}

impl Dnsmasq {
    fn start(test: &str) -> Option<Dnsmasq> {
        let dnsmasq = tool("dnsmasq")?;
        let scratch = Scratch::new(test);
        let port = free_port();
        let log = scratch.path("queries.log");
        let mut cmd = Command::new(dnsmasq);
        cmd.args([
            "--no-resolv",
            "--no-hosts",
            "--no-daemon",
            "--log-queries",
            "--user=root",
            "--address=/allowed.test/198.51.100.10",
            "--address=/allowed.test/2001:db8:100::10",
            "--address=/v4only.test/198.51.100.20",
            "--address=/missing.test/",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--log-facility={}", log.display()))
        .arg(format!("--pid-file={}", scratch.path("pid").display()));
        let mut server = Server::spawn(cmd, &scratch.path("dnsmasq.out"));
        server.wait_until(|| UdpSocket::bind(("127.0.0.1", port)).is_err());
        Some(Dnsmasq {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            _server: server,
            _scratch: scratch,
        })
    }

    /// How many queries of `qtype` for `name` dnsmasq received.
    fn queries(&self, qtype: &str, name: &str) -> usize {
        let needle = format!("query[{qtype}] {name} from");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }
}

/// The caller's side: a mio loop with the resolver registered in it.
struct Driver {
    poll: Poll,
    events: Events,
    resolver: Resolver,
    results: HashMap<QueryId, LookupResult>,
}

impl Driver {
    fn new(servers: &[SocketAddr], timeout: Duration) -> Driver {
        let poll = Poll::new().unwrap();
        let mut resolver = Resolver::new(servers, timeout).unwrap();
        resolver.register(poll.registry(), RESOLVER).unwrap();
        Driver {
            poll,
            events: Events::with_capacity(16),
            resolver,
            results: HashMap::new(),
        }
    }

    fn pending(&mut self, name: &str) -> QueryId {
        match self.resolver.lookup(name, Instant::now()) {
            Lookup::Pending(id) => id,
            Lookup::Cached(r) => panic!("{name}: expected a query, got {r:?}"),
        }
    }

    fn cached(&mut self, name: &str) -> LookupResult {
        match self.resolver.lookup(name, Instant::now()) {
            Lookup::Cached(r) => r,
            Lookup::Pending(_) => panic!("{name}: expected a cached result"),
        }
    }

    /// Runs the loop until `id` has its result.
    fn wait(&mut self, id: QueryId) -> LookupResult {
        let give_up = Instant::now() + Duration::from_secs(10);
        while !self.results.contains_key(&id) {
            let now = Instant::now();
            assert!(now < give_up, "no result after 10 s");
            let timeout = self
                .resolver
                .next_deadline()
                .map(|d| d.saturating_duration_since(now));
            self.poll.poll(&mut self.events, timeout).unwrap();
            for event in &self.events {
                assert_eq!(event.token(), RESOLVER);
                let done = self.resolver.on_readable(Instant::now());
                self.results.extend(done);
            }
            let done = self.resolver.on_timer(Instant::now());
            self.results.extend(done);
        }
        self.results.remove(&id).unwrap()
    }

    fn resolve(&mut self, name: &str) -> LookupResult {
        let id = self.pending(name);
        self.wait(id)
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// A bound UDP socket that never answers.
fn silent_server() -> (UdpSocket, SocketAddr) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

#[test]
fn a_and_aaaa_union_then_cached() {
    let Some(dns) = Dnsmasq::start("dns-union") else {
        return;
    };
    let mut d = Driver::new(&[dns.addr], Duration::from_secs(2));
    let result = d.resolve("allowed.test");
    assert_eq!(result, Ok(ips(&[ALLOWED_V4, ALLOWED_V6])));
    // Same name, other spelling: answered from the cache, no new query.
    assert_eq!(d.cached("Allowed.TEST."), result);
    assert_eq!(dns.queries("A", "allowed.test"), 1);
    assert_eq!(dns.queries("AAAA", "allowed.test"), 1);
    // A name with an A record only: the empty AAAA answer does no harm.
    assert_eq!(d.resolve("v4only.test"), Ok(ips(&[V4_ONLY])));
    // An IP literal needs no query at all.
    assert_eq!(d.cached("192.0.2.7"), Ok(ips(&["192.0.2.7"])));
}

#[test]
fn concurrent_lookups_of_one_name_share_its_queries() {
    let Some(dns) = Dnsmasq::start("dns-shared") else {
        return;
    };
    let mut d = Driver::new(&[dns.addr], Duration::from_secs(2));
    let first = d.pending("www.allowed.test");
    let second = d.pending("www.allowed.test");
    assert_ne!(first, second);
    let want = Ok(ips(&[ALLOWED_V4, ALLOWED_V6]));
    assert_eq!(d.wait(first), want);
    assert_eq!(d.wait(second), want);
    assert_eq!(dns.queries("A", "www.allowed.test"), 1);
    assert_eq!(dns.queries("AAAA", "www.allowed.test"), 1);
}

#[test]
fn nxdomain_is_no_such_name_and_cached_briefly() {
    let Some(dns) = Dnsmasq::start("dns-nxdomain") else {
        return;
    };
    let mut d = Driver::new(&[dns.addr], Duration::from_secs(2));
    let result = d.resolve("missing.test");
    assert_eq!(result, Err(DnsError::NoSuchName));
    assert_eq!(result.unwrap_err().to_string(), "no such name");
    assert_eq!(d.cached("missing.test"), Err(DnsError::NoSuchName));
}

#[test]
fn refusal_names_the_server_and_its_answer() {
    let Some(dns) = Dnsmasq::start("dns-refused") else {
        return;
    };
    let mut d = Driver::new(&[dns.addr], Duration::from_secs(2));
    let err = d.resolve("elsewhere.example").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&dns.addr.to_string()) && text.contains("Refused"),
        "{text}"
    );
    // A failure is not cached: the next lookup asks again.
    d.pending("elsewhere.example");
}

#[test]
fn silent_server_times_out_within_the_timeout() {
    let (_socket, addr) = silent_server();
    let timeout = Duration::from_millis(300);
    let mut d = Driver::new(&[addr], timeout);
    let start = Instant::now();
    let err = d.resolve("allowed.test").unwrap_err();
    let took = start.elapsed();
    assert!(err.is_timeout(), "{err}");
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(500),
        "{took:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("no usable DNS answer: {addr} timed out after 300 ms")
    );
}

#[test]
fn second_server_answers_when_the_first_is_silent() {
    let Some(dns) = Dnsmasq::start("dns-fallback") else {
        return;
    };
    let (_socket, silent) = silent_server();
    let timeout = Duration::from_millis(300);
    let mut d = Driver::new(&[silent, dns.addr], timeout);
    let start = Instant::now();
    assert_eq!(
        d.resolve("allowed.test"),
        Ok(ips(&[ALLOWED_V4, ALLOWED_V6]))
    );
    assert!(start.elapsed() >= timeout);
}

#[test]
fn second_server_is_asked_at_once_when_the_first_port_is_closed() {
    let Some(dns) = Dnsmasq::start("dns-closed") else {
        return;
    };
    let closed = silent_server().1; // the socket is dropped: the port is closed
    let timeout = Duration::from_secs(2);
    let mut d = Driver::new(&[closed, dns.addr], timeout);
    let start = Instant::now();
    assert_eq!(
        d.resolve("allowed.test"),
        Ok(ips(&[ALLOWED_V4, ALLOWED_V6]))
    );
    assert!(start.elapsed() < Duration::from_millis(500));
}

#[test]
fn server_over_ipv6() {
    let Some(dnsmasq) = tool("dnsmasq") else {
        return;
    };
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: no IPv6 loopback");
        return;
    }
    let scratch = Scratch::new("dns-v6");
    let port = free_port();
    let mut cmd = Command::new(dnsmasq);
    cmd.args([
        "--no-resolv",
        "--no-hosts",
        "--no-daemon",
        "--user=root",
        "--address=/allowed.test/198.51.100.10",
        "--listen-address=::1",
        "--bind-interfaces",
    ])
    .arg(format!("--port={port}"))
    .arg(format!("--pid-file={}", scratch.path("pid").display()));
    let mut server = Server::spawn(cmd, &scratch.path("dnsmasq.out"));
    server.wait_until(|| UdpSocket::bind(("::1", port)).is_err());
    let mut d = Driver::new(
        &[SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], port))],
        Duration::from_secs(2),
    );
    assert_eq!(d.resolve("allowed.test"), Ok(ips(&[ALLOWED_V4])));
}

#[test]
fn in_flight_lookups_are_bounded() {
    let (_socket, addr) = silent_server();
    let mut d = Driver::new(&[addr], Duration::from_secs(5));
    for i in 0..MAX_IN_FLIGHT {
        d.pending(&format!("n{i}.test"));
    }
    assert_eq!(d.cached("one-too-many.test"), Err(DnsError::Busy));
    // A name already in flight still joins its lookup.
    d.pending("n0.test");
}

#[test]
fn answers_to_other_questions_are_ignored() {
    // A fake server that first answers with a wrong id, then for another
    // name, and only then correctly: only the last may be believed.
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        for _ in 0..2 {
            let (n, client) = server.recv_from(&mut buf).unwrap();
            let query = Message::from_vec(&buf[..n]).unwrap();
            let reply = |id: u16, name: &str, ip: [u8; 4]| {
                let mut m = Message::new(id, MessageType::Response, OpCode::Query);
                let mut q = query.queries[0].clone();
                q.name = hickory_proto::rr::Name::from_ascii(name).unwrap();
                m.add_query(q.clone());
                if q.query_type == hickory_proto::rr::RecordType::A {
                    m.add_answer(Record::from_rdata(
                        q.name.clone(),
                        60,
                        RData::A(A::from(std::net::Ipv4Addr::from(ip))),
                    ));
                }
                m.to_vec().unwrap()
            };
            let id = query.metadata.id;
            let spoofs = [
                reply(id.wrapping_add(1), "spoof.test.", [203, 0, 113, 1]),
                reply(id, "other.test.", [203, 0, 113, 2]),
                reply(id, "spoof.test.", [192, 0, 2, 3]),
            ];
            for packet in spoofs {
                server.send_to(&packet, client).unwrap();
            }
        }
    });
    let mut d = Driver::new(&[addr], Duration::from_secs(2));
    assert_eq!(d.resolve("spoof.test"), Ok(ips(&["192.0.2.3"])));
    fake.join().unwrap();
}

#[test]
fn a_lost_query_is_sent_again_before_the_timeout() {
    // A fake server that drops the first copy of every query, as a lossy
    // path would, and answers the second.
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut answered = 0;
        let mut buf = [0u8; 1500];
        while answered < 2 {
            let (n, client) = server.recv_from(&mut buf).unwrap();
            let query = Message::from_vec(&buf[..n]).unwrap();
            let key = (query.metadata.id, query.queries[0].query_type);
            if !seen.contains(&key) {
                seen.push(key);
                continue;
            }
            let mut reply = Message::new(key.0, MessageType::Response, OpCode::Query);
            reply.add_query(query.queries[0].clone());
            if key.1 == hickory_proto::rr::RecordType::A {
                reply.add_answer(Record::from_rdata(
                    query.queries[0].name.clone(),
                    60,
                    RData::A(A::new(192, 0, 2, 9)),
                ));
            }
            server.send_to(&reply.to_vec().unwrap(), client).unwrap();
            answered += 1;
        }
    });
    let timeout = Duration::from_millis(600);
    let mut d = Driver::new(&[addr], timeout);
    let start = Instant::now();
    assert_eq!(d.resolve("lossy.test"), Ok(ips(&["192.0.2.9"])));
    let took = start.elapsed();
    assert!(took >= timeout / 2 && took < timeout, "{took:?}");
    fake.join().unwrap();
}

#[test]
fn truncated_answers_are_asked_again_over_tcp() {
    // A fake server whose UDP answers are all truncated, and whose TCP
    // answers (on the same port) carry more addresses than fit in 1232 bytes.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = std::net::TcpListener::bind(addr).unwrap();
    let many: Vec<std::net::Ipv4Addr> = (0..100).map(|i| [198, 51, 100, i].into()).collect();
    let answer_for = {
        let many = many.clone();
        move |query: &Message, truncated: bool| {
            let mut m = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
            m.add_query(query.queries[0].clone());
            m.metadata.truncation = truncated;
            if !truncated && query.queries[0].query_type == hickory_proto::rr::RecordType::A {
                for ip in &many {
                    m.add_answer(Record::from_rdata(
                        query.queries[0].name.clone(),
                        60,
                        RData::A(A::from(*ip)),
                    ));
                }
            }
            m.to_vec().unwrap()
        }
    };
    let udp_answer = answer_for.clone();
    let udp_side = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        for _ in 0..2 {
            let (n, client) = udp.recv_from(&mut buf).unwrap();
            let query = Message::from_vec(&buf[..n]).unwrap();
            udp.send_to(&udp_answer(&query, true), client).unwrap();
        }
    });
    let tcp_side = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut conn, _) = tcp.accept().unwrap();
            let mut len = [0u8; 2];
            conn.read_exact(&mut len).unwrap();
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            conn.read_exact(&mut query).unwrap();
            let query = Message::from_vec(&query).unwrap();
            let reply = answer_for(&query, false);
            if query.queries[0].query_type == hickory_proto::rr::RecordType::A {
                assert!(reply.len() > 1232, "would not need TCP");
            }
            let mut framed = u16::try_from(reply.len()).unwrap().to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            // In two pieces, as a slow path would deliver it.
            let (first, rest) = framed.split_at(framed.len() / 2);
            conn.write_all(first).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            conn.write_all(rest).unwrap();
        }
    });
    let mut d = Driver::new(&[addr], Duration::from_secs(2));
    let want: Vec<IpAddr> = many.into_iter().map(IpAddr::V4).collect();
    assert_eq!(d.resolve("big.test"), Ok(want));
    udp_side.join().unwrap();
    tcp_side.join().unwrap();
}

#[test]
fn a_tcp_retry_that_fails_is_reported() {
    // Truncated over UDP, and the TCP side hangs up without answering.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = std::net::TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, client)) = udp.recv_from(&mut buf) {
            let query = Message::from_vec(&buf[..n]).unwrap();
            let mut m = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
            m.add_query(query.queries[0].clone());
            m.metadata.truncation = true;
            udp.send_to(&m.to_vec().unwrap(), client).unwrap();
        }
    });
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            drop(conn);
        }
    });
    let mut d = Driver::new(&[addr], Duration::from_secs(2));
    let err = d.resolve("big.test").unwrap_err().to_string();
    // EOF or a reset, depending on whether our query was read before the close.
    let want = format!("no usable DNS answer: {addr} failed: over TCP: ");
    assert!(err.starts_with(&want), "{err}");
}
