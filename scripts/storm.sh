#!/usr/bin/env bash
# The reconnect-storm benchmark: builds the release relay, then runs tests/bench/storm.rs,
# which starts 200 `relay agent` processes against one relay, kills the relay, holds its
# port for 10 s with a listener that accepts and closes every connection (counting the
# attempts), restarts the relay on the same port and times how long until every agent
# is registered again. Figures only, no pass/fail on timing; results in BENCHMARKS.md.
#
# Knobs (environment): STORM_AGENTS (200), STORM_OUTAGE_SECS (10),
# STORM_AGENT_WORKERS (1), STORM_KEEP_LOGS, RELAY_BIN. Quick smoke run: STORM_AGENTS=20 STORM_OUTAGE_SECS=3 scripts/storm.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/storm.sh: cargo not found; install Rust with rustup first" >&2
  exit 1
fi

cargo build --release -p relay
cargo bench -p relay-tests --bench storm
