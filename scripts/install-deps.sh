#!/usr/bin/env bash
# Installs everything mig builds and tests with, from Debian 12's packages only.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential cmake ninja-build binutils pkg-config \
  libboost-dev liburing-dev libxxhash-dev libzstd-dev catch2 \
  libcli11-dev nlohmann-json3-dev libfmt-dev qemu-system-x86 qemu-utils libnbd-dev iperf3 \
  libssl-dev openssl clang help2man file dpkg-dev python3-matplotlib iproute2 gdb >/dev/null

# Where /dev/kvm is unusable, the tests that need KVM run inside QEMU's TCG instead
# (scripts/nested-kvm.sh), under Debian's kernel, unpacked here rather than installed: this
# host never boots it.
if ! { [ -r /dev/kvm ] && [ -w /dev/kvm ]; }; then
  $SUDO apt-get install -y -qq --no-install-recommends busybox-static cpio e2fsprogs >/dev/null
  nested=/opt/mig-nested-kvm
  image=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1)
  if [ ! -e "$nested/boot/vmlinuz-${image#linux-image-}" ]; then
    download=$(mktemp -d)
    (cd "$download" && apt-get download -qq "$image" 2>/dev/null)
    $SUDO rm -rf "$nested" && $SUDO mkdir -p "$nested"
    $SUDO dpkg-deb -x "$download"/*.deb "$nested"
    rm -rf "$download"
  fi
fi
