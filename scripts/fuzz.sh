#!/usr/bin/env bash
# Fuzzes with libFuzzer (cargo-fuzz) for $1 seconds one target ($2): `sniff`
# (agent_egress::sniff::sniff, the default; seeded with the captured first flights in
# tests/fixtures/clienthello) or `dns_question` (the DNS handler's decision on a
# datagram; seeded with a query for allowed.test). Works on a stable
# toolchain: RUSTC_BOOTSTRAP=1 lets it take the -Z flags cargo-fuzz passes.
# A crash leaves its input in fuzz/artifacts/TARGET/ and makes this script fail.
set -euo pipefail

seconds=${1:-}
target=${2:-sniff}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]] || ! [[ $target =~ ^(sniff|dns_question)$ ]]; then
    echo "usage: $0 SECONDS [sniff|dns_question]   (how long to fuzz, a positive integer)" >&2
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
corpus=$repo/fuzz/corpus/$target
mkdir -p "$corpus"
case $target in
sniff) cp "$repo"/tests/fixtures/clienthello/*.bin "$corpus"/ ;;
# id 0x1234, RD, one question: allowed.test A IN
dns_question) printf '\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07allowed\x04test\x00\x00\x01\x00\x01' >"$corpus/query-a" ;;
esac

cd "$repo/fuzz"
# -max_len above the 16 KiB bound so the "too large" paths are reached; -timeout
# catches a loop (one input must take far less than a second).
cargo fuzz run --target-dir "$target_dir" --debug-assertions "$target" "$corpus" -- \
    -max_total_time="$seconds" -max_len=20000 -timeout=2 -rss_limit_mb=2048 -print_final_stats=1
