// SPDX-License-Identifier: GPL-3.0-or-later
//! `suggest` over 1,000,000 audit records (#15: at most 10 s, bounded memory):
//! the records stream from a reader that repeats 10,000 distinct lines (3 agents,
//! 2,000 hosts of 400 domains, a tenth refused), so the cost measured is reading,
//! parsing and tallying, and the peak resident size says whether memory grows
//! with the records (it must not: it grows with the destinations).

use std::hint::black_box;
use std::io::{self, Read};

use agent_egress::audit::{encode_line, Event, Proto, Record, Verdict};
use agent_egress::audit_read::for_each_record;
use agent_egress::suggest::{render, Learner, Options};
use criterion::{criterion_group, criterion_main, Criterion};

const DISTINCT: usize = 10_000;
const RECORDS: usize = 1_000_000;

fn lines() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..DISTINCT {
        let host = format!("h{}.d{}.example.com", i % 2_000 % 5, i % 2_000 / 5);
        let refused = i % 10 == 0;
        let record = Record {
            ts: format!("2026-11-25T08:{:02}:{:02}.123Z", i / 60 % 60, i % 60),
            event: Event::End,
            conn_id: Some(i as u64),
            agent: Some(format!("agents.slice/agent-{}.slice", i % 3)),
            cgroup_id: Some(8812),
            pid: Some(41_234),
            uid: Some(1000),
            exe: Some(["/usr/bin/curl", "/usr/bin/git", "/usr/bin/node"][i % 3].into()),
            cmdline: Some(vec![
                "curl".into(),
                "-sS".into(),
                format!("https://{host}/"),
            ]),
            src: "10.0.0.2:51234".into(),
            dst: format!("198.51.100.{}:{}", i % 250, [443, 80, 22][i % 7 / 3]),
            proto: Proto::Tls,
            sni: Some(host.clone()),
            host: Some(host),
            rule: Some("default".into()),
            outbound: if refused { "block" } else { "direct" }.into(),
            verdict: if refused {
                Verdict::Block
            } else {
                Verdict::Allow
            },
            bytes_up: 1_834,
            bytes_down: 48_211,
            duration_ms: 412,
            ..Record::default()
        };
        encode_line(&record, &mut out).expect("encode");
    }
    out
}

/// The same lines over and over, `records` lines in all.
struct Repeat<'a> {
    lines: &'a [u8],
    at: usize,
    left: usize,
}

impl Read for Repeat<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.lines.len() {
            if self.left == 0 {
                return Ok(0);
            }
            self.left -= 1;
            self.at = 0;
        }
        let n = buf.len().min(self.lines.len() - self.at);
        buf[..n].copy_from_slice(&self.lines[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn suggest(lines: &[u8], records: usize) -> usize {
    let mut learner = Learner::new(Options::default());
    let mut input = Repeat {
        lines,
        at: lines.len(),
        left: records / DISTINCT,
    };
    for_each_record("bench", &mut input, |r| learner.feed(r), |e| panic!("{e}")).expect("read");
    assert_eq!(learner.stats.records, records as u64);
    render::json(&learner.finish()).len()
}

fn peak_rss_kib() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss
}

fn bench(c: &mut Criterion) {
    let lines = lines();
    suggest(&lines, 100_000);
    let after_100k = peak_rss_kib();
    let started = std::time::Instant::now();
    suggest(&lines, RECORDS);
    println!(
        "suggest: {RECORDS} records ({} MB of JSON lines) in {:.2} s; peak RSS {} MiB after 100,000 records, {} MiB after 1,000,000",
        lines.len() * (RECORDS / DISTINCT) / 1_000_000,
        started.elapsed().as_secs_f64(),
        after_100k / 1024,
        peak_rss_kib() / 1024
    );
    let mut group = c.benchmark_group("suggest");
    group.sample_size(10);
    group.bench_function("1M_records", |b| {
        b.iter(|| black_box(suggest(&lines, RECORDS)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
