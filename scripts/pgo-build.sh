#!/usr/bin/env bash
# The fastest `relay` binary: a release build optimized with a profile of its own tunnel
# work (profile-guided optimization). Three steps: build an instrumented binary, run the
# training below through it (a relay with an h2 and a v1 `relay agent` in front of a small
# upstream: small GETs at 64 and 1 connections, 64 MiB downloads and uploads), then build
# again with the profile it wrote. The result is target/pgo/optimized/release/relay.
# BENCHMARKS.md (tunnel comparison, run 13) has what it gains over the plain release build
# and what it costs; the plain `cargo build --release` stays the default build. What the
# training does not run (WebSocket channels, gRPC, TLS, Redis) is optimized as cold code.
#
#   scripts/pgo-build.sh                  instrument, train, build (two release builds)
#   scripts/pgo-build.sh --train <relay>  only the training, through the given binary
#
# Knobs: PGO_SECS (5: each small-request load), PGO_BULK_MIB (64: each transfer),
# PGO_DIR (target/pgo). Needs rustup's llvm-tools (added when missing), python3 (the
# upstream), wrk and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${PGO_SECS:-5}"
bulk_mib="${PGO_BULK_MIB:-64}"
dir="${PGO_DIR:-$PWD/target/pgo}"
# shellcheck source=scripts/lib-local-relay.sh
source scripts/lib-local-relay.sh

need() {
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "scripts/pgo-build.sh: $tool not found (apt-get install python3 wrk curl)" >&2
      exit 1
    fi
  done
}

# Loads `$2` with wrk over `$3` connections for PGO_SECS; fails on any non-2xx answer or
# socket error. `$1` names the step in the output.
load() {
  local label="$1" url="$2" connections="$3" out
  out="$(wrk -t1 -c"$connections" -d"${secs}s" -H "Authorization: Bearer $client_token" "$url")"
  if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then
    echo "scripts/pgo-build.sh: $label: failed requests:" >&2
    echo "$out" >&2
    exit 1
  fi
  echo "$label: $(awk '/requests in/ {print $1}' <<<"$out") requests"
}

pids=()
work=""
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$work" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

# Runs the training workload through the binary `$1`. The processes end with SIGTERM (the
# relay drains, the agents stop), so an instrumented binary writes its profile on exit.
train() {
  local relay="$1" port upstream_port relay_pid agent_pids=()
  need python3 wrk curl
  work="$(mktemp -d)"

  upstream_port="$(free_port)"
  start_upstream "$upstream_port" "$work"
  pids+=($!)

  export RELAY_JWT_SECRET
  RELAY_JWT_SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
  local host_token
  host_token="$("$relay" token --role host --host '*')"
  client_token="$("$relay" token --role client --host '*')"

  port="$(free_port)"
  RUST_LOG=info "$relay" serve --bind 127.0.0.1 --port "$port" --machine-id pgo \
    >"$work/relay.log" 2>&1 &
  relay_pid=$!
  pids+=("$relay_pid")
  wait_for_log "$work/relay.log" "listening"
  for protocol in h2 v1; do
    RUST_LOG=info "$relay" agent --relay "ws://127.0.0.1:$port" --host-id "pgo-$protocol" \
      --to "http://127.0.0.1:$upstream_port" --protocol "$protocol" --token "$host_token" \
      >"$work/agent-$protocol.log" 2>&1 &
    agent_pids+=($!)
    pids+=($!)
    wait_for_log "$work/agent-$protocol.log" "registered"
  done

  for protocol in h2 v1; do
    local url="http://127.0.0.1:$port/hosts/pgo-$protocol/small"
    load "$protocol, 64 connections" "$url" 64
    load "$protocol, 1 connection" "$url" 1
  done
  # v1 refuses bodies over 10 MiB: the bulk part is h2's.
  head -c "$((bulk_mib * 1024 * 1024))" /dev/zero >"$work/upload"
  local base="http://127.0.0.1:$port/hosts/pgo-h2" auth="Authorization: Bearer $client_token"
  for _ in 1 2; do
    curl -sS --fail -o /dev/null -w 'h2 download: %{size_download} bytes\n' -H "$auth" \
      "$base/bulk/$((bulk_mib * 16))"
    curl -sS --fail -o /dev/null -w 'h2 upload: %{size_upload} bytes\n' -H "$auth" \
      --data-binary @"$work/upload" "$base/sink"
  done

  kill -TERM "${agent_pids[@]}"
  wait "${agent_pids[@]}" 2>/dev/null || true
  kill -TERM "$relay_pid"
  wait "$relay_pid" 2>/dev/null || true
  echo "training done"
}

if [ "${1:-}" = "--train" ]; then
  if [ -z "${2:-}" ] || [ ! -x "$2" ]; then
    echo "usage: scripts/pgo-build.sh [--train <relay binary>]" >&2
    exit 2
  fi
  train "$(realpath "$2")"
  exit 0
elif [ -n "${1:-}" ]; then
  echo "usage: scripts/pgo-build.sh [--train <relay binary>]" >&2
  exit 2
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/pgo-build.sh: cargo not found; install Rust with rustup first" >&2
  exit 1
fi
need python3 wrk curl
sysroot="$(rustc --print sysroot)"
profdata="$(find "$sysroot/lib/rustlib" -name llvm-profdata -type f 2>/dev/null | head -n 1)"
if [ -z "$profdata" ]; then
  rustup component add llvm-tools
  profdata="$(find "$sysroot/lib/rustlib" -name llvm-profdata -type f | head -n 1)"
fi

raw="$dir/raw"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$raw" \
  cargo build --release --locked -p relay --bin relay --target-dir "$dir/instrumented"
# Build scripts ran instrumented too: only the training's profile counts.
rm -rf "$raw"
train "$dir/instrumented/release/relay"
if ! compgen -G "$raw/*.profraw" >/dev/null; then
  echo "scripts/pgo-build.sh: the training wrote no profile into $raw" >&2
  exit 1
fi
"$profdata" merge -o "$dir/relay.profdata" "$raw"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$dir/relay.profdata" \
  cargo build --release --locked -p relay --bin relay --target-dir "$dir/optimized"
echo "optimized binary: $dir/optimized/release/relay"
