#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Where a proxy's cycles go: the benchmark's world, the proxy behind its
# capture, wrk opening new connections (Connection: close) for SECONDS, and
# `perf record -g` on the proxy meanwhile. Prints the proxy's CPU per
# connection and perf's summaries (by thread, by binary, by symbol with
# children, the audit writer's own), then its CPU per connection by system
# call and by thread (bench/perf_by_syscall.py). With more than one proxy,
# each is profiled in turn in the same world and that table puts them side by
# side. Run as root:
#
#   bash bench/profile.sh [https|http|dns] [SECONDS]
#
# PROFILE_PROXIES: the proxies, bench/run.sh's names (default agent-egress;
# e.g. "agent-egress haproxy-nbthread1" to see what stands between them;
# haproxy-nbthread1-conntrack is haproxy behind a capture that keeps each
# flow's conntrack mark, as agent-egress's does).
# dns: dnsperf asks for a new name below the bench host each time, 4 clients
# with 64 in flight, through the DNS handler (agent-egress variants only).
# PROFILE_WATCHERS=3 puts 3 clients on agent-egress's event stream meanwhile.
# PROFILE_OUT=DIR keeps each proxy's perf data and perf script output there.
#
# Needs perf (Debian: linux-perf) besides bench/run.sh's tools.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCHEME=${1:-https}
SECONDS_TO_RUN=${2:-10}
PROXIES=${PROFILE_PROXIES:-agent-egress}
FREQ=2000
REPO=$(cd "$BENCH_DIR/.." && pwd)
AGENT_EGRESS=${AGENT_EGRESS:-${CARGO_TARGET_DIR:-$REPO/target}/release/agent-egress}

main() {
    [ "$(id -u)" = 0 ] || die "run as root (it builds network namespaces and cgroups)"
    local tool
    for tool in perf wrk curl nginx iperf3 dnsmasq dnsperf openssl python3; do
        command -v "$tool" >/dev/null || die "missing tool: $tool"
    done
    [[ " $PROXIES " != *" agent-egress"* ]] || [ -x "$AGENT_EGRESS" ] ||
        die "no agent-egress binary at $AGENT_EGRESS (cargo build --release)"
    case $SCHEME in http | https | dns) ;; *) die "scheme must be http, https or dns, not $SCHEME" ;; esac
    BENCH_ID=$(printf '%04x' "$$")
    WORK=$(mktemp -d "/tmp/aebench-$BENCH_ID.XXXX")
    # No bulk test here: the served big file need not exist.
    BENCH_DATA_FILE=/dev/null
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    ulimit -n "$(ulimit -Hn)"
    make_content
    [ "$SCHEME" != dns ] || make_dns_queries "$SECONDS_TO_RUN"
    local proxy runs=()
    for proxy in $PROXIES; do
        profile "$proxy"
        runs+=("$proxy=$WORK/$proxy.script:$UNITS")
    done
    echo "==== by system call and thread (a unit: a $( [ "$SCHEME" = dns ] && echo query || echo connection))"
    python3 "$BENCH_DIR/perf_by_syscall.py" --freq "$FREQ" "${runs[@]}"
}

# Profiles one proxy; sets UNITS to the connections (or queries) it handled.
profile() {
    PROXY=$1
    case $SCHEME:$PROXY in dns:agent-egress*) ;; dns:*) die "dns: agent-egress variants only, not $PROXY" ;; esac
    build_world
    proxy_start "$PROXY"
    as_agent curl -sSk -o /dev/null --max-time 5 "https://$ALLOWED_HOST/hello.txt" ||
        die "$PROXY: a first request failed"
    # PROFILE_WATCHERS=N: N clients on the control API's event stream meanwhile.
    local i
    if [[ $PROXY == agent-egress* ]]; then
        for ((i = 0; i < ${PROFILE_WATCHERS:-0}; i++)); do
            curl -sN --unix-socket "$WORK/control.sock" http://agent-egress/v1/events >/dev/null &
            track $!
        done
    fi

    local cpu0 cpu1 out perf_pid data=$WORK/$PROXY.perf
    cpu0=$(cpu_ticks "$PROXY_PID")
    perf record -F "$FREQ" -g -p "$PROXY_PID" -o "$data" -- sleep "$SECONDS_TO_RUN" \
        >/dev/null 2>&1 &
    perf_pid=$!
    echo "==== $PROXY"
    if [ "$SCHEME" = dns ]; then
        local qps
        read -r qps _ <<<"$(dnsperf_qps unique "$SECONDS_TO_RUN")"
        cpu1=$(cpu_ticks "$PROXY_PID")
        wait "$perf_pid" || true
        UNITS=$(awk -v q="$qps" -v s="$SECONDS_TO_RUN" 'BEGIN { printf "%.0f", q * s }')
        printf 'dns: %.0f queries/s, proxy CPU %s µs per query\n\n' "$qps" \
            "$(awk -v c="$(cpu_seconds "$cpu0" "$cpu1")" -v n="$UNITS" \
                'BEGIN { printf "%.1f", c * 1e6 / n }')"
    else
        out=$(as_agent wrk -t2 -c32 -d"${SECONDS_TO_RUN}s" -H 'Connection: close' \
            "$SCHEME://$ALLOWED_HOST/hello.txt")
        cpu1=$(cpu_ticks "$PROXY_PID")
        wait "$perf_pid" || true
        UNITS=$(awk '/requests in/ { print $1 }' <<<"$out")
        [ -n "$UNITS" ] || die "wrk: no result: $out"
        printf '%s: %s new connections/s, proxy CPU %s µs per connection\n\n' "$SCHEME" \
            "$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")" \
            "$(awk -v c="$(cpu_seconds "$cpu0" "$cpu1")" -v n="$UNITS" \
                'BEGIN { printf "%.0f", c * 1e6 / n }')"
    fi
    proxy_stop "$PROXY"
    teardown_world
    local report=(perf report -i "$data" --stdio -g none)
    echo "== by thread"
    top 8 "${report[@]}" --no-children --sort comm
    echo "== by binary"
    top 8 "${report[@]}" --no-children --sort dso
    echo "== by symbol, with what it calls (top 40)"
    top 40 "${report[@]}" --children --sort symbol
    if [[ $PROXY == agent-egress* ]]; then
        # Attribution's /proc reads and the records' encoding happen here.
        echo "== audit-writer thread, by symbol (top 30)"
        top 30 "${report[@]}" --comm audit-writer --no-children --sort symbol
    fi
    perf script -i "$data" -F comm,ip,sym >"$WORK/$PROXY.script" 2>/dev/null
    if [ -n "${PROFILE_OUT-}" ]; then
        mkdir -p "$PROFILE_OUT"
        cp "$data" "$WORK/$PROXY.script" "$PROFILE_OUT/"
    fi
    echo
}

# The first N lines of a perf report (its closed pipe is no failure).
top() {
    local lines=$1
    shift
    { "$@" 2>/dev/null | grep '%' | head -"$lines" | cut -c1-100; } || true
}

main "$@"
