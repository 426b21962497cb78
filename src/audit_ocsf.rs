// SPDX-License-Identifier: GPL-3.0-or-later
//! Audit records as OCSF events (`audit.format: "ocsf"`), for SIEMs.
//!
//! Schema 1.3.0 with the `host` (actor) and `security_control` (action,
//! disposition) profiles. Connections and kernel drops are Network Activity
//! (4001), DNS queries DNS Activity (4003); the writer's loss summaries and
//! policy changes are no network event, and go out as Base Events (class 0).
//! Whatever OCSF has no attribute for (rule, outbound, dial, cgroup, agent...)
//! is under `unmapped`, by our own names. docs/ocsf-network-activity.schema.json
//! holds what a consumer may rely on, and tests/audit_ocsf.rs checks the daemon's
//! records against it.
//!
//! Everything is borrowed from the record but the joined command lines and the
//! parent chain: one serde pass, as cheap as the JSON form.

use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::audit::{
    parse_timestamp, AuditError, Dial, Event, PolicyChange, Proto, Record, Verdict,
};
use crate::procinfo::Ancestor;

pub const OCSF_VERSION: &str = "1.3.0";

/// Append `record` as one OCSF event (one JSON line, with its newline) to `out`.
pub fn encode_ocsf_line(record: &Record, out: &mut Vec<u8>) -> Result<(), AuditError> {
    serde_json::to_writer(&mut *out, &OcsfEvent::from_record(record))
        .map_err(AuditError::Encode)?;
    out.push(b'\n');
    Ok(())
}

#[derive(Serialize)]
struct OcsfEvent<'a> {
    class_uid: u32,
    class_name: &'static str,
    category_uid: u32,
    category_name: &'static str,
    activity_id: u32,
    activity_name: &'static str,
    type_uid: u32,
    time: u64,
    severity_id: u8,
    severity: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_id: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action_id: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disposition_id: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disposition: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<u64>,
    metadata: Metadata<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    src_endpoint: Option<Endpoint<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dst_endpoint: Option<Endpoint<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_info: Option<ConnectionInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traffic: Option<Traffic>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<DnsQuery<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rcode_id: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rcode: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    answers: Option<Vec<DnsAnswer<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<Actor<'a>>,
    unmapped: Unmapped<'a>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    version: &'static str,
    product: Product,
    profiles: [&'static str; 2],
    log_name: &'static str,
    event_code: &'static str,
    original_time: &'a str,
}

#[derive(Serialize)]
struct Product {
    name: &'static str,
    vendor_name: &'static str,
    version: &'static str,
}

const PRODUCT: Product = Product {
    name: "agent-egress",
    vendor_name: "agent-egress",
    version: env!("CARGO_PKG_VERSION"),
};

#[derive(Serialize)]
struct Endpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<&'a str>,
}

impl<'a> Endpoint<'a> {
    /// None when there is nothing to say (OCSF wants at least one attribute).
    fn new(address: &str, hostname: Option<&'a str>) -> Option<Endpoint<'a>> {
        let socket: Option<SocketAddr> = address.parse().ok();
        if socket.is_none() && hostname.is_none() {
            return None;
        }
        Some(Endpoint {
            ip: socket.map(|s| s.ip()),
            port: socket.map(|s| s.port()),
            hostname,
        })
    }
}

#[derive(Serialize)]
struct ConnectionInfo {
    protocol_name: &'static str,
    protocol_num: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol_ver_id: Option<u8>,
    direction_id: u8,
    direction: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
}

#[derive(Serialize)]
struct Traffic {
    bytes_in: u64,
    bytes_out: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct DnsQuery<'a> {
    hostname: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(rename = "type")]
    kind: Option<&'a str>,
    class: &'static str,
}

#[derive(Serialize)]
struct DnsAnswer<'a> {
    rdata: &'a str,
}

#[derive(Serialize)]
struct Actor<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<Process<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<User>,
}

