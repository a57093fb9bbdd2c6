#!/usr/bin/env bash
# Smoke test of a relay fleet: every region must answer for itself.
#
#   scripts/smoke-test.sh [options] <hostname> <region>...
#
# For every region: GET /health with `fly-prefer-region: <region>` (Fly's proxy then routes
# the request to a machine in that region when one is up, and to another region when none
# is). The region passes only when the status is 200 AND the JSON body's `region` is the
# region asked for: a 200 from another region means the region has no healthy machine, and
# a non-200 is a failure whatever its body says.
#
# With SMOKE_PROBE_TOKEN (a client token) and SMOKE_PROBE_HOST (a hostId whose agent is
# connected) set, it also sends one request through that host's tunnel from every region:
# GET /hosts/<probe host><SMOKE_PROBE_PATH, default "/"> with the token and the same
# header, and expects a 2xx. That crosses the directory and cross-region routing
# (fly-replay) end to end. The token is passed to curl on stdin, never on a command line
# or in the output.
#
# Options:
#   --scheme http|https   default https
#   --port N              default: the scheme's port
#   --attempts N          tries per check before it fails (default 1)
#   --retry-delay SECS    pause between tries (default 2)
#   --timeout SECS        bound on one request (default 10)
#
# Against local relays: `scripts/smoke-test.sh --scheme http --port 8080 127.0.0.1 local`
# (a relay reached directly ignores fly-prefer-region and answers its own region).
#
# Prints one line per check (`ok   ams: health 200, region ams` / `FAIL fra: ...`) and a
# summary. Exit status: 0 when every region passed, 1 when any failed, 2 on a usage error
# or a missing tool. Needs curl, and jq or python3 to read JSON (Debian: apt-get install
# curl jq).
set -euo pipefail

prog=smoke-test.sh

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die_usage() {
  echo "$prog: $*" >&2
  echo "usage: $prog [--scheme http|https] [--port N] [--attempts N] [--retry-delay SECS] [--timeout SECS] <hostname> <region>..." >&2
  exit 2
}

scheme=https
port=
attempts=1
retry_delay=2
timeout=10
positional=()

while (($# > 0)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --scheme | --port | --attempts | --retry-delay | --timeout)
      (($# >= 2)) || die_usage "$1 needs a value"
      case $1 in
        --scheme) scheme=$2 ;;
        --port) port=$2 ;;
        --attempts) attempts=$2 ;;
        --retry-delay) retry_delay=$2 ;;
        --timeout) timeout=$2 ;;
      esac
      shift 2
      ;;
    --)
      shift
      positional+=("$@")
      break
      ;;
    -*) die_usage "unknown option $1" ;;
    *)
      positional+=("$1")
      shift
      ;;
  esac
done

