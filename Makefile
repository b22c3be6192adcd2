# Ringpost: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
DATA_DIR ?= ./data

.PHONY: run cluster test deps gen check-gen check-rules check-deploy fmt lint fuzz chaos clean

# Lints run while the workspace's own crates compile: clippy-driver wraps rustc for them (cargo
# compiles the dependencies with plain rustc, as always), so `make test` compiles each crate
# once, lints and code together, instead of a separate `cargo clippy` pass that checked every
# dependency again (a cold make test: 29 min 10 s without that pass, 35 min 0 s with it).
# CLIPPY_ARGS is how `cargo clippy -- -D warnings` hands `-D warnings` to the driver; it is not
# a documented interface, so scripts/check-lint-wrapper.sh fails make test if lints stop being
# denied this way. `make run`, `check-deploy`, `cluster` and `chaos` build with the same
# settings, so they share make test's build; `make lint` is plain `cargo clippy`, quicker after
# an edit.
LINTED = RUSTC_WORKSPACE_WRAPPER="$$(command -v clippy-driver)" CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__

## make run: build, then start a dev node (embedded coordinator, local data dir) in the foreground.
## Builds the workspace's binaries as `make test` does (same features, same lint settings), so
## after a `make test` nothing is compiled again, then runs the built binary.
run: deps
	$(LINTED) $(CARGO) build --workspace --bins
	$${CARGO_TARGET_DIR:-target}/debug/ringpost-node dev --data-dir $(DATA_DIR)

## make cluster: 3 coordinators and 3 nodes on loopback (data in ./data/cluster); prints addresses, Ctrl-C stops it.
cluster: deps
	$(LINTED) scripts/cluster.sh

## make test: every check CI runs: generated code, formatting, lints, the alert rules, the deployment checks, all tests,
## and that the binaries' build and the tests' build share their compiled crates.
test: deps check-gen check-rules
	$(CARGO) fmt --all --check
	$(LINTED) scripts/check-lint-wrapper.sh
	$(LINTED) $(CARGO) build --workspace --all-targets
	scripts/deploy-check.sh
	$(LINTED) $(CARGO) nextest run --workspace --no-fail-fast
	$(LINTED) $(CARGO) test --workspace --doc
	$(LINTED) scripts/check-shared-build.sh

deps:
	@scripts/deps.sh

## make check-deploy: the offline checks of deploy/ and terraform/ (Terraform tests, systemd units,
## the rendered configs through the real binaries, nft, checkov when installed).
check-deploy: deps
	$(LINTED) $(CARGO) build --workspace --bins
	scripts/deploy-check.sh

## make gen: regenerate wire/src/generated.rs from wire/schema/*.fbs with the pinned flatc.
gen:
	scripts/gen-wire.sh

check-gen:
	scripts/gen-wire.sh --check

## make check-rules: promtool checks and unit tests of deploy/prometheus, and the Grafana
## dashboard's queries parsed as PromQL (offline; needs promtool, which `make deps` installs).
check-rules: deps
	scripts/check-rules.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## make fuzz: run each wire decoder fuzz target for a bounded time (FUZZ_SECONDS each).
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

## make chaos: every chaos scenario against a real node (root for the network faults); prints a table.
CHAOS_SEED ?= 1
chaos: deps
	$(LINTED) $(CARGO) build -p ringpost-node -p ringpost-coordinator -p ringpost-chaos
	$(LINTED) $(CARGO) run -q -p ringpost-chaos --bin ringpost-chaos -- run all --seed $(CHAOS_SEED) --json $${CARGO_TARGET_DIR:-target}/chaos-report.json

clean:
	$(CARGO) clean
