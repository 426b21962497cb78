//! Cost of encoding one typical connection record as a JSON line, and as an
//! OCSF event (`audit.format: "ocsf"`).

use std::hint::black_box;

use agent_egress::audit::{encode_line, Dial, Event, Proto, Record, Verdict};
use agent_egress::audit_ocsf::encode_ocsf_line;
use criterion::{criterion_group, criterion_main, Criterion};

fn typical_record() -> Record {
    Record {
        ts: "2026-11-25T08:40:25.123Z".into(),
        event: Event::End,
        conn_id: Some(123_456),
        agent: Some("agents.slice/claude.service".into()),
        subtree: None,
        cgroup_id: Some(8812),
        pid: Some(41_234),
        uid: Some(1000),
        exe: Some("/usr/bin/curl".into()),
        cmdline: Some(vec![
            "curl".into(),
            "-sS".into(),
            "https://api.github.com/repos/example/project".into(),
        ]),
        ancestry: Some(Vec::new()),
        exe_sha256: None,
        attribution: None,
        src: "10.0.0.2:51234".into(),
        dst: "[2001:db8::10]:443".into(),
        proto: Proto::Tls,
        host: Some("api.github.com".into()),
        sni: Some("api.github.com".into()),
        http_host: None,
        ech: false,
        rule: Some("github".into()),
        outbound: "direct".into(),
        verdict: Verdict::Allow,
        dial: Some(Dial::Resolved),
        upstream: Some("198.51.100.10:443".into()),
        sniff: None,
        listener: None,
        qtype: None,
        rcode: None,
        answers: None,
        resolved: None,
        resolved_name: None,
        name_mismatch: None,
        rate_limited: None,
        cached: None,
        bytes_up: 1_834,
        bytes_down: 48_211,
        duration_ms: 412,
        error: None,
        dropped: None,
        policy: None,
        question: None,
        asked: None,
    }
}

fn encode(c: &mut Criterion) {
    let record = typical_record();
    let mut line = Vec::with_capacity(1024);
    c.bench_function("encode_line", |b| {
        b.iter(|| {
            line.clear();
            encode_line(black_box(&record), &mut line).unwrap();
            black_box(line.len())
        })
    });
    c.bench_function("encode_ocsf_line", |b| {
        b.iter(|| {
            line.clear();
            encode_ocsf_line(black_box(&record), &mut line).unwrap();
            black_box(line.len())
        })
    });
}

criterion_group!(benches, encode);
criterion_main!(benches);
