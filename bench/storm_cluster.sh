#!/usr/bin/env bash
# The reconnect storm of issue 12, set up and run in one go: two chat servers
# (MariaDB + Redis), the balancer in front finding them in Redis, N users
# logged in through it, chat1 killed with SIGKILL, and the time until every
# dropped user is logged in again (on chat2) with its token.
#
#   bash bench/storm_cluster.sh [USERS]          # default 10000 (5,000 dropped)
#
# Uses a private MySQL database (chatstorm, dropped first) and Redis
# database 7 (flushed first) on the local servers, ports 27601/27602 (chat)
# and 27700 (balancer); everything it starts is stopped at the end.
# Chat servers run with --scrypt-n 16 (the storm measures the login path,
# not the KDF) and listen with backlog=4096 (10,000 simultaneous set-up
# logins overflow the default backlog of 50); the balancer runs two workers
# (10,000 proxied connections need 20,000 descriptors).  STORM_CHAT_ARGS adds
# options to both chat servers (e.g. STORM_CHAT_ARGS="--gc-intervals off").
set -uo pipefail
cd "$(dirname "$0")/.."
USERS=${1:-10000}
PY=${PYTHON:-.venv/bin/python}
TWISTD=$(dirname "$PY")/twistd
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
TMP=$(mktemp -d /tmp/storm.XXXXXX)
MYSQL_URL=${STORM_MYSQL_URL:-mysql://root@127.0.0.1:3306/chatstorm}
REDIS_URL=${STORM_REDIS_URL:-redis://127.0.0.1:6379/7}
mysql -h127.0.0.1 -uroot -e 'DROP DATABASE IF EXISTS chatstorm' 2>/dev/null
redis-cli -n 7 FLUSHDB >/dev/null
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; sleep 1; kill -9 "${pids[@]}" 2>/dev/null; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
chat() {  # NAME PORT
    "$TWISTD" --pidfile "" -n --logfile "$TMP/$1.log" chat --name "$1" \
        --port "tcp:$2:interface=127.0.0.1:backlog=4096" --db "$MYSQL_URL" --redis "$REDIS_URL" \
        --scrypt-n 16 --idle-timeout 0 --register-burst 1000000 ${STORM_CHAT_ARGS:-} &
    pids+=($!)
}
chat chat1 27601; CHAT1=$!
sleep 2   # chat1 creates the schema
chat chat2 27602; CHAT2=$!
"$TWISTD" --pidfile "" -n --logfile "$TMP/balancer.log" balancer --listen tcp:27700:interface=127.0.0.1:backlog=4096 \
    --redis "$REDIS_URL" --workers 2 --connect-timeout 5 &
pids+=($!)
for port in 27601 27602 27700; do
    for _ in $(seq 100); do
        "$PY" -c "import socket,sys; s=socket.create_connection(('127.0.0.1',$port),1); s.sendall(b'PING\n'); s.settimeout(1); sys.exit(s.recv(4)!=b'PONG')" 2>/dev/null && break
        sleep 0.2
    done
done
sleep 3   # the balancer's first discovery poll and health checks
if [ -n "${STORM_PROFILE:-}" ]; then  # py-spy raw profile of chat2 from the kill on
    (while kill -0 "$CHAT1" 2>/dev/null; do sleep 0.05; done
     "$(dirname "$PY")/py-spy" record -r 200 --threads ${STORM_PROFILE_ARGS:-} -f raw -d ${STORM_PROFILE_S:-20} -p "$CHAT2" -o "$STORM_PROFILE" >/dev/null 2>&1) &
fi
"$PY" bench/chatload.py --target 127.0.0.1:27700 --storm "$USERS" --kill-pid "$CHAT1" --pid "$CHAT2"
echo "logs: $TMP"
