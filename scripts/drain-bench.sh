#!/usr/bin/env bash
# The graceful-drain benchmark: builds the release relay, then runs tests/bench/drain.rs.
# Relay A holds 1,000 / 5,000 / 10,000 v1 tunnels (lightweight clients in worker
# processes of the bench), gets SIGTERM, and its hosts move to relays B and C (all three
# share one redis-server): A's drain step timings, the re-home time per host, the 429s of
# B's and C's admission control, and the directory at the end. Then the registration
# rate of one relay with Redis (5,000 hosts connecting at once). Figures only, no
# pass/fail on timing.
#
# Needs redis-server on PATH. Knobs (environment): DRAIN_BENCH_SIZES (1000,5000,10000),
# DRAIN_BENCH_KEEP_OLD (largest size; 0 skips the run whose hosts keep their old tunnel
# until the relay closes it), DRAIN_BENCH_REGISTER (5000; 0 skips),
# DRAIN_BENCH_WINDOW (256), DRAIN_BENCH_KEEP_LOGS, RELAY_BIN.
# Quick smoke run: DRAIN_BENCH_SIZES=200 DRAIN_BENCH_REGISTER=500 scripts/drain-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/drain-bench.sh: cargo not found; install Rust with rustup first" >&2
  exit 1
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "scripts/drain-bench.sh: redis-server not found (apt-get install redis-server)" >&2
  exit 1
fi

echo "machine: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release -p relay
cargo bench -p relay-tests --bench drain
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
