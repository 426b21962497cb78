#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
#
# The side-by-side benchmark: agent-egress (a worker per CPU, and one worker)
# against no proxy, v2ray and haproxy (a thread per CPU, and one thread),
# each behind the same TPROXY capture of the same agent cgroup, in a world of
# network namespaces with TEST-NET addresses only. Run as root:
#
#   bash bench/run.sh
#
# Rounds are interleaved (round 1: none, v2ray, haproxy, agent-egress; round 2:
# the same; ...) so that a slow spell of a shared machine hits every proxy.
# Prints a markdown report and writes it to bench/results-<date>.md.
# See bench/README.md for the knobs (environment variables) and how to read it.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${BENCH_ROUNDS:-3}
PROXIES=${BENCH_PROXIES:-none v2ray haproxy haproxy-nbthread1 agent-egress agent-egress-workers1}
WRK_SECONDS=${BENCH_WRK_SECONDS:-10}
WRK_CONNECTIONS=${BENCH_WRK_CONNECTIONS:-32}
IPERF_SECONDS=${BENCH_IPERF_SECONDS:-5}
LATENCY_COUNT=${BENCH_LATENCY_COUNT:-300}
DNS_SECONDS=${BENCH_DNS_SECONDS:-4}
BLOCKED_COUNT=${BENCH_BLOCKED_COUNT:-100}
IDLE_COUNT=${BENCH_IDLE_COUNT:-2000}
SYSCALL_COUNT=${BENCH_SYSCALL_COUNT:-200}
HELD_COUNT=${BENCH_HELD_COUNT:-1000}
HELD_ROUNDS=${BENCH_HELD_ROUNDS:-50}
WATCHERS=${BENCH_WATCHERS:-3}
REPO=$(cd "$BENCH_DIR/.." && pwd)
AGENT_EGRESS=${AGENT_EGRESS:-${CARGO_TARGET_DIR:-$REPO/target}/release/agent-egress}


