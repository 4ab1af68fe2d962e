#!/usr/bin/env python3
"""
Benchmark the balancer side by side with nginx `stream` (1 worker) and a
direct connection, on loopback only.

    .venv/bin/python bench/balancer_bench.py [--rounds 3] [--idle 9000]
        [--targets direct,nginx,balancer] [--with-portforward]

Needs (installs nothing): redis-server, redis-benchmark, nginx, iperf3.
Everything it starts (two redis-servers, nginx, the balancer, iperf3) runs on
127.0.0.1 private ports and is stopped at the end.  Targets are interleaved
and each figure is the median of --rounds runs.

Figures:
  small      redis-benchmark -c 50 -t ping_inline,set,get: mean req/s of the 3
  pipelined  the same with -P 16
  p99        redis-benchmark -c 1 -t ping_inline: p99 latency (ms)
  conn/s     redis-benchmark -c 50 -k 0 -t ping_inline: one connection per request
  conn-cpu   proxy CPU per new connection (us) in the conn/s run
  bulk       iperf3 -t 3 through the proxy (Gbit/s)
  cpu-us     proxy CPU (utime+stime from /proc/PID/stat) per small request
  idle KiB   proxy RSS growth per idle proxied connection (--idle of them)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOST = "127.0.0.1"
REDIS_PORTS = (17001, 17002)
IPERF_PORT = 17003
STATUS_PORT = 17281
PORTS: dict[str, tuple[int, int]] = {}


def setPorts(base: int) -> None:
    """
    Every port the benchmark uses, from C{base} (default 17000).
    """
    global REDIS_PORTS, IPERF_PORT, STATUS_PORT
    REDIS_PORTS = (base + 1, base + 2)
    IPERF_PORT = base + 3
    STATUS_PORT = base + 281
    PORTS.update({  # target -> (redis proxy port, iperf proxy port)
        "direct": (REDIS_PORTS[0], IPERF_PORT),
        "nginx": (base + 100, base + 101),
        "balancer": (base + 200, base + 201),
        "portforward": (base + 300, base + 301),
    })


setPorts(17000)
TOOLS = ("redis-server", "redis-benchmark", "nginx", "iperf3")


def findTool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )


def waitPort(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def cpuSeconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def rssKib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def openIdle(count: int, port: int, source) -> list[socket.socket]:
    """
    Open C{count} connections to HOST:C{port}, connection C{i} from address
    C{source(i)}, each answered PING/PONG through to a backend (500 at a
    time); on failure, close them and raise.
    """
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            s = socket.socket()
            socks.append(s)
            s.setblocking(False)
            s.bind((source(i), 0))
            s.connect_ex((HOST, port))
            if len(socks) % 500 == 0:
                Bench._pingAll(socks[-500:])
        Bench._pingAll(socks[len(socks) - len(socks) % 500:])
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="balancer-bench-")
        self.procs: list[subprocess.Popen] = []
        self.pids: dict[str, list[int]] = {}

    # -- processes -------------------------------------------------------------

    def spawn(self, args: list[str], **kw) -> subprocess.Popen:
        log = open(os.path.join(self.tmp, os.path.basename(args[0]) + f"-{len(self.procs)}.log"), "w")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.procs.append(p)
        return p

    def start(self) -> None:
        for port in REDIS_PORTS:
            self.spawn([findTool("redis-server"), "--port", str(port), "--bind", HOST,
                        "--save", "", "--appendonly", "no", "--maxclients", "19000",
                        "--protected-mode", "no"])
        self.spawn([findTool("iperf3"), "-s", "-B", HOST, "-p", str(IPERF_PORT)])
        for port in REDIS_PORTS + (IPERF_PORT,):
            waitPort(port)
        targets = self.args.targets
        if "nginx" in targets:
            conf = os.path.join(self.tmp, "nginx.conf")
            streamSo = "/usr/lib/nginx/modules/ngx_stream_module.so"
            load = f"load_module {streamSo};" if os.path.exists(streamSo) else ""
            with open(conf, "w") as f:
                f.write(f"""{load}
