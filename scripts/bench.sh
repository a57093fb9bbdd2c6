#!/usr/bin/env bash
# The relay benchmark: builds the release relay, then runs tests/bench/proxy.rs, which
# starts it as a child process and measures HTTP proxying through a v1 tunnel against
# direct, and the relay's RSS per idle tunnel. Figures only, no pass/fail on timing;
# results and their context are recorded in BENCHMARKS.md.
#
# Knobs (environment): BENCH_SECS (measured seconds per 64-client run, default 10),
# BENCH_WARMUP_SECS, BENCH_CLIENTS (64), BENCH_TUNNELS (1000,5000), BENCH_SETTLE_SECS,
# BENCH_ONLY (proxy|rss). Quick smoke run: BENCH_SECS=3 BENCH_TUNNELS=200 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/bench.sh: cargo not found; install Rust with rustup first" >&2
  exit 1
fi

cargo build --release -p relay
cargo bench -p relay-tests --bench proxy