preflight() {
    [ "$(id -u)" = 0 ] || die "run as root (it builds network namespaces and cgroups)"
    local tool missing=()
    for tool in ip nft nsenter unshare nginx iperf3 dnsmasq dnsperf wrk curl openssl python3 jq ss awk strace; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    local proxy selected=()
    for proxy in $PROXIES; do
        case $proxy in
        v2ray) command -v v2ray >/dev/null || missing+=(v2ray) ;;
        haproxy | haproxy-nbthread1 | haproxy-nbthread1-conntrack) command -v haproxy >/dev/null || missing+=(haproxy) ;;
        agent-egress | agent-egress-workers1)
            if [ ! -x "$AGENT_EGRESS" ]; then
                log "WARNING: no agent-egress binary at $AGENT_EGRESS (set AGENT_EGRESS or build with" \
                    "cargo build --release): agent-egress is left out of this run"
                continue
            fi
            ;;
        none) ;;
        *) die "unknown proxy $proxy in BENCH_PROXIES (none v2ray haproxy haproxy-nbthread1 haproxy-nbthread1-conntrack agent-egress agent-egress-workers1)" ;;
        esac
        selected+=("$proxy")
    done
    PROXIES=${selected[*]}
    [ -n "$PROXIES" ] || die "nothing to measure"
    ((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (apt-get install them)"
    # 2,000 idle connections through a proxy: 4,000 sockets, and pipes for splicing.
    ulimit -n "$(ulimit -Hn)"
    (($(ulimit -n) >= 4 * IDLE_COUNT + 1024)) ||
        die "the open-file limit ($(ulimit -n)) is too low for $IDLE_COUNT idle connections"
}

# One measurement: proxy, round, metric, value.
record() {
    printf '%s\t%s\t%s\t%s\n' "$PROXY" "$ROUND" "$1" "$2" >>"$RESULTS"
    log "  $PROXY round $ROUND: $1 = $2"
}

proxy_cpu() {
    if [ -n "$PROXY_PID" ]; then cpu_ticks "$PROXY_PID"; else echo 0; fi
}


test_idle_connections() {
    [ -n "$PROXY_PID" ] || return 0
    local out
    out=$(as_agent python3 "$BENCH_DIR/client.py" idle --host "$ALLOWED_HOST" \
        --count "$IDLE_COUNT" --pid "$PROXY_PID")
    local opened closed before with
    read -r opened closed before with < <(jq -r '"\(.opened) \(.closed_by_peer) \(.rss_before_kib) \(.rss_with_kib)"' <<<"$out")
    ((opened == IDLE_COUNT && closed == 0)) ||
        die "idle test: $opened of $IDLE_COUNT connections opened, $closed closed by the peer: $out"
    record rss_before_MB "$(awk -v k="$before" 'BEGIN { printf "%.2f", k * 1024 / 1e6 }')"
    record rss_idle_MB "$(awk -v k="$with" 'BEGIN { printf "%.2f", k * 1024 / 1e6 }')"
    record kB_per_idle_conn "$(awk -v a="$before" -v b="$with" -v n="$opened" \
        'BEGIN { printf "%.2f", (b - a) * 1024 / 1000 / n }')"
}

# #14's held connections, on a fresh daemon (the idle test's freed heap would
# hide what they take): HELD_COUNT connections to a name the policy asks
# about, held on one question; RSS over resting, then the release from the
# answer to each ServerHello, all at once and one at a time.
test_held_connections() {
    case $PROXY in agent-egress*) ;; *) return 0 ;; esac
    proxy_stop "$PROXY"
    proxy_start "$PROXY"
    as_agent curl -sSk -o /dev/null --max-time 5 "https://$ALLOWED_HOST/hello.txt" ||
        die "$PROXY: a first request after the restart failed"
    local out
    out=$(as_agent python3 "$BENCH_DIR/client.py" held --host "held.$ALLOWED_HOST" \
        --allowed "$ALLOWED_HOST" --address "$SERVER_IP" --count "$HELD_COUNT" \
        --rounds "$HELD_ROUNDS" --socket "$WORK/control.sock" --pid "$PROXY_PID") ||
        die "held test: $out"
    local before with
    read -r before with < <(jq -r '"\(.rss_before_kib) \(.rss_with_kib)"' <<<"$out")
    record held_MB_over_resting "$(awk -v a="$before" -v b="$with" 'BEGIN { printf "%.2f", (b - a) * 1024 / 1e6 }')"
    record kB_per_held_conn "$(awk -v a="$before" -v b="$with" -v n="$HELD_COUNT" \
        'BEGIN { printf "%.2f", (b - a) * 1024 / 1000 / n }')"
    local name
    for name in release_all release_one plain_handshake; do
        record_percentiles "$name" "$(jq -c --arg n "$name" \
            '{p50_ms: .[$n + "_p50_ms"], p99_ms: .[$n + "_p99_ms"]}' <<<"$out")"
    done
}

# Record the p50 and p99 (ms) of a client.py timing run's JSON as NAME_p50_ms, NAME_p99_ms.
record_percentiles() {
    local name=$1 out=$2 p
    for p in p50 p99; do
        record "${name}_${p}_ms" "$(jq -r ".${p}_ms * 1000 | round / 1000" <<<"$out")"
    done
}

test_latency() {
    local out
    out=$(as_agent python3 "$BENCH_DIR/client.py" latency --host "$ALLOWED_HOST" --count "$LATENCY_COUNT")
    [ "$(jq -r .errors <<<"$out")" = 0 ] || die "latency test had errors: $out"
    record_percentiles latency "$out"
}

test_blocked() {
    [ "$PROXY" != none ] || return 0
    local out
    out=$(as_agent python3 "$BENCH_DIR/client.py" blocked --host "$BLOCKED_HOST" --count "$BLOCKED_COUNT")
    [ "$(jq -r .not_blocked <<<"$out")" = 0 ] || die "$PROXY let $BLOCKED_HOST through: $out"
    record_percentiles blocked "$out"
}

