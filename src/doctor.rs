//! `agent-egress doctor`: an active self-test of a running daemon. Beside what
//! `status` shows (table, set, routes, listener, BPF programs), it places a
//! probe process in a cgroup made below each agent cgroup and checks that the
//! capture holds for it: a TCP connection to a TEST-NET address is answered by
//! the proxy (its refusal, not the network), a UDP datagram is dropped and
//! counted, and a DNS query to that address is answered by the daemon's
//! handler. The probe's traffic only ever goes to that TEST-NET address.

use crate::backstop;
use crate::capture::Capture;
use crate::cgroup;
use crate::config::{BackstopMode, Config, DelegatedSubtrees};
use crate::connect_log;
use crate::netfilter;
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// Where the probes go: TEST-NET-1 (RFC 5737), which no one answers.
const PROBE_HOST: &str = "192.0.2.254";
const PROBE_TCP: &str = "192.0.2.254:80";
const PROBE_UDP: &str = "192.0.2.254:9";
const PROBE_DNS: &str = "192.0.2.254:53";
/// A name no resolver has (RFC 6761): whoever answers, it is no real lookup.
const PROBE_NAME: &str = "doctor.agent-egress.invalid.";
/// How long the probe waits for the proxy's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// What the proxy's refusal of a name no rule allows says.
const REFUSAL_MARK: &[u8] = b"agent-egress";

#[derive(Serialize)]
pub struct Check {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

fn check(check: impl Into<String>, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        ok,
        detail: detail.into(),
    }
}

/// Every check, in order; the caller exits non-zero if one failed.
pub fn run(config: &Config) -> Vec<Check> {
    let status = match Capture::status(config) {
        Ok(s) => s,
        Err(e) => return vec![check("kernel state", false, e.to_string())],
    };
    let table = &config.interception.table;
    let mut checks = vec![
        check(
            format!("table inet {table}"),
            status.table_installed,
            if status.table_installed {
                "installed"
            } else {
                "missing"
            },
        ),
        check(
            "policy routing",
            status.routing_installed,
            if status.routing_installed {
                "installed"
            } else {
                "missing"
            },
        ),
    ];
    for (addr, up) in &status.listener {
        checks.push(check(
            format!("listener {addr}"),
            *up,
            if *up { "accepting" } else { "not listening" },
        ));
    }
    let root = match cgroup::cgroup2_root() {
        Ok(r) => r,
        Err(e) => {
            checks.push(check("cgroup2", false, e.to_string()));
            return checks;
        }
    };
    for (path, id) in &status.configured_cgroups {
        let Some(id) = id else {
            checks.push(check(
                format!("agent {path}"),
                true,
                "does not exist yet: nothing to probe",
            ));
            continue;
        };
        let in_set = status.agents_set.iter().any(|m| m.id == *id);
        checks.push(check(
            format!("agent {path} in the set"),
            in_set,
            if in_set {
                "member"
            } else {
                "not in set inet agents: its sockets are not captured"
            },
        ));
        let dir = root.join(path);
        // Without the connect log processes are found by a /proc search:
        // attribution degrades, the capture does not.
        let mut connects = programs("connect log", connect_log::attached_count(&dir), path);
        if !connects.ok {
            connects.ok = true;
            connects.detail += " (processes are found by searching /proc instead)";
        }
        checks.push(connects);
        if config.backstop_wanted().unwrap_or(false) {
            let mut attached = programs("kernel backstop", backstop::attached_count(&dir), path);
            // `auto` goes without it where the kernel refuses; the daemon's log says why.
            if !attached.ok && config.interception.backstop == BackstopMode::Auto {
                attached.ok = true;
                attached.detail +=
                    " (interception.backstop \"auto\": the daemon's log says why not)";
            }
            checks.push(attached);
        }
        checks.extend(probe(table, &root, path, config.dns.capture));
    }
    let ignored = config.interception.delegated_subtrees == DelegatedSubtrees::Ignore;
    for d in &status.delegated {
        let detail = if d.captured {
            "captured whole".to_string()
        } else {
            format!(
                "not captured (delegated_subtrees: {}): its processes may leave the capture",
                d.handling
            )
        };
        checks.push(check(
            format!(
                "agent {} in subtree {} delegated to {}",
                d.agent, d.subtree, d.writer
            ),
            d.captured || ignored,
            detail,
        ));
    }
    checks
}

