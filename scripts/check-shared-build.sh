#!/usr/bin/env bash
# Checks that the binaries' build and the tests' build share every compiled library.
#
# With the workspace's resolver, a dev-dependency that turns on a feature of a shared crate
# makes `cargo build --workspace --bins` (make run, make test's first build) and the test build
# resolve different features, so each compiles its own copy of that crate and of everything
# above it: the node's library among them. node/Cargo.toml turns those features on for the
# binaries too ("Feature unification only"). This script fails, naming the crates, when a change
# splits the two builds again. Run after both builds (make test runs it last), it compiles
# nothing and takes a few seconds.
#
#   scripts/check-shared-build.sh        # CARGO (default cargo) and CARGO_TARGET_DIR as usual
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo="${CARGO:-cargo}"
command -v jq >/dev/null || { echo "check-shared-build: needs jq (make deps installs it)" >&2; exit 2; }

libs='select(.reason == "compiler-artifact")
  | select(.target.kind | index("lib") or index("rlib") or index("proc-macro"))
  | "\(.package_id) [\(.features | join(","))] \(.filenames | map(select(endswith(".rlib") or endswith(".so"))) | join(" "))"'
work="$(mktemp -d "${TMPDIR:-/tmp}/ringpost-shared-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

"$cargo" build --workspace --bins --message-format=json 2>"$work/err" | jq -r "$libs" | sort -u >"$work/bins" \
  || { cat "$work/err" >&2; exit 1; }
"$cargo" test --workspace --no-run --message-format=json 2>>"$work/err" | jq -r "$libs" | sort -u >"$work/tests" \
  || { cat "$work/err" >&2; exit 1; }

split="$(comm -23 "$work/bins" "$work/tests")"
if [[ -n "$split" ]]; then
  echo "check-shared-build: the binaries' build compiled these libraries in a form the test build does not use:" >&2
  echo "$split" | sed 's/^/  /' >&2
  echo "Turn the features the test build has on in node/Cargo.toml (\"Feature unification only\")." >&2
  echo "Compare: cargo tree --workspace -e features -i CRATE" >&2
  exit 1
fi
echo "check-shared-build: the binaries' $(wc -l <"$work/bins") library units are all shared with the test build"
