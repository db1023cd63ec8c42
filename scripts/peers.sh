#!/usr/bin/env bash
# peers.sh — install the third-party "peer" tools that Blockship's benchmarks compare against.
#
# Usage:
#   scripts/peers.sh install PEER...   install what is missing; print one command path per PEER (stdout)
#   scripts/peers.sh qemu-img-rbd      same as `install qemu-img-rbd`
#   scripts/peers.sh path PEER         print the path only if already installed, else exit 1 (no network)
#   scripts/peers.sh list              the peers this script knows
#
# Peers:
#   qemu-img-rbd  `qemu-img` able to read/write `rbd:POOL/IMG[:conf=FILE][:id=NAME][:keyring=FILE]`.
#   rbd           Ceph's own `rbd` CLI (`rbd import FILE POOL/IMG`), from Debian's ceph-common.
#   nbdcopy       libnbd's copy tool (Debian's libnbd-bin), the NBD speed reference.
#   qemu-nbd      QEMU's NBD server (qemu-utils), serving images to the NBD peers.
#   qemu-img      plain `qemu-img convert` (qemu-utils).
#
# stdout carries only the printed paths, so `QIMG=$(scripts/peers.sh install qemu-img-rbd)` works;
# progress and errors go to stderr. Safe to run repeatedly and concurrently (one lock).
#
# Knobs (environment):
#   BLOCKSHIP_PEERS_PREFIX=/opt/blockship-peers   where private files and wrappers go
#   BLOCKSHIP_PEERS_INSTALL=1                     0 = never touch the network / apt; fail if missing
#
# Why qemu-img-rbd is not simply `apt-get install qemu-block-extra`:
#   The machine image carries qemu-utils 1:10.0.2+ds-2+deb13u1~bpo12+1 from bookworm-backports (other
#   tools need its qemu-nbd / qemu-storage-daemon), but backports is not in sources.list, so apt's only
#   qemu-block-extra candidate is bookworm's 7.2. QEMU refuses modules from any other build
#   ("Only modules from the same build can be loaded": each module must export the qemu_stamp_<hash>
#   symbol that the binary looks for), so 7.2's block-rbd.so cannot serve qemu-img 10, and apt's plan
#   for `apt-get install qemu-block-extra` is to REMOVE qemu-utils 10. Instead we fetch qemu-block-extra of EXACTLY the installed
#   qemu-utils version (through a private apt configuration that can see bookworm-backports, leaving
#   /etc/apt and the system's package lists alone), unpack only block-rbd.so under PREFIX and point
#   QEMU_MODULE_DIR at it from a wrapper. Nothing under /usr changes and dpkg's database is untouched,
#   which also spares the gluster/iscsi/nfs/ssh libraries the full package would pull in.
set -euo pipefail

PREFIX=${BLOCKSHIP_PEERS_PREFIX:-/opt/blockship-peers}
ALLOW_INSTALL=${BLOCKSHIP_PEERS_INSTALL:-1}
PEERS="qemu-img-rbd rbd nbdcopy qemu-nbd qemu-img"

