//! The end-to-end suite: the scenarios of the NixOS VM tests (vm-tests/,
//! listed in vm-tests/scenarios.txt), one for one and named the same, run here
//! for real: the daemon in a network namespace, real curl and headless
//! Chromium as the agent, real nginx and dnsmasq as the internet.
//!
//! Runs as `cargo test --test e2e [NAME...]`; prints a table of the scenarios
//! with their times and a closing `N passed, N failed` line.

mod backstop;
mod chromium;
mod dns;
#[path = "../harness/mod.rs"]
mod harness;
mod process;
mod scenarios;
mod supervisor;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

type Scenario = (&'static str, fn());

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let listed = listed_in_vm_tests();
    let ours: Vec<&str> = scenarios::ALL.iter().map(|(n, _)| *n).collect();
    if listed.iter().map(String::as_str).ne(ours.iter().copied()) {
        eprintln!(
            "vm-tests/scenarios.txt and the e2e suite differ:\n  vm-tests: {listed:?}\n  e2e:      {ours:?}"
        );
        std::process::exit(1);
    }
    if !harness::require_root_and_tools(&[
        "curl", "chromium", "dig", "dnsmasq", "getent", "jq", "python3", "socat", "unshare",
    ]) {
        println!("0 passed, 0 failed, {} skipped", ours.len());
        return;
    }
    let mut results: Vec<(&str, bool, Duration)> = Vec::new();
    for (name, run) in scenarios::ALL {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        eprintln!("--- scenario {name}");
        let started = Instant::now();
        let ok = catch_unwind(AssertUnwindSafe(run)).is_ok();
        let took = started.elapsed();
        eprintln!("--- scenario {name}: {}", if ok { "pass" } else { "FAIL" });
        results.push((name, ok, took));
    }
    let leftovers = catch_unwind(harness::assert_no_leftovers).is_ok();
    println!();
    println!("| scenario | result | time |");
    println!("| --- | --- | --- |");
    for (name, ok, took) in &results {
        let verdict = if *ok { "pass" } else { "FAIL" };
        println!("| {name} | {verdict} | {:.1} s |", took.as_secs_f64());
    }
    println!(
        "| (nothing left behind) | {} | |",
        if leftovers { "pass" } else { "FAIL" }
    );
    let passed = results.iter().filter(|r| r.1).count();
    let failed = results.len() - passed + usize::from(!leftovers);
    println!();
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

fn listed_in_vm_tests() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/vm-tests/scenarios.txt");
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}