# The agent's DNS: straight to dnsmasq (none), or answered by agent-egress's
# handler. The other proxies leave DNS alone (their capture is TCP only).
# Latency: one query at a time (bench/client.py); throughput: dnsperf, 4
# clients with 64 queries in flight, for one name (a cache hit after the
# first) and for a new name each (never cached, anywhere). The CPU that
# dnsperf and dnsmasq pay per query is recorded too: with the handler's, it
# is what the 2 cores have to share.
test_dns() {
    case $PROXY in none | agent-egress*) ;; *) return 0 ;; esac
    local out variant flag cpu0 cpu1 qps client_us server0 server1 server
    server=$(cat "$WORK/dnsmasq.pid")
    for variant in repeated unique; do
        flag=
        [ "$variant" = unique ] && flag=--unique
        out=$(as_agent python3 "$BENCH_DIR/client.py" dns --server "$SERVER_IP" \
            --name "$ALLOWED_HOST" --count "$LATENCY_COUNT" $flag)
        [ "$(jq -r .errors <<<"$out")" = 0 ] || die "dns test ($variant) had errors: $out"
        record_percentiles "dns_$variant" "$out"
        cpu0=$(proxy_cpu)
        server0=$(cpu_ticks "$server")
        read -r qps client_us <<<"$(dnsperf_qps "$variant" "$DNS_SECONDS")"
        server1=$(cpu_ticks "$server")
        cpu1=$(proxy_cpu)
        record "dns_${variant}_qps" "$(printf '%.0f' "$qps")"
        record "client_cpu_us_per_dns_query_$variant" "$client_us"
        record "server_cpu_us_per_dns_query_$variant" "$(awk -v c="$(cpu_seconds "$server0" "$server1")" \
            -v q="$qps" -v s="$DNS_SECONDS" 'BEGIN { printf "%.1f", c * 1e6 / (q * s) }')"
        if [ -n "$PROXY_PID" ]; then
            record "cpu_us_per_dns_query_$variant" "$(awk -v c="$(cpu_seconds "$cpu0" "$cpu1")" \
                -v q="$qps" -v s="$DNS_SECONDS" 'BEGIN { printf "%.1f", c * 1e6 / (q * s) }')"
        fi
    done
}

test_tls_bulk() {
    local cpu0 cpu1 out speed size
    cpu0=$(proxy_cpu)
    out=$(as_agent curl -sSk -o /dev/null -w '%{speed_download} %{size_download}' \
        "https://$ALLOWED_HOST/1g.bin")
    cpu1=$(proxy_cpu)
    read -r speed size <<<"$out"
    [ "$size" = "$BULK_BYTES" ] || die "TLS bulk: got $size of $BULK_BYTES bytes"
    record tls_bulk_MBps "$(awk -v s="$speed" 'BEGIN { printf "%.1f", s / 1e6 }')"
    if [ -n "$PROXY_PID" ]; then
        record cpu_s_per_GB_tls "$(awk -v c="$(cpu_seconds "$cpu0" "$cpu1")" -v b="$size" \
            'BEGIN { printf "%.3f", c / (b / 1e9) }')"
    fi
}

test_raw_bulk() {
    local cpu0 cpu1 out bps bytes
    cpu0=$(proxy_cpu)
    out=$(as_agent iperf3 -c "$SERVER_IP" -p "$IPERF_PORT" -R -t "$IPERF_SECONDS" -O 1 -J)
    cpu1=$(proxy_cpu)
    bps=$(jq -r '.end.sum_received.bits_per_second // empty' <<<"$out")
    [ -n "$bps" ] || die "iperf3: $(jq -r '.error // "no result"' <<<"$out")"
    record raw_bulk_MBps "$(awk -v b="$bps" 'BEGIN { printf "%.1f", b / 8 / 1e6 }')"
    # -O 1 leaves the first second out of the rate but not out of the bytes sent:
    # what the proxy's CPU time covers is every byte of the test.
    bytes=$(jq -r '[.intervals[].sum.bytes] | add' <<<"$out")
    if [ -n "$PROXY_PID" ]; then
        record cpu_s_per_GB_raw "$(awk -v c="$(cpu_seconds "$cpu0" "$cpu1")" -v b="$bytes" \
            'BEGIN { printf "%.3f", c / (b / 1e9) }')"
    fi
}

