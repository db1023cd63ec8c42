#!/usr/bin/env bash
# Blockship's whole test suite on a Debian 12 machine: installs what the tests need, checks
# formatting and lints, starts a throw-away Ceph cluster on 127.0.0.1 (cephx, a restricted
# client), runs every unit and integration test (real sink and agent processes, real QUIC with
# mutual TLS on loopback, real librbd), and stops whatever it started, also on failure.
# `.ci/run` calls exactly this. BLOCKSHIP_CEPH_DIR moves the cluster (default /tmp/blockship-ceph).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

step "dependencies"
bash scripts/deps.sh test

step "cargo fmt --check"
cargo fmt --all -- --check

# The sink's crash points and both sides' corruption points (failpoints) are compiled into the
# test build only; release builds (demo, bench, production) never have them.
FEATURES="--features blockship-sink/failpoints,blockship-agent/failpoints"

step "cargo clippy --all-targets -D warnings"
cargo clippy --release --workspace --all-targets --quiet $FEATURES -- -D warnings
# Without the test-only features only the agent's and the sink's libraries and binaries differ.
cargo clippy --release -p blockship-agent -p blockship-sink --lib --bins --quiet -- -D warnings

step "throw-away Ceph cluster (cephx)"
export BLOCKSHIP_CEPH_AUTH=cephx
trap 'bash scripts/ceph-down.sh >/dev/null 2>&1 || true' EXIT
eval "$(bash scripts/ceph-up.sh)"
export BLOCKSHIP_REQUIRE_CEPH=1
# QEMU and NBD tools come from deps.sh: their tests must run, not skip. So must io_uring and
# O_DIRECT: the tests' files live under /var/tmp (disk-backed, where /tmp may be a tmpfs; and a
# short path, for the Unix sockets of the NBD tests).
export BLOCKSHIP_REQUIRE_NBD=1 BLOCKSHIP_REQUIRE_IO_URING=1 BLOCKSHIP_REQUIRE_DIRECT_IO=1
# CI runs as root: the disk-full tests mount a small tmpfs.
export BLOCKSHIP_REQUIRE_ROOT=1
# The test build has the failpoints: the corruption tests must run, not skip.
export BLOCKSHIP_REQUIRE_FAILPOINTS=1
TMPDIR=$(mktemp -d /var/tmp/blockship-test.XXXXXX)
export TMPDIR
trap 'rm -rf "$TMPDIR"; bash scripts/ceph-down.sh >/dev/null 2>&1 || true' EXIT
bash scripts/ceph-smoke.sh >/dev/null

step "cargo test (release build, plus the sink's test-only failpoints)"
cargo test --release --workspace $FEATURES --no-fail-fast --quiet -- --test-threads=2

step "benchmark smoke test (blockship-bench all --quick; no thresholds)"
# A smoke test checks that every scenario runs and copies byte for byte; it sets no thresholds,
# so it reuses the test build (failpoints compiled in but never configured) instead of spending
# minutes on a second release build. Measured runs (`blockship-bench all`) build without them.
# (--all-targets: the same feature set as `cargo test`, dev-dependencies included, so nothing
# is rebuilt; a plain build would rebuild tokio and all above it without its test features.)
cargo build --release --workspace --all-targets $FEATURES --quiet
target/release/blockship-bench all --quick --no-build --out target/bench-quick >/dev/null
# Every scenario ran (CI has root for the wan namespaces and the Ceph cluster for rbd).
for s in lan wan rbd incremental memory compression continuous cutover; do
  grep -q "^## $s " target/bench-quick/results.md || { echo "bench: scenario $s missing" >&2; exit 1; }
done
if grep -q '^Skipped:' target/bench-quick/results.md; then
  grep -B2 '^Skipped:' target/bench-quick/results.md >&2; exit 1
fi

step "crash loop (blockship-bench chaos: 10 kills, seed 1)"
# The sink and the agent SIGKILLed at seeded moments while a live writer runs; every committed
# group epoch must be one consistent cut of the writer's log (`chaos --kills 100` for the full run).
target/release/blockship-bench --no-build --work "$TMPDIR/chaos" chaos --kills 10 --seed 1

step "fuzz the protocol targets (30 s each, from the committed seeds)"
# The agent-side targets need a ~15-minute instrumented build: `scripts/fuzz.sh all` runs them.
bash scripts/fuzz.sh protocol 30

step "done in $(( $(date +%s) - start ))s"
