#!/usr/bin/env bash
# The standard runs behind BENCHMARKS.md: release builds, one dev node per run started by the
# bench (--spawn-node), registrations reused across runs through one data dir and one accounts
# file. Results (JSON and SVG charts) go to bench/results/. Every run is bounded in time and
# stops everything it starts.
#
#   bench/standard-runs.sh            # all runs
#   bench/standard-runs.sh idle chat  # some of them (idle, chat, drain, storm, compare, quic100k)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ringpost-target}"
cargo build --release -p ringpost-node -p ringpost-bench
BENCH="$CARGO_TARGET_DIR/release/ringpost-bench"
NODE="$CARGO_TARGET_DIR/release/ringpost-node"
OUT=bench/results
DATA="${BENCH_DATA_DIR:-/tmp/ringpost-bench-data}"
mkdir -p "$OUT" "$DATA"
common=(--spawn-node "$NODE" --data-dir "$DATA" --accounts "$DATA/accounts.txt" --quiet)
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(idle chat drain storm compare)
want() { local r; for r in "${runs[@]}"; do [ "$r" = "$1" ] && return 0; done; return 1; }

if want idle; then
  for t in ws wss quic; do
    timeout 900 "$BENCH" idle "${common[@]}" --transport "$t" --connections 10000 \
      --json "$OUT/idle-$t-10k.json" --chart "$OUT/idle-$t-10k.svg"
  done
  timeout 900 "$BENCH" idle "${common[@]}" --transport ws --connections 19000 --json "$OUT/idle-ws-19k.json"
fi
if want chat; then
  timeout 300 "$BENCH" chat "${common[@]}" --transport ws --pairs 100 --window 16 \
    --json "$OUT/chat-ws-saturate.json" --chart "$OUT/chat-ws-saturate.svg"
  for t in ws wss quic; do
    timeout 300 "$BENCH" chat "${common[@]}" --transport "$t" --pairs 1000 --rate 20000 \
      --json "$OUT/chat-$t-20k.json" --chart "$OUT/chat-$t-20k.svg"
  done
  # Below saturation, for a latency figure that is not a queue.
  timeout 300 "$BENCH" chat "${common[@]}" --transport ws --pairs 1000 --rate 5000 \
    --json "$OUT/chat-ws-5k.json" --chart "$OUT/chat-ws-5k.svg"
fi
if want drain; then
  timeout 600 "$BENCH" offline-drain "${common[@]}" --transport ws --devices 100 --messages 100000 \
    --json "$OUT/drain-ws-100k.json" --chart "$OUT/drain-ws-100k.svg"
fi
if want storm; then
  timeout 900 "$BENCH" reconnect-storm "${common[@]}" --transport ws --connections 10000 \
    --json "$OUT/storm-ws-10k.json" --chart "$OUT/storm-ws-10k.svg"
fi
if want quic100k; then
  timeout 1800 "$BENCH" reconnect-storm "${common[@]}" --transport quic --connections 100000 \
    --json "$OUT/storm-quic-100k.json" --chart "$OUT/storm-quic-100k.svg"
fi
if want compare; then
  timeout 1200 "$BENCH" compare --spawn-node "$NODE" --data-dir "$DATA" --accounts "$DATA/accounts.txt" --quiet \
    --connections 10000 --pairs 100 --rate 20000 --json "$OUT/compare.json"
fi
