//! One query of an agent, decided before anything leaves the host: decoded by
//! hickory-proto, checked against the query types forwarded and the policy for
//! its name; and the answers we give ourselves (a refusal, an error).

use crate::config::{Dns, RefuseWith};
use crate::names::normalize_host;
use hickory_proto::op::{Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::svcb::SvcParamKey;
use hickory_proto::rr::{RData, RecordType};
use hickory_proto::serialize::binary::BinDecodable;
use std::net::IpAddr;

/// Answers named in an audit record, at most.
const MAX_ANSWERS_RECORDED: usize = 16;

/// What the policy says of a name: the rule that decided, and whether it lets
/// the agent learn the name's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameVerdict {
    pub allowed: bool,
    pub rule: String,
    /// The outbound the rule names (what a connection to the name would get).
    pub outbound: String,
}

/// What to do with one datagram an agent sent to port 53.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Forward the query (its id replaced by ours) to the resolvers.
    Forward {
        name: String,
        qtype: RecordType,
        verdict: NameVerdict,
    },
    /// Answer at once: the bytes to send, and what the record says.
    Answer {
        response: Vec<u8>,
        name: Option<String>,
        qtype: Option<RecordType>,
        verdict: Option<NameVerdict>,
        rcode: ResponseCode,
        why: String,
    },
    /// Not even a DNS header: nothing to answer.
    Drop(String),
}

/// Decide `datagram`. `query_types` are the types forwarded; `decide_name`
/// asks the policy about a (normalised) name.
pub fn plan(datagram: &[u8], dns: &Dns, decide_name: impl FnOnce(&str) -> NameVerdict) -> Plan {
    let refuse_with = match dns.refuse_with {
        RefuseWith::NxDomain => ResponseCode::NXDomain,
        RefuseWith::Refused => ResponseCode::Refused,
    };
    let message = match Message::from_vec(datagram) {
        Ok(message) => message,
        Err(e) => {
            return match Header::from_bytes(datagram) {
                Ok(header) => answer(
                    &header.metadata,
                    None,
                    ResponseCode::FormErr,
                    format!("malformed query: {e}"),
                ),
                Err(_) => Plan::Drop(format!("not a DNS message ({} bytes): {e}", datagram.len())),
            };
        }
    };
    let metadata = &message.metadata;
    if metadata.message_type != MessageType::Query {
        return Plan::Drop("a response sent to port 53".into());
    }
    if metadata.op_code != OpCode::Query {
        return answer(
            metadata,
            Some(&message),
            ResponseCode::NotImp,
            format!("opcode {:?} is not forwarded", metadata.op_code),
        );
    }
    let [query] = message.queries.as_slice() else {
        return answer(
            metadata,
            Some(&message),
            ResponseCode::FormErr,
            format!("{} questions in one query", message.queries.len()),
        );
    };
    let qtype = query.query_type;
    let raw_name = query.name.to_ascii();
    let name = match normalize_host(&raw_name) {
        Ok(name) => name,
        // The root, or a name no host could have: refused like a refused name.
        Err(e) => {
            let mut plan = answer(
                metadata,
                Some(&message),
                refuse_with,
                format!("name {raw_name:?} not usable: {e}"),
            );
            set_question(&mut plan, None, Some(qtype), None);
            return plan;
        }
    };
    let longest_label = name.split('.').map(str::len).max().unwrap_or(0);
    if longest_label > dns.max_label_length || name.len() > dns.max_name_length {
        let mut plan = answer(
            metadata,
            Some(&message),
            ResponseCode::Refused,
            format!(
                "{name}: a label of {longest_label} bytes or a name of {} (dns.max_label_length {}, dns.max_name_length {})",
                name.len(),
                dns.max_label_length,
                dns.max_name_length
            ),
        );
        set_question(&mut plan, Some(name), Some(qtype), None);
        return plan;
    }
    if !dns.query_types.contains(&qtype) {
        let mut plan = answer(
            metadata,
            Some(&message),
            ResponseCode::Refused,
            format!("query type {qtype} is not forwarded (dns.query_types)"),
        );
        set_question(&mut plan, Some(name), Some(qtype), None);
        return plan;
    }
    let verdict = decide_name(&name);
    if !verdict.allowed {
        let mut plan = answer(
            metadata,
            Some(&message),
            refuse_with,
            format!("{name} is refused by rule {:?}", verdict.rule),
        );
        set_question(&mut plan, Some(name), Some(qtype), Some(verdict));
        return plan;
    }
    Plan::Forward {
        name,
        qtype,
        verdict,
    }
}

