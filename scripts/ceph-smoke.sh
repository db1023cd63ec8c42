#!/usr/bin/env bash
# ceph-smoke.sh — quick check (a few seconds) that the cluster from scripts/ceph-up.sh serves RBD:
# create, write (rbd bench), snapshot, export, sha256 comparison, image metadata, remove.
# Exit 0 = all good.
#
# Uses CEPH_CONF from the environment; if unset, sources BLOCKSHIP_CEPH_DIR/env (default
# /tmp/blockship-ceph/env). If BLOCKSHIP_CEPH_ID is set (ceph-up.sh's env sets it), runs as that
# restricted client, so the smoke test also proves its caps are sufficient for Blockship's work.
set -euo pipefail

if [ -z "${CEPH_CONF:-}" ]; then
  envf=${BLOCKSHIP_CEPH_DIR:-${CEPH_DIR:-/tmp/blockship-ceph}}/env
  [ -r "$envf" ] || { echo "[smoke] CEPH_CONF not set and $envf missing: run scripts/ceph-up.sh" >&2; exit 1; }
  # shellcheck disable=SC1090
  . "$envf"
fi
POOL=${BLOCKSHIP_CEPH_POOL:-rbd}
AUTHARGS=()
[ -n "${BLOCKSHIP_CEPH_ID:-}" ] && AUTHARGS+=(--id "$BLOCKSHIP_CEPH_ID")
[ -n "${BLOCKSHIP_CEPH_KEYRING:-}" ] && AUTHARGS+=(--keyring "$BLOCKSHIP_CEPH_KEYRING")

say() { echo "[smoke] $*" >&2; }
fail() { say "FAIL: $*"; exit 1; }
# Bounded retries against the mon, then a hard timeout: a dead cluster must fail the smoke test,
# not hang it.
r() { timeout 120 rbd -c "$CEPH_CONF" "${AUTHARGS[@]}" --client-mount-timeout 15 "$@"; }

IMG=$POOL/smoke-$$   # per-run name: concurrent runs must not trample each other
W=$(mktemp -d /tmp/blockship-ceph-smoke.XXXXXX)
DONE=0
cleanup() {
  rm -rf "$W"
  [ "$DONE" = 1 ] && return 0
  r snap purge --no-progress "$IMG" >/dev/null 2>&1 || true
  r rm --no-progress "$IMG" >/dev/null 2>&1 || true
  r rm --no-progress "$IMG-imp" >/dev/null 2>&1 || true
}
trap cleanup EXIT
T0=$SECONDS

say "conf $CEPH_CONF, client ${BLOCKSHIP_CEPH_ID:-admin}, image $IMG"
r create --size 64M "$IMG"
r bench --io-type write --io-size 64K --io-pattern rand --io-total 8M "$IMG" >/dev/null \
  || fail "rbd bench write"
r snap create --no-progress "$IMG@s1"
r snap ls "$IMG" | grep -qw s1 || fail "snapshot s1 not listed"

# Snapshot and head must be identical until the head is written again...
r export --no-progress "$IMG@s1" "$W/s1.img" >/dev/null 2>&1
snap_sum=$(sha256sum <"$W/s1.img" | cut -d' ' -f1)
head_sum=$(r export --no-progress "$IMG" - 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$snap_sum" = "$head_sum" ] || fail "head != snapshot right after snap create"
# ...and the snapshot must be immune to later writes, which must show up in the head.
r bench --io-type write --io-size 64K --io-pattern rand --io-total 1M "$IMG" >/dev/null
[ "$(r export --no-progress "$IMG@s1" - 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$snap_sum" ] \
  || fail "snapshot content changed after writing to the head"

# Byte-exact round trip of known data (bench data alone could be all zeros and still "match").
head -c 4M /dev/urandom >"$W/rand"
r import --no-progress "$W/rand" "$IMG-imp" >/dev/null 2>&1 || fail "rbd import"
imp_sum=$(r export --no-progress "$IMG-imp" - 2>/dev/null | sha256sum | cut -d' ' -f1)
r rm --no-progress "$IMG-imp" >/dev/null 2>&1
[ "$imp_sum" = "$(sha256sum <"$W/rand" | cut -d' ' -f1)" ] || fail "import/export round trip mismatch"

# Image metadata (Blockship may keep replication state there).
r image-meta set "$IMG" blockship.smoke ok
[ "$(r image-meta get "$IMG" blockship.smoke)" = ok ] || fail "image-meta get"
r image-meta list "$IMG" | grep -q blockship.smoke || fail "image-meta list"

r snap purge --no-progress "$IMG"
r rm --no-progress "$IMG"
r ls "$POOL" | grep -qx "${IMG#*/}" && fail "image still listed after rm"
DONE=1
say "ALL OK in $((SECONDS - T0)) s (snapshot sha256 $snap_sum)"
