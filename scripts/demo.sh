#!/usr/bin/env bash
# Blockship demo on one machine: build, create a lab PKI, start a sink with a file-target root,
# replicate a generated 1 GiB image (zeros, text-like and random regions) over QUIC with mutual
# TLS, change 100 scattered 4 KiB blocks, replicate again (compare mode: only what differs),
# then verify source and target chunk by chunk and byte for byte. Then the agent daemon keeps a
# two-disk "VM" (a group) replicated every 5 s while its disks change, and `status` shows it.
#
# Knobs: BLOCKSHIP_DEMO_DIR (default /tmp/blockship-demo), BLOCKSHIP_DEMO_SIZE (default 1GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${BLOCKSHIP_DEMO_DIR:-/tmp/blockship-demo}
SIZE=${BLOCKSHIP_DEMO_SIZE:-1GiB}

bash scripts/deps.sh build
echo "== building (release)"
cargo build --release --bins --quiet
B=$PWD/target/release

rm -rf "$DIR"
mkdir -p "$DIR/root" "$DIR/state"
echo "== lab PKI in $DIR/pki"
"$B/blockship-sink" pki init --dir "$DIR/pki" --agent demo-agent >/dev/null
echo "== generating a $SIZE mixed test image"
"$B/blockship-bench" gen-image --profile mixed --size "$SIZE" "$DIR/source.img"

echo "== starting the sink (file targets below $DIR/root)"
"$B/blockship-sink" serve --listen 127.0.0.1:0 --pki "$DIR/pki" --file-root "$DIR/root" \
  --state-dir "$DIR/state" --allow 'demo-agent=file:demo/*' >"$DIR/sink.out" 2>"$DIR/sink.log" &
SINK=$!
trap 'kill $SINK 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q '^listening on' "$DIR/sink.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(sed -n 's/^listening on //p' "$DIR/sink.out")
[ -n "$ADDR" ] || { cat "$DIR/sink.log"; echo "sink did not start" >&2; exit 1; }
CONN=(--sink "$ADDR" --pki "$DIR/pki" --name demo-agent)

echo "== epoch 1: full sync into file:demo/vm1"
"$B/blockship-agent" sync "${CONN[@]}" --source "$DIR/source.img" --target file:demo/vm1
echo "== changing 100 scattered 4 KiB blocks of the source"
python3 - "$DIR/source.img" <<'PY'
import os, random, sys
random.seed(7)
with open(sys.argv[1], "r+b") as f:
    size = os.fstat(f.fileno()).st_size
    for _ in range(100):
        f.seek(random.randrange(size // 4096) * 4096)
        f.write(os.urandom(4096))
PY
echo "== epoch 2: compare-mode sync (only chunks whose BLAKE3 differs are sent)"
"$B/blockship-agent" sync "${CONN[@]}" --source "$DIR/source.img" --target file:demo/vm1
echo "== verify (the sink hashes the target's data)"
"$B/blockship-agent" verify "${CONN[@]}" --source "$DIR/source.img" --target file:demo/vm1
cmp "$DIR/source.img" "$DIR/root/demo/vm1"
echo "== cmp: target is byte-identical to the source"
echo "== replication state kept by the sink:"
cat "$DIR"/state/targets/*/state.json
echo

echo "== continuous: the agent daemon keeps a two-disk VM (group vm2) replicated every 5 s"
for d in 0 1; do "$B/blockship-bench" gen-image --profile mixed --size 64MiB --seed $((d + 2)) "$DIR/vm2-disk$d.img" >/dev/null; done
cat >"$DIR/agent.toml" <<EOF
[agent]
sink = "$ADDR"
pki = "$DIR/pki"
name = "demo-agent"
[daemon]
control_socket = "$DIR/agent.sock"
[[group]]
name = "vm2"
kind = "file"
interval = "5s"
disks = [{ source = "$DIR/vm2-disk0.img", target = "file:demo/vm2-0" },
         { source = "$DIR/vm2-disk1.img", target = "file:demo/vm2-1" }]
EOF
"$B/blockship-agent" run --config "$DIR/agent.toml" >/dev/null 2>"$DIR/agent.log" &
AGENT=$!
trap 'kill $AGENT $SINK 2>/dev/null || true' EXIT
epoch() {
  "$B/blockship-agent" status --json --control-socket "$DIR/agent.sock" 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["committed_epoch"])' 2>/dev/null || echo 0
}
wait_epoch() {
  for _ in $(seq 1 120); do [ "$(epoch)" -ge "$1" ] && return 0; sleep 0.5; done
  cat "$DIR/agent.log"; echo "group vm2 did not reach epoch $1" >&2; exit 1
}
wait_epoch 1
echo "== the guest writes to both disks; the next cycles replicate it"
python3 - "$DIR/vm2-disk0.img" "$DIR/vm2-disk1.img" <<'PY'
import os, sys
for path in sys.argv[1:]:
    with open(path, "r+b") as f:
        f.seek(8 << 20)
        f.write(os.urandom(1 << 20))
PY
wait_epoch $(( $(epoch) + 2 ))
"$B/blockship-agent" status --control-socket "$DIR/agent.sock"
echo "== cutover of vm2: the machine stops writing (pre-freeze hook), a final cycle, the sink finalises"
python3 - "$DIR/vm2-disk1.img" <<'PY'
import os, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(20 << 20)
    f.write(os.urandom(4 << 20))
PY
"$B/blockship-agent" cutover --control-socket "$DIR/agent.sock" --group vm2 \
  --pre-freeze 'echo "stopping $BLOCKSHIP_GROUP ($BLOCKSHIP_DISK_COUNT disks)"' \
  --post-cutover 'echo "boot from $BLOCKSHIP_TARGETS"'
"$B/blockship-agent" status --control-socket "$DIR/agent.sock"
kill -TERM $AGENT && wait $AGENT
cmp "$DIR/vm2-disk0.img" "$DIR/root/demo/vm2-0" && cmp "$DIR/vm2-disk1.img" "$DIR/root/demo/vm2-1"
echo "== cmp: both disks of vm2 are byte-identical to their sources, cut over; the daemon exited 0 on SIGTERM"
