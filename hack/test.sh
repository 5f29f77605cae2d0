#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (`.ci/run` calls this file).
#
# It installs what the tests need on a fresh machine, then runs: formatting, clippy with
# warnings as errors, every Rust test (unit, integration, end-to-end on loopback) and an
# offline check of the example manifests, and the Helm chart rendered and validated.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
cargo --version
# A clean build of the workspace's test binaries needs a few GiB; say so up front rather than
# failing in the linker. CI builds once, so incremental caches would only cost disk.
df -h . | tail -1 | awk '{print "disk: " $4 " free on " $6}'
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL=0; fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest not found; installing it (locked)"
  cargo install cargo-nextest --locked
fi

step "PostgreSQL for the budget store tests (installed and started if not running)"
bash hack/ensure-postgres.sh

step "formatting (cargo fmt --check)"
cargo fmt --all -- --check

step "lints (cargo clippy --all-targets -- -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "examples validate offline (ringfence check)"
cargo run --quiet --locked -p ringfence -- check examples/incident

step "Python peers for the end-to-end tests (pinned, in e2e/.venv)"
bash hack/python-peers.sh

step "Helm chart: lint, render, validate (hack/chart-check.sh: helm + kubernetes-validate --strict)"
bash hack/chart-check.sh

# Last, so its summary line closes the output.
step "tests (cargo nextest run --workspace)"
cargo nextest run --workspace --locked --no-fail-fast
