# shellcheck shell=bash
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Helpers of bench/run.sh: the namespace world, the hand-made TPROXY capture,
# the proxies under test, and how clients and measurements are run.
# Sourced, not run. Everything it creates is named after $BENCH_ID and recorded
# so that cleanup() removes it, whatever failed.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# TEST-NET addresses only: the link between the agent and the "internet" netns,
# the server, a second server address for the blocked name, and the resolver.
AGENT_IP=192.0.2.1
GATEWAY_IP=192.0.2.2
SERVER_IP=198.51.100.10
BLOCKED_IP=198.51.100.20
ALLOWED_HOST=bench.example
BLOCKED_HOST=blocked.example
IPERF_PORT=5201

# Every proxy listens on the same port behind the same capture.
PROXY_PORT=15001
# The hand-made capture's mark, routing table and rule priority: not agent-egress's
# defaults (0xae1), so a leftover of one can never be mistaken for the other.
CAPTURE_MARK=0xbe1
CAPTURE_TABLE=3041
CAPTURE_PRIORITY=3041
CAPTURE_NFT_TABLE=aebench

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Fill @NAME@ placeholders of a template from the shell variables of the same name.
render() {
    local template=$1 out=$2 text name
    text=$(<"$template")
    for name in WORK CGROUP PROXY_PORT SERVER_IP BLOCKED_IP ALLOWED_HOST BLOCKED_HOST \
        IPERF_PORT CAPTURE_MARK CAPTURE_NFT_TABLE CAPTURE_CT_FLOW CAPTURE_CT_SAVE AUDIT_PATH \
        HAPROXY_THREADS AE_WORKERS; do
        text=${text//@$name@/${!name-}}
    done
    if [[ $text =~ @[A-Z_]+@ ]]; then
        die "$template: placeholder ${BASH_REMATCH[0]} has no value"
    fi
    printf '%s\n' "$text" >"$out"
}

cgroup2_root() {
    awk '{ for (i = 1; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") { print $5; exit } } }' \
        /proc/self/mountinfo
}

# Wait until CMD succeeds, at most SECONDS (in steps of 50 ms).
wait_for() {
    local seconds=$1
    shift
    local tries=$((seconds * 20))
    while ((tries-- > 0)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    return 1
}

# --- the world -------------------------------------------------------------

# The agent netns (client side, where proxies and the capture live) and the
# "internet" netns with nginx (TLS and plain HTTP), iperf3 and dnsmasq.
# Made afresh for every proxy's run (see run_proxy_round): TIME_WAIT sockets
# of one proxy's tens of thousands of connections would otherwise slow the
# next proxy's connects for a minute (measured: haproxy 5,168 new HTTP
# connections/s in a fresh world, 2,860 right after another proxy's run).
build_world() {
    NS_AGENT=aeb${BENCH_ID}a
    NS_NET=aeb${BENCH_ID}n
    CGROUP=aebench-$BENCH_ID
    local root
    root=$(cgroup2_root)
    [ -n "$root" ] || die "no cgroup2 mount in /proc/self/mountinfo"
    CGROUP_DIR=$root/$CGROUP

    ip netns add "$NS_AGENT"
    ip netns add "$NS_NET"
    ip link add "aeb${BENCH_ID}a" type veth peer name "aeb${BENCH_ID}n"
    ip link set "aeb${BENCH_ID}a" netns "$NS_AGENT"
    ip link set "aeb${BENCH_ID}n" netns "$NS_NET"
    ip -n "$NS_AGENT" link set lo up
    ip -n "$NS_NET" link set lo up
    ip -n "$NS_AGENT" addr add "$AGENT_IP/24" dev "aeb${BENCH_ID}a"
    ip -n "$NS_NET" addr add "$GATEWAY_IP/24" dev "aeb${BENCH_ID}n"
    ip -n "$NS_NET" addr add "$SERVER_IP/32" dev lo
    ip -n "$NS_NET" addr add "$BLOCKED_IP/32" dev lo
    ip -n "$NS_AGENT" link set "aeb${BENCH_ID}a" up
    ip -n "$NS_NET" link set "aeb${BENCH_ID}n" up
    ip -n "$NS_AGENT" route add 198.51.100.0/24 via "$GATEWAY_IP"
    # Every connection goes from one address to one server port, and through a
    # proxy twice (client and proxy both connect from 192.0.2.1), each leaving a
    # TIME_WAIT: tens of thousands after one proxy's 10 s run. Without reuse the
    # next proxy's connect() scans a full port range every time (20 ms each,
    # seen with haproxy after v2ray): reuse, as hosts running proxies do, and a
    # wide port range.
    ip netns exec "$NS_AGENT" sysctl -qw net.ipv4.ip_local_port_range="1024 65535" net.ipv4.tcp_tw_reuse=1
    ip netns exec "$NS_NET" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"

    mkdir "$CGROUP_DIR"

    # Clients run through `ip netns exec`, which reads /etc/netns/NAME: names
    # resolve from this hosts file, never through a real resolver.
    mkdir -p "/etc/netns/$NS_AGENT"
    printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$SERVER_IP" "$ALLOWED_HOST" \
        "$BLOCKED_IP" "$BLOCKED_HOST" >"/etc/netns/$NS_AGENT/hosts"
    printf 'nameserver %s\n' "$SERVER_IP" >"/etc/netns/$NS_AGENT/resolv.conf"

    start_servers
}

# Everything build_world made, in reverse order; each step may fail on a
# half-built world.
teardown_world() {
    if [ -n "${NS_AGENT-}" ] && [ -e "/run/netns/$NS_AGENT" ]; then
        capture_remove
        # agent-egress leaves its table behind unless told; it dies with the netns anyway.
    fi
    local pid
    for pid in "${TRACKED[@]}"; do stop_pid "$pid"; done
    TRACKED=()
    if [ -n "${CGROUP_DIR-}" ] && [ -d "$CGROUP_DIR" ]; then
        # Clients killed by a signal may still be in the cgroup.
        while read -r pid; do kill -KILL "$pid"; done <"$CGROUP_DIR/cgroup.procs"
        wait_for 5 rmdir "$CGROUP_DIR" || log "could not remove $CGROUP_DIR"
    fi
    [ -n "${NS_AGENT-}" ] && ip netns del "$NS_AGENT" 2>/dev/null
    [ -n "${NS_NET-}" ] && ip netns del "$NS_NET" 2>/dev/null
    [ -n "${NS_AGENT-}" ] && rm -rf "/etc/netns/$NS_AGENT"
    return 0
}

make_content() {
    mkdir -p "$WORK/www" "$WORK/nginx-tmp"
    printf 'ok\n' >"$WORK/www/hello.txt"
    if [ -n "${BENCH_DATA_FILE-}" ]; then
        ln -s "$BENCH_DATA_FILE" "$WORK/www/1g.bin"
    else
        # Content does not matter (no compression anywhere): an allocated file is instant.
        fallocate -l 1G "$WORK/www/1g.bin" 2>/dev/null ||
            head -c 1G /dev/zero >"$WORK/www/1g.bin"
    fi
    BULK_BYTES=$(stat -L -c %s "$WORK/www/1g.bin")
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=$ALLOWED_HOST" -addext "subjectAltName=DNS:$ALLOWED_HOST,DNS:$BLOCKED_HOST" \
        -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
}

start_servers() {
    render "$BENCH_DIR/nginx.conf.tmpl" "$WORK/nginx.conf"
    ip netns exec "$NS_NET" nginx -c "$WORK/nginx.conf" -p "$WORK" -e "$WORK/nginx-error.log" \
        >"$WORK/nginx.out" 2>&1 &
    track $!
    ip netns exec "$NS_NET" iperf3 -s -B "$SERVER_IP" -p "$IPERF_PORT" >"$WORK/iperf3.out" 2>&1 &
    track $!
    ip netns exec "$NS_NET" dnsmasq -k -C /dev/null -u root --no-hosts --no-resolv \
        --bind-interfaces --listen-address="$SERVER_IP" --pid-file="$WORK/dnsmasq.pid" --local-ttl=300 \
        --address="/$ALLOWED_HOST/$SERVER_IP" --address="/$BLOCKED_HOST/$BLOCKED_IP" \
        >"$WORK/dnsmasq.out" 2>&1 &
    track $!
    wait_for 10 listening "$NS_NET" "$SERVER_IP:443" || die "nginx did not start: $(tail -3 "$WORK/nginx-error.log")"
    wait_for 10 listening "$NS_NET" "$SERVER_IP:$IPERF_PORT" || die "iperf3 did not start: $(cat "$WORK/iperf3.out")"
}

# Is something listening on ADDR:PORT (or *:PORT) in netns NS?
listening() {
    local ns=$1 addr=${2%:*} port=${2##*:}
    ip netns exec "$ns" ss -Hltn "sport = :$port" | grep -qE "($addr|\*|0\.0\.0\.0|\[::\]):$port"
}

# Remember a process to stop at the end.
TRACKED=()
track() { TRACKED+=("$1"); }

stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    local tries=100
    while ((tries-- > 0)) && kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Everything, in reverse order of creation; each step may fail on a half-built world.
cleanup() {
    local status=$?
    trap - EXIT INT TERM ERR
    set +e
    [ -n "${PROXY_PID-}" ] && stop_pid "$PROXY_PID"
    teardown_world
    if [ -n "${WORK-}" ] && [ -d "$WORK" ]; then
        if [ "${BENCH_KEEP_WORK-}" = 1 ]; then
            rm -f "$WORK/www/1g.bin"
            log "kept $WORK (BENCH_KEEP_WORK=1)"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$status"
}

# --- capture and proxies ---------------------------------------------------

# The capture agent-egress installs for itself, made by hand for the other
# proxies: mark the agent cgroup's TCP, route marked packets to lo, TPROXY them
# to the proxy port, and reset them if nothing listens.
capture_install() {
    render "$BENCH_DIR/capture.nft.tmpl" "$WORK/capture.nft"
    # Debian's nft resolves `socket cgroupv2` paths under /sys/fs/cgroup only: give
    # it a private mount of the cgroup2 hierarchy there.
    # shellcheck disable=SC2016 # $1 is the inner shell's
    nsenter --net="/run/netns/$NS_AGENT" unshare -m sh -c \
        'mount -t cgroup2 none /sys/fs/cgroup && nft -f "$1"' sh "$WORK/capture.nft"
    ip -n "$NS_AGENT" rule add fwmark "$CAPTURE_MARK" lookup "$CAPTURE_TABLE" priority "$CAPTURE_PRIORITY"
    ip -n "$NS_AGENT" route add local default dev lo table "$CAPTURE_TABLE"
}

# Idempotent: any part may be gone already.
capture_remove() {
    ip netns exec "$NS_AGENT" nft delete table inet "$CAPTURE_NFT_TABLE" 2>/dev/null || true
    ip -n "$NS_AGENT" rule del priority "$CAPTURE_PRIORITY" 2>/dev/null || true
    ip -n "$NS_AGENT" route flush table "$CAPTURE_TABLE" 2>/dev/null || true
}

# Packets the hand-made capture handed to the proxy so far.
capture_count() {
    ip netns exec "$NS_AGENT" nft list chain inet "$CAPTURE_NFT_TABLE" prerouting 2>/dev/null |
        awk '/tproxy/ { for (i = 1; i < NF; i++) if ($i == "packets") print $(i + 1) }'
}

# Start PROXY (none, v2ray, haproxy, haproxy-nbthread1, haproxy-nbthread1-conntrack,
# agent-egress, agent-egress-workers1) behind its capture; sets PROXY_PID.
proxy_start() {
    local proxy=$1
    PROXY_PID=
    # The variants: haproxy with one thread (its cheapest per connection here)
    # beside its default (a thread per CPU); agent-egress with one worker beside
    # its default (a worker per CPU).
    HAPROXY_THREADS="# nbthread: the default, one per CPU"
    AE_WORKERS=0
    CAPTURE_CT_FLOW= CAPTURE_CT_SAVE=
    PROXY_LOG=$WORK/$proxy.log
    case $proxy in
    haproxy-nbthread1) HAPROXY_THREADS="nbthread 1" ;;
    haproxy-nbthread1-conntrack)
        # What agent-egress's capture pays to stay fail-closed, for haproxy too.
        HAPROXY_THREADS="nbthread 1"
        CAPTURE_CT_FLOW="        ct direction original ct mark $CAPTURE_MARK meta mark set $CAPTURE_MARK accept"
        CAPTURE_CT_SAVE=" ct mark set meta mark"
        ;;
    agent-egress-workers1) AE_WORKERS=1 ;;
    esac
    case $proxy in
    none) return 0 ;;
    v2ray)
        render "$BENCH_DIR/v2ray.json.tmpl" "$WORK/v2ray.json"
        capture_install
        nsenter --net="/run/netns/$NS_AGENT" v2ray -config "$WORK/v2ray.json" >"$PROXY_LOG" 2>&1 &
        PROXY_PID=$!
        ;;
    haproxy | haproxy-nbthread1 | haproxy-nbthread1-conntrack)
        render "$BENCH_DIR/haproxy.cfg.tmpl" "$WORK/haproxy.cfg"
        capture_install
        nsenter --net="/run/netns/$NS_AGENT" haproxy -db -f "$WORK/haproxy.cfg" >"$PROXY_LOG" 2>&1 &
        PROXY_PID=$!
        ;;
    agent-egress | agent-egress-workers1)
        AUDIT_PATH=$WORK/audit.jsonl
        render "$BENCH_DIR/agent-egress.json.tmpl" "$WORK/agent-egress.json"
        # Its own capture, the same shape as ours: ours must be gone.
        capture_remove
        # nsenter, not `ip netns exec`: the daemon needs the cgroup2 mount that
        # ip netns exec's fresh /sys would hide.
        nsenter --net="/run/netns/$NS_AGENT" "$AGENT_EGRESS" run --config "$WORK/agent-egress.json" \
            --cleanup-on-exit >"$PROXY_LOG" 2>&1 &
        PROXY_PID=$!
        wait_for 10 ip netns exec "$NS_AGENT" nft list table inet agent_egress ||
            die "agent-egress did not install its table: $(tail -5 "$PROXY_LOG")"
        ;;
    *) die "unknown proxy $proxy" ;;
    esac
    wait_for 10 proxy_ready "$PROXY_PID" ||
        die "$proxy is not listening on 127.0.0.1:$PROXY_PORT: $(tail -5 "$PROXY_LOG")"
    kill -0 "$PROXY_PID" 2>/dev/null || die "$proxy exited: $(tail -5 "$PROXY_LOG")"
}

