#!/bin/bash
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Runs inside the systemd VM of tests/systemd_vm.rs (from agent-egress-vm-test.service,
# which the image enables and which powers the guest off when this ends). The test
# mounts its share on /mnt/test:
#
#   agent-egress               the binary cargo built, installed as /usr/local/bin/agent-egress
#   agent-probe@.service       the test's agent unit (the module adds a drop-in)
#   cases/CASE/units/...       the module's units, store paths mapped to the image's
#   cases/CASE/files/...       the module's files (config.json, logrotate config, scripts)
#   cases/CASE/executables     which of those files are executables
#   cases/CASE/groups          the groups the module declares (users.groups)
#   dist/...                   dist/systemd/ of the repository (the units for other
#                              distributions), installed by the dist_* scenarios
#   results/                   written here: results.txt (one line per scenario:
#                              NAME pass|FAIL SECONDS DETAIL), journal.txt, logs
#
# Each scenario runs in a subshell with `set -e`; `fail MESSAGE` ends it, and the
# message is its detail in results.txt. Scenarios run in order and later ones rely
# on the daemon being up, so each leaves it running.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export SYSTEMD_PAGER= SYSTEMD_COLORS=0

share=/mnt/test
out=$share/results
mkdir -p "$out"
results=$out/results.txt
: >"$results"
work=/run/agent-egress-vm
probes=/run/agent-probe
inet=/run/inet
mkdir -p "$work" "$probes" "$inet"
audit=/var/log/agent-egress/audit.jsonl
config=/etc/agent-egress/config.json
# How long a refused connection may take under TCG (about 20x slower than KVM):
# a refusal costs milliseconds natively, a timeout would cost seconds.
fast=2.0

log() { echo "guest-test: $*"; }

# ---- scenario machinery ----------------------------------------------------------

fail() {
    echo "$*" >>"$work/detail"
    exit 1
}

note() {
    echo "$*" >>"$work/detail"
}

scenario() {
    local name=$1
    shift
    : >"$work/detail"
    log "--- scenario $name"
    local started ended status
    started=$(date +%s.%N)
    ( set -e; "$@" ) </dev/null
    if [ $? = 0 ]; then status=pass; else status=FAIL; fi
    ended=$(date +%s.%N)
    local detail
    detail=$(tr '\n' ' ' <"$work/detail" | tr -s ' ' | cut -c1-600)
    printf '%s %s %s %s\n' "$name" "$status" "$(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')" "$detail" >>"$results"
    log "--- scenario $name: $status $detail"
}

# ---- installing the module's output ----------------------------------------------

install_case() {
    local dir=$share/cases/$1
    [ -d "$dir" ] || { echo "no case $1 in the share"; return 1; }
    cp -r "$dir/units/." /etc/systemd/system/
    cp -r "$dir/files/." /
    while read -r exe; do
        [ -n "$exe" ] && chmod 0755 "$exe"
    done <"$dir/executables"
    # As users.groups makes them on NixOS (the image has agent-egress already).
    local group
    while read -r group; do
        [ -n "$group" ] && { getent group "$group" >/dev/null || groupadd --system "$group"; }
    done <"$dir/groups"
    systemctl daemon-reload
}

# ---- the agent probes --------------------------------------------------------------

# make_probe NAME BODY: the script agent-probe@NAME runs. Its first lines (before
# BODY) record the unit's cgroup, its id (the inode the kernel matches) and whether
# nft lists that id in the daemon's set at that moment. `fetch TAG CURL-ARGS...`
# records curl's exit code, HTTP code, time and both ends of the connection (as
# curl saw them: the audit record's src and dst), the body in NAME.TAG.body.
make_probe() {
    local name=$1 body=$2
    cat >"$probes/probe-$name.sh" <<EOF
cg=\$(sed -n 's/^0:://p' /proc/self/cgroup)
id=\$(stat -c %i "/sys/fs/cgroup\$cg")
set_now=\$(nft list set inet agent_egress agents 2>&1)
echo "cgroup=\$cg"
echo "cgroup_id=\$id"
if printf '%s\n' "\$set_now" | grep -qwF -e "\$id" -e "\"\${cg#/}\""; then
    echo "in_set=yes"
else
    echo "in_set=no"
fi
printf '%s\n' "\$set_now" | sed 's/^/set: /'
fetch() {
    tag=\$1
    shift
    w=\$(curl -sS -m 10 -o "$probes/$name.\$tag.body" \\
        -w '%{http_code} %{time_total} %{local_ip}:%{local_port} %{remote_ip}:%{remote_port}' \\
        "\$@" 2>"$probes/$name.\$tag.err")
    rc=\$?
    # The URL's host and port: curl reports no ends for a failed TLS handshake.
    for url; do :; done
    host=\${url#*://}
    host=\${host%%/*}
    case \$url in https://*) port=443 ;; *) port=80 ;; esac
    case \$host in *:*) port=\${host##*:} host=\${host%:*} ;; esac
    echo "fetch.\$tag=\$rc \$w \$host \$port"
}
$body
EOF
    rm -f "$probes/$name.out" "$probes/$name".*.body "$probes/$name".*.err
}

# run_probe NAME: start agent-probe@NAME (oneshot: returns when its script ends).
run_probe() {
    rm -f "$probes/$1.out"
    timeout 120 systemctl start "agent-probe@$1.service" ||
        fail "systemctl start agent-probe@$1 failed: $(systemctl status --no-pager -n 20 "agent-probe@$1.service" 2>&1 | tail -n 12)"
}

# probe_value NAME KEY: what the probe's last run printed as KEY=...
probe_value() {
    sed -n "s/^$2=//p" "$probes/$1.out" | tail -n 1
}

# fetch_result NAME TAG: "EXIT CODE TIME SRC DST HOST PORT" of the probe's fetch
# TAG (SRC and DST as curl saw them, ":-1" when it did not say; HOST and PORT
# from the URL).
fetch_result() {
    local v
    v=$(probe_value "$1" "fetch.$2")
    [ -n "$v" ] || fail "probe $1 ran no fetch $2: $(tr '\n' ' ' <"$probes/$1.out" | cut -c1-300)"
    echo "$v"
}

body_of() {
    cat "$probes/$1.$2.body" 2>/dev/null
}

err_of() {
    tr '\n' ' ' <"$probes/$1.$2.err" 2>/dev/null
}

# expect_in_set NAME: the probe saw its own cgroup id in the set at its start.
expect_in_set() {
    [ "$(probe_value "$1" in_set)" = yes ] ||
        fail "agent-probe@$1's cgroup $(probe_value "$1" cgroup) (id $(probe_value "$1" cgroup_id)) was not in set inet agent_egress agents when it started: $(grep '^set: ' "$probes/$1.out" | tr '\n' ' ' | cut -c1-300)"
}

# expect_allowed NAME TAG BODY: curl exited 0 with HTTP 200 and exactly BODY.
expect_allowed() {
    local r
    r=$(fetch_result "$1" "$2")
    set -- "$1" "$2" "$3" $r
    [ "$4" = 0 ] && [ "$5" = 200 ] || fail "$2: curl exit $4, HTTP $5 (want 0, 200): $(err_of "$1" "$2")"
    [ "$(body_of "$1" "$2")" = "$3" ] || fail "$2: body $(body_of "$1" "$2" | head -c 200) (want $3)"
}

# expect_fast TAG TIME: a refusal within $fast seconds.
expect_fast() {
    awk -v t="$2" -v max="$fast" 'BEGIN { exit !(t < max) }' || fail "$1 took $2 s to be refused (more than $fast s)"
}

# ---- audit records ----------------------------------------------------------------

# Records are found by the connection's two ends (curl's -w), not by what the
# daemon attributes (pid, cmdline), so a missing attribution is reported as such.
# Where curl did not say (a refused TLS handshake), by the probe's cgroup id, the
# host and the port.

# records_of NAME TAG [FILE...]: the audit records (one JSON a line) of the probe's
# fetch TAG, from FILE (default: the audit file and its rotated copy); a
# question's records (the ask verdict) are the question's, not the fetch's.
records_of() {
    local r id
    r=($(fetch_result "$1" "$2"))
    id=$(probe_value "$1" cgroup_id)
    shift 2
    [ $# -gt 0 ] || set -- "$audit" "$audit.1"
    local filter='select(.src == $s and .dst == $d)'
    case ${r[3]} in
    *:-1 | "") filter='select(.cgroup_id == ($id | tonumber) and .host == $h and (.dst | endswith(":" + $p)))' ;;
    esac
    cat "$@" 2>/dev/null | jq -c --arg s "${r[3]}" --arg d "${r[4]}" --arg id "${id:-0}" \
        --arg h "${r[5]}" --arg p "${r[6]}" "select(.event | startswith(\"question_\") | not) | $filter"
}

# wait_record NAME TAG [FILE...]: waits (10 s) for the record of a fetch, prints it.
wait_record() {
    local i rec
    for i in $(seq 50); do
        rec=$(records_of "$@" | head -n 1)
        if [ -n "$rec" ]; then
            echo "$rec"
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# expect_record NAME TAG CHECK...: the fetch's record passes each jq CHECK.
expect_record() {
    local name=$1 tag=$2
    shift 2
    local rec check
    rec=$(wait_record "$name" "$tag") ||
        fail "no audit record of $name's fetch $tag ($(fetch_result "$name" "$tag")) in $audit within 10 s"
    for check in "$@"; do
        [ "$(jq "$check" <<<"$rec")" = true ] || fail "the audit record of $name's fetch $tag fails $check: $(cut -c1-500 <<<"$rec")"
    done
}

# The record names the agent and its process (curl, in agent-probe@NAME's cgroup).
attributed='.agent == "agent.slice/agent-egress.slice/agent-egress-agents.slice/agent-egress-agents-tester.slice" and .pid > 0 and .exe == "/usr/bin/curl" and (.cmdline | length) > 0'

# ---- the test's internet: a netns with nginx ----------------------------------------

setup_internet() {
    ip netns add inet
    ip link add ae-host type veth peer name ae-inet
    ip link set ae-inet netns inet
    ip addr add 203.0.113.1/24 dev ae-host
    ip link set ae-host up
    ip -n inet link set lo up
    local a
    for a in 10 20 30; do
        ip -n inet addr add "203.0.113.$a/24" dev ae-inet
    done
    ip -n inet link set ae-inet up
    # Where agent-egress doctor sends its probes: routed into the test's
    # netns, so the capture is exercised (nothing there answers).
    ip route add 192.0.2.254/32 via 203.0.113.10 dev ae-host
    cat >"$inet/nginx.conf" <<EOF
user www-data;
worker_processes 1;
pid $inet/nginx.pid;
error_log $inet/error.log;
events { worker_connections 64; }
http {
    log_format arrivals '\$server_addr \$remote_addr "\$request" \$status';
    access_log $inet/access.log arrivals;
    default_type text/plain;
    server { listen 203.0.113.10:80; return 200 "hello from allowed.test\n"; }
    server { listen 203.0.113.20:80; return 200 "hello from blocked.test\n"; }
    server { listen 203.0.113.30:80; return 200 "hello from other.test\n"; }
}
EOF
    : >"$inet/access.log"
    ip netns exec inet nginx -c "$inet/nginx.conf" -e "$inet/error.log"
    local i
    for i in $(seq 50); do
        curl -s -m 2 http://203.0.113.10/ready >/dev/null && return 0
        sleep 0.2
    done
    echo "nginx in netns inet does not answer"
    return 1
}

# arrivals ADDRESS: requests nginx logged for ADDRESS so far.
arrivals() {
    grep -c "^$1 " "$inet/access.log" || true
}

# ---- scenarios ------------------------------------------------------------------------

# systemd loads the module's units without complaint.
s_units_load() {
    local unit state
    for unit in agent-egress.service agent-egress-agents.slice agent-egress-agents-tester.slice agent-probe@load.service; do
        state=$(systemctl show -p LoadState --value "$unit")
        [ "$state" = loaded ] || fail "$unit: LoadState=$state: $(systemctl show -p LoadError --value "$unit")"
    done
    local verify
    verify=$(cd /etc/systemd/system && systemd-analyze verify --man=no \
        agent-egress.service agent-egress-agents.slice agent-egress-agents-tester.slice \
        agent-probe@load.service 2>&1) || true
    if [ -z "$verify" ]; then
        note "systemd-analyze verify: clean"
    else
        note "systemd-analyze verify: $verify"
    fi
    local complaints
    complaints=$(journalctl -b -o cat _PID=1 | grep -E 'agent-(egress|probe)' |
        grep -iE 'unknown|invalid|failed to parse|ignoring|not supported|unsupported' || true)
    [ -z "$complaints" ] || fail "systemd about the module's units: $complaints"
    if grep -qiE 'unknown|invalid|failed to parse|ignoring' <<<"$verify"; then
        fail "systemd-analyze verify complains"
    fi
}

# The daemon starts under the module's hardening, as its own user; it says
# when it is ready (Type=notify) and its ExecStartPost self-test passes.
s_daemon_active() {
    timeout 90 systemctl start agent-egress.service ||
        fail "systemctl start agent-egress failed: $(journalctl -b -u agent-egress -o cat -n 15 | tr '\n' ' ')"
    [ "$(systemctl is-active agent-egress.service)" = active ] || fail "agent-egress is $(systemctl is-active agent-egress.service)"
    local pid user
    pid=$(systemctl show -p MainPID --value agent-egress.service)
    user=$(ps -o user= -p "$pid" | tr -d ' ')
    [ "$user" = agent-egress ] || fail "the daemon (pid $pid) runs as $user, not agent-egress"
    nft list set inet agent_egress agents >/dev/null || fail "no set inet agent_egress agents"
    journalctl -b -u agent-egress.service -o cat | grep -q '^ok    table inet agent_egress: installed' ||
        fail "no sign of the doctor run by ExecStartPost: $(journalctl -b -u agent-egress -o cat -n 10 | tr '\n' ' ')"
    note "MainPID $pid user $user; $(grep -E '^Cap(Eff|Bnd)' "/proc/$pid/status" | tr '\n\t' '  ')"
}

# NFTSet= adds the agent's cgroup id before the agent runs, also when the start
# of the agent is what starts the daemon (BindsTo + After) and the table is new.
s_nftset_before_agent() {
    systemctl stop agent-egress.service
    # A stopped daemon leaves its table (the lockdown); without it, only the
    # ordering can put the table there before the agent's cgroup is made.
    nft delete table inet agent_egress 2>/dev/null || true
    make_probe first ''
    run_probe first
    [ "$(systemctl is-active agent-egress.service)" = active ] || fail "starting agent-probe@first did not start agent-egress (BindsTo)"
    expect_in_set first
    note "cgroup $(probe_value first cgroup) id $(probe_value first cgroup_id)"
}

# The agent's curl: the allowed name through, the blocked one refused at once
# (TLS alert; HTTP 403 naming agent-egress), the blocked server never reached.
s_curl_allowed_blocked() {
    local before
    before=$(arrivals 203.0.113.20)
    make_probe curl '
fetch allowed --resolve allowed.test:80:203.0.113.10 http://allowed.test/curl/allowed
fetch blocked_https --resolve blocked.test:443:203.0.113.20 https://blocked.test/curl/blocked_https
fetch blocked_http --resolve blocked.test:80:203.0.113.20 http://blocked.test/curl/blocked_http'
    run_probe curl
    expect_in_set curl
    expect_allowed curl allowed "hello from allowed.test"
    local r
    r=($(fetch_result curl blocked_https))
    [ "${r[0]}" = 35 ] || fail "blocked https: curl exit ${r[0]} (want 35, the TLS alert): $(err_of curl blocked_https)"
    expect_fast "blocked https" "${r[2]}"
    note "blocked https refused in ${r[2]} s: $(err_of curl blocked_https)"
    r=($(fetch_result curl blocked_http))
    [ "${r[1]}" = 403 ] || fail "blocked http: HTTP ${r[1]} (want 403)"
    grep -q agent-egress "$probes/curl.blocked_http.body" || fail "blocked http: the 403 does not name agent-egress: $(body_of curl blocked_http | head -c 200)"
    expect_fast "blocked http" "${r[2]}"
    [ "$(arrivals 203.0.113.20)" = "$before" ] || fail "blocked.test's server was reached"
    local id
    id=$(probe_value curl cgroup_id)
    expect_record curl allowed '.host == "allowed.test"' '.verdict == "allow"' '.rule == "allow"' ".cgroup_id == $id"
    expect_record curl blocked_https '.host == "blocked.test"' '.verdict == "block"' '.proto == "tls"'
    expect_record curl blocked_http '.host == "blocked.test"' '.verdict == "block"' '.proto == "http"'
}

# A restarted agent unit gets a new cgroup; its first connection is captured.
s_restart_captured() {
    make_probe cap '
fetch allowed --resolve allowed.test:80:203.0.113.10 "http://allowed.test/cap/$id"
fetch blocked --resolve blocked.test:80:203.0.113.20 "http://blocked.test/cap/$id"'
    run_probe cap
    local first
    first=$(probe_value cap cgroup_id)
    timeout 120 systemctl restart agent-probe@cap.service || fail "systemctl restart agent-probe@cap failed"
    local second
    second=$(probe_value cap cgroup_id)
    [ -n "$second" ] && [ "$second" != "$first" ] || fail "the restarted unit's cgroup id is $second, the first run's $first: not a new cgroup"
    expect_in_set cap
    expect_allowed cap allowed "hello from allowed.test"
    local r
    r=($(fetch_result cap blocked))
    [ "${r[1]}" = 403 ] || fail "blocked after restart: HTTP ${r[1]} (want agent-egress's 403): $(err_of cap blocked)"
    expect_record cap allowed ".cgroup_id == $second" '.verdict == "allow"'
    expect_record cap blocked ".cgroup_id == $second" '.verdict == "block"'
    note "cgroup id $first, then $second"
}

# Stopping the daemon stops the agents bound to it.
s_bindsto_stops_agents() {
    mkdir -p /etc/systemd/system/agent-probe@sleeper.service.d
    printf '[Service]\nType=simple\n' >/etc/systemd/system/agent-probe@sleeper.service.d/simple.conf
    systemctl daemon-reload
    make_probe sleeper 'exec sleep 600'
    timeout 60 systemctl start agent-probe@sleeper.service || fail "cannot start agent-probe@sleeper"
    local pid
    pid=$(systemctl show -p MainPID --value agent-probe@sleeper.service)
    [ "$(systemctl is-active agent-probe@sleeper.service)" = active ] && [ "$pid" != 0 ] || fail "agent-probe@sleeper is not running"
    timeout 60 systemctl stop agent-egress.service || fail "systemctl stop agent-egress failed"
    local state
    state=$(systemctl is-active agent-probe@sleeper.service || true)
    [ "$state" = inactive ] || [ "$state" = failed ] || fail "agent-probe@sleeper is $state after agent-egress stopped"
    if kill -0 "$pid" 2>/dev/null; then
        fail "the agent's process $pid still runs after agent-egress stopped"
    fi
    timeout 90 systemctl start agent-egress.service || fail "cannot start agent-egress again"
    note "agent-probe@sleeper went $state"
}

# A changed config is applied by `systemctl reload` (SIGHUP), same process.
s_reload_not_restart() {
    local pid restarts
    pid=$(systemctl show -p MainPID --value agent-egress.service)
    make_probe other '
fetch other --resolve other.test:80:203.0.113.30 "http://other.test/reload/$id"'
    run_probe other
    local r
    r=($(fetch_result other other))
    [ "${r[1]}" = 403 ] || fail "other.test before the reload: HTTP ${r[1]} (want 403)"
    cp "$config" "$work/config.orig"
    jq -c '(.rules[] | select(.name == "allow") | .domains) += ["other.test"]' "$work/config.orig" >"$work/config.new"
    grep -q other.test "$work/config.new" || fail "could not add other.test to the config's allow rule"
    install -m 0644 "$work/config.new" "$config"
    timeout 30 systemctl reload agent-egress.service || fail "systemctl reload agent-egress failed"
    local i ok=
    for i in $(seq 20); do
        run_probe other
        r=($(fetch_result other other))
        if [ "${r[1]}" = 200 ]; then
            ok=yes
            break
        fi
        sleep 0.5
    done
    [ -n "$ok" ] || fail "other.test still refused after the reload: $(journalctl -b -u agent-egress -o cat -n 5 | tr '\n' ' ')"
    [ "$(body_of other other)" = "hello from other.test" ] || fail "other.test body: $(body_of other other | head -c 200)"
    local after
    after=$(systemctl show -p MainPID --value agent-egress.service)
    [ "$after" = "$pid" ] || fail "MainPID $pid became $after: restarted, not reloaded"
    install -m 0644 "$work/config.orig" "$config"
    timeout 30 systemctl reload agent-egress.service || fail "reload to the original config failed"
    note "MainPID $pid kept; other.test allowed after the reload"
}

# logrotate with the module's config in a unit sandboxed as NixOS's logrotate.service
# (nixos/modules/services/logging/logrotate.nix, allowNetworking off: no network,
# no address family), with -f to rotate now and -v to say what it did. The
# hardening is nixpkgs PR 339050's with the fixes merged before 25.05: the
# capabilities of PR 345275 and 359322, and @setuid after ~@privileged (PR 345487;
# without it `su` in a logrotate config dies of SIGSYS at the euid switch). A unit
# file rather than systemd-run -p: systemd 257 refuses RestrictAddressFamilies=none
# as a transient property.
write_logrotate_unit() {
    cat >/run/systemd/system/logrotate-nixos-sandbox.service <<'UNIT'
[Service]
Type=oneshot
ExecStart=/usr/sbin/logrotate -v -f -s /var/lib/logrotate/status /etc/logrotate.d/agent-egress
Nice=19
IOSchedulingClass=best-effort
IOSchedulingPriority=7
CapabilityBoundingSet=CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_KILL CAP_SETUID CAP_SETGID
DevicePolicy=closed
LockPersonality=true
MemoryDenyWriteExecute=true
NoNewPrivileges=true
PrivateDevices=true
PrivateTmp=true
ProcSubset=pid
ProtectClock=true
ProtectControlGroups=true
ProtectHome=true
ProtectHostname=true
ProtectKernelLogs=true
ProtectKernelModules=true
ProtectKernelTunables=true
ProtectProc=invisible
ProtectSystem=full
RestrictNamespaces=true
RestrictRealtime=true
RestrictSUIDSGID=true
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallFilter=@chown
SystemCallFilter=@setuid
UMask=0027
PrivateNetwork=true
RestrictAddressFamilies=none
UNIT
    systemctl daemon-reload
}

s_rotation() {
    [ -s "$audit" ] || fail "no audit file $audit before the rotation"
    [ ! -e "$audit.1" ] || fail "$audit.1 exists before the first rotation"
    local batch
    for batch in before just_after after; do
        make_probe "rot_$batch" "
for t in 1 2 3; do fetch \$t --resolve allowed.test:80:203.0.113.10 http://allowed.test/rot/$batch/\$t; done"
    done
    run_probe rot_before
    wait_record rot_before 3 >/dev/null || fail "no record of the connections before the rotation"
    local lines_before
    lines_before=$(wc -l <"$audit")
    write_logrotate_unit
    local rotated
    if ! timeout 60 systemctl start logrotate-nixos-sandbox.service; then
        rotated=$(journalctl -b -u logrotate-nixos-sandbox.service -o cat --no-pager | tail -n 8 | tr '\n' ' ')
        fail "logrotate under NixOS's sandbox failed: $rotated"
    fi
    rotated=$(journalctl -b -u logrotate-nixos-sandbox.service -o cat --no-pager | tail -n 8 | tr '\n' ' ')
    [ -e "$audit.1" ] || [ -e "$audit.1.gz" ] || fail "logrotate did not rotate $audit: $rotated"
    run_probe rot_just_after
    # The daemon notices a rotated-away file within about a second.
    sleep 2
    run_probe rot_after
    local old=$audit.1
    if [ -e "$audit.1.gz" ]; then
        zcat "$audit.1.gz" >"$work/audit.1"
        old=$work/audit.1
    fi
    wait_record rot_after 3 "$audit" "$old" >/dev/null || fail "no record of the last connection after the rotation"
    local t n
    for batch in before just_after after; do
        for t in 1 2 3; do
            [ "$(fetch_result "rot_$batch" "$t" | cut -d' ' -f1)" = 0 ] || fail "rot_$batch fetch $t failed: $(err_of "rot_$batch" "$t")"
            n=$(records_of "rot_$batch" "$t" "$audit" "$old" | wc -l)
            [ "$n" = 1 ] || fail "$n records of rot_$batch's fetch $t across $audit and $old (want 1)"
        done
    done
    for t in 1 2 3; do
        [ -n "$(records_of rot_after "$t" "$audit")" ] || fail "the record of rot_after's fetch $t (2 s after the rotation) is not in the new $audit"
    done
    local total
    total=$(($(wc -l <"$old") + $(wc -l <"$audit")))
    [ "$total" = $((lines_before + 6)) ] || fail "$total records in $audit and $old, want $((lines_before + 6)) ($lines_before before the rotation + 6)"
    note "$(wc -l <"$old") records in the rotated file, $(wc -l <"$audit") in the new one; $(stat -c '%U:%G %a' "$audit") new file"
}

# Every record of the file-audit run names the agent and the process (curl): the
# daemon knows each agent unit's cgroup, also one made after it started.
s_audit_names_agent() {
    local bad
    # (Connections only: no drop reports or policy changes; the doctor's
    # probes, run as ExecStartPost at each start, are its own, and so are the
    # drop reports of their UDP.)
    bad=$(cat "$audit" "$audit.1" 2>/dev/null | jq -c "select(.event != \"drops\" and .event != \"policy\" and .host != \"doctor.agent-egress.invalid\") | select(($attributed) | not) | {cgroup_id, host, agent, pid, exe}" | sort | uniq -c)
    if [ -n "$bad" ]; then
        local ids probe_ids
        probe_ids=$(grep -H '^cgroup_id=' "$probes"/*.out | sed 's|.*/||; s|\.out:cgroup_id=| |' | tr '\n' ' ')
        fail "records without agent, pid or exe (count, fields): $bad; the probes' cgroup ids: $probe_ids"
    fi
    note "$(cat "$audit" "$audit.1" 2>/dev/null | wc -l) records, all attributed"
}

# With the agents' slices in place, the self-test probes each of them.
s_doctor_probes_agents() {
    local report
    report=$(agent-egress doctor --config /etc/agent-egress/config.json 2>&1) ||
        fail "agent-egress doctor failed: $(grep FAIL <<<"$report" | tr '\n' ' ')"
    grep -q '^ok    capture of TCP from .*agent-egress-agents-tester.slice: 192.0.2.254:80 answered by the proxy' <<<"$report" ||
        fail "the doctor did not probe the tester's slice: $(tr '\n' ' ' <<<"$report" | cut -c1-400)"
    # And as the module's timer runs it.
    timeout 30 systemctl start agent-egress-doctor.timer || fail "cannot start agent-egress-doctor.timer"
    timeout 60 systemctl start agent-egress-doctor.service ||
        fail "agent-egress-doctor.service failed: $(journalctl -b -u agent-egress-doctor -o cat -n 8 | tr '\n' ' ')"
    note "$(grep -c '^ok' <<<"$report") checks passed; the timer's service too ($(systemctl show -p NextElapseUSecMonotonic --value agent-egress-doctor.timer) next)"
}

# The agent unit cannot reach systemd's or D-Bus's sockets (InaccessiblePaths=),
# so it cannot have systemd start a unit outside its cgroup (systemd-run).
s_bus_hidden() {
    busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus GetId >/dev/null ||
        fail "the system bus does not answer outside the agent unit either: the check would prove nothing"
    make_probe bus '
systemd-run --wait --quiet --unit="agent-escape-$id" true >/dev/null 2>&1; echo "systemd_run=$?"
busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus GetId >/dev/null 2>&1; echo "busctl=$?"'
    run_probe bus
    [ "$(probe_value bus systemd_run)" != 0 ] || fail "systemd-run started a unit from inside the agent unit"
    [ "$(probe_value bus busctl)" != 0 ] || fail "the agent unit reached the system bus"
    if systemctl list-units --all --no-legend 'agent-escape-*' | grep -q .; then
        fail "a transient unit was made: $(systemctl list-units --all --no-legend 'agent-escape-*')"
    fi
    note "inside the agent unit: systemd-run exit $(probe_value bus systemd_run), busctl exit $(probe_value bus busctl)"
}

# The table deleted and the daemon frozen: the agent still reaches nothing
# (RestrictNetworkInterfaces=lo); thawed, the daemon puts the table back.
s_backstop_holds() {
    echo "backstop window begins" | systemd-cat -t guest-test
    local froze=freeze
    timeout 30 systemctl freeze agent-egress.service 2>"$work/freeze.err" || {
        froze=SIGSTOP
        systemctl kill -s SIGSTOP agent-egress.service
    }
    nft delete table inet agent_egress || fail "cannot delete table inet agent_egress"
    local before
    before=$(arrivals 203.0.113.10)
    make_probe escape '
fetch name -m 3 --resolve allowed.test:80:203.0.113.10 "http://allowed.test/escape/$id"
fetch ip -m 3 "http://203.0.113.10/escape-ip/$id"'
    run_probe escape
    local r tag
    for tag in name ip; do
        r=($(fetch_result escape "$tag"))
        [ "${r[0]}" != 0 ] || fail "the agent reached 203.0.113.10 ($tag) with the table deleted and the daemon frozen"
        note "$tag: curl exit ${r[0]} in ${r[2]} s: $(err_of escape "$tag")"
    done
    [ "$(arrivals 203.0.113.10)" = "$before" ] || fail "the server logged a request from the agent while the backstop should hold"
    if [ $froze = freeze ]; then
        systemctl thaw agent-egress.service
    else
        systemctl kill -s SIGCONT agent-egress.service
    fi
    local i
    for i in $(seq 50); do
        nft list set inet agent_egress agents >/dev/null 2>&1 && break
        sleep 0.2
    done
    nft list set inet agent_egress agents >/dev/null 2>&1 || note "the thawed daemon did not put its table back within 10 s"
    # A fresh daemon for what follows.
    timeout 90 systemctl restart agent-egress.service || fail "cannot restart agent-egress after the backstop check"
    echo "backstop window ends" | systemd-cat -t guest-test
    note "daemon stopped by $froze"
}

# With audit.path "-" (the journal-audit case), a connection's record is a JSON
# line in the daemon's journal.
s_journal_audit() {
    local unit=/etc/systemd/system/agent-egress.service triggers_before
    triggers_before=$(grep '^X-Restart-Triggers=' "$unit" || true)
    install_case journal-audit || fail "cannot install case journal-audit"
    # As switch-to-configuration: a unit whose restart triggers changed is
    # restarted, one whose reload triggers alone changed is reloaded. The
    # daemon refuses to change audit on a reload, so this must be a restart.
    [ -n "$triggers_before" ] || fail "the daemon unit has no X-Restart-Triggers"
    [ "$(grep '^X-Restart-Triggers=' "$unit")" != "$triggers_before" ] ||
        fail "audit.path changed but X-Restart-Triggers did not: a switch would reload, and the daemon refuses that"
    timeout 90 systemctl restart agent-egress.service || fail "cannot restart agent-egress with the journal-audit config"
    local lines_before
    lines_before=$(wc -l <"$audit" 2>/dev/null || echo 0)
    make_probe journal '
fetch allowed --resolve allowed.test:80:203.0.113.10 "http://allowed.test/journal/$id"'
    run_probe journal
    expect_allowed journal allowed "hello from allowed.test"
    local id r rec i
    id=$(probe_value journal cgroup_id)
    r=($(fetch_result journal allowed))
    for i in $(seq 50); do
        rec=$(journalctl -b -u agent-egress.service -o cat | grep '^{' |
            jq -c --arg s "${r[3]}" --arg d "${r[4]}" 'select(.src == $s and .dst == $d)' 2>/dev/null | head -n 1)
        [ -n "$rec" ] && break
        sleep 0.2
    done
    [ -n "$rec" ] || fail "no JSON line for the connection ${r[3]} -> ${r[4]} in journalctl -u agent-egress -o cat: $(journalctl -b -u agent-egress -o cat -n 5 | tr '\n' ' ' | cut -c1-300)"
    local key
    for key in ts event agent cgroup_id pid uid exe cmdline src dst proto host rule outbound verdict bytes_up bytes_down duration_ms error; do
        [ "$(jq --arg k "$key" 'has($k)' <<<"$rec")" = true ] || fail "the journal's record lacks $key: $rec"
    done
    local check
    for check in '.event == "end"' '.host == "allowed.test"' '.verdict == "allow"' '.rule == "allow"' \
        ".cgroup_id == $id" '.dst == "203.0.113.10:80"' '.proto == "http"' '.bytes_down > 0' \
        '.error == null'; do
        [ "$(jq "$check" <<<"$rec")" = true ] || fail "the journal's record fails $check: $rec"
    done
    if [ "$(jq "$attributed" <<<"$rec")" = true ]; then
        note "attributed to pid $(jq .pid <<<"$rec") $(jq -r .exe <<<"$rec")"
    else
        note "not attributed (agent $(jq -c .agent <<<"$rec"), pid $(jq -c .pid <<<"$rec")): see audit_names_agent"
    fi
    [ "$(wc -l <"$audit" 2>/dev/null || echo 0)" = "$lines_before" ] || fail "the record also went to $audit"
}

# services.agentEgress.learn (the learn case): the daemon in audit mode lets the
# refused host through and records what enforce would refuse, and
# agent-egress-learn.service, under its sandbox as its timer would start it,
# turns the audit file into /var/lib/agent-egress/suggested.nix.
s_learn_suggests() {
    install_case learn || fail "cannot install case learn"
    timeout 90 systemctl restart agent-egress.service || fail "cannot restart agent-egress with learn"
    [ "$(jq -r .mode "$config")" = audit ] || fail "learn left the daemon in mode $(jq -c .mode "$config")"
    timeout 30 systemctl start agent-egress-learn.timer || fail "cannot start agent-egress-learn.timer"
    make_probe learn '
fetch allowed --resolve allowed.test:80:203.0.113.10 http://allowed.test/learn/allowed
fetch blocked --resolve blocked.test:80:203.0.113.20 http://blocked.test/learn/blocked'
    run_probe learn
    expect_allowed learn allowed "hello from allowed.test"
    expect_allowed learn blocked "hello from blocked.test"
    expect_record learn blocked '.verdict == "would_block"' '.host == "blocked.test"'
    expect_record learn allowed '.verdict == "allow"'
    local suggested=/var/lib/agent-egress/suggested.nix
    rm -f "$suggested"
    timeout 60 systemctl start agent-egress-learn.service ||
        fail "agent-egress-learn.service failed: $(journalctl -b -u agent-egress-learn -o cat -n 8 | tr '\n' ' ')"
    [ -f "$suggested" ] || fail "no $suggested after agent-egress-learn.service"
    [ "$(stat -c '%U %a' "$suggested")" = "agent-egress 600" ] ||
        fail "$suggested is $(stat -c '%U %a' "$suggested"), not agent-egress 600"
    grep -qF 'allowed.test"' "$suggested" && grep -qF 'blocked.test"' "$suggested" ||
        fail "$suggested does not list both hosts: $(head -c 400 "$suggested" | tr '\n' ' ')"
    ls /var/lib/agent-egress/ | grep -q 'suggested.nix.' && fail "a temporary file was left: $(ls /var/lib/agent-egress/)"
    systemctl list-timers --all --no-pager agent-egress-learn.timer | grep -q agent-egress-learn.timer ||
        fail "agent-egress-learn.timer is not scheduled"
    # The daemon keeps its runtime rules there too (control.enable): one added
    # over the socket lands in the state file.
    curl -sf --unix-socket /run/agent-egress/control.sock -d '{"domains": ["other.test"], "outbound": "direct"}' \
        http://agent-egress/v1/rules >/dev/null || fail "the control socket refused a runtime rule"
    grep -qF other.test /var/lib/agent-egress/runtime-rules.json ||
        fail "the runtime rule is not in /var/lib/agent-egress/runtime-rules.json"
    note "$(grep -c '"' "$suggested") quoted entries in $suggested; a runtime rule kept in the state file"
}

# services.agentEgress.control.supervisors (the supervisor case): the README's
# example supervisor, a unit of its own (DynamicUser, the control group, no
# network), answers an ask rule's questions on the control socket: pypi.org
# for good (a runtime rule: the next fetch asks nobody), paste.test refused
# this once; the agent's curl only waits.
s_supervisor_answers_questions() {
    local unit=agent-egress-supervisor-by-host.service before
    # The names it answers for, where the daemon's resolver (resolved, from
    # /etc/hosts) finds them: the same servers as allowed.test and other.test.
    grep -q ' pypi.org$' /etc/hosts || printf '203.0.113.10 pypi.org\n203.0.113.30 paste.test\n' >>/etc/hosts
    install_case supervisor || fail "cannot install case supervisor"
    timeout 90 systemctl restart agent-egress.service || fail "cannot restart agent-egress with the supervisor case"
    timeout 30 systemctl restart "$unit" ||
        fail "cannot start $unit: $(journalctl -b -u "$unit" -o cat -n 8 | tr '\n' ' ')"
    before=$(arrivals 203.0.113.30)
    make_probe supervised '
fetch pypi -m 20 --resolve pypi.org:80:203.0.113.10 http://pypi.org/supervised/pypi
fetch again -m 20 --resolve pypi.org:80:203.0.113.10 http://pypi.org/supervised/again
fetch paste -m 20 --resolve paste.test:80:203.0.113.30 http://paste.test/supervised/paste'
    run_probe supervised
    expect_allowed supervised pypi "hello from allowed.test"
    expect_allowed supervised again "hello from allowed.test"
    local r
    r=($(fetch_result supervised paste))
    [ "${r[1]}" = 403 ] || fail "paste.test: HTTP ${r[1]} (want 403, the supervisor refused it): $(err_of supervised paste)"
    [ "$(arrivals 203.0.113.30)" = "$before" ] || fail "paste.test's server was reached though the supervisor refused it"
    expect_record supervised pypi '.verdict == "allow"' '.rule == "ask-supervisor"' \
        '.asked.answer == "allow-always"' '.asked.by.uid > 0' '.asked.waited_ms >= 0'
    expect_record supervised again '.verdict == "allow"' '.rule | startswith("asked-")' '.asked == null'
    expect_record supervised paste '.verdict == "block"' '.asked.answer == "deny-once"'
    local by
    by=$(wait_record supervised pypi | jq .asked.by.uid)
    [ "$(systemctl show -p MainPID --value "$unit")" != 0 ] || fail "$unit is not running"
    note "answered by uid $by ($unit, DynamicUser)"
    systemctl stop "$unit"
}

# ---- dist/systemd: the units for other distributions -------------------------------

dist=$share/dist
# The seed's case: a user's --user service, started by the user's manager.
agent_user=agentuser
agent_uid=1000
gateway_cgroup=user.slice/user-$agent_uid.slice/user@$agent_uid.service/app.slice/openclaw-gateway.service

# The invocation of agent-egress.service now running: its journal lines.
daemon_journal() {
    journalctl -b -o cat --no-pager _SYSTEMD_INVOCATION_ID="$(systemctl show -p InvocationID --value agent-egress.service)"
}

# In place of the module's units, dist/systemd/ as README.md's section for Debian,
# Ubuntu and Fedora installs it (the binary is in /usr/local/bin already), with the
# test world's policy in the example config: allowed.test instead of github.com.
# A system unit (agent-probe@) under capture by capture.conf: its cgroup joins the
# set before it runs, allowed.test answers, blocked.test is refused, each audited.
s_dist_system_unit() {
    timeout 60 systemctl stop agent-egress.service || fail "cannot stop the module's daemon"
    install -D -m 0644 "$dist/agent-egress.sysusers" /etc/sysusers.d/agent-egress.conf
    systemd-sysusers /etc/sysusers.d/agent-egress.conf || fail "systemd-sysusers refuses agent-egress.sysusers"
    local unit
    for unit in agent-egress.service agent-egress-agents.slice agent-egress-doctor.service agent-egress-doctor.timer; do
        install -m 0644 "$dist/$unit" "/etc/systemd/system/$unit"
    done
    jq '(.rules[] | select(.name == "allow") | .domains) = ["allowed.test"]' "$dist/config.json" >"$work/dist-config.json"
    install -m 0644 "$work/dist-config.json" "$config"
    agent-egress check --config "$config" >/dev/null || fail "agent-egress check refuses the dist config: $(agent-egress check --config "$config" 2>&1)"
    # The module's drop-in for the test's agent unit, replaced by the dist one.
    install -m 0644 "$dist/capture.conf" /etc/systemd/system/agent-probe@.service.d/agent-egress.conf
    systemctl daemon-reload
    local verify
    verify=$(cd /etc/systemd/system && systemd-analyze verify --man=no agent-egress.service \
        agent-egress-agents.slice agent-egress-doctor.service agent-egress-doctor.timer agent-probe@dist.service 2>&1) ||
        fail "systemd-analyze verify failed: $verify"
    [ -z "$verify" ] || fail "systemd-analyze verify on the dist units: $verify"
    timeout 90 systemctl start agent-egress.service ||
        fail "the dist agent-egress.service does not start: $(journalctl -b -u agent-egress -o cat -n 15 | tr '\n' ' ')"
    daemon_journal | grep -q '^ok    table inet agent_egress: installed' ||
        fail "no sign of the dist unit's ExecStartPost doctor: $(daemon_journal | tail -n 8 | tr '\n' ' ')"
    daemon_journal | grep -q '^ok    kernel backstop on agent.slice/agent-egress.slice/agent-egress-agents.slice' ||
        fail "the dist config's backstop is not on the agents' slice: $(daemon_journal | grep -i backstop | tr '\n' ' ')"
    local before
    before=$(arrivals 203.0.113.20)
    make_probe dist '
fetch allowed --resolve allowed.test:80:203.0.113.10 "http://allowed.test/dist/$id"
fetch blocked --resolve blocked.test:80:203.0.113.20 "http://blocked.test/dist/$id"'
    run_probe dist
    [ "$(probe_value dist cgroup)" = /agent.slice/agent-egress.slice/agent-egress-agents.slice/agent-probe@dist.service ] ||
        fail "capture.conf did not move agent-probe@dist into the agents' slice: cgroup $(probe_value dist cgroup)"
    expect_in_set dist
    expect_allowed dist allowed "hello from allowed.test"
    local r
    r=($(fetch_result dist blocked))
    [ "${r[1]}" = 403 ] || fail "blocked.test from the dist-captured unit: HTTP ${r[1]} (want 403): $(err_of dist blocked)"
    [ "$(arrivals 203.0.113.20)" = "$before" ] || fail "blocked.test's server was reached"
    local agent='.agent == "agent.slice/agent-egress.slice/agent-egress-agents.slice"'
    expect_record dist allowed '.verdict == "allow"' "$agent" '.exe == "/usr/bin/curl"' '.pid > 0'
    expect_record dist blocked '.verdict == "block"' "$agent" '.host == "blocked.test"'
    note "cgroup $(probe_value dist cgroup) id $(probe_value dist cgroup_id) in the set at start; allowed 200, blocked 403, both audited"
}

# The seed's case: the daemon runs (dist units) and, after a reload, lists the
# cgroup of a user's --user unit, openclaw-gateway.service, before that user ever
# logged in; then the
# user's manager starts (lingering, as at a login) and with it the unit, enabled in
# the user's own ~/.config/systemd/user, with dist's capture-user.conf for every
# user. Its curl to allowed.test answers, to blocked.test is refused, each with an
# audit record naming the unit's cgroup; it cannot reach its user manager
# (systemctl --user); agent-egress doctor probes it, backstop included.
s_dist_user_unit_after_login() {
    [ ! -e "/sys/fs/cgroup/user.slice/user-$agent_uid.slice" ] || fail "user $agent_uid has a slice already: the login would not come after the daemon"
    useradd --create-home --uid "$agent_uid" --shell /bin/bash "$agent_user" || fail "cannot add user $agent_user"
    # The image has no libpam-systemd, whose pam_systemd sets this at a real
    # login; without it the user manager refuses to run.
    mkdir -p /run/systemd/system/user@.service.d
    printf '[Service]\nEnvironment=XDG_RUNTIME_DIR=/run/user/%%i\n' >/run/systemd/system/user@.service.d/vm-runtime-dir.conf
    systemctl daemon-reload
    # As README.md says: the cgroup into the config, and a reload (a restart
    # would leave the previous backstop copy attached beside the new one).
    local pid
    pid=$(systemctl show -p MainPID --value agent-egress.service)
    jq --arg cg "$gateway_cgroup" '.interception.cgroups += [$cg]' "$config" >"$work/user-config.json"
    install -m 0644 "$work/user-config.json" "$config"
    timeout 30 systemctl reload agent-egress.service || fail "systemctl reload agent-egress failed"
    local report i
    for i in $(seq 20); do
        report=$(agent-egress doctor --config "$config" 2>&1) && grep -qF "ok    agent $gateway_cgroup: does not exist yet" <<<"$report" && break
        sleep 0.5
    done
    grep -qF "ok    agent $gateway_cgroup: does not exist yet" <<<"$report" ||
        fail "the doctor does not see the reloaded daemon waiting for the unit's cgroup: $(tr '\n' ' ' <<<"$report" | cut -c1-400)"
    [ "$(systemctl show -p MainPID --value agent-egress.service)" = "$pid" ] || fail "the reload restarted the daemon"

    install -D -m 0644 "$dist/capture-user.conf" /etc/systemd/user/openclaw-gateway.service.d/agent-egress.conf
    local out=/run/agent-user home
    mkdir -p "$out"
    chown "$agent_user:" "$out"
    home=$(getent passwd "$agent_user" | cut -d: -f6)
    mkdir -p "$home/.config/systemd/user/default.target.wants"
    cat >"$home/.config/systemd/user/openclaw-gateway.service" <<'UNIT'
[Unit]
Description=the test's stand-in for OpenClaw's gateway

[Service]
ExecStart=/bin/sh /run/agent-user/gateway.sh

[Install]
WantedBy=default.target
UNIT
    ln -sf ../openclaw-gateway.service "$home/.config/systemd/user/default.target.wants/openclaw-gateway.service"
    chown -R "$agent_user:" "$home/.config"
    # The unit's script: what make_probe's scripts record (but nft's view of the
    # set, which needs root), then its fetches, an escape through its manager's
    # bus, and it stays running (the doctor probes its cgroup).
    cat >"$out/gateway.sh" <<'EOF2'
exec >>/run/agent-user/gateway.out 2>&1
cg=$(sed -n 's/^0:://p' /proc/self/cgroup)
id=$(stat -c %i "/sys/fs/cgroup$cg")
echo "cgroup=$cg"
echo "cgroup_id=$id"
fetch() {
    tag=$1
    shift
    w=$(curl -sS -m 10 -o "/run/agent-user/gateway.$tag.body" \
        -w '%{http_code} %{time_total} %{local_ip}:%{local_port} %{remote_ip}:%{remote_port}' \
        "$@" 2>"/run/agent-user/gateway.$tag.err")
    rc=$?
    for url; do :; done
    host=${url#*://}
    host=${host%%/*}
    echo "fetch.$tag=$rc $w $host 80"
}
fetch allowed --resolve allowed.test:80:203.0.113.10 "http://allowed.test/user/$id"
fetch blocked --resolve blocked.test:80:203.0.113.20 "http://blocked.test/user/$id"
systemctl --user show-environment >/dev/null 2>&1; echo "user_manager=$?"
echo done=yes
exec sleep 600
EOF2
    chmod 0644 "$out/gateway.sh"
    local before login_at
    before=$(arrivals 203.0.113.20)
    login_at=$(date +%s.%N)
    if ! timeout 60 loginctl enable-linger "$agent_user"; then
        note "loginctl enable-linger failed; starting user@$agent_uid.service directly"
        timeout 60 systemctl start "user@$agent_uid.service" || fail "cannot start user@$agent_uid.service"
    fi
    for i in $(seq 300); do
        grep -q '^done=yes' "$out/gateway.out" 2>/dev/null && break
        sleep 0.2
    done
    grep -q '^done=yes' "$out/gateway.out" 2>/dev/null ||
        fail "openclaw-gateway.service did not run its fetches within 60 s: user@$agent_uid is $(systemctl is-active "user@$agent_uid.service"); $(journalctl -b --no-pager -o cat _UID="$agent_uid" -n 10 2>/dev/null | tr '\n' ' ' | cut -c1-400) $(cat "$out/gateway.out" 2>/dev/null | tr '\n' ' ')"
    cp "$out/gateway.out" "$probes/gateway.out"
    cp "$out"/gateway.*.body "$out"/gateway.*.err "$probes/" 2>/dev/null || true
    [ "$(probe_value gateway cgroup)" = "/$gateway_cgroup" ] ||
        fail "the --user unit runs in $(probe_value gateway cgroup), not /$gateway_cgroup"
    expect_allowed gateway allowed "hello from allowed.test"
    local r
    r=($(fetch_result gateway blocked))
    [ "${r[1]}" = 403 ] || fail "blocked.test from the --user unit: HTTP ${r[1]} (want agent-egress's 403): $(err_of gateway blocked)"
    grep -q agent-egress "$probes/gateway.blocked.body" || fail "the 403 does not name agent-egress: $(body_of gateway blocked | head -c 200)"
    [ "$(arrivals 203.0.113.20)" = "$before" ] || fail "blocked.test's server was reached from the --user unit"
    local agent=".agent == \"$gateway_cgroup\""
    expect_record gateway allowed '.verdict == "allow"' "$agent" ".uid == $agent_uid" '.exe == "/usr/bin/curl"'
    expect_record gateway blocked '.verdict == "block"' "$agent" '.host == "blocked.test"'
    # Its user manager (which would start a unit outside this cgroup on the
    # unit's behalf) answers the user outside the unit, not the unit.
    local as_user=(runuser -u "$agent_user" -- env XDG_RUNTIME_DIR="/run/user/$agent_uid")
    "${as_user[@]}" systemctl --user show-environment >/dev/null ||
        fail "the user manager does not answer its user outside the unit either: the check would prove nothing"
    [ "$(probe_value gateway user_manager)" != 0 ] || fail "the --user unit reached its user manager (systemctl --user)"
    report=$(agent-egress doctor --config "$config" 2>&1) || fail "agent-egress doctor failed: $(grep FAIL <<<"$report" | tr '\n' ' ')"
    grep -qF "ok    capture of TCP from $gateway_cgroup: 192.0.2.254:80 answered by the proxy" <<<"$report" ||
        fail "the doctor did not probe the --user unit: $(tr '\n' ' ' <<<"$report" | cut -c1-400)"
    grep -qF "ok    kernel backstop on $gateway_cgroup" <<<"$report" ||
        fail "no backstop on the --user unit: $(grep -F backstop <<<"$report" | tr '\n' ' ')"
    # How long after the login the daemon had the cgroup (its own log line).
    local captured_at
    captured_at=$(journalctl -b -u agent-egress.service -o short-unix --no-pager | grep -F "cgroup $gateway_cgroup (id" | tail -n 1 | cut -d' ' -f1)
    note "user unit's cgroup id $(probe_value gateway cgroup_id) captured $(awk -v a="$login_at" -v b="$captured_at" 'BEGIN { printf "%.2f", b - a }') s after enable-linger; allowed 200, blocked 403, both audited (uid $agent_uid); systemctl --user from inside exit $(probe_value gateway user_manager); doctor ok, backstop on"
    # What a user manager makes of RestrictNetworkInterfaces=: a user unit
    # outside the capture, asked for lo only, fetching other.test.
    printf '[Service]\nType=oneshot\nRestrictNetworkInterfaces=lo\nExecStart=/bin/sh -c "curl -s -m 5 -o /dev/null -w %%%%{http_code} http://203.0.113.30/user-restrict-ifaces >/run/agent-user/rni.out"\n' \
        >"$home/.config/systemd/user/rni-check.service"
    "${as_user[@]}" systemctl --user daemon-reload
    "${as_user[@]}" timeout 30 systemctl --user start rni-check.service || true
    note "a user manager's unit with RestrictNetworkInterfaces=lo fetched other.test: HTTP $(cat "$out/rni.out" 2>/dev/null) (200: the setting was not applied)"
}

# What systemd said about the module's units during the whole run, but for the
# backstop check's window (it deletes the table, so NFTSet= cannot add then).
s_no_unit_warnings() {
    local said
    said=$(journalctl -b -o cat --no-pager _PID=1 + SYSLOG_IDENTIFIER=guest-test |
        awk '/^backstop window (begins|ends)$/ { skip = ($3 == "begins"); next } !skip' |
        grep -E 'agent-(egress|probe)|agent_egress' |
        grep -E 'Failed|failed|Unknown|Invalid|[Ii]gnoring|not supported|Unsupported|[Ww]arning' |
        sed -E 's/cgroup [0-9]+/cgroup N/' | sort | uniq -c | sort -rn || true)
    [ -z "$said" ] || fail "systemd said: $said"
}

# The daemon's sandbox (capabilities, system calls, paths) refuses it nothing.
s_sandbox_denials() {
    local denied
    denied=$(journalctl -b -u agent-egress.service -o cat --no-pager | grep -v '^{' |
        grep -E 'Operation not permitted|Permission denied|EPERM|EACCES|os error (1|13)\)' |
        sed -E 's/^\[[^]]*\] *//' | sort | uniq -c | sort -rn || true)
    [ -z "$denied" ] || fail "the daemon was refused (count, message): $denied"
}

# ---- the run ----------------------------------------------------------------------------

main() {
    log "up $(cut -d' ' -f1 /proc/uptime) s; $(systemctl --version | head -n 1); kernel $(uname -r)"
    install -m 0755 "$share/agent-egress" /usr/local/bin/agent-egress
    install -m 0644 "$share/agent-probe@.service" /etc/systemd/system/agent-probe@.service
    if ! setup_internet >"$out/setup.log" 2>&1; then
        echo "setup_internet FAIL 0 $(tr '\n' ' ' <"$out/setup.log" | cut -c1-400)" >>"$results"
        return
    fi
    if ! install_case file-audit >>"$out/setup.log" 2>&1; then
        echo "install_case FAIL 0 $(tr '\n' ' ' <"$out/setup.log" | cut -c1-400)" >>"$results"
        return
    fi
    scenario units_load s_units_load
    scenario daemon_active s_daemon_active
    scenario nftset_before_agent s_nftset_before_agent
    scenario curl_allowed_blocked s_curl_allowed_blocked
    scenario restart_captured s_restart_captured
    scenario bindsto_stops_agents s_bindsto_stops_agents
    scenario reload_not_restart s_reload_not_restart
    scenario rotation s_rotation
    scenario audit_names_agent s_audit_names_agent
    scenario bus_hidden s_bus_hidden
    scenario doctor_probes_agents s_doctor_probes_agents
    scenario backstop_holds s_backstop_holds
    scenario journal_audit s_journal_audit
    scenario learn_suggests s_learn_suggests
    scenario supervisor_answers_questions s_supervisor_answers_questions
    scenario dist_system_unit s_dist_system_unit
    scenario dist_user_unit_after_login s_dist_user_unit_after_login
    scenario no_unit_warnings s_no_unit_warnings
    scenario sandbox_denials s_sandbox_denials
}

main
log "done at $(cut -d' ' -f1 /proc/uptime) s"
journalctl -b -o short-monotonic --no-pager >"$out/journal.txt" 2>&1
cp "$inet/access.log" "$out/access.log" 2>/dev/null
cp "$audit" "$out/audit.jsonl" 2>/dev/null
cp "$audit.1" "$out/audit.jsonl.1" 2>/dev/null
for f in "$probes"/*.out; do
    [ -e "$f" ] && cp "$f" "$out/probe-$(basename "$f")"
done
echo done >"$out/finished"
sync
exit 0