#[derive(Serialize)]
struct User {
    uid: String,
}

#[derive(Serialize)]
struct Process<'a> {
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<ProcessFile<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmd_line: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lineage: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_process: Option<Box<Process<'a>>>,
}

impl<'a> Process<'a> {
    /// The process and, as `parent_process`, each of `ancestry` (nearest first).
    fn new(
        pid: u32,
        exe: Option<&'a str>,
        cmdline: Option<&[String]>,
        sha256: Option<&'a str>,
        ancestry: &'a [Ancestor],
    ) -> Process<'a> {
        let parent_process = ancestry.split_first().map(|(parent, further)| {
            Box::new(Process::new(
                parent.pid,
                parent.exe.as_deref(),
                parent.cmdline.as_deref(),
                None,
                further,
            ))
        });
        Process {
            pid,
            name: exe.map(basename),
            file: exe.map(|path| ProcessFile {
                name: basename(path),
                path,
                type_id: 1, // Regular File
                hashes: sha256.map(|value| {
                    [Fingerprint {
                        algorithm_id: 3,
                        algorithm: "SHA-256",
                        value,
                    }]
                }),
            }),
            cmd_line: cmdline.map(|args| args.join(" ")),
            lineage: None,
            parent_process,
        }
    }
}

#[derive(Serialize)]
struct ProcessFile<'a> {
    name: &'a str,
    path: &'a str,
    type_id: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    hashes: Option<[Fingerprint<'a>; 1]>,
}

#[derive(Serialize)]
struct Fingerprint<'a> {
    algorithm_id: u8,
    algorithm: &'static str,
    value: &'a str,
}

/// Our fields OCSF has no place for, by the names the JSON records give them.
#[derive(Serialize)]
struct Unmapped<'a> {
    verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subtree: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_id: Option<u64>,
    proto: Proto,
    #[serde(skip_serializing_if = "Option::is_none")]
    sni: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_host: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ech: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    outbound: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dial: Option<Dial>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sniff: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    listener: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attribution: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resolved: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resolved_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name_mismatch: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limited: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cached: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a PolicyChange>,
}

