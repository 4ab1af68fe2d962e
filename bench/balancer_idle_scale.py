#!/usr/bin/env python3
"""
Hold many idle proxied connections through the balancer and print its RSS
per connection.

    .venv/bin/python bench/balancer_idle_scale.py [--connections 50000]
        [--per-process 9000]

One balancer process needs two file descriptors per proxied connection, so
the number one process can hold is capped by RLIMIT_NOFILE's hard limit
(20,000 on this project's sandbox, and the sandbox may not raise it): past
that, the connections are spread over `--workers N` balancer processes
(SO_REUSEPORT), N = ceil(connections / per-process).  The clients are
spread over several processes too, each with its own 127.0.0.x source
address, and the backends are as many redis-servers.  Every connection
sends PING and waits for PONG, so each is known to be proxied through to a
backend before the RSS is read.

Needs redis-server.  Everything runs on 127.0.0.1 private ports and is
stopped at the end.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from balancer_bench import ROOT, children, findTool, openIdle, rssKib, waitPort  # noqa: E402

HOST = "127.0.0.1"
LISTEN_PORT = 17400
FIRST_BACKEND_PORT = 17401


def hold(index: int, count: int, ready, release) -> None:
    """
    A client process: open C{count} connections from 127.0.0.(10+index),
    see each answered, report, and keep them until told to let go.
    """
    socks = []
    try:
        socks = openIdle(count, LISTEN_PORT, lambda i: f"127.0.0.{10 + index}")
        ready.put((index, len(socks), None))
    except Exception as e:  # report, don't hang the parent
        ready.put((index, 0, repr(e)))
    release.wait()
    for s in socks:
        s.close()


def openFds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=50000)
    ap.add_argument("--per-process", dest="perProcess", metavar="N", type=int, default=9000,
                    help="idle connections per balancer process on average (2 fds each)")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.perProcess * 2 + 200 > hard:
        print(f"--per-process {args.perProcess} needs more than the hard limit of {hard} open files")
        return 2
    workers = max(1, math.ceil(args.connections / args.perProcess))
    clients = max(1, math.ceil(args.connections / min(args.perProcess, hard - 200)))
    tmp = tempfile.mkdtemp(prefix="balancer-idle-")
    procs: list[subprocess.Popen] = []

    def spawn(argv, **kw):
        log = open(os.path.join(tmp, f"{os.path.basename(argv[0])}-{len(procs)}.log"), "w")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
        procs.append(p)
        return p

    holders = []
    release = multiprocessing.Event()
    try:
        ports = [FIRST_BACKEND_PORT + i for i in range(workers)]
        for port in ports:
            spawn([findTool("redis-server"), "--port", str(port), "--bind", HOST, "--save", "",
                   "--appendonly", "no", "--maxclients", str(hard - 100), "--protected-mode", "no"])
        for port in ports:
            waitPort(port)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        backends = []
        for port in ports:
            backends += ["--backend", f"{HOST}:{port}"]
        balancer = spawn([
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "-r", "epoll", "-l", os.path.join(tmp, "twistd.log"),
            "balancer", "--listen", f"tcp:{LISTEN_PORT}:interface={HOST}", *backends,
            "--workers", str(workers), "--status", f"tcp:{LISTEN_PORT + 99}:interface={HOST}",
            "--check-interval", "2s", "--check-send", r"PING\r\n", "--check-expect", "PONG",
        ], env=env)
        waitPort(LISTEN_PORT)
        deadline = time.monotonic() + 30
        while len(children(balancer.pid)) < workers - 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # the workers' listeners and first health checks
        pids = [balancer.pid] + children(balancer.pid)
        if len(pids) != workers:
            print(f"expected {workers} balancer processes, found {len(pids)}")
            return 1
        before = rssKib(pids)
        fdsBefore = {pid: openFds(pid) for pid in pids}

        ready = multiprocessing.Queue()
        started = time.monotonic()
        share = [args.connections // clients + (i < args.connections % clients) for i in range(clients)]
        for i, count in enumerate(share):
            p = multiprocessing.Process(target=hold, args=(i, count, ready, release))
            p.start()
            holders.append(p)
        held, errors = 0, []
        for _ in holders:
            index, count, error = ready.get(timeout=600)
            held += count
            if error:
                errors.append(f"client {index}: {error}")
        took = time.monotonic() - started
        time.sleep(2)
        after = rssKib(pids)
        perWorker = [(openFds(pid) - fdsBefore[pid]) // 2 for pid in pids]
        alive = all(p.poll() is None for p in procs)

        print(f"balancer processes: {workers} (RLIMIT_NOFILE hard limit {hard})")
        print(f"idle proxied connections held: {held:,} (opened and answered in {took:.1f} s)")
        print(f"proxied connections per process (from open fds): {', '.join(f'{n:,}' for n in perWorker)}")
        print(f"balancer RSS: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB with the connections")
        if held:
            print(f"RSS per idle proxied connection: {(after - before) / held:.2f} KiB (target < 4)")
        for e in errors:
            print(e)
        if not alive:
            print("a process died during the run")
        return 0 if held == args.connections and not errors and alive else 1
    finally:
        release.set()
        for p in holders:
            p.join(timeout=30)
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
