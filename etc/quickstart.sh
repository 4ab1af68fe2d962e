#!/usr/bin/env bash
# Set up and run the embedded single node: a chat server on tcp:6000 (SQLite
# in ./run/chat.sqlite3, in-process presence) behind the balancer on tcp:8000.
# Ctrl-C stops both.  Connect with:  nc 127.0.0.1 8000   (type: help)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/twistd ]; then
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        else echo "python3-venv is missing: sudo apt-get install python3-venv" >&2; exit 1; fi
    fi
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q .
mkdir -p run
.venv/bin/twistd --pidfile run/chat.pid -n chat --config etc/chat.ini --db sqlite:run/chat.sqlite3 &
chat=$!
trap 'kill $chat 2>/dev/null; wait $chat 2>/dev/null' EXIT INT TERM
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/6000) 2>/dev/null && break; sleep 0.1; done
.venv/bin/twistd --pidfile run/balancer.pid -n balancer \
    --listen tcp:8000 --backend "127.0.0.1:6000 max_fails=3 fail_timeout=10" \
    --check-send 'PING\n' --check-expect PONG
