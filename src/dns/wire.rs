//! DNS messages on the wire: our queries out, the servers' answers in.
//!
//! Encoding and decoding are hickory-proto's; this module only decides what a
//! decoded answer means for one of our questions, and refuses anything that is
//! not an answer to exactly that question.

use super::Failure;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::CNAME;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use std::io;
use std::net::IpAddr;

/// What we advertise over EDNS(0): the size the 2020 DNS flag day settled on,
/// which passes almost every path without IP fragmentation.
pub(super) const EDNS_PAYLOAD: u16 = 1232;
/// CNAME links followed inside one answer; real chains are a handful long.
const MAX_CNAME_LINKS: usize = 16;

/// What one server said to one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    /// The name's addresses of the type asked; `ttl` is the smallest TTL on the
    /// records that led to them (CNAME links included).
    Addresses {
        addrs: Vec<IpAddr>,
        ttl: u32,
    },
    /// The name exists but has no record of the type asked.
    NoData,
    /// Cut short: ask again over TCP for the whole answer.
    Truncated,
    NoSuchName,
    /// No answer from this server; another server may give one.
    Failed(Failure),
}

/// A recursive query for `name`'s records of type `qtype`, with EDNS(0); an
/// error is the socket's to report, as one that cannot be sent.
pub(super) fn encode_query(id: u16, name: &Name, qtype: RecordType) -> io::Result<Vec<u8>> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name.clone(), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    message.set_edns(edns);
    message.to_vec().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot encode a DNS query for {name}: {e}"),
        )
    })
}

/// Decodes a datagram; None for anything that is not a well-formed response.
pub(super) fn decode_response(packet: &[u8]) -> Option<Message> {
    let message = Message::from_vec(packet).ok()?;
    (message.metadata.message_type == MessageType::Response
        && message.metadata.op_code == OpCode::Query)
        .then_some(message)
}

/// What `response` says about our question (`id`, `name`, `qtype`), or None
/// when it answers some other question: a late answer to an earlier attempt,
/// or a spoofing attempt, which must not settle anything.
pub(super) fn answer_to(
    response: &Message,
    id: u16,
    name: &Name,
    qtype: RecordType,
) -> Option<Answer> {
    let question_matches = match response.queries.as_slice() {
        [q] => q.name == *name && q.query_type == qtype && q.query_class == DNSClass::IN,
        _ => false,
    };
    if response.metadata.id != id || !question_matches {
        return None;
    }
    Some(match response.metadata.response_code {
        // A partial set of addresses could miss the one a connection went to.
        ResponseCode::NoError if response.metadata.truncation => Answer::Truncated,
        ResponseCode::NoError => addresses(response, name, qtype),
        ResponseCode::NXDomain => Answer::NoSuchName,
        code => Answer::Failed(Failure::Answered(format!(
            "answered {code} (rcode {})",
            u16::from(code)
        ))),
    })
}

