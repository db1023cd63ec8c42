#!/usr/bin/env bash
# ceph-up.sh — bring up a throw-away, single-host Ceph cluster for Blockship's tests.
#
# Debian 12 ships Ceph 16.2 (Pacific). This script runs 1 mon + 1 OSD (+ optionally 1 mgr) as plain
# root processes — no systemd, no containers — bound to 127.0.0.1 only, with everything (conf,
# keyrings, mon/osd data, logs, sockets, PID files) under ONE directory, so that tearing it down is
# "kill the PIDs we wrote, rm -rf the directory". Pool `rbd` (size 1) is created, `rbd pool init`-ed
# and probed with a real write before the script reports success.
#
# Usage:
#   eval "$(scripts/ceph-up.sh)"          # exports CEPH_CONF (last line) and BLOCKSHIP_CEPH_* vars
#   . /tmp/blockship-ceph/env             # same variables, from another shell later
#   scripts/ceph-smoke.sh
#   scripts/ceph-down.sh [--keep]
#
# Knobs (environment; each BLOCKSHIP_CEPH_X falls back to CEPH_X, then to the default):
#   BLOCKSHIP_CEPH_DIR=/tmp/blockship-ceph  everything lives here; keep it short (unix socket paths < 108 bytes)
#   BLOCKSHIP_CEPH_AUTH=none                none | cephx
#   BLOCKSHIP_CEPH_OBJECTSTORE=bluestore    bluestore: sparse file DIR/osd/ceph-0/block, bounded OSD memory.
#                                           memstore: RAM only, a few seconds faster, OSD RSS grows with the
#                                           data written, everything is lost if the OSD restarts.
#   BLOCKSHIP_CEPH_BLUESTORE_BYTES=20 GiB   apparent size of the sparse file (= worst-case disk use)
#   BLOCKSHIP_CEPH_MEMSTORE_BYTES=4 GiB     memstore capacity (RAM)
#   BLOCKSHIP_CEPH_MON_V2_PORT=3300         msgr2 port; change both ports to run a second cluster
#   BLOCKSHIP_CEPH_MON_V1_PORT=6789         legacy msgr1 port
#   BLOCKSHIP_CEPH_POOL=rbd                 BLOCKSHIP_CEPH_PG_NUM=8
#   BLOCKSHIP_CEPH_CLIENT=blockship         restricted client (mon 'profile rbd', osd 'profile rbd pool=POOL')
#   BLOCKSHIP_CEPH_WITH_MGR=0               1 = also run ceph-mgr (installs ceph-mgr, ~300 MB RSS). Without a
#                                           mgr, RBD I/O works but mgr-backed commands (ceph df, pg stat...) hang.
#   BLOCKSHIP_CEPH_INSTALL=1                0 = never run apt-get; fail if packages are missing
#
# Output: stdout carries only `export ...` lines (safe to eval); the LAST line is `export CEPH_CONF=...`.
# The same lines are written to DIR/env. Progress and errors go to stderr.
#
# The restricted client is created in BOTH auth modes so tests can always pass Ceph's usual
# `--id $BLOCKSHIP_CEPH_ID --keyring $BLOCKSHIP_CEPH_KEYRING` (with auth none the caps are simply not
# enforced). The admin keyring is DIR/ceph.client.admin.keyring.
#
# Measured on a 2-core VM: ~6 s with the packages present, ~20 s more for the apt-get install.
#
# Clients never give up by default: a stopped cluster makes them retry for client_mount_timeout
# (300 s), and a down OSD makes I/O wait forever. Tests should set client_mount_timeout (bounds
# rados_connect; rados_mon_op_timeout does NOT) and rados_osd_op_timeout (bounds OSD ops, incl.
# rbd open/ls), e.g. `rbd --client-mount-timeout 5 --rados-osd-op-timeout 5 ...` -> ETIMEDOUT (110).
set -euo pipefail

knob() { # knob NAME DEFAULT -> $BLOCKSHIP_CEPH_NAME, else $CEPH_NAME, else DEFAULT
  local b="BLOCKSHIP_CEPH_$1" c="CEPH_$1"
  printf '%s' "${!b:-${!c:-$2}}"
}
DIR=$(knob DIR /tmp/blockship-ceph)
AUTH=$(knob AUTH none)
OBJECTSTORE=$(knob OBJECTSTORE bluestore)
BLUESTORE_BYTES=$(knob BLUESTORE_BYTES 21474836480)
MEMSTORE_BYTES=$(knob MEMSTORE_BYTES 4294967296)
MON_V2_PORT=$(knob MON_V2_PORT 3300)
MON_V1_PORT=$(knob MON_V1_PORT 6789)
POOL=$(knob POOL rbd)
PG_NUM=$(knob PG_NUM 8)
CLIENT=$(knob CLIENT blockship)
WITH_MGR=$(knob WITH_MGR 0)
INSTALL=$(knob INSTALL 1)

