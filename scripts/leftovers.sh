#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Checks that no test world (tests/harness) was left behind: network namespaces
# ae<8 hex>a / ae<8 hex>n, /etc/netns entries for them, cgroups and temp dirs named
# ae-test-<8 hex>, and processes still running from such a temp dir.
# Prints each leftover and exits 1 if there is any; exits 0 otherwise.
# Run it when no test is running (a live test's world would be reported).
set -euo pipefail

found=0
report() {
    echo "leftover: $*"
    found=1
}

netns_re='^ae[0-9a-f]{8}[an]$'
dir_re='^ae-test-[0-9a-f]{8}$'

# Named network namespaces are mounted in /run/netns (what `ip netns list` reads).
for path in /run/netns/* /etc/netns/*; do
    [ -e "$path" ] || continue
    if [[ "$(basename "$path")" =~ $netns_re ]]; then
        report "$path"
    fi
done

# The cgroup2 mount, wherever it is (never assume /sys/fs/cgroup).
cgroup_root=$(awk '{ for (i = 1; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") { print $5; exit } } }' /proc/self/mountinfo)
if [ -z "$cgroup_root" ]; then
    echo "warning: no cgroup2 mount found in /proc/self/mountinfo; cgroups not checked" >&2
else
    for path in "$cgroup_root"/ae-test-*; do
        [ -d "$path" ] || continue
        if [[ "$(basename "$path")" =~ $dir_re ]]; then
            report "cgroup $path (processes: $(cat "$path"/cgroup.procs 2>/dev/null | tr '\n' ' '))"
        fi
    done
fi

tmp=${TMPDIR:-/tmp}
for path in "$tmp"/ae-test-*; do
    [ -d "$path" ] || continue
    if [[ "$(basename "$path")" =~ $dir_re ]]; then
        report "temp dir $path"
    fi
done

for cmdline in /proc/[0-9]*/cmdline; do
    pid=${cmdline#/proc/}
    pid=${pid%/cmdline}
    [ "$pid" = "$$" ] && continue
    # The process may be gone by now: then there is nothing to report.
    args=$( { tr '\0' ' ' <"$cmdline"; } 2>/dev/null) || continue
    if [[ "$args" =~ ae-test-[0-9a-f]{8} ]]; then
        report "process $pid: $args"
    fi
done

if [ "$found" = 0 ]; then
    echo "no test-world leftovers"
fi
exit "$found"