fn addresses(response: &Message, name: &Name, qtype: RecordType) -> Answer {
    let mut chain = vec![name.clone()];
    let mut ttl = u32::MAX;
    // Only records on the CNAME chain from our name count: anything else in
    // the answer section is not about the question and must not be believed.
    for _ in 0..MAX_CNAME_LINKS {
        let link = response.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(CNAME(target))
                if r.dns_class == DNSClass::IN
                    && chain.contains(&r.name)
                    && !chain.contains(target) =>
            {
                Some((target.clone(), r.ttl))
            }
            _ => None,
        });
        let Some((target, link_ttl)) = link else {
            break;
        };
        chain.push(target);
        ttl = ttl.min(link_ttl);
    }
    let mut addrs = Vec::new();
    for record in &response.answers {
        if record.dns_class != DNSClass::IN || !chain.contains(&record.name) {
            continue;
        }
        let addr = match (&record.data, qtype) {
            (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
            (RData::AAAA(a), RecordType::AAAA) => IpAddr::V6(a.0),
            _ => continue,
        };
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
        ttl = ttl.min(record.ttl);
    }
    if addrs.is_empty() {
        Answer::NoData
    } else {
        Answer::Addresses { addrs, ttl }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA};
    use hickory_proto::rr::Record;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn response_to(id: u16, qname: &str, qtype: RecordType) -> Message {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name(qname), qtype));
        m
    }

    fn roundtrip(m: &Message) -> Message {
        decode_response(&m.to_vec().unwrap()).unwrap()
    }

    #[test]
    fn query_is_recursive_with_edns_and_one_question() {
        let bytes = encode_query(0xbeef, &name("Example.COM."), RecordType::AAAA).unwrap();
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.metadata.id, 0xbeef);
        assert_eq!(m.metadata.message_type, MessageType::Query);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].query_type, RecordType::AAAA);
        assert_eq!(m.edns.as_ref().map(Edns::max_payload), Some(EDNS_PAYLOAD));
        // A query is not a response: we never take our own packet as an answer.
        assert!(decode_response(&bytes).is_none());
    }

    #[test]
    fn addresses_follow_the_cname_chain_only() {
        let mut m = response_to(7, "www.example.com.", RecordType::A);
        m.add_answer(Record::from_rdata(
            name("www.example.com."),
            300,
            RData::CNAME(CNAME(name("edge.example.net."))),
        ));
        m.add_answer(Record::from_rdata(
            name("edge.example.net."),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        // Unrelated record smuggled into the answer: ignored.
        m.add_answer(Record::from_rdata(
            name("evil.example.org."),
            1,
            RData::A(A::new(203, 0, 113, 66)),
        ));
        let answer = answer_to(&roundtrip(&m), 7, &name("www.example.com."), RecordType::A);
        assert_eq!(
            answer,
            Some(Answer::Addresses {
                addrs: vec!["192.0.2.1".parse().unwrap()],
                ttl: 60
            })
        );
    }

    #[test]
    fn other_questions_and_ids_are_not_our_answer() {
        let mut m = response_to(7, "a.example.", RecordType::A);
        m.add_answer(Record::from_rdata(
            name("a.example."),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        let m = roundtrip(&m);
        assert!(answer_to(&m, 8, &name("a.example."), RecordType::A).is_none());
        assert!(answer_to(&m, 7, &name("b.example."), RecordType::A).is_none());
        assert!(answer_to(&m, 7, &name("a.example."), RecordType::AAAA).is_none());
        // Names compare without regard to case.
        assert!(answer_to(&m, 7, &name("A.Example."), RecordType::A).is_some());
    }

    #[test]
    fn rcodes_and_empty_answers() {
        let q = name("a.example.");
        let mut m = response_to(1, "a.example.", RecordType::AAAA);
        assert_eq!(
            answer_to(&roundtrip(&m), 1, &q, RecordType::AAAA),
            Some(Answer::NoData)
        );
        // An A record does not answer an AAAA question.
        m.add_answer(Record::from_rdata(
            q.clone(),
            5,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        assert_eq!(
            answer_to(&roundtrip(&m), 1, &q, RecordType::AAAA),
            Some(Answer::NoData)
        );
        m.add_answer(Record::from_rdata(
            q.clone(),
            5,
            RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        ));
        assert!(matches!(
            answer_to(&roundtrip(&m), 1, &q, RecordType::AAAA),
            Some(Answer::Addresses { .. })
        ));
        m.metadata.response_code = ResponseCode::NXDomain;
        assert_eq!(
            answer_to(&roundtrip(&m), 1, &q, RecordType::AAAA),
            Some(Answer::NoSuchName)
        );
        m.metadata.response_code = ResponseCode::ServFail;
        assert_eq!(
            answer_to(&roundtrip(&m), 1, &q, RecordType::AAAA),
            Some(Answer::Failed(Failure::Answered(
                "answered Server Failure (rcode 2)".into()
            )))
        );
    }

    #[test]
    fn truncated_is_truncated_even_with_some_addresses() {
        let mut m = response_to(1, "a.example.", RecordType::A);
        m.metadata.truncation = true;
        m.add_answer(Record::from_rdata(
            name("a.example."),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        assert!(matches!(
            answer_to(&roundtrip(&m), 1, &name("a.example."), RecordType::A),
            Some(Answer::Truncated)
        ));
    }

    #[test]
    fn garbage_is_ignored() {
        assert!(decode_response(b"").is_none());
        assert!(decode_response(&[0xff; 40]).is_none());
    }
}
