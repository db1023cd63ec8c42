#!/usr/bin/env bash
# ceph-down.sh — stop the test cluster started by scripts/ceph-up.sh and delete its directory.
#
# Usage: scripts/ceph-down.sh [--keep]     --keep: stop the daemons but keep the directory (logs, data)
#
# Only processes that are BOTH named in DIR/run/*.pid AND carry DIR/ceph.conf on their command line
# are signalled: PIDs get reused, and other Ceph clusters (another engineer's, another test's DIR) may
# be running on the same host. Nothing is killed by name.
# Same directory knob as ceph-up.sh: BLOCKSHIP_CEPH_DIR, else CEPH_DIR, else /tmp/blockship-ceph.
set -euo pipefail

DIR=${BLOCKSHIP_CEPH_DIR:-${CEPH_DIR:-/tmp/blockship-ceph}}
CONF=$DIR/ceph.conf
KEEP=0
case ${1:-} in
  --keep) KEEP=1 ;;
  "") ;;
  *) echo "usage: $0 [--keep]" >&2; exit 2 ;;
esac

ours() { # is PID $1 alive and started with our conf?
  [ -r "/proc/$1/cmdline" ] && tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF -- "$CONF"
}

stop_pidfile() {
  local pf=$1 pid name
  [ -e "$pf" ] || return 0
  name=$(basename "$pf" .pid)
  pid=$(cat "$pf" 2>/dev/null || true)
  if [ -n "$pid" ] && ours "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    # A bluestore OSD needs a moment to umount cleanly; don't go straight for KILL.
    for _ in $(seq 1 60); do ours "$pid" || break; sleep 0.25; done
    if ours "$pid"; then
      echo "$name (pid $pid) ignored TERM for 15 s, sending KILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do ours "$pid" || break; sleep 0.1; done
    fi
    if ours "$pid"; then
      echo "$name (pid $pid) is still alive after KILL" >&2
      SURVIVORS=1
      return 0
    fi
    echo "stopped $name (pid $pid)" >&2
  fi
  rm -f "$pf"
}
SURVIVORS=0

if [ -d "$DIR/run" ]; then
  # OSDs first (they report themselves down to the mon), then mgr, then mon.
  for pf in "$DIR"/run/ceph-osd.*.pid; do stop_pidfile "$pf"; done
  for pf in "$DIR"/run/ceph-mgr.*.pid; do stop_pidfile "$pf"; done
  for pf in "$DIR"/run/ceph-mon.*.pid; do stop_pidfile "$pf"; done
fi

# Deleting the data under a still-running daemon would leave it failing in odd ways: keep everything.
[ "$SURVIVORS" = 0 ] || { echo "not removing $DIR: some daemons are still alive" >&2; exit 1; }

if [ "$KEEP" = 0 ] && [ -e "$DIR" ]; then
  # DIR may come from the environment: only delete what ceph-up.sh created.
  if [ -e "$DIR/.blockship-ceph" ]; then
    rm -rf "$DIR"
    echo "removed $DIR" >&2
  else
    echo "not removing $DIR: no .blockship-ceph marker (not created by ceph-up.sh)" >&2
    exit 1
  fi
fi
