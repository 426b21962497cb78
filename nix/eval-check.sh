#!/usr/bin/env bash
# Checks the Nix side without nixpkgs, a Nix store or a network:
#  1. every .nix file parses;
#  2. nix/module.nix evaluates with nixpkgs' lib and nix/eval-stubs.nix, and
#     what it generates (daemon unit, agents' units and slices, firewall
#     rules, JSON config) meets nix/eval-check.nix's expectations, including
#     the configurations it must refuse, and suggest's golden Nix output
#     (tests/fixtures/suggest/suggested.nix) as services.agentEgress.agents;
#  3. the build-time check the module's derivation runs (`agent-egress check`
#     on the generated JSON) accepts the generated configs and refuses a bad
#     one with the daemon's message;
#  4. the VM test script compiles and its subtests are vm-tests/scenarios.txt;
#  5. the learn service's script, run on the suggest fixture (as root, in a
#     mount namespace), writes suggest's golden output, and a failed run
#     leaves the previous file.
#
# Usage: nix/eval-check.sh LIB_PATH
#   LIB_PATH: a nixpkgs or nixpkgs.lib checkout, or its lib/ directory.
#   AGENT_EGRESS: the binary (default: $CARGO_TARGET_DIR or target/, debug/agent-egress).
# Without LIB_PATH it skips. With CI set, a missing tool or binary fails
# instead of skipping.
# SPDX-License-Identifier: GPL-3.0-or-later
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

skip() {
  echo "eval-check: SKIPPED: $*" >&2
  exit 0
}
fail() {
  echo "eval-check: FAILED: $*" >&2
  exit 1
}
# A missing prerequisite: a failure in CI, a loud skip elsewhere.
missing() {
  if [ -n "${CI:-}" ]; then fail "$*"; else skip "$*"; fi
}

