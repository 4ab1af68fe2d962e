#!/usr/bin/env python3
"""
Benchmark the balancer side by side with nginx `stream` (1 worker) and a
direct connection, on loopback only.

    .venv/bin/python bench/balancer_bench.py [--rounds 3] [--idle 9000] [--baseline TREE]
        [--targets direct,nginx,balancer] [--with-portforward] [--half-close-pairs] [--no-pin]

Needs (installs nothing): redis-server, redis-benchmark, nginx, iperf3.
Everything it starts (two redis-servers, nginx, the balancer, iperf3) runs on
127.0.0.1 private ports and is stopped at the end.  Targets are interleaved,
each round starting one target later than the one before, and each figure is
the median of --rounds runs.

Targets: direct, nginx (proxy_half_close off, its default), balancer (half-close
on, its default); --half-close-pairs adds nginx-hc (proxy_half_close on) and
balancer-nohc (--no-half-close) to compare new connections like with like;
--baseline TREE adds base (and base-nohc): the balancer of another tree (A/B).

Figures:
  small      redis-benchmark -c 50 -t ping_inline,set,get: mean req/s of the 3
  pipelined  the same with -P 16
  p99        redis-benchmark -c 1 -t ping_inline: p99 latency (ms)
  conn/s     redis-benchmark -c 50 -k 0 -t ping_inline: one connection per request
  conn-cpu   proxy CPU per new connection (us) in the conn/s run, and its user
             part (the rest is the kernel's, which on loopback includes part
             of the peers' TCP work); with --pin (the default) the proxy
             runs alone on the last CPU during the conn/s run, and
             redis-benchmark and the redis-servers on the others, so that
             where the scheduler puts them does not move the figure
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
PORTS: dict[str, tuple[int, int]] = {}
STATUS_PORTS: dict[str, int] = {}
#: balancer targets: (source tree option, extra arguments)
BALANCERS = {"balancer": (None, []), "balancer-nohc": (None, ["--no-half-close"]),
             "base": ("baseline", []), "base-nohc": ("baseline", ["--no-half-close"])}
#: (balancer target, target compared with, what is compared) for new connections
PAIRS = (("balancer", "nginx-hc", "both half-close"),
         ("balancer-nohc", "nginx", "both close at the first EOF"),
         ("base", "nginx-hc", "baseline tree, both half-close"),
         ("base-nohc", "nginx", "baseline tree, both close at the first EOF"),
         ("balancer", "base", "A/B"), ("balancer-nohc", "base-nohc", "A/B"))


def setPorts(base: int) -> None:
    """Every port the benchmark uses, from C{base} (default 17000)."""
    global REDIS_PORTS, IPERF_PORT
    REDIS_PORTS = (base + 1, base + 2)
    IPERF_PORT = base + 3
    # target -> (redis proxy port, iperf proxy port)
    PORTS.update({"direct": (REDIS_PORTS[0], IPERF_PORT), "portforward": (base + 300, base + 301),
                  "nginx": (base + 100, base + 101), "nginx-hc": (base + 110, base + 111)})
    for i, target in enumerate(BALANCERS):  # balancer, balancer-nohc, base, base-nohc
        PORTS[target] = (base + 200 + 10 * i, base + 201 + 10 * i)
        STATUS_PORTS[target] = base + 281 + i


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


def cpuTimes(pids: list[int]) -> tuple[float, float]:
    """user and system CPU seconds of C{pids}"""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])  # utime
        system += int(fields[12])  # stime
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def rssKib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def setAffinity(pids: list[int], cpus: set[int]) -> None:
    """Run every thread of C{pids} (0: this process) on C{cpus} only."""
    for pid in pids:
        tids = [0] if pid == 0 else [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # a thread that ended meanwhile
                pass


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
        self.idleTargets = 0  # targets whose idle connections were opened

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
        if "nginx" in targets or "nginx-hc" in targets:
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
    upstream redis {{ server {HOST}:{REDIS_PORTS[0]}; server {HOST}:{REDIS_PORTS[1]}; }}
    upstream iperf {{ server {HOST}:{IPERF_PORT}; }}
    proxy_connect_timeout 1s;
    tcp_nodelay on;
    server {{ listen {HOST}:{PORTS['nginx'][0]} backlog=1024; proxy_pass redis; }}
    server {{ listen {HOST}:{PORTS['nginx'][1]}; proxy_pass iperf; }}
    server {{ listen {HOST}:{PORTS['nginx-hc'][0]} backlog=1024; proxy_pass redis; proxy_half_close on; }}
    server {{ listen {HOST}:{PORTS['nginx-hc'][1]}; proxy_pass iperf; proxy_half_close on; }}
}}
""")
            p = self.spawn([findTool("nginx"), "-c", conf, "-e", f"{self.tmp}/nginx-error.log"])
            waitPort(PORTS["nginx"][0])
            time.sleep(0.2)
            self.pids["nginx"] = self.pids["nginx-hc"] = children(p.pid) or [p.pid]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # each process names its own log file (-l)
        twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                  "-n", "--pidfile=", "-r", "epoll"]
        for target, (treeOption, extra) in BALANCERS.items():
            if target in targets:
                self.startBalancer(target, twistd, env, treeOption, extra)
        if "portforward" in targets:
            p = self.spawn(twistd + ["-l", os.path.join(self.tmp, "twistd.log"), "portforward",
                                     "-p", f"tcp:{PORTS['portforward'][0]}:interface={HOST}",
                                     "-h", HOST, "-d", str(REDIS_PORTS[0])], env=env)
            self.spawn(twistd + ["-l", os.path.join(self.tmp, "twistd-pf.log"), "portforward",
                                 "-p", f"tcp:{PORTS['portforward'][1]}:interface={HOST}",
                                 "-h", HOST, "-d", str(IPERF_PORT)], env=env)
            waitPort(PORTS["portforward"][0])
            self.pids["portforward"] = [p.pid]
        self.pids["direct"] = []

    def startBalancer(self, target: str, twistd: list[str], env: dict[str, str],
                      treeOption: str | None, extra: list[str]) -> None:
        tree = os.path.abspath(getattr(self.args, treeOption)) if treeOption else ROOT
        # the tree first on the path, and as the current directory ("" leads sys.path)
        env = dict(env, PYTHONPATH=tree + os.pathsep + env["PYTHONPATH"])
        backends = [w for port in REDIS_PORTS
                    for w in ("--backend", f"{HOST}:{port} max_fails=3 fail_timeout=30s")]
        p = self.spawn(twistd + [
            f"--logfile={self.tmp}/twistd-{target}.log",
            "balancer", "--listen", f"tcp:{PORTS[target][0]}:interface={HOST}",
            *backends, "--status", f"tcp:{STATUS_PORTS[target]}:interface={HOST}",
            "--check-interval", "2s", "--check-send", r"PING\r\n", "--check-expect", "PONG",
            *extra,
        ], env=env, cwd=tree)
        # bulk test: a second balancer with the iperf3 backend
        self.spawn(twistd + [f"--logfile={self.tmp}/twistd-{target}-iperf.log", "balancer",
                             "--listen", f"tcp:{PORTS[target][1]}:interface={HOST}",
                             "--backend", f"{HOST}:{IPERF_PORT}", "--check-interval", "2s",
                             *extra], env=env, cwd=tree)
        for port in PORTS[target]:
            waitPort(port)
        self.pids[target] = [p.pid]

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

    def withCpu(self, target: str, n: int, *extra: str) -> tuple[list[dict[str, str]], float | None, float | None]:
        """redis-benchmark through C{target}, and the proxy's CPU and user
        CPU us per C{n} (None: direct)"""
        pids = self.pids[target]
        if not pids:
            return self.redisBenchmark(PORTS[target][0], *extra), None, None
        user0, system0 = cpuTimes(pids)
        rows = self.redisBenchmark(PORTS[target][0], *extra)
        user1, system1 = cpuTimes(pids)
        user = (user1 - user0) * 1e6 / n
        return rows, user + (system1 - system0) * 1e6 / n, user

    def small(self, target: str) -> tuple[float, float | None, float | None]:
        n = self.args.requests
        rows, cpu, user = self.withCpu(target, 3 * n, "-c", "50", "-n", str(n), "-t", "ping_inline,set,get")
        return statistics.mean(float(r["rps"]) for r in rows), cpu, user

    def pipelined(self, target: str) -> float:
        rows = self.redisBenchmark(PORTS[target][0], "-c", "50", "-P", "16",
                                    "-n", str(self.args.requests * 5), "-t", "ping_inline,set,get")
        return statistics.mean(float(r["rps"]) for r in rows)

    def p99(self, target: str) -> float:
        rows = self.redisBenchmark(PORTS[target][0], "-c", "1", "-n", "20000", "-t", "ping_inline")
        return float(rows[0]["p99_latency_ms"])

    def conns(self, target: str) -> tuple[float, float | None, float | None]:
        """New connections per second, and the proxy's CPU and user CPU us
        per connection.  With --pin the proxy runs on the last CPU and
        everything else (redis-benchmark, the redis-servers) on the others
        meanwhile."""
        n = 20000
        pids = self.pids[target]
        allCpus = os.sched_getaffinity(0)
        pinned = self.args.pin and len(allCpus) >= 2
        if pinned:
            proxyCpu = {max(allCpus)}
            others = [0] + [p.pid for p in self.procs[:len(REDIS_PORTS)]]
            setAffinity(others, allCpus - proxyCpu)
            setAffinity(pids, proxyCpu)
        try:
            rows, cpu, user = self.withCpu(target, n, "-c", "50", "-k", "0", "-n", str(n), "-t", "ping_inline")
        finally:
            if pinned:
                setAffinity(others + pids, allCpus)
        return float(rows[0]["rps"]), cpu, user

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
        # each target's clients from addresses of their own: the previous
        # targets' closed connections hold their source ports in TIME_WAIT
        self.idleTargets += 1
        net = self.idleTargets
        socks = openIdle(n, PORTS[target][0], lambda i: f"127.{net}.0.{2 + i // 20000}")
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
        """Make sure every connection is proxied through to a backend."""
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
    ap.add_argument("--with-portforward", action="store_true", help="also a twisted portforward")
    ap.add_argument("--half-close-pairs", action="store_true",
                    help="also measure targets nginx-hc and balancer-nohc (see above)")
    ap.add_argument("--baseline", metavar="TREE", help="also measure the balancer of source "
                    "tree TREE: targets base (and base-nohc with --half-close-pairs)")
    ap.add_argument("--only", default="small,pipelined,p99,conns,bulk,idle")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="during conns, the proxy on the last CPU and the rest on the others "
                         "(default: on, with 2 CPUs or more)")
    ap.add_argument("--port-base", type=int, default=17000,
                    help="ports used: BASE+1..3 (redis, iperf3), +100..111 nginx, "
                         "+200..231 balancers, +281..284 status, +300.. portforward")
    args = ap.parse_args()
    setPorts(args.port_base)
    args.targets = args.targets.split(",") + (["portforward"] if args.with_portforward else [])
    pairs = ["nginx-hc", "balancer-nohc"] if args.half_close_pairs else []
    pairs += (["base", "base-nohc"] if pairs else ["base"]) if args.baseline else []
    args.targets += [t for t in pairs if t not in args.targets]
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
            # each round starts one target later: every target takes every
            # place in the order (what ran before, its TIME_WAIT sockets and
            # the page cache, is the same for all over the rounds)
            shift = rnd % len(args.targets)
            for target in args.targets[shift:] + args.targets[:shift]:
                r = results[target]
                # figure -> its CPU figure (small and conns measure the proxy's CPU too)
                for name, cpuName in (("small", "cpu"), ("pipelined", None), ("p99", None),
                                      ("conns", "conn_cpu"), ("bulk", None)):
                    if name not in only:
                        continue
                    value = getattr(bench, name)(target)
                    if cpuName is not None:
                        value, cpu, user = value
                        if cpu is not None:
                            r.setdefault(cpuName, []).append(cpu)
                            r.setdefault(cpuName + "_user", []).append(user)
                    r.setdefault(name, []).append(value)
                print(f"round {rnd + 1} {target}: " + ", ".join(
                    f"{k}={v[-1]:.4g}" for k, v in r.items()), flush=True)
        if "idle" in only:
            for target in args.targets:
                try:  # report what we have
                    kib = bench.idle(target)
                except Exception as e:
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
            ("conn_cpu", "CPU us/conn", "{:.1f}"), ("conn_cpu_user", "of it user", "{:.1f}"),
            ("bulk", "bulk Gbit/s", "{:.2f}"),
            ("cpu", "CPU us/req", "{:.1f}"),
            ("idle", f"KiB/idle conn ({args.idle})", "{:.2f}")]
    med = {t: {k: statistics.median(v) for k, v in r.items()} for t, r in results.items()}
    print("\n| target | " + " | ".join(c[1] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for t in results:
        cells = [c[2].format(med[t][c[0]]) if c[0] in med[t] else "-" for c in cols]
        print(f"| {t} | " + " | ".join(cells) + " |")
    if "nginx" in med and "balancer" in med:
        n, b, d = med["nginx"], med["balancer"], med.get("direct", {})
        print("\nbalancer vs nginx-1 (targets):")
        checks = []
        for key, target in (("small", 0.75), ("pipelined", 0.75), ("conns", 0.9), ("bulk", 1.0)):
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
    pairs = [p for p in PAIRS if "conn_cpu" in med.get(p[0], {}) and "conn_cpu" in med.get(p[1], {})]
    if pairs:
        print("\nnew connections, like for like (targets >= 0.9x conn/s, <= 1.2x CPU/conn):")
    for b, n, what in pairs:
        ratio, cpu = med[b]["conns"] / med[n]["conns"], med[b]["conn_cpu"] / med[n]["conn_cpu"]
        verdict = "" if what == "A/B" else " MET" if ratio >= 0.9 and cpu <= 1.2 else " NOT MET"
        print(f"  {b} vs {n} ({what}): new conn/s {ratio:.2f}x, CPU/conn {cpu:.2f}x{verdict}")


if __name__ == "__main__":
    sys.exit(main())
