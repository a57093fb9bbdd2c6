#!/usr/bin/env bash
# Installs what the test suite needs and a fresh machine may lack: redis-server (tests of
# the Redis directory start their own on free ports), shellcheck (lints these scripts),
# openssl and wrk. Debian/Ubuntu packages; needs root or sudo when something is missing.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
# Tests of public-key tokens generate their keys with it.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# The test of scripts/pgo-build.sh's training loads the relay with it.
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
[ "${#missing[@]}" -eq 0 ] && exit 0

echo "setup: installing ${missing[*]}" >&2
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: apt-get not found; install ${missing[*]} with your package manager" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "setup: need root to install ${missing[*]}" >&2
    exit 1
  fi
  sudo=(sudo)
fi
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