# Listening, or dead (then waiting longer is pointless): either ends the wait.
proxy_ready() {
    ! kill -0 "$1" 2>/dev/null || listening "$NS_AGENT" "127.0.0.1:$PROXY_PORT"
}

proxy_stop() {
    local proxy=$1
    if [ -n "${PROXY_PID-}" ]; then
        stop_pid "$PROXY_PID"
        PROXY_PID=
    fi
    case $proxy in
    agent-egress*)
        # --cleanup-on-exit removed the table; a crash would have left it.
        if ip netns exec "$NS_AGENT" nft list table inet agent_egress >/dev/null 2>&1; then
            die "agent-egress left its table behind after SIGTERM with --cleanup-on-exit"
        fi
        ;;
    none) ;;
    *) capture_remove ;;
    esac
}

# Was the last test's traffic really handed to the proxy? Guards against
# measuring "direct" under another name.
assert_captured() {
    local proxy=$1 since=$2
    case $proxy in
    none)
        if ip netns exec "$NS_AGENT" nft list tables | grep -q .; then
            die "direct round with an nftables table in place: $(ip netns exec "$NS_AGENT" nft list tables)"
        fi
        ;;
    agent-egress*)
        local lines
        lines=$(wc -l <"$AUDIT_PATH" 2>/dev/null || echo 0)
        ((lines > since)) || die "agent-egress wrote no audit record: traffic was not captured"
        ;;
    *)
        local packets
        packets=$(capture_count)
        ((${packets:-0} > since)) || die "$proxy: the capture handed no packet to the proxy"
        ;;
    esac
}

