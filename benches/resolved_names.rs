//! The DNS handler's address → names map at its bound (100,000 addresses, as
//! many distinct names): what it holds in memory (#12: at most 16 MB), and
//! what a lookup, on every connection without a name of its own, costs.

use agent_egress::agent_dns::names::{ResolvedNames, MAX_ENTRIES};
use criterion::{criterion_group, criterion_main, Criterion};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Counts the bytes live on the heap, to weigh the map.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; only the count is ours.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: a pointer System.alloc gave for this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32))
}

fn full_map() -> ResolvedNames {
    let names = ResolvedNames::default();
    let now = Instant::now();
    for i in 0..MAX_ENTRIES {
        // A name as long as a typical API host's, one per address.
        let name = format!("api-{i:06}.service.example.com");
        names.insert(
            Some("agents.slice/agent-coder.scope"),
            &name,
            &[(address(i), 300)],
            now,
        );
    }
    names
}

fn bench(c: &mut Criterion) {
    let before = LIVE.load(Ordering::Relaxed);
    let names = full_map();
    let held = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "resolved names: {MAX_ENTRIES} addresses held in {:.1} MB ({} bytes each)",
        held as f64 / 1e6,
        held / MAX_ENTRIES
    );
    let now = Instant::now();
    let mut i = 0usize;
    c.bench_function("resolved name of an address (100,000 held)", |b| {
        b.iter(|| {
            i = (i + 7919) % MAX_ENTRIES;
            black_box(names.lookup(Some("agents.slice/agent-coder.scope"), address(i), now))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
