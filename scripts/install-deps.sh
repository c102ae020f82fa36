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
  libssl-dev openssl clang help2man file dpkg-dev python3-matplotlib iproute2 >/dev/null
