#!/usr/bin/env python3
"""
Cross-server chat throughput and latency of a two-server cluster.

Starts a private redis-server (free port, no persistence), two
`twistd -n chat` processes sharing one MariaDB/MySQL database (created for
the run and dropped afterwards; SQLite files cannot be shared between
servers) and Redis, then drives one-to-one traffic with bench/chatload.py:

1. single server: every client on server 1 (the figures to compare with);
2. cross-server: clients alternate between the servers and every message
   goes from a user on server 1 to a user on server 2 (relayed through
   Redis).

Besides rates and latencies it reports, for every run, the CPU time each
process (chat1, chat2, redis-server) spent per delivered message: its
utime+stime from /proc/PID/stat before and after the measured window,
divided by the messages delivered in that window.

Each is measured closed loop (as fast as it goes, --window messages in
flight per sender) and open loop at --rate messages/s (the latency at that
load).  Everything shares this machine: both servers, Redis, MariaDB and
the generator.

    .venv/bin/python bench/cluster_bench.py
    .venv/bin/python bench/cluster_bench.py --rate 8000 --duration 10 --pairs 200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import chatload  # noqa: E402


freePort = chatload.freePort


def waitFor(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def answersPing(port: int, line: bytes, reply: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(line)
            return s.recv(64).startswith(reply)
    except OSError:
        return False


def startRedis(workdir: str) -> tuple[subprocess.Popen, int]:
    port = freePort()
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=open(os.path.join(workdir, "redis.log"), "wb"),
        stderr=subprocess.STDOUT,
    )
    waitFor(lambda: answersPing(port, b"PING\r\n", b"+PONG"), 10, "redis-server")
    return proc, port


def startChat(name: str, workdir: str, db: str, redisPort: int, extra=()) -> tuple[subprocess.Popen, int]:
    port = freePort()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        twistd, "--pidfile", "", "-n", "--logfile", os.path.join(workdir, f"{name}.log"), "chat",
        "--port", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
        "--name", name,
        "--db", db,
        "--redis", f"redis://127.0.0.1:{redisPort}/0",
        "--scrypt-n", "16", "--idle-timeout", "0", "--register-burst", "1000000",
        *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=workdir)
    waitFor(lambda: proc.poll() is not None or answersPing(port, b"PING\n", b"PONG"), 60, name)
    if proc.poll() is not None:
        raise SystemExit(f"{name} exited; see {workdir}/{name}.log")
    return proc, port


def dropDatabase(dbURL: str) -> None:
    import pymysql

    parts = urlsplit(dbURL)
    connection = pymysql.connect(
        host=parts.hostname, port=parts.port or 3306, user=parts.username or "root", password=parts.password or ""
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{parts.path.lstrip('/')}`")
    finally:
        connection.close()


def machineBusy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, wall time) from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / tick, time.monotonic()


def othersBusy(ours, seconds: float = 1.0) -> float:
    """Cores' worth of CPU used by processes not in C{ours} over C{seconds}."""
    busy0, t0 = machineBusy()
    mine0 = sum(chatload.cpuSeconds(pid) for pid in ours)
    time.sleep(seconds)
    busy1, t1 = machineBusy()
    mine1 = sum(chatload.cpuSeconds(pid) for pid in ours)
    return max(0.0, ((busy1 - busy0) - (mine1 - mine0)) / (t1 - t0))


