#!/usr/bin/env bash
# Run the cargo-fuzz (libFuzzer) targets in fuzz/:
#   scripts/fuzz.sh TARGET [SECONDS]     one target (default 30 s)
#   scripts/fuzz.sh protocol [SECONDS]   frame_decoder, chunk_decode, session (what CI runs)
#   scripts/fuzz.sh all [SECONDS]        every target in turn
# Each run starts from the target's committed seeds (fuzz/seeds/TARGET) plus what earlier runs
# found (fuzz/corpus/TARGET, not committed). A crash stops the script with the reproducer in
# fuzz/artifacts/TARGET: turn it into a regression test, then fix it. The agent-side targets
# (nbd_client, vsphere_soap, disk_change_info, config_toml) need the fuzz crate's `agent`
# feature, an instrumented build of the agent and the sink (~15 min on 2 cores); the protocol
# targets build in a minute or two. cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP lets this
# stable toolchain take them. SANITIZER (default address) picks cargo-fuzz's --sanitizer.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
what=${1:?usage: scripts/fuzz.sh TARGET|protocol|all [SECONDS]}
secs=${2:-30}
export PATH="$HOME/.cargo/bin:$PATH" RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
protocol="frame_decoder chunk_decode session"
all=$(cargo fuzz list)
case "$what" in
  all) targets=$all ;;
  protocol) targets=$protocol ;;
  *)
    if ! grep -qx "$what" <<<"$all"; then
      echo "unknown fuzz target $what; there are: $(echo $all)" >&2
      exit 2
    fi
    targets=$what
    ;;
esac
flags=(--sanitizer "${SANITIZER:-address}")
for t in $targets; do
  if ! grep -qw "$t" <<<"$protocol"; then
    flags+=(--features agent)
    break
  fi
done
# One build for all the targets asked for, then the runs.
cargo fuzz build "${flags[@]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in $targets; do
  mkdir -p "corpus/$t" "seeds/$t"
  echo "== fuzz $t for ${secs}s"
  if ! cargo fuzz run "${flags[@]}" "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz $t failed; the reproducer is in fuzz/artifacts/$t" >&2
    exit 1
  fi
  grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
done
