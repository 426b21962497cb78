#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Prepares a Debian 12 (bookworm) machine, as root: every package the build, the
# tests and the benchmarks need, the kernel modules, and the Rust toolchain.
# Idempotent. `.ci/run` runs it before scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/setup.sh must run as root (the tests build network namespaces and cgroups)" >&2
    exit 1
fi
exec </dev/null
export DEBIAN_FRONTEND=noninteractive

step() {
    echo
    echo "==> [$(date -u +%H:%M:%S)] $*"
}

packages=(
    # build: rustables' build script runs bindgen, which needs libclang
    build-essential pkg-config libclang-dev clang git ca-certificates curl
    # the kernel side and the world the tests build
    nftables iproute2 kmod procps util-linux openssl
    nginx-light libnginx-mod-stream dnsmasq-base bind9-dnsutils dnsperf
    # clients and peers the tests drive
    chromium libnss3-tools python3 socat ncat microsocks tinyproxy dante-server v2ray haproxy wrk iperf3
    # tests/watch.rs reads `watch`'s screen in a terminal
    tmux
    # the example supervisor (nix/example-configuration.nix) that the e2e suite runs
    jq
    # Nix syntax checks of nix/, flake.nix and vm-tests/
    nix-bin
    # the audit log's rotation test runs the real logrotate
    logrotate
    # tests/systemd_vm.rs: a Debian guest with a real systemd, built with
    # debootstrap and mkfs.ext4 -d, booted in QEMU (TCG)
    qemu-system-x86 debootstrap e2fsprogs
)
# Services those packages may start on installation: they could hold ports or
# answer DNS on this machine, and the tests start their own instances in netns.
services=(nginx dnsmasq tinyproxy danted haproxy iperf3 v2ray nix-daemon)

step "apt-get install"
# Debian's policy-rc.d hook: exit 101 forbids maintainer scripts to start services.
policy=/usr/sbin/policy-rc.d
made_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    made_policy=yes
    trap 'rm -f "$policy"' EXIT
fi
apt-get update -q
# Wait for the dpkg lock rather than fail when something else (unattended-upgrades)
# is installing.
apt-get install -y -q -o DPkg::Lock::Timeout=600 \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${packages[@]}"
if [ -n "$made_policy" ]; then
    rm -f "$policy"
    trap - EXIT
fi

step "stop and disable services the packages brought"
for service in "${services[@]}"; do
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        if systemctl list-unit-files "$service.service" "$service.socket" --no-legend 2>/dev/null | grep -q .; then
            systemctl disable --now "$service.service" "$service.socket" >/dev/null 2>&1 || true
            echo "disabled $service"
        fi
    elif [ -x "/etc/init.d/$service" ]; then
        "/etc/init.d/$service" stop >/dev/null 2>&1 || true
        echo "stopped $service (if it ran)"
    fi
done

step "nginx modules"
# The test world needs the ssl and http2 modules; benchmarks against nginx's
# stream proxy need the stream module (dynamic in Debian).
nginx_build=$(nginx -V 2>&1)
for option in http_ssl_module http_v2_module stream=dynamic stream_ssl_preread_module; do
    if ! grep -q -- "--with-$option" <<<"$nginx_build"; then
        echo "nginx lacks --with-$option" >&2
        exit 1
    fi
done
ls /usr/lib/nginx/modules/ngx_stream_module.so

step "kernel modules"
# Built-in or missing modules are fine here: the tests that need them report it.
for module in nft_socket nft_tproxy nf_tproxy_ipv4 nf_tproxy_ipv6 nf_socket_ipv4 nf_socket_ipv6 nft_ct nf_conntrack; do
    if error=$(modprobe "$module" 2>&1); then
        echo "loaded $module"
    else
        echo "warning: modprobe $module: ${error:-failed} (fine if built into the kernel)"
    fi
done

step "Rust toolchain"
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
if ! command -v rustup >/dev/null; then
    # Debian 12's rustc (1.63) is older than the crate's rust-version: use rustup.
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y --profile minimal --component rustfmt,clippy
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
installed=$(rustup component list --installed)
for component in rustfmt clippy; do
    if ! grep -q "^$component" <<<"$installed"; then
        rustup component add "$component"
    fi
done
rustc --version
cargo --version
