//! libFuzzer target: the DNS handler's decision on an arbitrary datagram (and
//! its reading of an arbitrary answer) must never panic, and a datagram is
//! forwarded only as a query for an allowed name of a forwarded type.
#![no_main]

use agent_egress::agent_dns::question::{plan, read_answer, NameVerdict, Plan};
use agent_egress::config::{Config, DEFAULT_QUERY_TYPES};
use hickory_proto::rr::RecordType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dns = Config::default().dns;
    let decided = plan(data, &dns, |name| {
        NameVerdict {
            allowed: name.ends_with("allowed.test"),
            rule: "fuzz".into(),
            outbound: "direct".into(),
        }
    });
    if let Plan::Forward { name, qtype, .. } = &decided {
        assert!(name.ends_with("allowed.test"), "forwarded {name}");
        assert!(DEFAULT_QUERY_TYPES.contains(qtype), "forwarded type {qtype}");
    }
    let _ = read_answer(data, 0x1234, "allowed.test", RecordType::A);
});