# New connections per second: wrk with Connection: close, so every request is a
# fresh TCP (+ TLS) connection through the proxy.
test_new_connections() {
    local scheme=$1 variant=${2-} cpu0 cpu1 out rate requests errors
    cpu0=$(proxy_cpu)
    out=$(as_agent wrk -t2 -c"$WRK_CONNECTIONS" -d"${WRK_SECONDS}s" -H 'Connection: close' \
        "$scheme://$ALLOWED_HOST/hello.txt")
    cpu1=$(proxy_cpu)
    rate=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    requests=$(awk '/requests in/ { print $1 }' <<<"$out")
    if [ -z "$rate" ] || [ -z "$requests" ]; then die "wrk $scheme: no result: $out"; fi
    errors=$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10 } /Non-2xx/ { print $NF }' <<<"$out" |
        awk '{ s += $1 } END { print s + 0 }')
    record "${scheme}_conn_per_s$variant" "$(printf '%.0f' "$rate")"
    record "${scheme}_errors$variant" "$errors"
    if [ -n "$PROXY_PID" ]; then
        record "cpu_us_per_${scheme}_conn$variant" "$(awk -v c="$(cpu_seconds "$cpu0" "$cpu1")" -v n="$requests" \
            'BEGIN { printf "%.0f", c * 1e6 / n }')"
    fi
}

# The control API's event stream with WATCHERS clients attached (every
# connection is then streamed when decided and when it ends): new HTTPS conn/s
# again, then once more without them; the round's ratio is the watched run's
# rate over the mean of the unwatched runs just before and after it, so that
# the machine's drift over the three runs cancels out.
test_watched_connections() {
    case $PROXY in agent-egress*) ;; *) return 0 ;; esac
    ((WATCHERS > 0)) || return 0
    local pids=() i lines
    for ((i = 0; i < WATCHERS; i++)); do
        curl -sN --unix-socket "$WORK/control.sock" http://agent-egress/v1/events >"$WORK/watcher-$i.jsonl" &
        pids+=($!)
    done
    wait_for 5 watchers_attached || die "$WATCHERS event-stream clients did not attach"
    test_new_connections https _${WATCHERS}_watchers
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    lines=$(wc -l <"$WORK/watcher-0.jsonl")
    ((lines > 0)) || die "an event-stream client got no event"
    rm -f "$WORK"/watcher-*.jsonl
    test_new_connections https _after_watchers
    record watched_conn_ratio "$(awk -v w="$(recorded https_conn_per_s_${WATCHERS}_watchers)" \
        -v a="$(recorded https_conn_per_s)" -v b="$(recorded https_conn_per_s_after_watchers)" \
        'BEGIN { printf "%.3f", w / ((a + b) / 2) }')"
}

# What this round recorded for this proxy as METRIC.
recorded() {
    awk -F'\t' -v p="$PROXY" -v r="$ROUND" -v m="$1" '$1 == p && $2 == r && $3 == m { v = $4 } END { print v }' "$RESULTS"
}

