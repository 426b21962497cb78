//! Cost of one `sniff` call on a complete first flight of real clients.

use std::hint::black_box;

use agent_egress::sniff::{sniff, Sniff, DEFAULT_MAX_BYTES};
use criterion::{criterion_group, criterion_main, Criterion};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/clienthello/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn bench_sniff(c: &mut Criterion) {
    let mut group = c.benchmark_group("sniff");
    for name in [
        "curl.bin",
        "chromium.bin",
        "curl-two-records.bin",
        "http-curl.bin",
    ] {
        let bytes = fixture(name);
        assert!(matches!(sniff(&bytes, DEFAULT_MAX_BYTES), Sniff::Done(_)));
        group.bench_function(name, |b| {
            b.iter(|| sniff(black_box(&bytes), DEFAULT_MAX_BYTES))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_sniff);
criterion_main!(benches);
