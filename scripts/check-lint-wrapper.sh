#!/usr/bin/env bash
# Checks that the way `make test` runs clippy (clippy-driver as RUSTC_WORKSPACE_WRAPPER, with
# CLIPPY_ARGS carrying -D warnings; see the Makefile) still denies lints: it builds a scratch
# crate with one clippy warning in it through the same environment and expects the build to
# fail on that lint. CLIPPY_ARGS is how cargo-clippy talks to clippy-driver, not a documented
# interface; if a toolchain changed it, lints would quietly become warnings and make test would
# pass. Takes a second or two. Run by make test with the environment already set.
set -euo pipefail

[[ -n "${RUSTC_WORKSPACE_WRAPPER:-}" && -n "${CLIPPY_ARGS:-}" ]] || {
  echo "check-lint-wrapper: RUSTC_WORKSPACE_WRAPPER and CLIPPY_ARGS must be set (run it via make test)" >&2
  exit 2
}
work="$(mktemp -d "${TMPDIR:-/tmp}/ringpost-lint-wrapper.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
cat >"$work/Cargo.toml" <<'TOML'
[package]
name = "lint-canary"
version = "0.0.0"
edition = "2021"
publish = false

[workspace]
TOML
cat >"$work/src/main.rs" <<'RS'
fn main() {
    let v: Vec<u8> = std::env::args().map(|a| a.len() as u8).collect();
    println!("{}", v.len() == 0);
}
RS
if out="$(cd "$work" && CARGO_TARGET_DIR="$work/target" "${CARGO:-cargo}" build --quiet 2>&1)"; then
  echo "check-lint-wrapper: a crate with a clippy warning built cleanly: lints are not denied" >&2
  exit 1
fi
if ! grep -q "clippy::len.zero" <<<"$out"; then
  echo "check-lint-wrapper: the canary failed, but not on the clippy lint:" >&2
  echo "$out" >&2
  exit 1
fi
echo "check-lint-wrapper: clippy lints are denied in make test's builds"