watchers_attached() {
    local now
    now=$(curl -s --unix-socket "$WORK/control.sock" http://agent-egress/v1/status | jq -r '.events.watchers // 0')
    ((now >= WATCHERS))
}

# System calls the proxy makes per new HTTPS connection: strace -c -f on every
# thread while SYSCALL_COUNT connections are made one at a time (strace slows
# the proxy; only the counts are kept, never a time).
test_syscalls() {
    [ -n "$PROXY_PID" ] || return 0
    local summary=$WORK/strace-$PROXY-$ROUND.txt tracer calls
    strace -f -c -o "$summary" -p "$PROXY_PID" 2>/dev/null &
    tracer=$!
    sleep 0.5 # attached to every thread
    as_agent python3 "$BENCH_DIR/client.py" latency --host "$ALLOWED_HOST" --count "$SYSCALL_COUNT" >/dev/null
    sleep 0.3 # the last audit records written
    kill -INT "$tracer"
    wait "$tracer" || true
    calls=$(awk '$NF == "total" { print $4 }' "$summary")
    [ -n "$calls" ] || die "strace gave no total: $(tail -3 "$summary")"
    record syscalls_per_https_conn "$(awk -v c="$calls" -v n="$SYSCALL_COUNT" 'BEGIN { printf "%.0f", c / n }')"
}

run_proxy_round() {
    PROXY=$1
    log "round $ROUND: $PROXY"
    build_world
    proxy_start "$PROXY"
    local mark
    mark=$(capture_mark_now "$PROXY")
    as_agent curl -sSk -o /dev/null --max-time 5 "https://$ALLOWED_HOST/hello.txt" ||
        die "$PROXY: a first request failed"
    sleep 0.2 # agent-egress writes the audit record when the connection ends
    assert_captured "$PROXY" "$mark"
    # Memory first: a fresh process, as after a restart.
    test_idle_connections
    test_held_connections
    test_latency
    test_blocked
    test_dns
    test_tls_bulk
    test_raw_bulk
    test_new_connections http
    # Right before the watched run, which compares itself with it.
    test_new_connections https
    test_watched_connections
    test_syscalls
    proxy_stop "$PROXY"
    teardown_world
}

write_meta() {
    local ae_version=n/a ae_commit=n/a
    if [[ " $PROXIES " == *" agent-egress"* ]]; then
        ae_version="$("$AGENT_EGRESS" --version 2>&1 | head -1) ($AGENT_EGRESS)"
        ae_commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    fi
    jq -n \
        --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        --arg kernel "$(uname -r)" \
        --arg cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
        --arg cores "$(nproc)" \
        --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
        --arg v2ray "$(v2ray -version 2>/dev/null | head -1)" \
        --arg haproxy "$(haproxy -v 2>/dev/null | head -1)" \
        --arg nginx "$(nginx -v 2>&1)" \
        --arg curl "$(curl --version | head -1 | cut -d' ' -f1-2,5)" \
        --arg wrk "$({ wrk -v 2>&1 || true; } | head -1 | cut -d' ' -f1-2)" \
        --arg iperf3 "$(iperf3 --version | head -1)" \
        --arg dnsperf "$(dnsperf -h 2>&1 | awk '/^Version/ { print $2 }')" \
        --arg python "$(python3 -c 'import ssl, sys; print(sys.version.split()[0], ssl.OPENSSL_VERSION)')" \
        --arg agent_egress "$ae_version" --arg commit "$ae_commit" \
        --arg rounds "$ROUNDS" --arg proxies "$PROXIES" \
        --arg params "wrk -t2 -c$WRK_CONNECTIONS -d${WRK_SECONDS}s; iperf3 -R -t $IPERF_SECONDS -O 1; latency $LATENCY_COUNT; dnsperf -c 4 -q 64 -l $DNS_SECONDS; blocked $BLOCKED_COUNT; idle $IDLE_COUNT; TLS bulk $BULK_BYTES bytes; syscalls over $SYSCALL_COUNT connections; $WATCHERS event-stream clients" \
        '$ARGS.named' >"$WORK/meta.json"
}

main() {
    preflight
    BENCH_ID=$(printf '%04x' "$$")
    WORK=$(mktemp -d "/tmp/aebench-$BENCH_ID.XXXX")
    RESULTS=$WORK/results.tsv
    : >"$RESULTS"
    trap cleanup EXIT
    set -E
    trap 'log "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR
    trap 'exit 130' INT TERM
    local started=$SECONDS
    log "world: netns aeb${BENCH_ID}a (agent) and aeb${BENCH_ID}n (internet), work dir $WORK"
    make_content
    make_dns_queries "$DNS_SECONDS"
    write_meta
    log "proxies: $PROXIES; $ROUNDS rounds"
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        for proxy in $PROXIES; do run_proxy_round "$proxy"; done
    done
    jq --arg load_end "$(cut -d' ' -f1-3 /proc/loadavg)" --arg seconds "$((SECONDS - started))" \
        '. + {load_end: $load_end, seconds: $seconds}' "$WORK/meta.json" >"$WORK/meta.json.new"
    mv "$WORK/meta.json.new" "$WORK/meta.json"
    local report
    report=$BENCH_DIR/results-$(date +%Y-%m-%d-%H%M).md
    python3 "$BENCH_DIR/report.py" "$RESULTS" "$WORK/meta.json" >"$report"
    cat "$report"
    log "written to $report (took $((SECONDS - started)) s)"
}

main "$@"