worker_processes 1;
daemon off;
pid {self.tmp}/nginx.pid;
error_log {self.tmp}/nginx-error.log warn;
worker_rlimit_nofile 19500;
events {{ worker_connections 19000; }}
stream {{
    upstream redis {{
        server {HOST}:{REDIS_PORTS[0]};
        server {HOST}:{REDIS_PORTS[1]};
    }}
    upstream iperf {{ server {HOST}:{IPERF_PORT}; }}
    proxy_connect_timeout 1s;
    tcp_nodelay on;
    server {{ listen {HOST}:{PORTS['nginx'][0]} backlog=1024; proxy_pass redis; }}
    server {{ listen {HOST}:{PORTS['nginx'][1]}; proxy_pass iperf; }}
}}
""")
            p = self.spawn([findTool("nginx"), "-c", conf, "-e", f"{self.tmp}/nginx-error.log"])
            waitPort(PORTS["nginx"][0])
            time.sleep(0.2)
            self.pids["nginx"] = children(p.pid) or [p.pid]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                  "-n", "--pidfile=", "-r", "epoll", "-l", os.path.join(self.tmp, "twistd.log")]
        if "balancer" in targets:
            redisBackends = []
            for port in REDIS_PORTS:
                redisBackends += ["--backend", f"{HOST}:{port} max_fails=3 fail_timeout=30s"]
            p = self.spawn(twistd + [
                "balancer", "--listen", f"tcp:{PORTS['balancer'][0]}:interface={HOST}",
                *redisBackends, "--status", f"tcp:{STATUS_PORT}:interface={HOST}",
                "--check-interval", "2s", "--check-send", r"PING\r\n", "--check-expect", "PONG",
            ], env=env)
            # bulk test: a second balancer with the iperf3 backend
            self.spawn(twistd[:-2] + ["-l", os.path.join(self.tmp, "twistd-iperf.log"),
                                      "balancer",
                                      "--listen", f"tcp:{PORTS['balancer'][1]}:interface={HOST}",
                                      "--backend", f"{HOST}:{IPERF_PORT}",
                                      "--check-interval", "2s"], env=env)
            waitPort(PORTS["balancer"][0])
            waitPort(PORTS["balancer"][1])
            self.pids["balancer"] = [p.pid]
        if "portforward" in targets:
            p = self.spawn(twistd + ["portforward", "-p", f"tcp:{PORTS['portforward'][0]}:interface={HOST}",
                                     "-h", HOST, "-d", str(REDIS_PORTS[0])], env=env)
            self.spawn(twistd[:-2] + ["-l", os.path.join(self.tmp, "twistd-pf.log"), "portforward",
                                      "-p", f"tcp:{PORTS['portforward'][1]}:interface={HOST}",
                                      "-h", HOST, "-d", str(IPERF_PORT)], env=env)
            waitPort(PORTS["portforward"][0])
            self.pids["portforward"] = [p.pid]
        self.pids["direct"] = []

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- measurements ------------------------------------------------------------

    def redisBenchmark(self, port: int, *extra: str) -> list[dict[str, str]]:
        out = subprocess.run(
            [findTool("redis-benchmark"), "-h", HOST, "-p", str(port), "--csv", *extra],
            capture_output=True, text=True, timeout=300, check=True,
        ).stdout
        return list(csv.DictReader(io.StringIO(out)))

    def small(self, target: str) -> tuple[float, float | None]:
        port = PORTS[target][0]
        n = self.args.requests
        pids = self.pids[target]
        cpu0 = cpuSeconds(pids) if pids else 0.0
        rows = self.redisBenchmark(port, "-c", "50", "-n", str(n), "-t", "ping_inline,set,get")
        cpu1 = cpuSeconds(pids) if pids else 0.0
        rps = statistics.mean(float(r["rps"]) for r in rows)
        cpuUs = (cpu1 - cpu0) * 1e6 / (n * len(rows)) if pids else None
        return rps, cpuUs

    def pipelined(self, target: str) -> float:
        rows = self.redisBenchmark(PORTS[target][0], "-c", "50", "-P", "16",
                                    "-n", str(self.args.requests * 5), "-t", "ping_inline,set,get")
        return statistics.mean(float(r["rps"]) for r in rows)

    def p99(self, target: str) -> float:
        rows = self.redisBenchmark(PORTS[target][0], "-c", "1", "-n", "20000", "-t", "ping_inline")
        return float(rows[0]["p99_latency_ms"])

    def conns(self, target: str) -> tuple[float, float | None]:
        """
        New connections per second, and the proxy's CPU microseconds per
        connection (C{None} for the direct target).
        """
        n = 20000
        pids = self.pids[target]
        cpu0 = cpuSeconds(pids) if pids else 0.0
        rows = self.redisBenchmark(PORTS[target][0], "-c", "50", "-k", "0",
                                    "-n", str(n), "-t", "ping_inline")
        cpu1 = cpuSeconds(pids) if pids else 0.0
        return float(rows[0]["rps"]), ((cpu1 - cpu0) * 1e6 / n if pids else None)

    def bulk(self, target: str) -> float:
        out = subprocess.run(
            [findTool("iperf3"), "-c", HOST, "-p", str(PORTS[target][1]), "-t", "3", "-J"],
            capture_output=True, text=True, timeout=60,
        ).stdout
        data = json.loads(out)
        return data["end"]["sum_received"]["bits_per_second"] / 1e9

    def idle(self, target: str) -> float | None:
        pids = self.pids[target]
        n = self.args.idle
        if not pids or not n:
            return None
        time.sleep(0.5)
        before = rssKib(pids)
        socks = openIdle(n, PORTS[target][0], lambda i: f"127.0.0.{2 + i // 20000}")
        try:
            time.sleep(1.0)
            after = rssKib(pids)
        finally:
            for s in socks:
                s.close()
        time.sleep(1.0)
        return (after - before) / n

    @staticmethod
    def _pingAll(socks: list[socket.socket]) -> None:
        """
        Make sure every connection is proxied through to a backend.
        """
        ep = select.epoll()
        pending = {}
        for s in socks:
            ep.register(s.fileno(), select.EPOLLOUT)
            pending[s.fileno()] = (s, "connect")
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for fd, ev in ep.poll(1.0):
                s, state = pending[fd]
                if state == "connect":
                    s.send(b"PING\r\n")
                    ep.modify(fd, select.EPOLLIN)
                    pending[fd] = (s, "reply")
                else:
                    if s.recv(100):
                        ep.unregister(fd)
                        del pending[fd]
        ep.close()
        if pending:
            raise RuntimeError(f"{len(pending)} idle connections never answered")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100000)
    ap.add_argument("--idle", type=int, default=9000,
                    help="idle connections for the RSS figure (the proxy needs 2 fds each)")
    ap.add_argument("--targets", default="direct,nginx,balancer")
    ap.add_argument("--with-portforward", action="store_true",
                    help="also measure a bare twisted portforward")
    ap.add_argument("--only", default="small,pipelined,p99,conns,bulk,idle")
    ap.add_argument("--port-base", type=int, default=17000,
                    help="ports used: BASE+1..3 (redis, iperf3), +100.. nginx, +200.. balancer, "
                         "+281 status, +300.. portforward")
    args = ap.parse_args()
    setPorts(args.port_base)
    args.targets = args.targets.split(",") + (["portforward"] if args.with_portforward else [])
    missing = [t for t in TOOLS if not findTool(t)]
    if missing:
        print("missing tools: " + ", ".join(missing))
        print("on Debian: apt-get install redis-server redis-tools nginx-light libnginx-mod-stream iperf3")
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.idle * 2 + 100 > hard:
        args.idle = max(0, (hard - 200) // 2)
        print(f"RLIMIT_NOFILE hard limit is {hard}: holding {args.idle} idle connections")
    only = args.only.split(",")
    bench = Bench(args)
    results: dict[str, dict[str, list[float]]] = {t: {} for t in args.targets}
    try:
        bench.start()
        for rnd in range(args.rounds):
            for target in args.targets:
                r = results[target]
                if "small" in only:
                    rps, cpu = bench.small(target)
                    r.setdefault("small", []).append(rps)
                    if cpu is not None:
                        r.setdefault("cpu", []).append(cpu)
                if "pipelined" in only:
                    r.setdefault("pipelined", []).append(bench.pipelined(target))
                if "p99" in only:
                    r.setdefault("p99", []).append(bench.p99(target))
                if "conns" in only:
                    cps, cpu = bench.conns(target)
                    r.setdefault("conns", []).append(cps)
                    if cpu is not None:
                        r.setdefault("conn_cpu", []).append(cpu)
                if "bulk" in only:
                    r.setdefault("bulk", []).append(bench.bulk(target))
                print(f"round {rnd + 1} {target}: " + ", ".join(
                    f"{k}={v[-1]:.4g}" for k, v in r.items()), flush=True)
        if "idle" in only:
            for target in args.targets:
                try:
                    kib = bench.idle(target)
                except Exception as e:  # report what we have
                    print(f"idle connections through {target} failed: {e}")
                    continue
                if kib is not None:
                    results[target]["idle"] = [kib]
                    print(f"idle {target}: {kib:.2f} KiB/connection", flush=True)
    finally:
        bench.stop()
    report(results, args)
    return 0


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    cols = [("small", "small req/s", "{:,.0f}"), ("pipelined", "pipelined req/s", "{:,.0f}"),
            ("p99", "p99 ms", "{:.3f}"), ("conns", "new conn/s", "{:,.0f}"),
            ("conn_cpu", "CPU us/conn", "{:.1f}"),
            ("bulk", "bulk Gbit/s", "{:.2f}"), ("cpu", "CPU us/req", "{:.1f}"),
            ("idle", f"KiB/idle conn ({args.idle})", "{:.2f}")]
    med = {t: {k: statistics.median(v) for k, v in r.items()} for t, r in results.items()}
    print()
    print("| target | " + " | ".join(c[1] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for t in results:
        cells = [c[2].format(med[t][c[0]]) if c[0] in med[t] else "-" for c in cols]
        print(f"| {t} | " + " | ".join(cells) + " |")
    if "nginx" in med and "balancer" in med:
        n, b, d = med["nginx"], med["balancer"], med.get("direct", {})
        print()
        print("balancer vs nginx-1 (targets):")
        checks = []
        for key, target, better in (("small", 0.75, "ratio"), ("pipelined", 0.75, "ratio"),
                                    ("conns", 0.9, "ratio"), ("bulk", 1.0, "ratio")):
            if key in n and key in b:
                ratio = b[key] / n[key]
                checks.append((key, f"{ratio:.2f}x (target >= {target}x)", ratio >= target))
        if "conn_cpu" in b and "conn_cpu" in n:
            ratio = b["conn_cpu"] / n["conn_cpu"]
            checks.append(("conn_cpu", f"{ratio:.2f}x nginx's CPU per connection (target <= 1.2x)",
                           ratio <= 1.2))
        if "cpu" in b:
            checks.append(("cpu", f"{b['cpu']:.1f} us/req (target <= 20)", b["cpu"] <= 20))
        if "p99" in b and "p99" in d:
            added = b["p99"] - d["p99"]
            checks.append(("p99", f"+{added:.3f} ms over direct (target <= 0.1)", added <= 0.1))
        if "idle" in b:
            checks.append(("idle", f"{b['idle']:.2f} KiB/conn (target < 4)", b["idle"] < 4))
        for key, text, ok in checks:
            print(f"  {key:10s} {text:45s} {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    sys.exit(main())
