#!/usr/bin/env bash
# What idle TLS connections cost the relay (BENCHMARKS.md, hostile peers): for each of
# two kinds, a fresh release relay with a fresh P-256 certificate, then N clients
# (default 1000) that connect and say nothing: before the handshake, or after it. The
# relay's RSS before and after. Needs openssl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
dir="$(mktemp -d)"
relay=""
trap '[ -n "$relay" ] && kill "$relay" 2>/dev/null; rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=127.0.0.1 -addext "subjectAltName=IP:127.0.0.1" \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
cargo build --release -p relay
secret="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

for kind in before-handshake after-handshake; do
  : >"$dir/relay.log"
  RELAY_JWT_SECRET="$secret" target/release/relay serve --bind 127.0.0.1 --port 0 \
    --max-connections-per-ip 0 --tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem" \
    >"$dir/relay.log" 2>&1 &
  relay=$!
  port=""
  for _ in $(seq 100); do
    port="$(sed -n 's/.*listening addr=[^ ]*:\([0-9]*\).*/\1/p' "$dir/relay.log" | head -1)"
    [ -n "$port" ] && break
    sleep 0.1
  done
  [ -n "$port" ] || { cat "$dir/relay.log" >&2; exit 1; }
  python3 - "$port" "$relay" "$n" "$dir/cert.pem" "$kind" <<'PY'
import socket, ssl, sys, time
port, pid, n, ca, kind = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def rss_kib():
    with open(f"/proc/{pid}/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS"))
context = ssl.create_default_context(cafile=ca)
before, held = rss_kib(), []
for _ in range(n):
    sock = socket.create_connection(("127.0.0.1", port))
    if kind == "after-handshake":
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    held.append(sock)
time.sleep(1)
after = rss_kib()
print(f"{n} idle connections, {kind}: RSS {before} -> {after} KiB "
      f"({(after - before) / n:.1f} KiB each)")
PY
  kill "$relay"
  wait "$relay" 2>/dev/null || true
  relay=""
done
