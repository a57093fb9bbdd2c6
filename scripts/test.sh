#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, formatting, lints (Rust and shell), then
# every unit, doc and end-to-end test. End-to-end tests start the `relay` binary as a
# child process, so it is built first.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/test.sh: cargo not found; install Rust with rustup first" >&2
  exit 1
fi
scripts/setup.sh

shellcheck scripts/*.sh .ci/run
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace
