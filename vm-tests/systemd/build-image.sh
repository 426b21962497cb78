#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Builds the guest of tests/systemd_vm.rs: a Debian 13 (trixie) root with a real
# systemd, its kernel and initrd, as OUT/{root.img,vmlinuz,initrd.img}.
#
#   build-image.sh OUT [MIRROR]
#
# As root; needs debootstrap, mkfs.ext4 (e2fsprogs >= 1.43 for -d), unshare and
# network access to the Debian mirror. Builds in OUT.partial-PID beside OUT and
# renames it to OUT only when everything is done, so a failed or interrupted
# build never leaves a half image under OUT. The test keys OUT on this file's
# hash: any change here builds a fresh image.
set -euo pipefail

out=${1:?usage: build-image.sh OUT [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
suite=trixie

# What the scenarios run in the guest: the module's units need systemd >= 255
# (NFTSet=), nft, kill (procps) and bash; the test needs iproute2 (a second
# netns), nginx (the "internet"), curl (the agent), logrotate, jq (audit JSON)
# and systemd-resolved (127.0.0.53, the daemon's resolver, answering from
# /etc/hosts); curl refuses https without a CA bundle. The kernel's modules
# reach the initrd through initramfs-tools.
packages=(
    systemd systemd-sysv systemd-resolved udev dbus kmod procps
    linux-image-amd64 initramfs-tools zstd
    nftables iproute2 curl ca-certificates logrotate nginx-light jq
)

if [ "$(id -u)" != 0 ]; then
    echo "build-image.sh: must run as root" >&2
    exit 1
fi
if [ -e "$out" ]; then
    echo "build-image.sh: $out exists already" >&2
    exit 1
fi

work="$out.partial-$$"
root="$work/root"
cleanup() {
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work"

step() {
    echo "==> [$(date -u +%H:%M:%S)] $*"
}

# The root's initrd needs only what finds and mounts the root: a small list
# instead of "most" keeps the build and every boot (TCG unpacks it) short.
# initramfs-tools reads this when the kernel package is configured, so it must
# exist before debootstrap installs the kernel: debootstrap --foreign unpacks
# only, and the second stage (in a chroot) configures.
step "debootstrap $suite (first stage: download and unpack)"
include=$(IFS=,; echo "${packages[*]}")
debootstrap --foreign --variant=minbase --include="$include" "$suite" "$root" "$mirror"

mkdir -p "$root/etc/initramfs-tools/conf.d"
echo 'MODULES=list' >"$root/etc/initramfs-tools/conf.d/agent-egress-vm.conf"
printf '%s\n' virtio_pci virtio_blk ext4 >>"$root/etc/initramfs-tools/modules"
# Maintainer scripts must not start services in the chroot.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"

step "debootstrap (second stage: configure, in a chroot)"
# A private mount namespace: the chroot's /proc and /sys mounts vanish with it,
# whatever happens.
unshare --mount --propagation private chroot "$root" /debootstrap/debootstrap --second-stage
rm -f "$root/usr/sbin/policy-rc.d"

step "configure the guest"
echo agent-egress-vm >"$root/etc/hostname"
cat >"$root/etc/fstab" <<'EOF'
/dev/vda  /          ext4  rw,noatime  0 1
test      /mnt/test  9p    trans=virtio,version=9p2000.L,msize=1048576,cache=none  0 0
EOF
mkdir -p "$root/mnt/test"
# The test world's names, for systemd-resolved's answers on 127.0.0.53.
cat >>"$root/etc/hosts" <<'EOF'
203.0.113.10 allowed.test
203.0.113.20 blocked.test
203.0.113.30 other.test
EOF
# As NixOS's users.users.agent-egress = { isSystemUser = true; group = ...; }.
chroot "$root" useradd --system --user-group --no-create-home \
    --home-dir /var/empty --shell /usr/sbin/nologin agent-egress
# Root logs in on the serial console without a password (debugging by hand).
chroot "$root" passwd -d root >/dev/null
# No networking here but the test's own; no timers or services that compete for
# the emulated CPU; nginx runs only in the test's netns.
chroot "$root" systemctl mask \
    nginx.service logrotate.timer apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer e2scrub_reap.service dpkg-db-backup.timer fstrim.timer \
    systemd-timesyncd.service getty@tty1.service >/dev/null 2>&1 || true

# The unit that runs the test from the 9p share and powers off, pass or fail.
cat >"$root/etc/systemd/system/agent-egress-vm-test.service" <<'EOF'
[Unit]
Description=agent-egress VM test (runs /mnt/test/guest-test.sh)
After=multi-user.target systemd-resolved.service
Requires=mnt-test.mount
After=mnt-test.mount
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/bash /mnt/test/guest-test.sh
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
chroot "$root" systemctl enable agent-egress-vm-test.service >/dev/null

# Space: docs, manuals, locales and apt's lists are not needed in the guest.
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root/debootstrap"
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'C.*' -exec rm -rf {} +

step "kernel, initrd and the ext4 image"
kernel=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n 1)
initrd=$(find "$root/boot" -maxdepth 1 -name 'initrd.img-*' | sort | tail -n 1)
if [ -z "$kernel" ] || [ -z "$initrd" ]; then
    echo "build-image.sh: no kernel or initrd in $root/boot" >&2
    exit 1
fi
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"
# The guest writes into a snapshot overlay (snapshot=on); 512 MiB of free space
# is plenty for logs and the journal.
used_mib=$(du -sm "$root" | cut -f1)
truncate -s "$((used_mib + 512))M" "$work/root.img"
mkfs.ext4 -q -F -L agent-egress-vm -d "$root" "$work/root.img"
rm -rf "$root"
du -sh "$work"/*

mv -T "$work" "$out"
trap - EXIT
step "image ready in $out"