fn programs(what: &str, count: Result<usize, crate::bpf::BpfError>, path: &str) -> Check {
    match count {
        Ok(0) => check(format!("{what} on {path}"), false, "not attached"),
        Ok(n) => check(format!("{what} on {path}"), true, format!("{n} program(s)")),
        Err(e) => check(format!("{what} on {path}"), false, e.to_string()),
    }
}

/// A probe process in a new cgroup below `path`: its TCP connection must be
/// answered by the proxy, its UDP datagram dropped and counted, and (DNS
/// captured) its DNS query answered by the daemon's handler.
fn probe(table: &str, root: &Path, path: &str, dns_captured: bool) -> Vec<Check> {
    let name = format!("{path}/agent-egress-doctor-{}", std::process::id());
    let tcp = format!("capture of TCP from {path}");
    let udp = format!("drop of UDP from {path}");
    let dns = format!("capture of DNS from {path}");
    if let Err(e) = cgroup::create(root, &name) {
        return vec![check(
            tcp,
            false,
            format!("cannot make a probe cgroup: {e}"),
        )];
    }
    let dropped_before = netfilter::counters(table).map(|c| c.packets).unwrap_or(0);
    let outcome = in_cgroup(root, &name, probe_traffic);
    let dropped_after = netfilter::counters(table).map(|c| c.packets).unwrap_or(0);
    if let Err(e) = cgroup::remove(root, &name) {
        log::warn!("removing the probe cgroup {name}: {e}");
    }
    let answer = match outcome {
        Ok(answer) => answer,
        Err(e) => return vec![check(tcp, false, e.to_string())],
    };
    let (udp_sent, answer) = answer.split_once('\n').unwrap_or(("", &answer));
    let (dns_answer, answer) = answer.split_once('\n').unwrap_or(("", answer));
    // This host has no route there: nothing could leave that way, and the
    // kernel refuses before the capture is reached. Not a failure.
    let no_route = format!("no route to {PROBE_HOST} from this host: not exercised");
    let captured = answer.starts_with("HTTP/1.1 403")
        && answer
            .as_bytes()
            .windows(REFUSAL_MARK.len())
            .any(|w| w == REFUSAL_MARK);
    let tcp_check = if answer == UNREACHABLE {
        check(tcp, true, no_route.clone())
    } else if captured {
        check(
            tcp,
            true,
            format!("{PROBE_TCP} answered by the proxy's refusal"),
        )
    } else {
        check(
            tcp,
            false,
            format!(
                "{PROBE_TCP} not answered by the proxy: {}",
                answer.lines().next().unwrap_or("no answer")
            ),
        )
    };
    let udp_check = if udp_sent == UNREACHABLE {
        check(udp, true, no_route)
    } else {
        check(
            udp,
            dropped_after > dropped_before,
            format!("{PROBE_UDP}: drop counter {dropped_before} -> {dropped_after}"),
        )
    };
    let mut checks = vec![tcp_check, udp_check];
    if dns_captured {
        checks.push(if dns_answer == UNREACHABLE {
            check(
                dns,
                true,
                format!("no route to {PROBE_HOST} from this host: not exercised"),
            )
        } else {
            // Nobody at a TEST-NET address answers: an answer is the handler's.
            check(
                dns,
                dns_answer.starts_with("answered"),
                format!("{PROBE_DNS}: {dns_answer}"),
            )
        });
    }
    checks
}

/// What the probe reports for a destination the host has no route to.
const UNREACHABLE: &str = "unreachable";

fn unreachable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
    )
}