CLEANUP=()
cleanup() { [ ${#CLEANUP[@]} = 0 ] || rm -rf "${CLEANUP[@]}"; }
trap cleanup EXIT

log() { echo "peers.sh: $*" >&2; }
die() { echo "peers.sh: error: $*" >&2; exit 1; }

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
APT_ENV=(env DEBIAN_FRONTEND=noninteractive)
APT_LOCK=(-o DPkg::Lock::Timeout=600)

installed_version() { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | sed -n 's/^install ok installed //p'; }

# ---- generic apt-installed peers ------------------------------------------------------------------
# Peers that Debian ships in a usable version are plain `apt-get install --no-install-recommends`.
# The simulation guard refuses any plan that would remove, upgrade or downgrade an installed package:
# a careless peer must never swap out the backported qemu-utils (or Ceph) other tools depend on.
APT_UPDATED=0
apt_install() {
  local missing="" p plan
  for p in "$@"; do [ -n "$(installed_version "$p")" ] || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  [ "$ALLOW_INSTALL" = 1 ] || die "missing packages:$missing (BLOCKSHIP_PEERS_INSTALL=0)"
  if [ "$APT_UPDATED" = 0 ]; then
    $SUDO "${APT_ENV[@]}" apt-get "${APT_LOCK[@]}" update -qq
    APT_UPDATED=1
  fi
  # shellcheck disable=SC2086
  plan=$("${APT_ENV[@]}" apt-get -s install --no-install-recommends $missing) \
    || die "apt cannot install:$missing"
  # "Inst pkg [oldver] (newver ...)": the bracket means an installed version would be replaced.
  if grep -E '^(Remv|Inst [^ ]+ \[)' <<<"$plan" >&2; then
    die "installing$missing would change packages already installed (above); refusing"
  fi
  log "apt-get install:$missing"
  # shellcheck disable=SC2086
  $SUDO "${APT_ENV[@]}" apt-get "${APT_LOCK[@]}" install -y -qq --no-install-recommends --no-remove $missing >&2
}

# apt_peer CMD PKG...: the peer is CMD from PATH once PKG... are installed.
apt_peer() {
  local cmd=$1; shift
  apt_install "$@"
  command -v "$cmd" || die "$cmd not found after installing $*"
}

# ---- qemu-img-rbd ---------------------------------------------------------------------------------
QEMU_IMG=/usr/bin/qemu-img
QEMU_MODDIR_REL=usr/lib/x86_64-linux-gnu/qemu    # Debian's module path inside qemu-block-extra
QEMU_WRAPPER=$PREFIX/bin/qemu-img-rbd

# The build stamp qemu-img requires every module to export; it changes with every QEMU build.
qemu_stamp() { grep -a -o -m1 'qemu_stamp_[0-9a-f]\{40\}' "$1" | head -n1; }

# Keyed by version so an upgraded qemu-utils gets its own module; ':' (epoch) is kept out of the path.
qemu_moddir() { echo "$PREFIX/qemu-block-extra/${1//[^A-Za-z0-9.+~-]/_}/$QEMU_MODDIR_REL"; }

# Installed means: wrapper present and pointing at a module dir whose block-rbd.so carries the stamp
# of the qemu-img on disk right now. A later qemu-utils upgrade thus counts as "missing", not as
# installed-but-broken.
qemu_img_rbd_ok() {
  local ver moddir mod stamp
  ver=$(installed_version qemu-utils)
  [ -n "$ver" ] && [ -x "$QEMU_WRAPPER" ] || return 1
  moddir=$(qemu_moddir "$ver")
  mod=$moddir/block-rbd.so
  [ -f "$mod" ] && grep -qF "QEMU_MODULE_DIR='$moddir'" "$QEMU_WRAPPER" || return 1
  stamp=$(qemu_stamp "$QEMU_IMG")
  [ -n "$stamp" ] && grep -qaF "$stamp" "$mod"
}

# Runs apt with a private state/cache tree. SOURCES is a sources.list file; the system's lists,
# pkgcache and /etc/apt are neither read for sources nor written.
private_apt() {
  local tool=$1 sources=$2; shift 2
  local d=$PREFIX/apt
  mkdir -p "$d/lists/partial" "$d/cache/archives/partial"
  "$tool" -o Dir::Etc::sourcelist="$sources" -o Dir::Etc::sourceparts=- \
    -o Dir::State::lists="$d/lists" -o Dir::Cache="$d/cache" \
    -o APT::Sandbox::User=root "$@"
}

# has_version VER apt-cache-command...: does that apt configuration offer qemu-block-extra=VER?
# (`apt-cache show PKG=VER` exits 0 even when the version is unknown; madison's table does not lie.)
has_version() {
  local ver=$1; shift
  "$@" madison qemu-block-extra 2>/dev/null | awk -F' *[|] *' -v v="$ver" '$2 == v { f = 1 } END { exit !f }'
}

# Downloads qemu-block-extra=VER into DIR. Tries the system's apt sources first (right when qemu-utils
# itself came from them), then a private bookworm-backports source (where the image's qemu-utils is from).
fetch_qemu_block_extra() {
  local ver=$1 dir=$2 bpo=$PREFIX/apt/bookworm-backports.list
  if has_version "$ver" apt-cache; then
    (cd "$dir" && apt-get "${APT_LOCK[@]}" -o APT::Sandbox::User=root download "qemu-block-extra=$ver" >&2)
    return
  fi
  mkdir -p "$PREFIX/apt"
  echo 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main' >"$bpo"
  # Refresh the private lists only when they lack the version (first run, or a newer qemu-utils).
  if ! has_version "$ver" private_apt apt-cache "$bpo"; then
    log "fetching bookworm-backports package lists (private, under $PREFIX/apt)"
    private_apt apt-get "$bpo" -qq update >&2
  fi
  has_version "$ver" private_apt apt-cache "$bpo" \
    || die "no qemu-block-extra $ver in the system's apt sources nor in bookworm-backports; \
qemu-img $ver cannot get an rbd module of its own build"
  (cd "$dir" && private_apt apt-get "$bpo" -q download "qemu-block-extra=$ver" >&2)
}

install_qemu_img_rbd() {
  local ver stamp tmp deb moddir dest missing
  if qemu_img_rbd_ok; then echo "$QEMU_WRAPPER"; return; fi
  [ "$ALLOW_INSTALL" = 1 ] || die "qemu-img-rbd is not installed (BLOCKSHIP_PEERS_INSTALL=0)"
  # qemu-utils itself is deliberately not installed here: the image provides the backported 10.x, and
  # apt-get would pick bookworm's 7.2 on a machine without it.
  ver=$(installed_version qemu-utils)
  [ -n "$ver" ] && [ -x "$QEMU_IMG" ] || die "qemu-utils is not installed; this script only adds rbd support to it"
  stamp=$(qemu_stamp "$QEMU_IMG")
  [ -n "$stamp" ] || die "no qemu_stamp_* in $QEMU_IMG: built without module support?"
  # block-rbd.so links librbd/librados dynamically; bookworm's Ceph 16.2.15 satisfies qemu 10's needs.
  apt_install librbd1 librados2

  tmp=$(mktemp -d "${TMPDIR:-/tmp}/peers-qemu.XXXXXX")
  CLEANUP+=("$tmp")
  fetch_qemu_block_extra "$ver" "$tmp"
  deb=$(find "$tmp" -maxdepth 1 -name 'qemu-block-extra_*.deb' | head -n1)
  [ -n "$deb" ] || die "download of qemu-block-extra $ver produced no .deb"
  [ "$(dpkg-deb -f "$deb" Version)" = "$ver" ] || die "$deb is not version $ver"
  dpkg-deb -x "$deb" "$tmp/x"
  grep -qaF "$stamp" "$tmp/x/$QEMU_MODDIR_REL/block-rbd.so" \
    || die "block-rbd.so from qemu-block-extra $ver lacks $stamp: not the same build as $QEMU_IMG"
  missing=$(ldd "$tmp/x/$QEMU_MODDIR_REL/block-rbd.so" | grep 'not found' || true)
  [ -z "$missing" ] || die "block-rbd.so has unresolved libraries: $missing"

  # Only block-rbd.so: the package's other modules need libraries (gluster, iscsi, nfs, ssh) that are
  # not installed and that no peer needs; shipping them would only turn "unknown protocol" into
  # confusing dlopen errors.
  moddir=$(qemu_moddir "$ver")
  mkdir -p "$moddir" "$PREFIX/bin"
  install -m 0644 "$tmp/x/$QEMU_MODDIR_REL/block-rbd.so" "$moddir/block-rbd.so.tmp"
  mv -f "$moddir/block-rbd.so.tmp" "$moddir/block-rbd.so"

  # The wrapper re-checks the qemu-utils version on every run: after an upgrade the old module would
  # be rejected by qemu with a less obvious message.
  dest=$QEMU_WRAPPER
  cat >"$dest.tmp" <<EOF
#!/bin/sh
# Generated by Blockship scripts/peers.sh (install qemu-img-rbd); regenerate rather than edit.
# The system's qemu-img ($ver) plus the rbd block module of the same build, kept in $PREFIX.
if [ "\$(dpkg-query -W -f='\${Version}' qemu-utils 2>/dev/null)" != '$ver' ]; then
  echo "qemu-img-rbd: qemu-utils is no longer $ver; rerun scripts/peers.sh install qemu-img-rbd" >&2
  exit 1
fi
QEMU_MODULE_DIR='$moddir'
export QEMU_MODULE_DIR
exec $QEMU_IMG "\$@"
EOF
  chmod 0755 "$dest.tmp"
  mv -f "$dest.tmp" "$dest"
  qemu_img_rbd_ok || die "qemu-img-rbd failed its own check after install"
  log "qemu-img-rbd: qemu-utils $ver + $moddir/block-rbd.so"
  echo "$QEMU_WRAPPER"
}

# ---- dispatch -------------------------------------------------------------------------------------
install_peer() {
  case $1 in
    qemu-img-rbd) install_qemu_img_rbd ;;
    rbd) apt_peer rbd ceph-common ;;
    nbdcopy) apt_peer nbdcopy libnbd-bin ;;
    qemu-nbd) apt_peer qemu-nbd qemu-utils ;;
    qemu-img) apt_peer qemu-img qemu-utils ;;
    # New apt-only peer: add `NAME) apt_peer CMD DEBIAN-PKG... ;;` here and NAME to PEERS above.
    *) die "unknown peer '$1' (known: $PEERS)" ;;
  esac
}

path_peer() {
  case $1 in
    qemu-img-rbd) qemu_img_rbd_ok && echo "$QEMU_WRAPPER" ;;
    rbd | nbdcopy | qemu-nbd | qemu-img) command -v "$1" ;;
    *) die "unknown peer '$1' (known: $PEERS)" ;;
  esac
}

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

locked() {
  mkdir -p "$PREFIX"
  exec 9>"$PREFIX/.lock"
  flock 9
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  install)
    [ $# -gt 0 ] || usage
    locked
    for p in "$@"; do install_peer "$p"; done ;;
  qemu-img-rbd)
    locked
    install_peer qemu-img-rbd ;;
  path)
    [ $# = 1 ] || usage
    path_peer "$1" ;;
  list) for p in $PEERS; do echo "$p"; done ;;
  *) usage ;;
esac