((${#positional[@]} >= 2)) || die_usage "give a hostname and at least one region"
hostname=${positional[0]}
regions=("${positional[@]:1}")

case $scheme in
  http | https) ;;
  *) die_usage "--scheme must be http or https, not '$scheme'" ;;
esac
if [[ -n $port ]] && ! { [[ $port =~ ^[0-9]{1,5}$ ]] && ((10#$port >= 1 && 10#$port <= 65535)); }; then
  die_usage "--port must be a port number (1-65535), not '$port'"
fi
[[ $attempts =~ ^[1-9][0-9]{0,2}$ ]] || die_usage "--attempts must be a positive number, not '$attempts'"
[[ $retry_delay =~ ^[0-9]+$ ]] || die_usage "--retry-delay must be whole seconds, not '$retry_delay'"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die_usage "--timeout must be positive whole seconds, not '$timeout'"
# Names and IP addresses; brackets for an IPv6 literal ([::1]).
hostname_re='^[][A-Za-z0-9.:_-]+$'
[[ $hostname =~ $hostname_re ]] || die_usage "'$hostname' is not a hostname"
for region in "${regions[@]}"; do
  # The relay's own rule for region names.
  [[ $region =~ ^[A-Za-z0-9._-]+$ ]] || die_usage "'$region' is not a region name"
done

probe_token=${SMOKE_PROBE_TOKEN:-}
probe_host=${SMOKE_PROBE_HOST:-}
probe_path=${SMOKE_PROBE_PATH:-/}
if [[ -n $probe_token || -n $probe_host ]]; then
  [[ -n $probe_token && -n $probe_host ]] ||
    die_usage "the tunnel probe needs both SMOKE_PROBE_TOKEN and SMOKE_PROBE_HOST (only one is set)"
  [[ $probe_host =~ ^[A-Za-z0-9._-]{1,128}$ ]] || die_usage "SMOKE_PROBE_HOST '$probe_host' is not a hostId"
  [[ $probe_path == /* ]] || die_usage "SMOKE_PROBE_PATH must start with /, not '$probe_path'"
fi

if ! command -v curl >/dev/null 2>&1; then
  echo "$prog: curl is not installed; it is needed to send the requests (Debian: apt-get install curl)" >&2
  exit 2
fi
if command -v jq >/dev/null 2>&1; then
  json_tool=jq
elif command -v python3 >/dev/null 2>&1; then
  json_tool=python3
else
  echo "$prog: neither jq nor python3 is installed; one of them is needed to read the JSON that /health answers (Debian: apt-get install jq)" >&2
  exit 2
fi

base_url="$scheme://$hostname${port:+:$port}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
body_file=$work/body
err_file=$work/err

# Prints the string value of the top-level `field` of the JSON in `file`, or nothing when
# there is no such string. Fails when the file is not JSON.
json_field() {
  local file=$1 field=$2
  case $json_tool in
    jq)
      jq -r --arg f "$field" \
        'if type == "object" and (.[$f] | type) == "string" then .[$f] else empty end' \
        <"$file" 2>/dev/null
      ;;
    python3)
      python3 -c '
import json, sys
try:
    doc = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
value = doc.get(sys.argv[1]) if isinstance(doc, dict) else None
if isinstance(value, str):
    print(value)
' "$field" <"$file"
      ;;
  esac
}

# The first line of what curl said on stderr, for a failed request.
curl_error() {
  local line=
  IFS= read -r line <"$err_file" || true
  printf '%s' "${line:-curl failed without a message}"
}

# A short, printable excerpt of the response body.
body_excerpt() {
  local text
  text=$(LC_ALL=C tr -c '[:print:]' ' ' <"$body_file" 2>/dev/null || true)
  ((${#text} > 80)) && text="${text:0:80}..."
  printf '%s' "${text:-<empty>}"
}

# Whether curl's %{http_code} is a real status (000: no response).
valid_status() {
  [[ $1 =~ ^[1-5][0-9][0-9]$ ]]
}

# GET /health in `region`. Sets `detail`; succeeds when the region answered for itself.
check_health() {
  local region=$1 status got machine
  : >"$body_file"
  if ! status=$(curl --silent --show-error --max-time "$timeout" \
    --output "$body_file" --write-out '%{http_code}' \
    --header "fly-prefer-region: $region" -- "$base_url/health" 2>"$err_file"); then
    detail="health request failed: $(curl_error)"
    return 1
  fi
  if ! valid_status "$status"; then
    detail="health request got no HTTP status from curl ('$status')"
    return 1
  fi
  local is_json=1
  got=$(json_field "$body_file" region) || is_json=0
  if ((is_json)) && [[ $status == 200 && $got == "$region" ]]; then
    machine=$(json_field "$body_file" machine || true)
    detail="health 200, region $got${machine:+, machine $machine}"
    return 0
  fi
  detail="health $status"
  [[ $status == 200 ]] || detail+=" (want 200)"
  if ((is_json == 0)); then
    detail+=", body is not JSON: $(body_excerpt)"
  elif [[ -z $got ]]; then
    detail+=", no region in the body: $(body_excerpt)"
  else
    detail+=", region $got"
    [[ $got == "$region" ]] || detail+=" (want $region: no healthy machine answered from $region)"
  fi
  return 1
}

# GET /hosts/<probe host><probe path> in `region` with the probe token. Sets `detail`;
# succeeds on a 2xx.
check_probe() {
  local region=$1 status target="/hosts/$probe_host$probe_path"
  : >"$body_file"
  # The header comes from stdin (-H @-), so the token is on no command line.
  if ! status=$(printf 'Authorization: Bearer %s\n' "$probe_token" |
    curl --silent --show-error --max-time "$timeout" \
      --output "$body_file" --write-out '%{http_code}' \
      --header @- --header "fly-prefer-region: $region" -- "$base_url$target" 2>"$err_file"); then
    detail="probe GET $target failed: $(curl_error)"
    return 1
  fi
  if ! valid_status "$status"; then
    detail="probe GET $target got no HTTP status from curl ('$status')"
    return 1
  fi
  if [[ $status == 2[0-9][0-9] ]]; then
    detail="probe GET $target $status"
    return 0
  fi
  detail="probe GET $target $status (want 2xx): $(body_excerpt)"
  return 1
}

# Runs the `health` or `probe` check for region `$2` up to `attempts` times; prints its
# ok/FAIL line.
run_check() {
  local check=$1 region=$2 try passed
  for ((try = 1; try <= attempts; try++)); do
    passed=0
    case $check in
      health) check_health "$region" && passed=1 ;;
      probe) check_probe "$region" && passed=1 ;;
    esac
    if ((passed)); then
      ((try == 1)) || detail+=" (try $try of $attempts)"
      printf 'ok   %s: %s\n' "$region" "$detail"
      return 0
    fi
    ((try == attempts)) || sleep "$retry_delay"
  done
  ((attempts == 1)) || detail+=" (all $attempts tries)"
  printf 'FAIL %s: %s\n' "$region" "$detail"
  return 1
}

echo "smoke test of $base_url: regions ${regions[*]}"
if [[ -z $probe_token ]]; then
  echo "     (no tunnel probe: set SMOKE_PROBE_TOKEN and SMOKE_PROBE_HOST to add one)"
fi

failed=()
for region in "${regions[@]}"; do
  region_ok=1
  run_check health "$region" || region_ok=0
  if [[ -n $probe_token ]]; then
    run_check probe "$region" || region_ok=0
  fi
  ((region_ok)) || failed+=("$region")
done

total=${#regions[@]}
if ((${#failed[@]} == 0)); then
  echo "PASS: $total of $total regions ok (${regions[*]}) on $hostname"
  exit 0
fi
echo "FAIL: ${#failed[@]} of $total regions failed (${failed[*]}) on $hostname"
exit 1