def waitQuiet(ours, limit: float, timeout: float) -> float:
    """Wait until other processes use less than C{limit} cores (at most
    C{timeout} s); the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        others = othersBusy(ours)
        if others < limit or time.monotonic() > deadline:
            return others
        print(f"   (other processes use {others:.2f} cores; waiting for a quieter machine)", flush=True)


def load(label: str, targets, pids, args, rate: float) -> dict:
    argv = ["--clients", str(args.clients), "--pairs", str(args.pairs), "--duration", str(args.duration)]
    argv += ["--window", str(args.window), "--warmup", str(args.warmup)]
    if rate:
        argv += ["--rate", str(rate)]
    for target in targets:
        argv += ["--target", f"127.0.0.1:{target}"]
    for pid in args.ourPids:  # redis-server and both chat servers, idle or not
        argv += ["--pid", str(pid)]
    print(f"\n== {label}", flush=True)
    ours = [os.getpid(), *args.ourPids]
    if args.quiet:
        waitQuiet(ours, args.quiet, 120)
    busy0, t0 = machineBusy()
    mine0 = sum(chatload.cpuSeconds(pid) for pid in ours)
    result = chatload.main(argv)
    busy1, t1 = machineBusy()
    mine1 = sum(chatload.cpuSeconds(pid) for pid in ours)
    result["label"] = label
    result["others_cores"] = round(max(0.0, ((busy1 - busy0) - (mine1 - mine0)) / (t1 - t0)), 2)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="mysql://root@127.0.0.1:3306", help="MySQL server URL, without database")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--rate", type=float, default=8000, help="open-loop rate for the latency runs (0: skip them)")
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--only", choices=("single", "cross"), help="run one half only")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to both `twistd chat` (repeatable; e.g. --server-arg=--pipeline-depth=1)",
    )
    ap.add_argument(
        "--quiet",
        type=float,
        default=0.3,
        help="before each run wait (up to 2 min) until other processes use less than this many cores (0: don't)",
    )
    args = ap.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="cluster-bench-")
    dbURL = f"{args.db.rstrip('/')}/chatbench_{os.getpid()}"
    procs = []
    results = []
    try:
        redis, redisPort = startRedis(workdir)
        procs.append(redis)
        chat1, port1 = startChat("bench1", workdir, dbURL, redisPort, args.server_arg)
        procs.append(chat1)
        chat2, port2 = startChat("bench2", workdir, dbURL, redisPort, args.server_arg)
        procs.append(chat2)
        print(f"redis-server :{redisPort} pid {redis.pid}; bench1 :{port1} pid {chat1.pid}; bench2 :{port2} pid {chat2.pid}")
        args.ourPids = [redis.pid, chat1.pid, chat2.pid]
        print(f"database {dbURL}; logs in {workdir}")
        runs = []
        if args.only != "cross":
            runs += [("single-server closed loop", [port1], [chat1.pid], 0)]
            if args.rate:
                runs += [(f"single-server open loop {args.rate:g}/s", [port1], [chat1.pid], args.rate)]
        if args.only != "single":
            runs += [("cross-server closed loop", [port1, port2], [chat1.pid, chat2.pid], 0)]
            if args.rate:
                runs += [(f"cross-server open loop {args.rate:g}/s", [port1, port2], [chat1.pid, chat2.pid], args.rate)]
        for label, targets, pids, rate in runs:
            results.append(load(label, targets, pids, args, rate))
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            dropDatabase(dbURL)
        except Exception as e:  # noqa: BLE001
            print(f"could not drop {dbURL}: {e}")

    print("\n== summary (messages/s delivered; latency send to receipt; CPU: % of one core)")
    print(
        f"{'run':<36} {'msg/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6}"
        f" {'chat1':>6} {'chat2':>6} {'redis':>6} {'gen':>5} {'others':>7}"
    )
    for r in results:
        cpu = [r.get(f"server_{pid}_cpu_pct", "-") for pid in args.ourPids]
        print(
            f"{r['label']:<36} {r['delivered_per_s']:>7} {r['p50_ms']:>7} {r['p99_ms']:>7} {r['max_ms']:>7}"
            f" {r['errors']:>6} {cpu[1]:>6} {cpu[2]:>6} {cpu[0]:>6} {r['generator_cpu_pct']:>5}"
            f" {r['others_cores']:>7}"
        )
    print("(others: cores' worth of CPU used by unrelated processes during the whole run, login included)")
    print("\n== CPU per delivered message, per process (µs; utime+stime from /proc/PID/stat over the measured window)")
    print(f"{'run':<36} {'chat1':>8} {'chat2':>8} {'redis':>8} {'total':>8}")
    for r in results:
        per = [r.get(f"server_{pid}_cpu_us_per_msg") for pid in args.ourPids]
        total = round(sum(x for x in per if x is not None), 1) if any(x is not None for x in per) else "-"
        per = ["-" if x is None else x for x in per]
        r["cpu_us_per_msg"] = {"chat1": per[1], "chat2": per[2], "redis": per[0]}
        print(f"{r['label']:<36} {per[1]:>8} {per[2]:>8} {per[0]:>8} {total:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
