#!/usr/bin/env bash
# Helpers shared by the scripts that run a relay, `relay agent` and an upstream on this
# machine to measure or train them (scripts/instructions.sh, scripts/pgo-build.sh).
# Sourced, never run by itself. Messages name the script that sourced it.

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until `$1` prints a line matching `$2` into its log, or fails after 60 s.
wait_for_log() {
  local log="$1" pattern="$2" deadline=$((SECONDS + 60))
  until grep -q "$pattern" "$log" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "scripts/$(basename "$0"): no '$pattern' in $log after 60 s:" >&2
      tail -5 "$log" >&2
      exit 1
    fi
    sleep 0.2
  done
}

# Starts the upstream on port `$1` in the background (its pid in `$!`), writing its
# program into directory `$2`. Python's http.server, keeping connections alive: GET
# answers a 64-byte body, GET /bulk/<n> n chunks of 64 KiB, POST reads the body and
# answers 200. Its own speed is not what is measured.
start_upstream() {
  cat >"$2/upstream.py" <<'PY'
import http.server, sys
BODY = b"0123456789abcdef" * 4
CHUNK = b"x" * 65536
class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        if self.path.startswith("/bulk/"):
            chunks = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("content-length", str(chunks * len(CHUNK)))
            self.end_headers()
            for _ in range(chunks):
                self.wfile.write(CHUNK)
            return
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def do_POST(self):
        left = int(self.headers.get("content-length", "0"))
        while left > 0:
            got = self.rfile.read(min(left, len(CHUNK)))
            if not got:
                break
            left -= len(got)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # wrk closes its connections mid-answer when its time is up
class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256  # the agent opens up to 64 connections at once: no SYN dropped
Server(("127.0.0.1", int(sys.argv[1])), Upstream).serve_forever()
PY
  python3 "$2/upstream.py" "$1" 2>"$2/upstream.log" &
}