# A CEPH_ARGS left in the caller's environment (e.g. "--id blockship") would silently apply to the
# admin commands below and make them fail with EACCES.
unset CEPH_ARGS

CONF=$DIR/ceph.conf
MARKER=$DIR/.blockship-ceph   # ceph-down.sh only deletes directories that carry this marker
T0=${EPOCHREALTIME/./}
elapsed() { local d=$(( ${EPOCHREALTIME/./} - T0 )); printf '%d.%d' $((d / 1000000)) $(( d % 1000000 / 100000 )); }
log() { printf '[ceph-up %5ss] %s\n' "$(elapsed)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# Hard timeouts on every CLI call: without a mgr, mgr-backed commands wait forever, and a dead mon
# makes any client retry forever unless told otherwise.
c()   { timeout 60 ceph -c "$CONF" --connect-timeout 30 "$@"; }
rb()  { timeout 120 rbd -c "$CONF" "$@"; }
# Run a ceph command, showing its output only if it fails (the happy path is noisy and useless).
cq()  { local out; out=$(c "$@" 2>&1) || die "ceph $* failed: $out"; }

case $AUTH in none|cephx) ;; *) die "AUTH must be none or cephx (got '$AUTH')";; esac
case $OBJECTSTORE in bluestore|memstore) ;; *) die "OBJECTSTORE must be bluestore or memstore (got '$OBJECTSTORE')";; esac
[ "$(id -u)" = 0 ] || die "must run as root (apt-get, and the daemons run as root here)"
case $DIR in /*) ;; *) die "DIR must be an absolute path (got '$DIR')";; esac
# Admin sockets live in DIR/run; sun_path is 108 bytes, and a too-long path only shows up as a
# cryptic bind error deep in a daemon log.
[ ${#DIR} -le 80 ] || die "DIR path too long for unix sockets (${#DIR} > 80 chars): $DIR"

# ------------------------------------------------------------------------------------------ packages
PKGS="ceph-mon ceph-osd ceph-common librbd-dev librados-dev"
[ "$WITH_MGR" = 1 ] && PKGS="$PKGS ceph-mgr"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  [ "$INSTALL" = 1 ] || die "missing packages:$missing (and INSTALL=0)"
  log "installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  # Lock timeout: another apt run (e.g. a parallel setup script) must not make us fail spuriously.
  apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
  # --no-install-recommends keeps out ceph-mgr/mds/fuse and dozens of python packages.
  # shellcheck disable=SC2086
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing >&2
  log "packages installed"
fi
for b in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd rados timeout; do
  command -v "$b" >/dev/null || die "$b not found in PATH"
done

# ------------------------------------------------------------------------------- preconditions
ours() { # is PID $1 alive and started with our conf?
  [ -r "/proc/$1/cmdline" ] && tr '\0' '\n' <"/proc/$1/cmdline" | grep -qxF -- "$CONF"
}
if [ -d "$DIR/run" ]; then
  for pf in "$DIR"/run/*.pid; do
    [ -e "$pf" ] || continue
    pid=$(cat "$pf" 2>/dev/null || true)
    if [ -n "$pid" ] && ours "$pid"; then
      die "a cluster from $DIR is still running ($(basename "$pf" .pid), pid $pid): run scripts/ceph-down.sh first"
    fi
  done
fi
for port in "$MON_V2_PORT" "$MON_V1_PORT"; do
  # A successful connect means someone listens on 127.0.0.1 (or 0.0.0.0); the mon would fail to bind
  # and only say so in its log.
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "127.0.0.1:$port is in use (another cluster?); set BLOCKSHIP_CEPH_MON_V2_PORT / _MON_V1_PORT"
  fi
done
if [ -e "$DIR" ]; then
  # Only wipe what is recognisably a previous run of ours: DIR may be a user-supplied path.
  if [ -e "$MARKER" ] || [ -z "$(ls -A "$DIR")" ]; then
    rm -rf "$DIR"
  else
    die "$DIR exists and was not created by ceph-up.sh; refusing to delete it"
  fi
fi

mkdir -p "$DIR"/{mon,osd,mgr,log,run,crash}
: >"$MARKER"
FSID=$(cat /proc/sys/kernel/random/uuid)
MON_ADDRS="[v2:127.0.0.1:$MON_V2_PORT,v1:127.0.0.1:$MON_V1_PORT]"

# ---------------------------------------------------------------------------------------- ceph.conf
cat >"$CONF" <<EOF
# Generated by Blockship scripts/ceph-up.sh — throw-away single-host test cluster on loopback.
[global]
fsid = $FSID
mon host = $MON_ADDRS
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = $AUTH
auth service required = $AUTH
auth client required = $AUTH
auth allow insecure global id reclaim = false
run dir = $DIR/run
pid file = $DIR/run/\$cluster-\$name.pid
log file = $DIR/log/\$cluster-\$name.log
crash dir = $DIR/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = $PG_NUM
osd pool default pgp num = $PG_NUM
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# DIR usually shares the root disk; don't raise HEALTH_WARN just because it is < 30 % free.
mon data avail warn = 2
mon data avail crit = 1

[mon]
# Admin sockets only for daemons: a shared client socket path makes the second of two concurrent
# clients (e.g. "rbd export - | rbd import -") fail with EEXIST.
admin socket = $DIR/run/\$cluster-\$name.asok
mon data = $DIR/mon/\$cluster-\$id
keyring = $DIR/mon/\$cluster-\$id/keyring
mon cluster log file = $DIR/log/\$cluster.log
# Commit mon updates (osd boot, pool create, PG maps) every 0.1 s instead of every 1 s: a few seconds
# less bring-up, irrelevant load for a one-mon cluster.
paxos propose interval = 0.1
# Without a mgr, MGR_DOWN (HEALTH_WARN) is raised this long after mkfs; push it out of sight.
mon mgr mkfs grace = $([ "$WITH_MGR" = 1 ] && echo 120 || echo 315360000)

[mgr]
admin socket = $DIR/run/\$cluster-\$name.asok
mgr data = $DIR/mgr/\$cluster-\$id
keyring = $DIR/mgr/\$cluster-\$id/keyring

[osd]
admin socket = $DIR/run/\$cluster-\$name.asok
osd data = $DIR/osd/\$cluster-\$id
keyring = $DIR/osd/\$cluster-\$id/keyring
osd objectstore = $OBJECTSTORE
EOF
if [ "$OBJECTSTORE" = memstore ]; then
  cat >>"$CONF" <<EOF
memstore device bytes = $MEMSTORE_BYTES
# 64 KiB page sets instead of one buffer per object: far less RSS growth on overwrites.
memstore page set = true
EOF
else
  cat >>"$CONF" <<EOF
# Sparse regular file \$osd_data/block created by mkfs: no loop device, no LVM.
# Do NOT set "bluestore block path = \$osd_data/block": mkfs then makes "block" a symlink to itself.
bluestore block create = true
bluestore block size = $BLUESTORE_BYTES
bluestore block db create = false
bluestore block wal create = false
osd memory target = 1073741824
EOF
fi
cat >>"$CONF" <<EOF

[client]
# Per-identity keyring, so "--id $CLIENT" finds its key without an explicit --keyring.
keyring = $DIR/ceph.\$name.keyring
EOF

# ---------------------------------------------------------------------------------------------- mon
log "mon: fsid $FSID, $MON_ADDRS, auth=$AUTH, objectstore=$OBJECTSTORE"
ADMIN_KEYRING=$DIR/ceph.client.admin.keyring
ceph-authtool --create-keyring "$ADMIN_KEYRING" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$DIR/mon.keyring" --import-keyring "$ADMIN_KEYRING" >/dev/null
monmaptool --create --fsid "$FSID" --addv a "$MON_ADDRS" "$DIR/monmap" >/dev/null
mkdir -p "$DIR/mon/ceph-a"
ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring" \
  >>"$DIR/log/mon-mkfs.log" 2>&1 || die "mon mkfs failed (see $DIR/log/mon-mkfs.log)"
ceph-mon -c "$CONF" -i a >>"$DIR/log/mon-start.log" 2>&1 || die "ceph-mon failed to start (see $DIR/log/)"
for _ in $(seq 1 120); do c quorum_status >/dev/null 2>&1 && break; sleep 0.25; done
c quorum_status >/dev/null 2>&1 || die "mon did not reach quorum (see $DIR/log/ceph-mon.a.log)"
log "mon.a up (pid $(cat "$DIR/run/ceph-mon.a.pid"))"

# ---------------------------------------------------------------------------------- mgr (optional)
if [ "$WITH_MGR" = 1 ]; then
  mkdir -p "$DIR/mgr/ceph-x"
  cq auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' -o "$DIR/mgr/ceph-x/keyring"
  ceph-mgr -c "$CONF" -i x >>"$DIR/log/mgr-start.log" 2>&1 || die "ceph-mgr failed to start"
  log "mgr.x started"
fi

# ---------------------------------------------------------------------------------------------- osd
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
OSD_SECRET=$(ceph-authtool --gen-print-key)
OSD_ID=$(printf '{"cephx_secret": "%s"}' "$OSD_SECRET" | c osd new "$OSD_UUID" -i -) \
  || die "ceph osd new failed"
OSD_DIR=$DIR/osd/ceph-$OSD_ID
mkdir -p "$OSD_DIR"
ceph-authtool --create-keyring "$OSD_DIR/keyring" --name "osd.$OSD_ID" --add-key "$OSD_SECRET" >/dev/null
ceph-osd -c "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID" >>"$DIR/log/osd-mkfs.log" 2>&1 \
  || die "osd mkfs failed (see $DIR/log/osd-mkfs.log and ceph-osd.$OSD_ID.log)"
ceph-osd -c "$CONF" -i "$OSD_ID" >>"$DIR/log/osd-start.log" 2>&1 || die "ceph-osd failed to start"
for _ in $(seq 1 240); do c osd stat 2>/dev/null | grep -q ' 1 up' && break; sleep 0.25; done
c osd stat 2>/dev/null | grep -q ' 1 up' || die "osd.$OSD_ID did not come up (see $DIR/log/ceph-osd.$OSD_ID.log)"
log "osd.$OSD_ID up (pid $(cat "$DIR/run/ceph-osd.$OSD_ID.pid"))"

# --------------------------------------------------------------------------------------------- pool
# size/min_size 1 come from "osd pool default size/min size" (no extra mon round trips); verify anyway.
cq osd pool create "$POOL" "$PG_NUM" "$PG_NUM" replicated
[ "$(c osd pool get "$POOL" size 2>/dev/null)" = "size: 1" ] || die "pool $POOL does not have size 1"
rb pool init "$POOL" || die "rbd pool init $POOL failed"   # returns once the PGs are active
echo probe | timeout 60 rados -c "$CONF" -p "$POOL" put __ceph_up_probe - \
  && timeout 60 rados -c "$CONF" -p "$POOL" rm __ceph_up_probe \
  || die "probe write into pool $POOL failed"
log "pool '$POOL' writable"

# ------------------------------------------------------------------------------ restricted client
# What Blockship itself should run as: rbd profile on one pool, nothing cluster-wide.
CLIENT_KEYRING=$DIR/ceph.client.$CLIENT.keyring
cq auth get-or-create "client.$CLIENT" mon 'profile rbd' osd "profile rbd pool=$POOL" -o "$CLIENT_KEYRING"
log "client.$CLIENT created (keyring $CLIENT_KEYRING)"

if [ "$WITH_MGR" = 1 ]; then
  for _ in $(seq 1 240); do c mgr stat 2>/dev/null | grep -q '"available": true' && break; sleep 0.5; done
  c mgr stat 2>/dev/null | grep -q '"available": true' || log "WARNING: mgr not available yet"
fi
log "health: $(c health 2>&1 | head -1)"

# ------------------------------------------------------------------------------------------ output
# Written last: the env file's existence means "cluster was ready".
cat >"$DIR/env.tmp" <<EOF
export BLOCKSHIP_CEPH_DIR=$DIR
export BLOCKSHIP_CEPH_AUTH=$AUTH
export BLOCKSHIP_CEPH_POOL=$POOL
export BLOCKSHIP_CEPH_ID=$CLIENT
export BLOCKSHIP_CEPH_KEYRING=$CLIENT_KEYRING
export BLOCKSHIP_CEPH_ADMIN_KEYRING=$ADMIN_KEYRING
export CEPH_CONF=$CONF
EOF
mv "$DIR/env.tmp" "$DIR/env"
log "ready in $(elapsed)s — env: $DIR/env, logs: $DIR/log"
cat "$DIR/env"
