#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, formatting, lints (Rust and shell), then
# every unit, doc and end-to-end test. End-to-end tests start the `relay` binary as a
# child process; each test process brings it up to date with the same `cargo build` before
# running it (tests/support/cargo_build.rs), which this build makes a no-op while showing
# compile errors here first.
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
# The binary as the tests build it (tests/support/cargo_build.rs): `--examples` (the relay
# has none) resolves features as `cargo test --workspace` does, so both share one build of
# every dependency.
cargo build -p relay --bin relay --examples
cargo test --workspace
