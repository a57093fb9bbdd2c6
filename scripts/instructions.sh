#!/usr/bin/env bash
# User-space instructions per request of the relay and of `relay agent`, counted by
# valgrind's callgrind: one process at a time runs under callgrind while wrk sends GETs
# of a 64-byte body over one keep-alive connection. Instruction counts do not depend on
# what else the machine is doing, so this resolves changes of a few percent that the
# timed tunnel bench (scripts/bench.sh tunnels) cannot; it does not count the kernel,
# which the timed bench does. Figures only; results in BENCHMARKS.md.
#
#   scripts/instructions.sh [relay-binary]     (default: target/release/relay, built)
#
# Knobs: INSTR_PROTOCOLS (h2,v1), INSTR_PROCESSES (relay,agent), INSTR_SECS (10: the
# counted wrk run; 2 s unmeasured before it), INSTR_CONNECTIONS (1), INSTR_KEEP (a
# directory: keep the callgrind files there, for callgrind_annotate).
# Needs valgrind, wrk and python3 (the upstream: http.server keeping connections alive).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib-local-relay.sh
source scripts/lib-local-relay.sh

for tool in valgrind callgrind_control wrk python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "scripts/instructions.sh: $tool not found (apt-get install valgrind wrk python3)" >&2
    exit 1
  fi
done

relay="${1:-}"
if [ -z "$relay" ]; then
  cargo build --release -p relay >&2
  relay="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/relay"
fi
relay="$(realpath "$relay")"
protocols="${INSTR_PROTOCOLS:-h2,v1}"
processes="${INSTR_PROCESSES:-relay,agent}"
secs="${INSTR_SECS:-10}"
connections="${INSTR_CONNECTIONS:-1}"

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

upstream_port="$(free_port)"
start_upstream "$upstream_port" "$work"
pids+=($!)

export RELAY_JWT_SECRET
RELAY_JWT_SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
host_token="$("$relay" token --role host --host '*')"
client_token="$("$relay" token --role client --host '*')"

# Runs `$2` (relay or agent) of protocol `$1` under callgrind and prints instructions
# per request.
measure() {
  local protocol="$1" counted="$2" port relay_cmd agent_cmd out="$work/cg.$1.$2"
  port="$(free_port)"
  relay_cmd=("$relay" serve --bind 127.0.0.1 --port "$port" --machine-id instr)
  agent_cmd=("$relay" agent --relay "ws://127.0.0.1:$port" --host-id "instr-$protocol"
    --to "http://127.0.0.1:$upstream_port" --protocol "$protocol" --token "$host_token")
  local grind=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$out")
  if [ "$counted" = relay ]; then relay_cmd=("${grind[@]}" "${relay_cmd[@]}"); fi
  if [ "$counted" = agent ]; then agent_cmd=("${grind[@]}" "${agent_cmd[@]}"); fi

  RUST_LOG=info "${relay_cmd[@]}" >"$work/relay.log" 2>&1 &
  local relay_pid=$!
  pids+=("$relay_pid")
  wait_for_log "$work/relay.log" "listening"
  RUST_LOG=info "${agent_cmd[@]}" >"$work/agent.log" 2>&1 &
  local agent_pid=$!
  pids+=("$agent_pid")
  wait_for_log "$work/agent.log" "registered"

  local url="http://127.0.0.1:$port/hosts/instr-$protocol/small"
  local pid="$relay_pid"
  [ "$counted" = agent ] && pid="$agent_pid"
  wrk -t1 -c"$connections" -d2s -H "Authorization: Bearer $client_token" "$url" >/dev/null
  callgrind_control -i on "$pid" >/dev/null 2>&1
  wrk -t1 -c"$connections" -d"${secs}s" -H "Authorization: Bearer $client_token" "$url" \
    >"$work/wrk.out"
  callgrind_control -i off "$pid" >/dev/null 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$agent_pid" "$relay_pid"
  wait "$agent_pid" "$relay_pid" 2>/dev/null || true

  local requests instructions
  requests="$(awk '/requests in/ {print $1}' "$work/wrk.out")"
  if grep -q 'Non-2xx' "$work/wrk.out"; then
    echo "scripts/instructions.sh: failed requests:" >&2
    cat "$work/wrk.out" >&2
    exit 1
  fi
  instructions="$(cat "$out"* | awk '/^totals:/ {s += $2} END {print s}')"
  printf '| %s | %s | %s | %s | %.0f |\n' "$protocol" "$counted" "$requests" \
    "$instructions" "$(echo "$instructions / $requests" | bc -l)"
  if [ -n "${INSTR_KEEP:-}" ]; then
    mkdir -p "$INSTR_KEEP"
    cp "$out"* "$INSTR_KEEP/"
  fi
  rm -f "$out"*
}

echo "relay binary: $relay; $connections connection(s), ${secs} s counted"
echo "| protocol | process | requests | instructions | instructions per request |"
echo "|---|---|---:|---:|---:|"
IFS=, read -ra protocol_list <<<"$protocols"
IFS=, read -ra process_list <<<"$processes"
for protocol in "${protocol_list[@]}"; do
  for process in "${process_list[@]}"; do
    measure "$protocol" "$process"
  done
done
