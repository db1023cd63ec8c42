#!/usr/bin/env bash
# Installs the Debian 12 packages Blockship needs. `deps.sh build`: what building needs
# (a C compiler for zstd and ring). `deps.sh test`: also what the test suite drives.
# Skips apt entirely when everything is present.
set -euo pipefail
what=${1:-build}
pkgs="build-essential pkg-config"
case $what in
  build) ;;
  test) pkgs="$pkgs python3 qemu-utils libnbd-bin nbdkit fonts-dejavu-core librbd-dev iptables openssl" ;;
  *) echo "usage: deps.sh build|test" >&2; exit 2 ;;
esac
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "installing:$missing" >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing
fi