[ $# -ge 1 ] && [ -n "$1" ] || skip "no nixpkgs lib given (usage: $0 LIB_PATH)"
if [ -f "$1/lib/default.nix" ]; then
  lib_path=$(cd "$1/lib" && pwd)
elif [ -f "$1/default.nix" ]; then
  lib_path=$(cd "$1" && pwd)
else
  fail "$1 is neither nixpkgs' lib nor a checkout holding lib/"
fi
command -v nix-instantiate >/dev/null || missing "nix-instantiate is not installed"
# The lib's own revision, for the stamp: a git checkout's commit, else its version file.
lib_revision=${LIB_REVISION:-}
[ -n "$lib_revision" ] || lib_revision=$(git -C "$lib_path" rev-parse HEAD 2>/dev/null || cat "$lib_path/.version" 2>/dev/null || echo unknown)
command -v jq >/dev/null || missing "jq is not installed"
command -v python3 >/dev/null || missing "python3 is not installed"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Evaluation only: no store writes (--readonly-mode, dummy store), no daemon.
export XDG_CACHE_HOME="$work/cache" NIX_REMOTE=
nix_eval() {
  nix-instantiate --readonly-mode --store dummy:// "$@"
}

echo "== parse every .nix file"
mapfile -t nix_files < <(cd "$root" && find . -name '*.nix' -not -path './target/*' | sort)
for file in "${nix_files[@]}"; do
  nix_eval --parse "$root/$file" >/dev/null || fail "$file does not parse"
done
echo "ok: ${#nix_files[@]} files"

echo "== evaluate the module with $lib_path"
package_dir="$work/package"
mkdir -p "$package_dir/bin" "$work/generated"
nix_eval --eval --strict --json "$here/eval-check.nix" \
  --argstr libPath "$lib_path" \
  --argstr packageDir "$package_dir" \
  --argstr generatedDir "$work/generated" >"$work/eval.json" ||
  fail "nix/eval-check.nix does not evaluate (error above)"
if [ "$(jq '.failures | length' "$work/eval.json")" -ne 0 ]; then
  jq -r '.failures[]' "$work/eval.json" >&2
  fail "the module's output does not meet the expectations above"
fi
echo "ok: expectations of nix/eval-check.nix hold"
[ "$(jq .packageEvaluable "$work/eval.json")" = true ] ||
  echo "note: nix/package.nix not evaluated: this lib's lib.fileset needs a newer Nix than $(nix-instantiate --version)"

echo "== systemd-analyze verify on the units"
if command -v systemd-analyze >/dev/null; then
  python3 "$here/render-units.py" verify "$work/eval.json" "$work/units"
  # systemd older than 254 does not know NFTSet= yet; nothing else may warn.
  for unit in "$work"/units/*/*; do
    if (cd "$(dirname "$unit")" && systemd-analyze verify "./$(basename "$unit")" 2>&1) |
      grep -v "Unknown key 'NFTSet'" | grep .; then
      fail "systemd-analyze verify complains about $unit"
    fi
  done
  echo "ok: $(find "$work/units" -type f | wc -l) units ($(systemd-analyze --version | head -n 1))"
else
  missing "systemd-analyze is not installed"
fi

echo "== the systemd VM's install set: vm-tests/systemd/install.json"
install_json="$root/vm-tests/systemd/install.json"
python3 "$here/render-units.py" install "$work/eval.json" "$work/install.json" "$package_dir"
if [ -n "${EVAL_CHECK_UPDATE:-}" ]; then
  cp "$work/install.json" "$install_json"
  echo "updated $install_json"
elif ! diff -u "$install_json" "$work/install.json"; then
  fail "vm-tests/systemd/install.json is not what the module generates (EVAL_CHECK_UPDATE=1 $0 LIB_PATH rewrites it)"
fi
echo "ok"

echo "== vm-tests: the generated test script"
jq -r .vmScript "$work/eval.json" >"$work/vm-script.py"
python3 - "$work/vm-script.py" "$root/vm-tests/scenarios.txt" <<'EOF'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read(), "the VM test script")
subtests = [
    node.args[0].value
    for node in ast.walk(tree)
    if isinstance(node, ast.Call)
    and getattr(node.func, "id", None) == "subtest"
    and node.args
    and isinstance(node.args[0], ast.Constant)
]
listed = open(sys.argv[2]).read().split()
if subtests != listed:
    sys.exit(f"the VM test's subtests {subtests} differ from vm-tests/scenarios.txt {listed}")
print(f"ok: its {len(listed)} subtests are vm-tests/scenarios.txt")
EOF
# The test driver lints the script with pyflakes, its machines and helpers
# being globals.
if command -v pyflakes3 >/dev/null; then
  {
    echo "agent = internet = start_all = subtest = None"
    cat "$work/vm-script.py"
  } >"$work/vm-lint.py"
  pyflakes3 "$work/vm-lint.py" || fail "pyflakes finds the VM test script wanting"
  echo "ok: pyflakes"
else
  missing "pyflakes3 is not installed"
fi

echo "== agent-egress check on the generated configs"
binary=${AGENT_EGRESS:-${CARGO_TARGET_DIR:-$root/target}/debug/agent-egress}
[ -x "$binary" ] || missing "no binary at $binary (cargo build, or set AGENT_EGRESS)"
"$binary" check --help 2>&1 | grep -q -- '--config' ||
  missing "$binary has no 'check --config' subcommand yet: the build-time check was not run"
ln -s "$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")" "$package_dir/bin/agent-egress"

case_dir() {
  jq -r --arg c "$2" ".$1[\$c].dir" "$work/eval.json"
}
# Runs a case's build command as the derivation would, with $out in its directory.
run_check() {
  local section=$1 case=$2 dir
  dir=$(case_dir "$section" "$case")
  mkdir -p "$dir"
  jq -r --arg c "$case" ".$section[\$c].json" "$work/eval.json" >"$dir/agent-egress.json"
  jq -r --arg c "$case" ".$section[\$c].checkCommand" "$work/eval.json" >"$dir/build.sh"
  (cd "$dir" && out="$dir/out" bash -euo pipefail build.sh) >"$dir/log" 2>&1
}
for case in $(jq -r '.accepted | keys[]' "$work/eval.json"); do
  dir=$(case_dir accepted "$case")
  run_check accepted "$case" || {
    cat "$dir/log" >&2
    fail "$case: agent-egress check refused the generated config"
  }
  cmp -s "$dir/out" "$dir/agent-egress.json" || fail "$case: the checked config differs from the generated one"
  echo "ok: $case accepted"
done
for case in $(jq -r '.rejected | keys[]' "$work/eval.json"); do
  dir=$(case_dir rejected "$case")
  message=$(jq -r --arg c "$case" '.rejected[$c].message' "$work/eval.json")
  run_check rejected "$case" && fail "$case: agent-egress check accepted a config with a bad $message"
  grep -q -- "$message" "$dir/log" || {
    cat "$dir/log" >&2
    fail "$case: agent-egress check refused the config without naming $message"
  }
  echo "ok: $case refused: $(head -n 1 "$dir/log")"
done
echo "== the learn service's script on the suggest fixture"
# As systemd runs it (NixOS's job scripts are bash -e), in a mount namespace
# whose /var/log and /var/lib are scratch: the audit file empty, a rotated
# gzip copy holding the fixture, an older suggestion to replace.
[ "$(id -u)" -eq 0 ] && command -v unshare >/dev/null ||
  missing "not root, or no unshare: the learn service's script was not run"
jq -r .learnScript "$work/eval.json" >"$work/learn.sh"
learn_in_namespace() {
  unshare -m bash -euo pipefail -c '
    mount --make-rprivate /
    mount -t tmpfs tmpfs /var/log
    mount -t tmpfs tmpfs /var/lib
    mkdir /var/log/agent-egress /var/lib/agent-egress
    if [ "$4" = with-records ]; then
      : >/var/log/agent-egress/audit.jsonl
      gzip -c "$1/tests/fixtures/suggest/audit.jsonl" >/var/log/agent-egress/audit.jsonl.2.gz
    fi
    echo "# the previous suggestion" >/var/lib/agent-egress/suggested.nix
    status=0
    PATH="$2:$PATH" bash -e "$3/learn.sh" 2>"$3/learn.log" || status=$?
    cp /var/lib/agent-egress/suggested.nix "$3/learnt.nix"
    ls -A /var/lib/agent-egress >"$3/learn-dir"
    exit "$status"
  ' _ "$root" "$package_dir/bin" "$work" "$1"
}
learn_in_namespace with-records || {
  cat "$work/learn.log" >&2
  fail "the learn script failed on the fixture"
}
diff -u "$root/tests/fixtures/suggest/suggested.nix" "$work/learnt.nix" ||
  fail "the learn script did not write suggest's output for the fixture to /var/lib/agent-egress/suggested.nix"
[ "$(cat "$work/learn-dir")" = suggested.nix ] || fail "the learn script left $(tr '\n' ' ' <"$work/learn-dir") in /var/lib/agent-egress"
echo "ok: suggested.nix is suggest's output for the audit file and its rotated copy"
learn_in_namespace without-records && fail "the learn script succeeded with no audit file"
[ "$(cat "$work/learnt.nix")" = "# the previous suggestion" ] || fail "a failed learn run replaced the previous suggestion"
[ "$(cat "$work/learn-dir")" = suggested.nix ] || fail "a failed learn run left $(tr '\n' ' ' <"$work/learn-dir") in /var/lib/agent-egress"
echo "ok: a run with nothing to read fails and leaves the previous suggestion whole"

echo "== stamp: what this evaluation covered (nix/eval-stamp.json)"
# CI has no nixpkgs lib: tests/packaging.rs holds these inputs to the
# hashes below, so a change to any of them fails CI until this check has
# passed on it again and rewritten the stamp.
stamp_inputs() {
  (cd "$root" && {
    find nix presets vm-tests -maxdepth 1 -type f -not -name eval-stamp.json
    echo vm-tests/systemd/install.json
    # suggest's golden Nix output, which eval-check.nix drops into the module.
    echo tests/fixtures/suggest/suggested.nix
  } | LC_ALL=C sort)
}
new_stamp=$(
  cd "$root"
  stamp_inputs | while read -r file; do
    printf '%s\t%s\n' "$file" "$(sha256sum "$file" | cut -d' ' -f1)"
  done | jq -R -s --arg lib "$lib_revision" '
    {about: "Written by nix/eval-check.sh when every check above passed on these files; tests/packaging.rs compares the hashes.",
     lib: $lib,
     inputs: (split("\n") | map(select(. != "") | split("\t") | {key: .[0], value: .[1]}) | from_entries)}'
)
if [ -n "${EVAL_CHECK_UPDATE:-}" ]; then
  printf '%s\n' "$new_stamp" >"$here/eval-stamp.json"
  echo "updated nix/eval-stamp.json"
elif ! diff <(jq -S .inputs "$here/eval-stamp.json" 2>/dev/null) <(jq -S .inputs <<<"$new_stamp") >/dev/null; then
  echo "note: nix/eval-stamp.json is stale; EVAL_CHECK_UPDATE=1 $0 LIB_PATH rewrites it"
fi
echo "eval-check: PASSED"
