#!/usr/bin/env bash
# The relay benchmarks. Figures only, no pass/fail on timing; results and their context
# are recorded in BENCHMARKS.md. Builds the release relay first.
#
#   scripts/bench.sh [proxy]   tests/bench/proxy.rs: HTTP proxying through a v1 tunnel
#                              (an in-process v1 host) against direct, and the relay's
#                              RSS per idle tunnel.
#   scripts/bench.sh tunnels   tests/bench/tunnels.rs: direct, rathole, relay + `relay
#                              agent` (v1) and `relay agent --protocol h2` side by side,
#                              interleaved: request rate, CPU per request, bulk, SSE,
#                              idle memory. Installs what it needs when missing: wrk
#                              (apt-get, needs root or sudo) and rathole (cargo install
#                              into <target>/bench-tools).
#   scripts/bench.sh attacks   tests/bench/attacks.rs: each attack of issue 11 against a
#                              fresh relay at its default limits: peak RSS, what the
#                              relay did, and whether another tenant was served meanwhile.
#                              BENCH_ATTACKS=name,name picks some.
#
# Knobs (environment) of proxy: BENCH_SECS (measured seconds per 64-client run, default
# 10), BENCH_WARMUP_SECS, BENCH_CLIENTS (64), BENCH_TUNNELS (1000,5000),
# BENCH_SETTLE_SECS, BENCH_ONLY (proxy|rss). Quick smoke run:
# BENCH_SECS=3 BENCH_TUNNELS=200 scripts/bench.sh
#
# Knobs of tunnels (all listed in tests/bench/tunnels.rs): BENCH_SECS, BENCH_SETS (6),
# BENCH_ONLY (small,bulk,sse,idle,loadgen), BENCH_PATHS (direct,rathole,v1,h2),
# BENCH_LOADGEN (wrk|builtin), BENCH_DOWN_BYTES / BENCH_UP_BYTES (1G),
# BENCH_MEDIUM_BYTES (8M), BENCH_SSE_*, BENCH_TUNNELS. Quick smoke run:
# BENCH_SECS=2 BENCH_SETS=2 BENCH_TUNNELS=200 BENCH_DOWN_BYTES=256M BENCH_UP_BYTES=256M scripts/bench.sh tunnels
set -euo pipefail
cd "$(dirname "$0")/.."

bench="${1:-proxy}"
case "$bench" in
  proxy | tunnels | attacks) ;;
  *)
    echo "usage: scripts/bench.sh [proxy|tunnels|attacks]" >&2
    exit 64
    ;;
esac

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/bench.sh: cargo not found; install Rust with rustup first" >&2
  exit 1
fi

# wrk is the tunnel bench's load generator (it costs less CPU per request than the
# built-in one, which matters on a machine whose cores the tunnels share).
install_wrk() {
  command -v wrk >/dev/null 2>&1 && return 0
  [ -n "${WRK_BIN:-}" ] && return 0
  [ "${BENCH_LOADGEN:-wrk}" = builtin ] && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "scripts/bench.sh: wrk is missing and installing it needs root or sudo;" \
        "install wrk, or run with BENCH_LOADGEN=builtin" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/bench.sh: wrk is missing and apt-get is not here; install wrk," \
      "or run with BENCH_LOADGEN=builtin" >&2
    exit 1
  fi
  echo "scripts/bench.sh: installing wrk" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq wrk >/dev/null
}

# rathole 0.5.0, the tunnel the relay is compared with, built into the target directory
# (never into the tests). Not --locked: its lock file pins time 0.3.29, which no longer
# compiles with current rustc (E0282 in time's format_description). Its default features
# need OpenSSL headers (libssl-dev, pkg-config) for the TLS transports; without them it is
# built with only what the bench uses, the plain TCP transport.
install_rathole() {
  [ -n "${RATHOLE_BIN:-}" ] && return 0
  case ",${BENCH_PATHS:-rathole}," in
    *,rathole,*) ;;
    *) return 0 ;;
  esac
  local tools="${CARGO_TARGET_DIR:-target}/bench-tools"
  mkdir -p "$tools"
  tools="$(cd "$tools" && pwd)"
  if [ ! -x "$tools/bin/rathole" ]; then
    echo "scripts/bench.sh: installing rathole into $tools" >&2
    if ! cargo install rathole --version 0.5.0 --root "$tools"; then
      echo "scripts/bench.sh: rathole with its default features did not build;" \
        "trying the TCP transport alone (--no-default-features --features server,client)" >&2
      cargo install rathole --version 0.5.0 --root "$tools" \
        --no-default-features --features server,client
    fi
  fi
  export RATHOLE_BIN="$tools/bin/rathole"
}

if [ "$bench" = tunnels ]; then
  install_wrk
  install_rathole
fi
cargo build --release -p relay
cargo bench -p relay-tests --bench "$bench"