# How far assert_captured's counter is now.
capture_mark_now() {
    case $1 in
    none) echo 0 ;;
    agent-egress*) wc -l <"$AUDIT_PATH" 2>/dev/null || echo 0 ;;
    *) capture_count ;;
    esac
}

# --- clients and measurements ----------------------------------------------

# Run CMD as an agent: inside the agent cgroup (joined before exec, so nothing
# of CMD runs uncaptured) and the agent netns.
as_agent() {
    sh -c 'cg=$1 ns=$2; shift 2; echo $$ >"$cg/cgroup.procs" && exec ip netns exec "$ns" "$@"' \
        sh "$CGROUP_DIR" "$NS_AGENT" "$@"
}

# dnsperf's inputs in $WORK: one name (dns-repeated.txt), and more new names
# below it than SECONDS of dnsperf ask (dns-unique.txt, read once).
make_dns_queries() {
    local seconds=$1
    printf '%s A\n' "$ALLOWED_HOST" >"$WORK/dns-repeated.txt"
    seq 1 "$((seconds * 250000))" |
        awk -v host="$ALLOWED_HOST" '{ printf "u%d.%s A\n", $1, host }' >"$WORK/dns-unique.txt"
}

# dnsperf as the agent for SECONDS on dns-VARIANT.txt, 4 clients with 64
# queries in flight (new names: through the file once, none asked twice);
# prints its queries/s and its own CPU per query (µs: what the client pays,
# its share of the 2 cores), and fails on no result or a lost query.
dnsperf_qps() {
    local variant=$1 seconds=$2 once= out qps done TIMEFORMAT='%U %S'
    [ "$variant" = unique ] && once="-n 1"
    # shellcheck disable=SC2086 # $once is one option or none
    out=$( { time as_agent dnsperf -s "$SERVER_IP" -d "$WORK/dns-$variant.txt" $once \
        -l "$seconds" -c 4 -q 64 2>&1; } 2>&1) || die "dnsperf ($variant) failed: $out"
    qps=$(awk '/Queries per second:/ { print $4 }' <<<"$out")
    done=$(awk '/Queries completed:/ { print $3 }' <<<"$out")
    [ -n "$qps" ] && [ -n "$done" ] || die "dnsperf ($variant): no result: $out"
    awk '/Queries lost:/ { exit !($3 == 0) }' <<<"$out" || die "dnsperf ($variant) lost queries: $out"
    printf '%s %s\n' "$qps" "$(tail -1 <<<"$out" |
        awk -v n="$done" '{ printf "%.1f", ($1 + $2) * 1e6 / n }')"
}

# utime + stime of PID in clock ticks (all threads, dead ones included).
cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}

TICKS=$(getconf CLK_TCK)

# CPU seconds between two cpu_ticks readings.
cpu_seconds() {
    awk -v a="$1" -v b="$2" -v t="$TICKS" 'BEGIN { printf "%.3f", (b - a) / t }'
}

rss_kib() {
    awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}
