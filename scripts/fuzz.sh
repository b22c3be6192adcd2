#!/usr/bin/env bash
# Fuzz the wire decoders: each cargo-fuzz target in wire/fuzz runs for a bounded time.
#
#   scripts/fuzz.sh [SECONDS]    seconds per target (default 60)
#
# Installs cargo-fuzz if missing. cargo-fuzz passes nightly-only flags (-Zsanitizer=address);
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. Seeds (valid frames of every type)
# are regenerated from the schema's strategies into wire/fuzz/corpus/<target>/, which also
# keeps what libFuzzer finds between runs (gitignored). A crash leaves its input in
# wire/fuzz/artifacts/<target>/ and fails the script; reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir wire/fuzz <target> <file>
set -euo pipefail

seconds="${1:-60}"
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -gt 0 ]] || {
  echo "usage: $0 [SECONDS]" >&2
  exit 2
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fuzz_dir="wire/fuzz"
targets=(frame_decode frame_view decode_prefixed)

export RUSTC_BOOTSTRAP=1
# cargo-fuzz finds its binaries under the fuzz crate's own target dir.
unset CARGO_TARGET_DIR

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

echo "fuzz: writing seed frames into $fuzz_dir/corpus/" >&2
RINGPOST_FUZZ_SEEDS="$root/$fuzz_dir/corpus" \
  CARGO_TARGET_DIR="${HOME}/.cache/ringpost-target-wire" \
  cargo test --quiet -p ringpost-wire --test integration -- --ignored wire_fuzz_seeds:: >/dev/null

for target in "${targets[@]}"; do
  echo "fuzz: $target for ${seconds}s" >&2
  # -max_len: a whole frame plus its prefix and a chunk byte; -rss_limit_mb well above what a
  # 128 KiB frame justifies, so a leak or blow-up shows.
  cargo fuzz run --fuzz-dir "$fuzz_dir" "$target" "$fuzz_dir/corpus/$target" -- \
    -max_total_time="$seconds" -max_len=131077 -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1
done
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each without a finding"
