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

Token logins (issue 12; the server must send "token" in LOGIN_MSG_ACK):

    # password-login N users once, keep their tokens, close the connections,
    # then time N token logins ({"msgid":1,"id":ID,"token":T}) with 50 in
    # flight (each: TCP connect, login, ack):
    python bench/chatload.py --spawn --clients 5000 --token-logins --concurrency 50

    # reconnect storm: N users logged in through the balancer, kill -9 one
    # chat server behind it (another one takes over), time until every
    # dropped user is logged in again with its token:
    python bench/chatload.py --target 127.0.0.1:7000 --storm 5000 --kill-pid 1234

    # the same on one spawned server, killed and restarted at once (it keeps
    # its tokens in Redis: --spawn-redis, by default the local Redis with a
    # key prefix of its own, deleted afterwards):
    python bench/chatload.py --spawn --storm 5000

Both print what the server lacks when its login reply carries no token.

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
import random
import selectors
import signal
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
        sock.settimeout(5)
        try:
            sock.connect((host, port))
        except OSError:
            sock.close()
            raise
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
                except OSError:
                    break  # reset: the read side reports the close
                data = data[sent:]
        self.dirty.clear()

    def close(self, conn: Conn) -> None:
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self.dirty.discard(conn)
        conn.outbuf.clear()

    def poll(self, timeout: float, onLine, onClose=None) -> None:
        """Read what is ready; call onLine(conn, line) for each line, and
        onClose(conn) when a connection is closed by the other side (without
        onClose, that ends the run)."""
        self.flush()
        for key, _ in self.sel.select(timeout):
            conn = key.data
            if conn.sock.fileno() < 0:
                continue  # closed by an earlier callback of this round
            try:
                data = conn.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                if onClose is None:
                    raise SystemExit(f"server closed connection {conn.index}")
                self.close(conn)
                onClose(conn)
                continue
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


