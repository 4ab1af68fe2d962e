#!/bin/bash
# The balancer's user-space instructions per proxied connection, counted by
# valgrind's callgrind: unlike CPU time, the count is the same from run to
# run (within about 1%) whatever else the machine is doing, so two trees can
# be compared with one run each.  The kernel's work (most of the CPU time of
# a new connection) is not counted.
#
#   bash bench/balancer_callgrind.sh [TREE] [CONNECTIONS]     (defaults: . 4000)
#
# Starts its own redis-server (backend) on 127.0.0.1:$BASE_PORT+1 and the
# balancer of TREE under callgrind on $BASE_PORT (BASE_PORT default 22400),
# warms up with 1,000 connections, zeroes the counters, opens CONNECTIONS
# connections with `redis-benchmark -c 50 -k 0 -t ping_inline`, dumps the
# counters and prints "Ir per connection".  BALANCER_ARGS adds options to the
# balancer (e.g. BALANCER_ARGS=--no-half-close).  Set KEEP=1 to keep the callgrind
# file (for callgrind_annotate).  Needs valgrind, redis-server,
# redis-benchmark and the project's .venv.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
tree=$(cd "${1:-$here}" && pwd)
n=${2:-4000}
base=${BASE_PORT:-22400}
port=$base
backend=$((base + 1))
tmp=$(mktemp -d /tmp/balancer-callgrind.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${KEEP:-}" ] || rm -rf "$tmp"
}
trap cleanup EXIT
for tool in valgrind callgrind_control redis-server redis-benchmark redis-cli; do
    command -v $tool >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
redis-server --port $backend --bind 127.0.0.1 --save '' --appendonly no >"$tmp/redis.log" 2>&1 &
pids+=($!)
cd "$tree"
PYTHONPATH=$tree valgrind --tool=callgrind --compress-strings=no --compress-pos=no \
    --callgrind-out-file="$tmp/callgrind.%p" \
    "$here/.venv/bin/python" -c "from twisted.scripts.twistd import run; run()" \
    -n --pidfile= -r epoll -l "$tmp/balancer.log" balancer \
    --listen tcp:$port:interface=127.0.0.1 --backend 127.0.0.1:$backend \
    --check-interval 0 ${BALANCER_ARGS:-} >"$tmp/valgrind.log" 2>&1 &
vg=$!
pids+=($vg)
for _ in $(seq 120); do
    redis-cli -p $port ping >/dev/null 2>&1 && break
    sleep 1
done
redis-cli -p $port ping >/dev/null || { echo "the balancer did not start: $tmp" >&2; KEEP=1; exit 1; }
redis-benchmark -p $port -c 50 -k 0 -n 1000 -t ping_inline -q >/dev/null 2>&1
callgrind_control -z $vg >/dev/null 2>&1
redis-benchmark -p $port -c 50 -k 0 -n "$n" -t ping_inline -q >/dev/null 2>&1
callgrind_control -d $vg >/dev/null 2>&1
sleep 1
out="$tmp/callgrind.$vg.1"
total=$(awk '/^summary:/ {print $2}' "$out")
echo "$tree: $total Ir for $n connections, $((total / n)) Ir per connection"
[ -z "${KEEP:-}" ] || echo "callgrind file: $out"
