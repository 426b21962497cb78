#!/usr/bin/env bash
# Fuzzes agent_egress::sniff::sniff with libFuzzer (cargo-fuzz) for $1 seconds, seeded
# with the captured first flights in tests/fixtures/clienthello. Works on a stable
# toolchain: RUSTC_BOOTSTRAP=1 lets it take the -Z flags cargo-fuzz passes.
# A crash leaves its input in fuzz/artifacts/sniff/ and makes this script fail.
set -euo pipefail

seconds=${1:-}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 SECONDS   (how long to fuzz, a positive integer)" >&2
    exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: installing it" >&2
    cargo install --locked cargo-fuzz
fi

# Kept apart from the main build's artifacts: these are instrumented differently.
target_dir=${CARGO_TARGET_DIR:-$repo/target}/fuzz
corpus=$repo/fuzz/corpus/sniff
mkdir -p "$corpus"
cp "$repo"/tests/fixtures/clienthello/*.bin "$corpus"/

cd "$repo/fuzz"
# -max_len above the 16 KiB bound so the "too large" paths are reached; -timeout
# catches a loop (one input must take far less than a second).
cargo fuzz run --target-dir "$target_dir" --debug-assertions sniff "$corpus" -- \
    -max_total_time="$seconds" -max_len=20000 -timeout=2 -rss_limit_mb=2048 -print_final_stats=1