fn set_question(
    plan: &mut Plan,
    new_name: Option<String>,
    new_qtype: Option<RecordType>,
    new_verdict: Option<NameVerdict>,
) {
    if let Plan::Answer {
        name,
        qtype,
        verdict,
        ..
    } = plan
    {
        *name = new_name;
        *qtype = new_qtype;
        *verdict = new_verdict;
    }
}

/// Our own answer with `rcode` to a query with this header (and its question,
/// if it could be read). Recursion is available, as a resolver's would be.
fn answer(
    metadata: &hickory_proto::op::Metadata,
    request: Option<&Message>,
    rcode: ResponseCode,
    why: String,
) -> Plan {
    let mut response = Message::error_msg(metadata.id, metadata.op_code, rcode);
    response.metadata.recursion_desired = metadata.recursion_desired;
    response.metadata.recursion_available = true;
    if let Some(request) = request {
        response.add_queries(request.queries.iter().cloned());
    }
    match response.to_vec() {
        Ok(bytes) => Plan::Answer {
            response: bytes,
            name: None,
            qtype: None,
            verdict: None,
            rcode,
            why,
        },
        Err(e) => Plan::Drop(format!("{why}; cannot encode the answer: {e}")),
    }
}

/// The answer a server gave, as an audit record names it: its code and the
/// records of its answer section (bounded), or why it is no answer to us.
pub fn read_answer(datagram: &[u8], id: u16, name: &str, qtype: RecordType) -> Option<Summary> {
    let message = Message::from_vec(datagram).ok()?;
    let metadata = &message.metadata;
    let same_question = match message.queries.as_slice() {
        [q] => q.query_type == qtype && normalize_host(&q.name.to_ascii()).is_ok_and(|n| n == name),
        _ => false,
    };
    if metadata.id != id || metadata.message_type != MessageType::Response || !same_question {
        return None;
    }
    let answers = message
        .answers
        .iter()
        .take(MAX_ANSWERS_RECORDED)
        .map(|record| match &record.data {
            RData::A(a) => a.to_string(),
            RData::AAAA(a) => a.to_string(),
            RData::CNAME(c) => format!("CNAME {}", c.0),
            other => other.record_type().to_string(),
        })
        .collect();
    let addresses = message
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some((IpAddr::V4(a.0), record.ttl)),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), record.ttl)),
            _ => None,
        })
        .collect();
    // How long the answer may be kept: its shortest TTL (a negative answer's
    // from its SOA). None: nothing to keep it by.
    let ttl = message
        .answers
        .iter()
        .chain(&message.authorities)
        .map(|record| record.ttl)
        .min();
    Some(Summary {
        rcode: metadata.response_code,
        truncated: metadata.truncation,
        answers,
        addresses,
        ttl,
    })
}

/// A server's answer in an audit record's terms.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub rcode: ResponseCode,
    pub truncated: bool,
    pub answers: Vec<String>,
    /// The answer's addresses with their TTLs (seconds), for [`super::names`].
    pub addresses: Vec<(IpAddr, u32)>,
    /// The shortest TTL of its records, seconds.
    pub ttl: Option<u32>,
}

/// `response` without the `ech` parameter of its HTTPS and SVCB records, and
/// how many it dropped; `None` when it had none (send it as it is). A client
/// that gets an ECH config sends only the provider's public name in the
/// clear: the proxy would decide and audit a name the agent did not ask for.
pub fn strip_ech(response: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut message = Message::from_vec(response).ok()?;
    let mut dropped = 0;
    for record in message
        .answers
        .iter_mut()
        .chain(message.additionals.iter_mut())
    {
        let svcb = match &mut record.data {
            RData::HTTPS(https) => &mut https.0,
            RData::SVCB(svcb) => svcb,
            _ => continue,
        };
        let before = svcb.svc_params.len();
        svcb.svc_params
            .retain(|(key, _)| *key != SvcParamKey::EchConfigList);
        dropped += before - svcb.svc_params.len();
    }
    if dropped == 0 {
        return None;
    }
    message.to_vec().ok().map(|bytes| (bytes, dropped))
}

/// A kept answer served for `query` after `age`: the agent's id and question,
/// every TTL less the age.
pub fn from_cache(kept: &[u8], query: &[u8], age: std::time::Duration) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let room = usize::from(request.max_payload());
    let mut response = Message::from_vec(kept).ok()?;
    response.metadata.id = request.metadata.id;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.queries = request.queries;
    let age = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
    for record in response
        .answers
        .iter_mut()
        .chain(response.authorities.iter_mut())
        .chain(response.additionals.iter_mut())
    {
        record.ttl = record.ttl.saturating_sub(age);
    }
    // Larger than the agent takes over UDP (512 bytes without EDNS): asked
    // anew, the server truncates it for this agent as it should.
    response.to_vec().ok().filter(|bytes| bytes.len() <= room)
}

