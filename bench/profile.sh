#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Where agent-egress's cycles go: the benchmark's world, agent-egress behind
# its capture, wrk opening new connections (Connection: close) for SECONDS,
# and `perf record -g` on the proxy meanwhile. Prints the proxy's CPU per
# connection and perf's summaries (by thread, by binary, by symbol with
# children). Run as root:
#
#   bash bench/profile.sh [https|http|dns] [SECONDS]
#
# dns: dnsperf asks for a new name below the bench host each time, 4 clients
# with 64 in flight, through the DNS handler. PROFILE_PROXY=agent-egress-workers1
# profiles the one-worker variant; PROFILE_WATCHERS=3 puts 3 clients on the
# event stream meanwhile.
#
# Needs perf (Debian: linux-perf) besides bench/run.sh's tools.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCHEME=${1:-https}
SECONDS_TO_RUN=${2:-10}
REPO=$(cd "$BENCH_DIR/.." && pwd)
AGENT_EGRESS=${AGENT_EGRESS:-${CARGO_TARGET_DIR:-$REPO/target}/release/agent-egress}

main() {
    [ "$(id -u)" = 0 ] || die "run as root (it builds network namespaces and cgroups)"
    local tool
    for tool in perf wrk curl nginx iperf3 dnsmasq dnsperf openssl; do
        command -v "$tool" >/dev/null || die "missing tool: $tool"
    done
    [ -x "$AGENT_EGRESS" ] || die "no agent-egress binary at $AGENT_EGRESS (cargo build --release)"
    case $SCHEME in http | https | dns) ;; *) die "scheme must be http, https or dns, not $SCHEME" ;; esac
    BENCH_ID=$(printf '%04x' "$$")
    WORK=$(mktemp -d "/tmp/aebench-$BENCH_ID.XXXX")
    # No bulk test here: the served big file need not exist.
    BENCH_DATA_FILE=/dev/null
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    ulimit -n "$(ulimit -Hn)"
    make_content
    build_world
    PROXY=${PROFILE_PROXY:-agent-egress}
    proxy_start "$PROXY"
    as_agent curl -sSk -o /dev/null --max-time 5 "https://$ALLOWED_HOST/hello.txt" ||
        die "a first request failed"
    # PROFILE_WATCHERS=N: N clients on the control API's event stream meanwhile.
    local i
    for ((i = 0; i < ${PROFILE_WATCHERS:-0}; i++)); do
        curl -sN --unix-socket "$WORK/control.sock" http://agent-egress/v1/events >/dev/null &
        track $!
    done

    local cpu0 cpu1 out requests perf_pid
    cpu0=$(cpu_ticks "$PROXY_PID")
    perf record -F 2000 -g -p "$PROXY_PID" -o "$WORK/perf.data" -- sleep "$SECONDS_TO_RUN" \
        >/dev/null 2>&1 &
    perf_pid=$!
    if [ "$SCHEME" = dns ]; then
        seq 1 "$((SECONDS_TO_RUN * 250000))" |
            awk -v host="$ALLOWED_HOST" '{ printf "u%d.%s A\n", $1, host }' >"$WORK/dns-unique.txt"
        out=$(as_agent dnsperf -s "$SERVER_IP" -d "$WORK/dns-unique.txt" -n 1 \
            -l "$SECONDS_TO_RUN" -c 4 -q 64 2>&1)
        cpu1=$(cpu_ticks "$PROXY_PID")
        wait "$perf_pid" || true
        local qps
        qps=$(awk '/Queries per second:/ { print $4 }' <<<"$out")
        [ -n "$qps" ] || die "dnsperf: no result: $out"
        requests=$(awk -v q="$qps" -v s="$SECONDS_TO_RUN" 'BEGIN { printf "%.0f", q * s }')
        printf 'dns: %.0f queries/s, proxy CPU %s µs per query\n\n' "$qps" \
            "$(awk -v c="$(cpu_seconds "$cpu0" "$cpu1")" -v n="$requests" \
                'BEGIN { printf "%.1f", c * 1e6 / n }')"
    else
        out=$(as_agent wrk -t2 -c32 -d"${SECONDS_TO_RUN}s" -H 'Connection: close' \
            "$SCHEME://$ALLOWED_HOST/hello.txt")
        cpu1=$(cpu_ticks "$PROXY_PID")
        wait "$perf_pid" || true
        requests=$(awk '/requests in/ { print $1 }' <<<"$out")
        [ -n "$requests" ] || die "wrk: no result: $out"
        printf '%s: %s new connections/s, proxy CPU %s µs per connection\n\n' "$SCHEME" \
            "$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")" \
            "$(awk -v c="$(cpu_seconds "$cpu0" "$cpu1")" -v n="$requests" \
                'BEGIN { printf "%.0f", c * 1e6 / n }')"
    fi
    local report=(perf report -i "$WORK/perf.data" --stdio -g none)
    echo "== by thread"
    "${report[@]}" --no-children --sort comm 2>/dev/null | grep '%' | head -8
    echo "== by binary"
    "${report[@]}" --no-children --sort dso 2>/dev/null | grep '%' | head -8
    echo "== by symbol, with what it calls (top 40)"
    "${report[@]}" --children --sort symbol 2>/dev/null | grep '%' | head -40 | cut -c1-100
    # Attribution's /proc reads and the records' encoding happen here.
    echo "== audit-writer thread, by symbol, with what it calls (top 40)"
    "${report[@]}" --comm audit-writer --children --sort symbol 2>/dev/null | grep '%' |
        head -40 | cut -c1-100
}

main "$@"