def startServer(port: int, workdir: str, extra=()) -> subprocess.Popen:
    """Start a private chat server (SQLite in C{workdir}); do not wait."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    cmd = [
        twistd, "--pidfile", "", "-n", "--logfile", os.path.join(workdir, "chat.log"), "chat",
        "--port", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
        "--db", f"sqlite:{workdir}/bench.sqlite3",
        "--scrypt-n", "16", "--idle-timeout", "0",
        # Every bench user registers from 127.0.0.1.
        "--register-burst", "1000000", *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd)


def spawnServer(port: int, workdir: str, extra=()) -> subprocess.Popen:
    """Start a private chat server and wait until it answers PING."""
    proc = startServer(port, workdir, extra)
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


def redisDeletePrefix(url: str, prefix: str) -> int:
    """Delete the keys under C{prefix} of the Redis at C{url} (redis://
    [:password@]host[:port][/db]); how many."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=10)
    f = sock.makefile("rb")

    def call(*words):
        out = [b"*%d\r\n" % len(words)]
        for w in words:
            w = str(w).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(w), w))
        sock.sendall(b"".join(out))
        return read()

    def read():
        line = f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise SystemExit(f"Redis at {url}: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else f.read(n + 2)[:-2].decode()
        if kind == b"*":
            return [read() for _ in range(int(rest))]
        return rest.decode()

    try:
        if parts.password:
            call("AUTH", unquote(parts.password))
        if parts.path.strip("/"):
            call("SELECT", parts.path.strip("/"))
        cursor, deleted = "0", 0
        while True:
            cursor, keys = call("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            if keys:
                deleted += call("DEL", *keys)
            if cursor == "0":
                return deleted
    finally:
        f.close()
        sock.close()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", help="HOST:PORT of a chat server or balancer (repeatable)")
    ap.add_argument("--pid", action="append", type=int, default=[], help="server pid(s), for RSS/CPU figures")
    ap.add_argument("--spawn", action="store_true", help="start a private chat server")
    ap.add_argument(
        "--server-arg", action="append", default=[], metavar="ARG",
        help="--spawn: pass ARG to the chat server (repeatable), e.g. --server-arg=--gc-intervals=off",
    )
    ap.add_argument("--clients", type=int, default=1000, help="logged-in connections (default 1000)")
    ap.add_argument("--pairs", type=int, default=100, help="sender/receiver pairs (default 100)")
    ap.add_argument("--window", type=int, default=4, help="messages in flight per sender, closed loop (default 4)")
    ap.add_argument("--rate", type=float, default=0, help="total messages/s, open loop (default: closed loop)")
    ap.add_argument("--duration", type=float, default=10, help="seconds of traffic (default 10)")
    ap.add_argument("--warmup", type=float, default=1, help="seconds of traffic not counted (default 1)")
    ap.add_argument(
        "--token-logins",
        action="store_true",
        help="instead of message traffic: time a token login of each of the --clients users",
    )
    ap.add_argument("--concurrency", type=int, default=50, help="token logins in flight (default 50)")
    ap.add_argument(
        "--token-rounds",
        type=int,
        default=1,
        help="token logins per user, each with the token of the previous one (default 1)",
    )
    ap.add_argument(
        "--storm",
        type=int,
        default=0,
        metavar="N",
        help="instead of message traffic: log N users in, kill -9 a chat server, time until all are back with tokens",
    )
    ap.add_argument("--kill-pid", type=int, help="--storm: the chat server to kill (default: the spawned one)")
    ap.add_argument(
        "--no-restart",
        action="store_true",
        help="--storm --spawn: do not restart the killed server (only useful with others behind a balancer)",
    )
    ap.add_argument("--storm-timeout", type=float, default=120, help="--storm: give up after this many s (default 120)")
    ap.add_argument(
        "--spawn-redis",
        metavar="URL",
        help="--spawn: run the server in cluster mode on this Redis, with a key prefix of its own deleted afterwards"
        " (default with --storm: redis://127.0.0.1:6379/0, so its tokens survive the restart)",
    )
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    args = ap.parse_args(argv)
    if args.storm:
        args.clients = args.storm
        if not args.spawn and not args.kill_pid:
            ap.error("--storm needs --kill-pid PID (a chat server behind --target) or --spawn")
        if args.spawn and args.spawn_redis is None:
            args.spawn_redis = "redis://127.0.0.1:6379/0"
    elif not args.token_logins and args.clients < 2 * args.pairs:
        ap.error("--clients must be at least 2 * --pairs")
    if args.concurrency < 1:
        ap.error("--concurrency must be at least 1")

    limit = raiseFileLimit(args.clients + args.concurrency + 1000)
    if limit < args.clients + args.concurrency + 100:
        ap.error(f"open-files limit {limit} is too low for {args.clients} clients (ulimit -n)")
    args.server = None
    workdir = tempfile.mkdtemp(prefix="chatload-")
    redisPrefix = None
    if args.spawn:
        port = freePort()
        extra = list(args.server_arg)
        if args.spawn_redis:
            redisPrefix = f"chatload:{os.getpid()}:{time.monotonic_ns() % 10**9}:"
            extra += ["--redis", args.spawn_redis, "--redis-prefix", redisPrefix, "--name", "chatload"]
        args.spawnArgs = (port, workdir, extra)
        args.server = spawnServer(port, workdir, extra)
        args.target = [f"127.0.0.1:{port}"]
        args.pid = [args.server.pid]
    if not args.target:
        ap.error("give --target HOST:PORT or --spawn")
    targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in args.target]
    try:
        if args.storm:
            return runStorm(args, targets)
        if args.token_logins:
            return runTokenLogins(args, targets)
        return run(args, targets)
    finally:
        if args.server is not None and args.server.poll() is None:
            args.server.terminate()
            args.server.wait(30)
        if redisPrefix:
            try:
                redisDeletePrefix(args.spawn_redis, redisPrefix)
            except OSError as e:
                print(f"could not delete the Redis keys under {redisPrefix}: {e}")


def report(result: dict, asJSON: bool) -> None:
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if asJSON:
        print(json.dumps(result))


class NoTokens(Exception):
    """The server's login replies carry no token."""


NO_TOKEN_TEXT = (
    'the server\'s LOGIN_MSG_ACK has no "token" field: this server does not issue session-resumption'
    " tokens yet (issue 12 not wired into the login flow), so token logins cannot be measured"
)


def registerAndLogin(loop: "Loop", args, targets, run_id: str, wantTokens: bool = False):
    """
    Register C{args.clients} users (pipelined on one connection) and log
    each in with its password on a connection of its own (client i on
    target i % len(targets)).  Returns (clients, tokens, registered s,
    login s); C{tokens} maps uid to the token of its login reply.
    """
    t0 = time.monotonic()
    registrars = [loop.connect(host, port, -1 - i) for i, (host, port) in enumerate(targets)]
    uids = []
    for start in range(0, args.clients, 1000):
        batch = range(start, min(args.clients, start + 1000))
        lines = [json.dumps({"msgid": 4, "name": f"b{run_id}-{i}", "password": "pw"}).encode() for i in batch]
        replies = loop.request(registrars[0], lines)
        # A server answers PING before its store is up, and errno 30
        # ("starting") to the rest: wait for it.
        deadline = time.monotonic() + 30
        while all(r.get("errno") == 30 for r in replies) and time.monotonic() < deadline:
            time.sleep(0.1)
            replies = loop.request(registrars[0], lines)
        for reply in replies:
            if reply.get("errno") != 0:
                raise SystemExit(f"register failed: {reply}")
            uids.append(reply["id"])
    for conn in registrars:
        loop.close(conn)
    loop.conns.clear()
    registered = time.monotonic() - t0

    t0 = time.monotonic()
    pending = 0
    clients: list[Conn] = []
    tokens: dict[int, str] = {}
    loggedIn = 0

    def onLogin(conn, line):
        nonlocal loggedIn, pending
        reply = json.loads(line)
        if reply.get("msgid") == 2:
            if reply.get("errno") == 30:
                # The KDF pool's queue is full ("busy, retry"): retry, as a
                # client would.
                retries.append(conn)
                return
            if reply.get("errno") != 0:
                raise SystemExit(f"login failed: {reply}")
            if "token" in reply:
                tokens[conn.uid] = reply["token"]
            elif wantTokens:
                raise NoTokens()
            loggedIn += 1
            pending -= 1

    retries: list[Conn] = []

    def resend() -> None:
        while retries:
            conn = retries.pop()
            loop.send(conn, b'{"msgid":1,"id":%d,"password":"pw"}\n' % conn.uid)

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
                resend()
    while pending:
        loop.poll(1, onLogin)
        resend()
    loginTime = time.monotonic() - t0
    return clients, tokens, registered, loginTime


def tokenLoginLine(uid: int, token: str) -> bytes:
    return json.dumps({"msgid": 1, "id": uid, "token": token}).encode() + b"\n"


def runTokenLogins(args, targets) -> dict:
    """Password-login every user once, keep the tokens, close; then time
    one token login per user (connect, login, ack) with
    C{args.concurrency} in flight."""
    loop = Loop()
    run_id = f"{os.getpid()}x{time.monotonic_ns() % 10**9}"
    try:
        clients, tokens, registered, passwordTime = registerAndLogin(loop, args, targets, run_id, wantTokens=True)
    except NoTokens:
        print(NO_TOKEN_TEXT)
        return {"token_logins": "unsupported by the server"}
    for conn in clients:
        loop.close(conn)
    loop.conns.clear()
    time.sleep(0.5)  # let the server see the connections go

    queue: list = []
    inflight = 0
    latencies: list[float] = []
    failures: dict[str, int] = {}
    firstFailure: list = []
    startedAt: dict[Conn, float] = {}
    conns: list[Conn] = []
    perf = time.perf_counter

    def startOne() -> None:
        nonlocal inflight
        uid, token = queue.pop()
        host, port = targets[len(conns) % len(targets)]
        t = perf()
        conn = loop.connect(host, port, len(conns))
        conn.uid = uid
        conns.append(conn)
        startedAt[conn] = t
        loop.send(conn, tokenLoginLine(uid, token))
        inflight += 1

    def fail(what: str, detail) -> None:
        failures[what] = failures.get(what, 0) + 1
        if not firstFailure:
            firstFailure.append(detail)

    def onLine(conn, line):
        nonlocal inflight
        reply = json.loads(line)
        msgid = reply.get("msgid")
        if msgid not in (2, 99) or conn not in startedAt:
            return  # a push (friend state...) or a late line
        latencies.append((perf() - startedAt.pop(conn)) * 1000)
        inflight -= 1
        if msgid == 2 and reply.get("errno") == 0 and reply.get("token"):
            tokens[conn.uid] = reply["token"]
        elif msgid == 2 and reply.get("errno") == 0:
            fail("ack without a new token", reply)
        else:
            fail(f"errno {reply.get('errno')}", reply)

    def onClose(conn):
        nonlocal inflight
        if conn in startedAt:
            del startedAt[conn]
            inflight -= 1
            fail("closed before the reply", conn.uid)

    cpu0 = {pid: cpuSeconds(pid) for pid in args.pid}
    wall = 0.0
    for _ in range(args.token_rounds):
        if conns:  # the previous round's connections go; the server sees it
            for conn in conns:
                loop.close(conn)
            conns.clear()
            loop.conns.clear()
            time.sleep(0.5)
        queue = list(tokens.items())
        queue.reverse()
        t0 = time.monotonic()
        while queue or inflight:
            while queue and inflight < args.concurrency:
                startOne()
            loop.poll(1, onLine, onClose)
        wall += time.monotonic() - t0
    cpu = {pid: cpuSeconds(pid) - cpu0[pid] for pid in args.pid}
    latencies.sort()
    n = len(tokens) * args.token_rounds
    result = {
        "targets": [f"{h}:{p}" for h, p in targets],
        "users": len(tokens),
        "registered_s": round(registered, 2),
        "password_logins_per_s": round(len(tokens) / passwordTime),
        "concurrency": args.concurrency,
        "token_logins": n,
        "token_logins_per_s": round(n / wall),
        "token_login_p50_ms": round(percentile(latencies, 0.50), 2),
        "token_login_p99_ms": round(percentile(latencies, 0.99), 2),
        "token_login_max_ms": round(latencies[-1], 2) if latencies else None,
        "token_login_failures": sum(failures.values()),
    }
    for what, count in failures.items():
        result[f"failures_{what.replace(' ', '_')}"] = count
    for pid in args.pid:
        result[f"server_{pid}_cpu_us_per_token_login"] = round(cpu[pid] * 1e6 / n, 1)
    report(result, args.json)
    if firstFailure:
        print("first failure:", str(firstFailure[0])[:300])
    for conn in conns:
        loop.close(conn)
    return result


def runStorm(args, targets) -> dict:
    """
    Log C{args.storm} users in (through --target, normally the balancer),
    kill -9 a chat server (C{--kill-pid}, or the spawned one, restarted at
    once unless --no-restart), and reconnect every user whose connection
    dropped with its token, at once, retrying with jittered exponential
    back-off (50 ms doubling up to 1 s) while the server is unreachable.
    Reports the time from the kill until the last dropped user is logged
    in again.
    """
    loop = Loop()
    run_id = f"{os.getpid()}x{time.monotonic_ns() % 10**9}"
    try:
        clients, tokens, registered, passwordTime = registerAndLogin(loop, args, targets, run_id, wantTokens=True)
    except NoTokens:
        print(NO_TOKEN_TEXT)
        return {"storm": "unsupported by the server"}
    users = len(clients)
    perf = time.monotonic
    down: dict[int, float] = {}  # uid -> when its connection dropped
    back: dict[int, float] = {}  # uid -> seconds from the kill to its new login ack
    attempts = {"connect_refused": 0, "closed_before_reply": 0, "logins": 0}
    errnos: dict[int, int] = {}
    rejected: set[int] = set()
    retryAt: list[tuple[float, int, int]] = []  # (when, uid, attempt)
    waiting: dict[Conn, int] = {}  # new connection -> attempt number
    firstProblem: list = []

    def schedule(uid: int, attempt: int) -> None:
        delay = 0.0 if attempt == 0 else min(1.0, 0.05 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        retryAt.append((perf() + delay, uid, attempt))

    def reconnect(uid: int, attempt: int) -> None:
        host, port = targets[uid % len(targets)]
        try:
            conn = loop.connect(host, port, uid)
        except OSError:
            attempts["connect_refused"] += 1
            schedule(uid, attempt + 1)
            return
        conn.uid = uid
        waiting[conn] = attempt
        loop.send(conn, tokenLoginLine(uid, tokens[uid]))
        attempts["logins"] += 1

    def onClose(conn):
        uid = conn.uid
        if conn in waiting:  # a reconnection that did not get through
            attempt = waiting.pop(conn)
            attempts["closed_before_reply"] += 1
            schedule(uid, attempt + 1)
        elif uid not in down or uid in back:  # a logged-in user dropped
            down[uid] = perf()
            back.pop(uid, None)
            schedule(uid, 0)

    def onLine(conn, line):
        if conn not in waiting:
            return
        reply = json.loads(line)
        if reply.get("msgid") not in (2, 99):
            return
        attempt = waiting.pop(conn)
        errno = reply.get("errno")
        if reply.get("msgid") == 2 and errno == 0:
            back[conn.uid] = perf() - killedAt
            if reply.get("token"):
                tokens[conn.uid] = reply["token"]
            return
        errnos[errno] = errnos.get(errno, 0) + 1
        if not firstProblem:
            firstProblem.append(reply)
        loop.close(conn)
        if errno == 1:  # wrong or expired token: final
            rejected.add(conn.uid)
        else:  # throttled, unavailable, online elsewhere...: try again
            schedule(conn.uid, attempt + 1)

    victim = args.kill_pid or args.server.pid
    print(f"{users} users logged in; kill -9 {victim}", flush=True)
    cpu0 = {pid: cpuSeconds(pid) for pid in args.pid if pid != victim}
    killedAt = perf()
    os.kill(victim, signal.SIGKILL)
    if args.server is not None and victim == args.server.pid:
        args.server.wait()
        if not args.no_restart:
            port, workdir, extra = args.spawnArgs
            args.server = startServer(port, workdir, extra)
    deadline = killedAt + args.storm_timeout
    lastDrop = killedAt
    while True:
        now = perf()
        if down:
            lastDrop = max(down.values())
        settled = now - max(lastDrop, killedAt) > 1.0
        if down and settled and all(uid in back or uid in rejected for uid in down):
            break
        if not down and now - killedAt > 5:
            break  # nobody dropped: wrong pid?
        if now > deadline:
            break
        due = [r for r in retryAt if r[0] <= now]
        if due:
            retryAt[:] = [r for r in retryAt if r[0] > now]
            for _, uid, attempt in due:
                reconnect(uid, attempt)
        loop.poll(0.005, onLine, onClose)
    times = sorted(back[uid] for uid in down if uid in back)
    missing = [uid for uid in down if uid not in back and uid not in rejected]
    result = {
        "targets": [f"{h}:{p}" for h, p in targets],
        "users": users,
        "password_logins_per_s": round(users / passwordTime),
        "killed_pid": victim,
        "dropped": len(down),
        "back": len(times),
        "rejected_tokens": len(rejected),
        "not_back": len(missing),
        "all_back_s": round(times[-1], 3) if times and not missing and not rejected else None,
        "back_p50_s": round(percentile(times, 0.50), 3),
        "back_p99_s": round(percentile(times, 0.99), 3),
        "token_logins_sent": attempts["logins"],
        "connects_refused": attempts["connect_refused"],
        "closed_before_reply": attempts["closed_before_reply"],
    }
    for errno, count in sorted(errnos.items(), key=lambda kv: str(kv[0])):
        result[f"replies_errno_{errno}"] = count
    for pid, c0 in cpu0.items():
        result[f"server_{pid}_cpu_s"] = round(cpuSeconds(pid) - c0, 2)
    if args.server is not None and args.server.pid != victim and args.server.poll() is None:
        # the restarted server: all of its CPU since the kill, start-up included
        result[f"restarted_server_{args.server.pid}_cpu_s"] = round(cpuSeconds(args.server.pid), 2)
    report(result, args.json)
    if not down:
        print(f"no connection dropped within 5 s of killing {victim}: is it a chat server behind --target?")
    if firstProblem:
        print("first error reply:", str(firstProblem[0])[:300])
    for conn in loop.conns:
        if conn.sock.fileno() >= 0:
            loop.close(conn)
    return result


def run(args, targets) -> dict:
    loop = Loop()
    # A name prefix of this run's users, so runs against one server differ.
    run_id = f"{os.getpid()}x{time.monotonic_ns() % 10**9}"
    baseline = {pid: rssKiB(pid) for pid in args.pid}
    clients, _, registered, loginTime = registerAndLogin(loop, args, targets, run_id)
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
    report(result, args.json)
    if firstError:
        print("first unexpected line:", firstError[0])
    for conn in loop.conns:
        conn.sock.close()
    return result


if __name__ == "__main__":
    # 2: the server cannot do what was asked (no tokens in its login replies).
    sys.exit(2 if "unsupported by the server" in main().values() else 0)
