#!/usr/bin/env python3
"""
Load generator for `twistd chat`.

Registers and logs in N clients over TCP (all stay connected; most idle),
then P sender/receiver pairs exchange one-to-one messages for a while, and
prints: connections held, delivered messages/s, p50/p99/max delivery latency
(send to receipt, one clock), the server's RSS per connection and CPU per
message.

    # start a private server (SQLite in a temp dir) and load it:
    python bench/chatload.py --spawn --clients 10000 --pairs 100 --duration 10

    # against running servers; clients alternate between targets, and each
    # pair is split across them when there are two (cross-server traffic):
    python bench/chatload.py --target 127.0.0.1:6001 --target 127.0.0.1:6002 --pid 123 --pid 124

Traffic is closed-loop by default (each sender keeps --window messages in
flight); --rate R sends at a fixed total rate instead (open loop), which is
the way to read latency at a given load.  A spawned server runs with
--scrypt-n 16: the benchmark measures the message path, not the password
KDF (which costs ~50 ms per login at the default cost, by design).

One process, one thread, one core: the generator uses raw non-blocking
sockets and epoll so that it is not the bottleneck.  It only talks to the
addresses given (127.0.0.1 by default) and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time

MSG_MARK = b'"msg":"'


def raiseFileLimit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, want), hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpuSeconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def freePort() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Conn:
    __slots__ = ("sock", "inbuf", "outbuf", "index", "uid", "lines")

    def __init__(self, sock: socket.socket, index: int) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = []
        self.index = index
        self.uid = None
        self.lines = []


class Loop:
    """A minimal epoll loop over many line-based connections."""

    def __init__(self) -> None:
        self.sel = selectors.EpollSelector()
        self.conns: list[Conn] = []
        self.dirty: set[Conn] = set()

    def connect(self, host: str, port: int, index: int) -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((host, port))
        sock.setblocking(False)
        conn = Conn(sock, index)
        self.sel.register(sock, selectors.EVENT_READ, conn)
        self.conns.append(conn)
        return conn

    def send(self, conn: Conn, data: bytes) -> None:
        conn.outbuf.append(data)
        self.dirty.add(conn)

    def flush(self) -> None:
        for conn in self.dirty:
            data = b"".join(conn.outbuf)
            conn.outbuf.clear()
            while data:
                try:
                    sent = conn.sock.send(data)
                except BlockingIOError:
                    self.sel.select(0.001)
                    continue
                data = data[sent:]
        self.dirty.clear()

    def poll(self, timeout: float, onLine) -> None:
        """Read what is ready; call onLine(conn, line) for each line."""
        self.flush()
        for key, _ in self.sel.select(timeout):
            conn = key.data
            try:
                data = conn.sock.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                raise SystemExit(f"server closed connection {conn.index}")
            data = conn.inbuf + data
            *lines, conn.inbuf = data.split(b"\n")
            for line in lines:
                onLine(conn, line)

    def request(self, conn: Conn, lines: list[bytes], timeout: float = 120) -> list[dict]:
        """Send lines on one connection and wait for as many replies."""
        replies = []
        self.send(conn, b"".join(line + b"\n" for line in lines))
        deadline = time.monotonic() + timeout

        def take(c, line):
            if c is conn:
                replies.append(json.loads(line))

        while len(replies) < len(lines):
            if time.monotonic() > deadline:
                raise SystemExit("timed out waiting for replies")
            self.poll(0.5, take)
        return replies


def spawnServer(port: int, workdir: str) -> subprocess.Popen:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    cmd = [
        twistd, "--pidfile", "", "-n", "--logfile", os.path.join(workdir, "chat.log"), "chat",
        "--port", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
        "--db", f"sqlite:{workdir}/bench.sqlite3",
        "--scrypt-n", "16", "--idle-timeout", "0",
    ]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\n")
                if s.recv(16).startswith(b"PONG"):
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the chat server did not start; see " + os.path.join(workdir, "chat.log"))


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", help="HOST:PORT of a chat server (repeatable)")
    ap.add_argument("--pid", action="append", type=int, default=[], help="server pid(s), for RSS/CPU figures")
    ap.add_argument("--spawn", action="store_true", help="start a private chat server")
    ap.add_argument("--clients", type=int, default=1000, help="logged-in connections (default 1000)")
    ap.add_argument("--pairs", type=int, default=100, help="sender/receiver pairs (default 100)")
    ap.add_argument("--window", type=int, default=4, help="messages in flight per sender, closed loop (default 4)")
    ap.add_argument("--rate", type=float, default=0, help="total messages/s, open loop (default: closed loop)")
    ap.add_argument("--duration", type=float, default=10, help="seconds of traffic (default 10)")
    ap.add_argument("--warmup", type=float, default=1, help="seconds of traffic not counted (default 1)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    args = ap.parse_args(argv)
    if args.clients < 2 * args.pairs:
        ap.error("--clients must be at least 2 * --pairs")

    limit = raiseFileLimit(args.clients + 1000)
    if limit < args.clients + 100:
        ap.error(f"open-files limit {limit} is too low for {args.clients} clients (ulimit -n)")
    proc = None
    workdir = tempfile.mkdtemp(prefix="chatload-")
    if args.spawn:
        port = freePort()
        proc = spawnServer(port, workdir)
        args.target = [f"127.0.0.1:{port}"]
        args.pid = [proc.pid]
    if not args.target:
        ap.error("give --target HOST:PORT or --spawn")
    targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in args.target]
    try:
        return run(args, targets)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


def run(args, targets) -> dict:
    loop = Loop()
    # A name prefix of this run's users, so runs against one server differ.
    run_id = f"{os.getpid()}x{time.monotonic_ns() % 10**9}"
    baseline = {pid: rssKiB(pid) for pid in args.pid}

    # Register: pipelined on one connection per target.
    t0 = time.monotonic()
    registrars = [loop.connect(host, port, -1 - i) for i, (host, port) in enumerate(targets)]
    uids = []
    for start in range(0, args.clients, 1000):
        batch = range(start, min(args.clients, start + 1000))
        replies = loop.request(
            registrars[0],
            [json.dumps({"msgid": 4, "name": f"b{run_id}-{i}", "password": "pw"}).encode() for i in batch],
        )
        for reply in replies:
            if reply.get("errno") != 0:
                raise SystemExit(f"register failed: {reply}")
            uids.append(reply["id"])
    for conn in registrars:
        loop.sel.unregister(conn.sock)
        conn.sock.close()
    loop.conns.clear()
    registered = time.monotonic() - t0

    # Connect and log in every client; client i uses target i % len(targets).
    t0 = time.monotonic()
    pending = 0
    clients: list[Conn] = []
    loggedIn = 0

    def onLogin(conn, line):
        nonlocal loggedIn, pending
        reply = json.loads(line)
        if reply.get("msgid") == 2:
            if reply.get("errno") != 0:
                raise SystemExit(f"login failed: {reply}")
            loggedIn += 1
            pending -= 1

    for i, uid in enumerate(uids):
        host, port = targets[i % len(targets)]
        conn = loop.connect(host, port, i)
        conn.uid = uid
        clients.append(conn)
        loop.send(conn, b'{"msgid":1,"id":%d,"password":"pw"}\n' % uid)
        pending += 1
        if pending >= 200:
            while pending > 50:
                loop.poll(1, onLogin)
    while pending:
        loop.poll(1, onLogin)
    loginTime = time.monotonic() - t0
    time.sleep(0.5)
    held = {pid: rssKiB(pid) for pid in args.pid}

    # Traffic: pair k is client 2k -> client 2k+1 (on the other target when
    # there are two).
    senders = [clients[2 * k] for k in range(args.pairs)]
    receiverOf = {clients[2 * k + 1].uid: k for k in range(args.pairs)}
    inflight = [0] * args.pairs
    lines = [b'{"msgid":6,"toid":%d,"msg":"' % clients[2 * k + 1].uid for k in range(args.pairs)]
    latencies: list[float] = []
    counters = {"sent": 0, "delivered": 0, "acks": 0, "errors": 0}
    counting = False
    firstError = []
    perf = time.perf_counter_ns

    def sendOne(k: int) -> None:
        loop.send(senders[k], lines[k] + b'%d"}\n' % perf())
        inflight[k] += 1
        counters["sent"] += 1

    def onTraffic(conn, line):
        if line.startswith(b'{"msgid":6,'):
            at = line.find(MSG_MARK) + 7
            sentAt = int(line[at : line.index(b'"', at)])
            k = receiverOf[conn.uid]
            inflight[k] -= 1
            if counting:
                latencies.append((perf() - sentAt) / 1e6)
                counters["delivered"] += 1
            if closedLoop and running:
                sendOne(k)
        elif line.startswith(b'{"msgid":12,"errno":0'):
            counters["acks"] += 1
        else:
            counters["errors"] += 1
            if not firstError:
                firstError.append(line[:200])

    closedLoop = not args.rate
    running = True
    start = time.monotonic()
    end = start + args.warmup + args.duration
    if closedLoop:
        for k in range(args.pairs):
            for _ in range(args.window):
                sendOne(k)
    cpu0 = wall0 = selfCpu0 = None
    rateSent = 0
    while True:
        now = time.monotonic()
        if not counting and now >= start + args.warmup:
            counting = True
            wall0 = now
            cpu0 = {pid: cpuSeconds(pid) for pid in args.pid}
            selfCpu0 = time.process_time()
        if now >= end:
            break
        if not closedLoop:
            due = int(args.rate * (now - start)) - rateSent
            for _ in range(max(0, due)):
                sendOne(rateSent % args.pairs)
                rateSent += 1
        loop.poll(0.0005 if not closedLoop else 0.01, onTraffic)
    running = False
    wall = time.monotonic() - wall0
    cpu = {pid: cpuSeconds(pid) - cpu0[pid] for pid in args.pid}
    selfCpu = time.process_time() - selfCpu0
    # Drain what is in flight (not counted).
    drainEnd = time.monotonic() + 5
    while sum(inflight) > 0 and time.monotonic() < drainEnd:
        loop.poll(0.05, onTraffic)

    latencies.sort()
    delivered = counters["delivered"]
    result = {
        "targets": [f"{h}:{p}" for h, p in targets],
        "connections": len(clients),
        "registered_s": round(registered, 2),
        "login_s": round(loginTime, 2),
        "pairs": args.pairs,
        "mode": f"open loop {args.rate:g}/s" if args.rate else f"closed loop, window {args.window}",
        "delivered_per_s": round(delivered / wall),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "errors": counters["errors"],
        "lost_in_flight": sum(inflight),
        "generator_cpu_pct": round(100 * selfCpu / wall),
    }
    for pid in args.pid:
        result[f"server_{pid}_rss_MiB"] = round(held[pid] / 1024, 1)
        result[f"server_{pid}_KiB_per_conn"] = round((held[pid] - baseline[pid]) * len(args.pid) / len(clients), 2)
        if delivered:
            result[f"server_{pid}_cpu_us_per_msg"] = round(cpu[pid] * 1e6 / delivered, 1)
            result[f"server_{pid}_cpu_pct"] = round(100 * cpu[pid] / wall)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if firstError:
        print("first unexpected line:", firstError[0])
    if args.json:
        print(json.dumps(result))
    for conn in loop.conns:
        conn.sock.close()
    return result


if __name__ == "__main__":
    main()
