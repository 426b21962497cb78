#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Every check the project has, in order: formatting, clippy, Nix syntax, all tests
# (as root: they build network namespaces and cgroups), and a check that the tests
# left nothing behind. Needs the packages .ci/run installs; `bash .ci/run` installs
# them and then runs this. Set CI=true to make a test that lacks root or a tool
# fail instead of skip.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
export RUST_BACKTRACE=1
# rustup installs into ~/.cargo; a non-login shell may not have it on PATH.
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
# Bounds the test run so a hung test fails the job instead of stalling it.
test_timeout=${TEST_TIMEOUT:-60m}

step() {
    echo
    echo "==> [$(date -u +%H:%M:%S)] $*"
}

step "cargo fmt --check"
cargo fmt --all -- --check

step "no merge conflict markers"
if git grep -nE '^(<<<<<<<|>>>>>>>)( |$)' -- . ; then
    echo "merge conflict markers above" >&2
    exit 1
fi

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

step "nix-instantiate --parse on every .nix file"
nix_files=()
while IFS= read -r -d '' file; do
    nix_files+=("$file")
done < <(find . \( -name .git -o -name target \) -prune -o -name '*.nix' -print0 | sort -z)
for file in "${nix_files[@]}"; do
    nix-instantiate --parse "$file" >/dev/null
done
echo "${#nix_files[@]} .nix file(s) parse"

step "cargo test: unit, integration and end-to-end tests (timeout $test_timeout)"
timeout "$test_timeout" cargo test --locked --lib --bins --tests -- --test-threads=2

step "cargo test --benches (each criterion benchmark run once, as a test)"
timeout "$test_timeout" cargo test --locked --benches

step "cargo test --doc"
timeout "$test_timeout" cargo test --locked --doc

step "leftovers"
bash scripts/leftovers.sh

step "all checks passed"