/// A response code as resolvers and dig print it (`NOERROR`, `NXDOMAIN`, ...).
pub fn mnemonic(rcode: ResponseCode) -> String {
    match rcode {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

/// REFUSED for a query the handler will not forward after all (a limit).
pub fn refused(query: &[u8]) -> Option<Vec<u8>> {
    own_answer(query, ResponseCode::Refused)
}

/// SERVFAIL for a forwarded query no server answered.
pub fn server_failure(query: &[u8]) -> Option<Vec<u8>> {
    own_answer(query, ResponseCode::ServFail)
}

fn own_answer(query: &[u8], rcode: ResponseCode) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    match answer(&request.metadata, Some(&request), rcode, String::new()) {
        Plan::Answer { response, .. } => Some(response),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;
    use std::time::Duration;

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    fn allow_only(allowed: &'static str) -> impl FnOnce(&str) -> NameVerdict {
        move |name| {
            let allowed = name == allowed || name.ends_with(&format!(".{allowed}"));
            NameVerdict {
                allowed,
                rule: if allowed { "allowed" } else { "default" }.into(),
                outbound: if allowed { "direct" } else { "block" }.into(),
            }
        }
    }

    fn decided(datagram: &[u8]) -> Plan {
        plan(datagram, &Config::default().dns, allow_only("allowed.test"))
    }

    fn rcode_of(plan: &Plan) -> (ResponseCode, u16, bool) {
        let Plan::Answer { response, .. } = plan else {
            panic!("not answered at once: {plan:?}");
        };
        let m = Message::from_vec(response).unwrap();
        (
            m.metadata.response_code,
            m.metadata.id,
            m.metadata.recursion_available,
        )
    }

    #[test]
    fn allowed_names_are_forwarded_normalised() {
        assert_eq!(
            decided(&query("WWW.Allowed.Test.", RecordType::AAAA)),
            Plan::Forward {
                name: "www.allowed.test".into(),
                qtype: RecordType::AAAA,
                verdict: NameVerdict {
                    allowed: true,
                    rule: "allowed".into(),
                    outbound: "direct".into()
                }
            }
        );
    }

    #[test]
    fn refused_names_get_nxdomain_with_the_question_and_id() {
        let refusal = decided(&query("c2VjcmV0.attacker.test.", RecordType::A));
        assert_eq!(rcode_of(&refusal), (ResponseCode::NXDomain, 0x1234, true));
        let Plan::Answer { name, verdict, .. } = &refusal else {
            unreachable!()
        };
        assert_eq!(name.as_deref(), Some("c2vjcmv0.attacker.test"));
        let verdict = verdict.as_ref().expect("the policy's verdict");
        assert_eq!(
            (verdict.rule.as_str(), verdict.outbound.as_str()),
            ("default", "block")
        );
        let mut dns = Config::default().dns;
        dns.refuse_with = RefuseWith::Refused;
        let refused = plan(
            &query("x.attacker.test.", RecordType::A),
            &dns,
            allow_only("allowed.test"),
        );
        assert_eq!(rcode_of(&refused).0, ResponseCode::Refused);
    }

    #[test]
    fn tunnel_types_are_refused_even_for_allowed_names() {
        for qtype in [RecordType::TXT, RecordType::NULL, RecordType::ANY] {
            let plan = decided(&query("allowed.test.", qtype));
            assert_eq!(rcode_of(&plan).0, ResponseCode::Refused, "{qtype}");
        }
    }

    #[test]
    fn long_labels_and_names_are_refused_even_when_allowed() {
        let data = "a".repeat(49);
        let plan = decided(&query(&format!("{data}.allowed.test."), RecordType::A));
        assert_eq!(rcode_of(&plan).0, ResponseCode::Refused);
        let ok = "a".repeat(48);
        assert!(matches!(
            decided(&query(&format!("{ok}.allowed.test."), RecordType::A)),
            Plan::Forward { .. }
        ));
        let long = format!("{}.allowed.test.", ["abcdefghij"; 16].join("."));
        assert_eq!(
            rcode_of(&decided(&query(&long, RecordType::A))).0,
            ResponseCode::Refused
        );
    }

    #[test]
    fn ech_configs_are_taken_out_of_https_records() {
        use hickory_proto::rr::rdata::svcb::{Alpn, EchConfigList, SvcParamValue, SVCB};
        use hickory_proto::rr::rdata::HTTPS;
        let mut answer = Message::from_vec(&query("allowed.test.", RecordType::HTTPS)).unwrap();
        answer.metadata.message_type = MessageType::Response;
        let svcb = SVCB::new(
            1,
            Name::root(),
            vec![
                (
                    SvcParamKey::Alpn,
                    SvcParamValue::Alpn(Alpn(vec!["h2".into()])),
                ),
                (
                    SvcParamKey::EchConfigList,
                    SvcParamValue::EchConfigList(EchConfigList(vec![0xde, 0xad, 0xbe, 0xef])),
                ),
            ],
        );
        answer.add_answer(hickory_proto::rr::Record::from_rdata(
            Name::from_str("allowed.test.").unwrap(),
            60,
            RData::HTTPS(HTTPS(svcb)),
        ));
        let bytes = answer.to_vec().unwrap();
        let (stripped, dropped) = strip_ech(&bytes).expect("an ech parameter to drop");
        assert_eq!(dropped, 1);
        let stripped = Message::from_vec(&stripped).unwrap();
        let RData::HTTPS(https) = &stripped.answers[0].data else {
            panic!("not an HTTPS record: {stripped:?}");
        };
        assert_eq!(https.0.svc_params.len(), 1);
        assert_eq!(https.0.svc_params[0].0, SvcParamKey::Alpn);
        // Nothing to drop: sent as it is.
        assert!(strip_ech(&stripped.to_vec().unwrap()).is_none());
    }

    #[test]
    fn malformed_input_is_answered_or_dropped_never_forwarded() {
        // A header and a question cut short: FORMERR with the id.
        let mut cut = query("allowed.test.", RecordType::A);
        cut.truncate(cut.len() - 3);
        assert_eq!(rcode_of(&decided(&cut)).0, ResponseCode::FormErr);
        // A compression pointer to itself.
        let mut looped = query("allowed.test.", RecordType::A)[..12].to_vec();
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(!matches!(decided(&looped), Plan::Forward { .. }));
        // Less than a header.
        assert!(matches!(decided(&[1, 2, 3]), Plan::Drop(_)));
        // Two questions in one query.
        let mut two = Message::new(7, MessageType::Query, OpCode::Query);
        for name in ["allowed.test.", "x.attacker.test."] {
            two.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        }
        assert_eq!(
            rcode_of(&decided(&two.to_vec().unwrap())).0,
            ResponseCode::FormErr
        );
        // A response is no question.
        let mut response = Message::from_vec(&query("allowed.test.", RecordType::A)).unwrap();
        response.metadata.message_type = MessageType::Response;
        assert!(matches!(
            decided(&response.to_vec().unwrap()),
            Plan::Drop(_)
        ));
    }

    #[test]
    fn an_answer_counts_only_for_its_own_id_and_question() {
        let mut answer = Message::from_vec(&query("allowed.test.", RecordType::A)).unwrap();
        answer.metadata.message_type = MessageType::Response;
        answer.add_answer(hickory_proto::rr::Record::from_rdata(
            Name::from_str("allowed.test.").unwrap(),
            60,
            RData::A("198.51.100.10".parse().unwrap()),
        ));
        let bytes = answer.to_vec().unwrap();
        let summary = read_answer(&bytes, 0x1234, "allowed.test", RecordType::A).unwrap();
        assert_eq!(summary.answers, ["198.51.100.10"]);
        assert_eq!(summary.addresses, [("198.51.100.10".parse().unwrap(), 60)]);
        assert_eq!(summary.rcode, ResponseCode::NoError);
        assert_eq!(summary.ttl, Some(60));
        // Kept and served 25 s later for a query with another id.
        let mut later = Message::from_vec(&query("ALLOWED.test.", RecordType::A)).unwrap();
        later.metadata.id = 0x4321;
        let served = from_cache(&bytes, &later.to_vec().unwrap(), Duration::from_secs(25)).unwrap();
        let served = Message::from_vec(&served).unwrap();
        assert_eq!(served.metadata.id, 0x4321);
        assert!(served.queries[0]
            .name
            .to_ascii()
            .eq_ignore_ascii_case("allowed.test."));
        assert_eq!(served.answers[0].ttl, 35);
        assert!(read_answer(&bytes, 0x1235, "allowed.test", RecordType::A).is_none());
        assert!(read_answer(&bytes, 0x1234, "other.test", RecordType::A).is_none());
        assert!(read_answer(&bytes, 0x1234, "allowed.test", RecordType::AAAA).is_none());
        assert!(read_answer(&bytes[..20], 0x1234, "allowed.test", RecordType::A).is_none());
    }
}