/// What the probe saw, run in the probe's cgroup: a line on its UDP datagram
/// ("sent", or [`UNREACHABLE`]), then the first bytes of the answer to an HTTP
/// request, or why there was none.
fn probe_traffic() -> String {
    let udp = match UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.send_to(b"agent-egress doctor", PROBE_UDP))
    {
        Ok(_) => "sent".to_string(),
        Err(e) if unreachable(&e) => UNREACHABLE.to_string(),
        Err(e) => format!("not sent: {e}"),
    };
    format!("{udp}\n{}\n{}", probe_dns(), probe_tcp())
}

/// A DNS query to [`PROBE_DNS`]: "answered RCODE" when an answer to it came.
fn probe_dns() -> String {
    let id = std::process::id() as u16;
    let query = match Name::from_ascii(PROBE_NAME) {
        Ok(name) => {
            let mut message = Message::new(id, MessageType::Query, OpCode::Query);
            message.metadata.recursion_desired = true;
            message.add_query(Query::query(name, RecordType::A));
            message.to_vec()
        }
        Err(e) => return format!("bad probe name: {e}"),
    };
    let query = match query {
        Ok(q) => q,
        Err(e) => return format!("cannot encode the probe query: {e}"),
    };
    let socket = match UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        s.connect(PROBE_DNS)?;
        s.set_read_timeout(Some(PROBE_TIMEOUT))?;
        s.send(&query)?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) if unreachable(&e) => return UNREACHABLE.into(),
        Err(e) => return format!("not sent: {e}"),
    };
    let mut buf = [0u8; 1500];
    match socket.recv(&mut buf) {
        Ok(n) => match Message::from_vec(&buf[..n]) {
            Ok(m) if m.metadata.id == id && m.metadata.message_type == MessageType::Response => {
                format!(
                    "answered {}",
                    crate::agent_dns::question::mnemonic(m.metadata.response_code)
                )
            }
            _ => "an answer that is not to the probe's query".into(),
        },
        Err(e) => format!("no answer: {e}"),
    }
}

fn probe_tcp() -> String {
    let addr: SocketAddr = match PROBE_TCP.parse() {
        Ok(a) => a,
        Err(e) => return format!("bad probe address: {e}"),
    };
    let mut stream = match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
        Ok(s) => s,
        Err(e) if unreachable(&e) => return UNREACHABLE.into(),
        Err(e) => return format!("connect: {e}"),
    };
    let _ = stream.set_read_timeout(Some(PROBE_TIMEOUT));
    let request =
        b"GET / HTTP/1.1\r\nHost: doctor.agent-egress.invalid\r\nConnection: close\r\n\r\n";
    if let Err(e) = stream.write_all(request) {
        return format!("send: {e}");
    }
    let mut answer = Vec::new();
    let _ = stream.take(4096).read_to_end(&mut answer);
    if answer.is_empty() {
        return "no answer".into();
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The probe's child process could not be started.
#[derive(Debug)]
enum ProbeError {
    Pipe(std::io::Error),
    Fork(std::io::Error),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Pipe(e) => write!(f, "pipe: {e}"),
            ProbeError::Fork(e) => write!(f, "fork: {e}"),
        }
    }
}

impl std::error::Error for ProbeError {}

/// Runs `work` in a child process moved into `root/rel` first; its result.
fn in_cgroup(root: &Path, rel: &str, work: fn() -> String) -> Result<String, ProbeError> {
    let procs = root.join(rel).join("cgroup.procs");
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(ProbeError::Pipe(std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just made and are owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: doctor is single-threaded (no other thread holds a lock the
    // child could need); the child only writes files and sockets, then _exits.
    match unsafe { libc::fork() } {
        -1 => Err(ProbeError::Fork(std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            let answer = match std::fs::write(&procs, b"0") {
                Ok(()) => work(),
                Err(e) => format!("cannot join {}: {e}", procs.display()),
            };
            let mut out = std::fs::File::from(write_end);
            let _ = out.write_all(answer.as_bytes());
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) }
        }
        child => {
            drop(write_end);
            let mut answer = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut answer);
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            Ok(answer)
        }
    }
}

/// The checks as text, one line each.
pub fn to_text(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| {
            format!(
                "{}  {}: {}\n",
                if c.ok { "ok  " } else { "FAIL" },
                c.check,
                c.detail
            )
        })
        .collect()
}