/// Class, category and activity: (class_uid, class_name, category_uid,
/// category_name, activity_id, activity_name).
type Classification = (u32, &'static str, u32, &'static str, u32, &'static str);

fn classify(record: &Record) -> Classification {
    const NETWORK: (u32, &str, u32, &str) = (4001, "Network Activity", 4, "Network Activity");
    let network = |id, name| (NETWORK.0, NETWORK.1, NETWORK.2, NETWORK.3, id, name);
    match record.event {
        Event::Dns => (4003, "DNS Activity", 4, "Network Activity", 6, "Traffic"),
        Event::Drops => network(6, "Traffic"),
        Event::Start | Event::End => match record.verdict {
            Verdict::Block => network(5, "Refuse"),
            Verdict::Error => network(4, "Fail"),
            _ if record.event == Event::Start => network(1, "Open"),
            _ => network(2, "Close"),
        },
        Event::AuditDrops | Event::Policy | Event::QuestionAsked | Event::QuestionAnswered => {
            (0, "Base Event", 0, "Uncategorized", 99, "Other")
        }
    }
}

/// (action_id, action, disposition_id, disposition) of the security_control
/// profile. Audit mode's "would block" was let through and noticed: Observed,
/// Detected.
fn outcome(record: &Record) -> Option<(u8, &'static str, u8, &'static str)> {
    match record.event {
        Event::AuditDrops | Event::Policy | Event::QuestionAsked | Event::QuestionAnswered => None,
        Event::Drops => Some((2, "Denied", 6, "Dropped")),
        _ => Some(match record.verdict {
            Verdict::Undecided => (0, "Unknown", 0, "Unknown"),
            Verdict::Allow | Verdict::Error => (1, "Allowed", 1, "Allowed"),
            Verdict::Block => (2, "Denied", 2, "Blocked"),
            Verdict::WouldBlock => (3, "Observed", 15, "Detected"),
        }),
    }
}

/// (severity_id, severity): refusals and losses are worth a look, the rest is
/// information.
fn severity(record: &Record) -> (u8, &'static str) {
    match (record.event, record.verdict) {
        (Event::AuditDrops, _) => (3, "Medium"),
        (Event::Drops, _) | (_, Verdict::Block | Verdict::WouldBlock) => (2, "Low"),
        _ => (1, "Informational"),
    }
}

fn status(record: &Record) -> Option<(u8, &'static str)> {
    match (record.event, record.verdict) {
        (Event::AuditDrops | Event::Policy | Event::QuestionAsked | Event::QuestionAnswered, _) => {
            None
        }
        (Event::Drops, _) | (_, Verdict::Block | Verdict::Error) => Some((2, "Failure")),
        (_, Verdict::Undecided) => Some((0, "Unknown")),
        _ if record.error.is_some() => Some((2, "Failure")),
        _ => Some((1, "Success")),
    }
}

/// OCSF's rcode_id and caption for our mnemonic (agent_dns::question::mnemonic).
fn rcode_id(rcode: &str) -> (u16, Option<&'static str>) {
    const CAPTIONS: [&str; 12] = [
        "NoError",
        "FormError",
        "ServError",
        "NXDomain",
        "NotImp",
        "Refused",
        "YXDomain",
        "YXRRSet",
        "NXRRSet",
        "NotAuth",
        "NotZone",
        "DSOTYPENI",
    ];
    let code = match rcode {
        "NOERROR" => Some(0),
        "FORMERR" => Some(1),
        "SERVFAIL" => Some(2),
        "NXDOMAIN" => Some(3),
        "NOTIMP" => Some(4),
        "REFUSED" => Some(5),
        other => other
            .strip_prefix("RCODE")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    match code {
        Some(n) if n < CAPTIONS.len() => (n as u16, Some(CAPTIONS[n])),
        _ => (99, None),
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn message(record: &Record) -> Option<String> {
    match record.event {
        Event::AuditDrops => Some(format!(
            "{} audit records lost (the writer's queue was full)",
            record.dropped.unwrap_or(0)
        )),
        Event::Policy => record.policy.as_ref().map(|change| {
            let action = serde_json::to_value(change.action).ok();
            let action = action
                .as_ref()
                .and_then(|a| a.as_str())
                .unwrap_or("changed");
            format!("policy {action}")
        }),
        Event::QuestionAsked | Event::QuestionAnswered => record.question.as_ref().map(|q| {
            let answer = q.answer.and_then(|a| serde_json::to_value(a).ok());
            match answer.as_ref().and_then(|a| a.as_str()) {
                Some(answer) => format!("question {} answered: {answer}", q.id),
                None => format!("question {} asked", q.id),
            }
        }),
        _ => None,
    }
}

impl<'a> OcsfEvent<'a> {
    fn from_record(r: &'a Record) -> OcsfEvent<'a> {
        let (class_uid, class_name, category_uid, category_name, activity_id, activity_name) =
            classify(r);
        let (severity_id, severity) = severity(r);
        let status = status(r);
        let outcome = outcome(r);
        let network = class_uid != 0;
        let dns = r.event == Event::Dns;
        let connection = matches!(r.event, Event::Start | Event::End);
        let process = r.pid.map(|pid| {
            let ancestry = r.ancestry.as_deref().unwrap_or(&[]);
            let mut process = Process::new(
                pid,
                r.exe.as_deref(),
                r.cmdline.as_deref(),
                r.exe_sha256.as_deref(),
                ancestry,
            );
            if !ancestry.is_empty() {
                // Root first, the process itself last, as OCSF's example has it.
                let mut lineage: Vec<&str> = ancestry
                    .iter()
                    .rev()
                    .filter_map(|a| a.exe.as_deref())
                    .collect();
                lineage.extend(r.exe.as_deref());
                process.lineage = Some(lineage);
            }
            process
        });
        let user = r.uid.map(|uid| User {
            uid: uid.to_string(),
        });
        let actor = (process.is_some() || user.is_some()).then_some(Actor { process, user });
        let (rcode_id, rcode) = match r.rcode.as_deref().filter(|_| dns) {
            Some(ours) => {
                let (id, caption) = rcode_id(ours);
                (Some(id), Some(caption.unwrap_or(ours)))
            }
            None => (None, None),
        };
        let protocol = match r.proto {
            Proto::Udp => Some(("udp", 17)),
            Proto::Tls | Proto::Http | Proto::Tcp => Some(("tcp", 6)),
            Proto::Dns => None,
        };
        let dst_endpoint = Endpoint::new(&r.dst, r.host.as_deref().filter(|_| !dns));
        let connection_info =
            protocol
                .filter(|_| network && !dns)
                .map(|(name, num)| ConnectionInfo {
                    protocol_name: name,
                    protocol_num: num,
                    protocol_ver_id: dst_endpoint.as_ref().and_then(|e| e.ip).map(|ip| match ip {
                        IpAddr::V4(_) => 4,
                        IpAddr::V6(_) => 6,
                    }),
                    direction_id: 2,
                    direction: "Outbound",
                    uid: r.conn_id.map(|id| id.to_string()),
                });
        OcsfEvent {
            class_uid,
            class_name,
            category_uid,
            category_name,
            activity_id,
            activity_name,
            type_uid: class_uid * 100 + activity_id,
            // The writer stamps every record; one given another shape is dated now.
            time: parse_timestamp(&r.ts).unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
            }),
            severity_id,
            severity,
            status_id: status.map(|s| s.0),
            status: status.map(|s| s.1),
            status_detail: r.error.as_deref(),
            action_id: outcome.map(|o| o.0),
            action: outcome.map(|o| o.1),
            disposition_id: outcome.map(|o| o.2),
            disposition: outcome.map(|o| o.3),
            message: message(r),
            duration: connection.then_some(r.duration_ms),
            metadata: Metadata {
                version: OCSF_VERSION,
                product: PRODUCT,
                profiles: ["host", "security_control"],
                log_name: "audit",
                event_code: r.event.as_str(),
                original_time: &r.ts,
            },
            src_endpoint: network.then(|| Endpoint::new(&r.src, None)).flatten(),
            dst_endpoint: dst_endpoint.filter(|_| network),
            connection_info,
            traffic: (r.event == Event::End).then_some(Traffic {
                bytes_in: r.bytes_down,
                bytes_out: r.bytes_up,
                bytes: r.bytes_down.saturating_add(r.bytes_up),
            }),
            query: r.host.as_deref().filter(|_| dns).map(|hostname| DnsQuery {
                hostname,
                kind: r.qtype.as_deref(),
                class: "IN",
            }),
            rcode_id,
            rcode,
            answers: r
                .answers
                .as_ref()
                .filter(|_| dns)
                .map(|answers| answers.iter().map(|a| DnsAnswer { rdata: a }).collect()),
            actor,
            unmapped: Unmapped {
                verdict: r.verdict,
                agent: r.agent.as_deref(),
                subtree: r.subtree.as_deref(),
                cgroup_id: r.cgroup_id,
                proto: r.proto,
                sni: r.sni.as_deref(),
                http_host: r.http_host.as_deref(),
                ech: r.ech,
                rule: r.rule.as_deref(),
                outbound: &r.outbound,
                dial: r.dial,
                upstream: r.upstream.as_deref(),
                sniff: r.sniff.as_deref(),
                listener: r.listener.as_deref(),
                attribution: r.attribution.as_deref(),
                resolved: r.resolved,
                resolved_name: r.resolved_name.as_deref(),
                name_mismatch: r.name_mismatch,
                rate_limited: r.rate_limited,
                cached: r.cached,
                dropped: r.dropped,
                policy: r.policy.as_ref(),
            },
        }
    }
}
