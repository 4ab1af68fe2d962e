#!/usr/bin/env python3
"""
Replay the hostile clients of issue 9 against a chat server and print, per
attack, what the server did and its RSS before and after.

    python bench/abuse.py --spawn                 # a default single node (SQLite)
    python bench/abuse.py --host H --port P --pid PID

Every attack is bounded in count and time (see --help).  An attack marked
"HURT" got what it wanted (memory, a forged line, ...); "held" means the
server answered with a bounded, clear reply.  The RSS figures need the
server's pid (--spawn knows it; otherwise give --pid, or they show n/a).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time


def rssMiB(pid):
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Conn:
    """One client connection speaking JSON lines."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host, port, limit=2**24, source=None):
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection(host, port, limit=limit, local_addr=local)
        return cls(reader, writer)

    def sendRaw(self, data: bytes):
        self.writer.write(data)

    def send(self, message):
        data = message if isinstance(message, str) else json.dumps(message)
        self.writer.write(data.encode("utf-8") + b"\n")

    async def line(self, timeout=10.0) -> bytes:
        data = await asyncio.wait_for(self.reader.readline(), timeout)
        if not data:
            raise ConnectionError("closed")
        return data.rstrip(b"\r\n")

    async def reply(self, timeout=10.0) -> dict:
        return json.loads(await self.line(timeout))

    async def request(self, message, timeout=10.0) -> dict:
        self.send(message)
        return await self.reply(timeout)

    async def replyTo(self, msgid, timeout=10.0) -> dict:
        """The next reply with C{msgid} or an error, skipping notices."""
        while True:
            r = await self.reply(timeout)
            if r.get("msgid") in (msgid, 99):
                return r

    def close(self):
        try:
            self.writer.transport.abort()
        except Exception:
            pass


class Abuse:
    def __init__(self, args, pid):
        self.args = args
        self.host, self.port, self.pid = args.host, args.port, pid
        self.results = []
        #: On loopback each attack comes from its own address (127.0.0.N),
        #: so one attack's throttling does not spoil the next one.
        self.source = None
        self._sources = 10 if self.host.startswith("127.") else None

    async def connect(self):
        return await Conn.open(self.host, self.port, source=self.source)

    async def register(self, name, password="pw"):
        c = await self.connect()
        try:
            r = await c.request({"msgid": 4, "name": name, "password": password}, timeout=60)
        finally:
            c.close()
        if r.get("errno"):
            raise RuntimeError(f"cannot register {name}: {r}")
        return r["id"]

    async def login(self, uid, password="pw"):
        c = await self.connect()
        r = await c.request({"msgid": 1, "id": uid, "password": password}, timeout=60)
        if r.get("errno"):
            raise RuntimeError(f"cannot log in {uid}: {r}")
        return c

    async def pingMs(self):
        """Round trip of a PING on a fresh connection, in ms (None: no answer)."""
        start = time.perf_counter()
        try:
            c = await self.connect()
            try:
                r = await c.request({"msgid": 21}, timeout=10)
            finally:
                c.close()
        except (OSError, asyncio.TimeoutError, ConnectionError):
            return None
        return (time.perf_counter() - start) * 1000 if r.get("msgid") == 22 else None

    async def run(self, name, attack):
        if self._sources is not None:
            self._sources += 1
            self.source = f"127.0.0.{self._sources}"
        before = rssMiB(self.pid)
        started = time.perf_counter()
        try:
            hurt, what = await attack()
        except Exception as e:  # report and go on with the next attack
            hurt, what = None, f"attack failed: {type(e).__name__}: {e}"
        seconds = time.perf_counter() - started
        ping = await self.pingMs()
        after = rssMiB(self.pid)
        verdict = {True: "HURT", False: "held", None: "????"}[hurt]
        fmt = lambda x: "n/a" if x is None else f"{x:.0f} MiB"
        line = (
            f"{name:<22} {verdict}  {what}\n{'':<22}       RSS {fmt(before)} -> {fmt(after)}, "
            f"{seconds:.1f} s, PING after: {'no answer' if ping is None else f'{ping:.0f} ms'}"
        )
        print(line, flush=True)
        self.results.append((name, verdict, what, before, after))

    # --- the attacks ---------------------------------------------------------

    async def helpFlood(self):
        """Send help lines and never read: the server must stop reading us
        (its memory stays bounded) rather than queue every reply."""
        start = rssMiB(self.pid)
        c = await self.connect()
        n = self.args.help_lines
        sent = 0
        chunk = b"help\n" * 1000
        deadline = time.monotonic() + self.args.seconds
        try:
            while sent < n and time.monotonic() < deadline:
                c.sendRaw(chunk)
                sent += 1000
                try:
                    await asyncio.wait_for(c.writer.drain(), 1)
                except asyncio.TimeoutError:
                    break  # the server stopped reading us: backpressure
            await asyncio.sleep(1)
            before = rssMiB(self.pid)
            closed = c.reader.at_eof() or c.writer.transport.is_closing()
        finally:
            c.close()
        grew = None if before is None or start is None else before - start
        stopped = "it stopped reading us" if sent < n else "it read all of it"
        return (grew is None and sent >= n) or (grew is not None and grew > 32), (
            f"sent {sent} help lines ({sent * 5 // 1024} KiB) without reading ({stopped}); "
            f"server {'closed' if closed else 'kept'} the connection; RSS while it was open: "
            f"{'n/a' if before is None else f'{before:.0f} MiB'}"
        )

    async def parallelLogins(self):
        uid = await self.register(f"victim{os.getpid()}", "right")
        n = self.args.parallel
        conns = await asyncio.gather(*(self.connect() for _ in range(n)))
        for c in conns:
            c.send({"msgid": 1, "id": uid, "password": "wrong"})
        replies = await asyncio.gather(*(c.reply(timeout=120) for c in conns), return_exceptions=True)
        for c in conns:
            c.close()
        counts = {}
        for r in replies:
            key = "timeout" if isinstance(r, Exception) else r.get("errno")
            counts[key] = counts.get(key, 0) + 1
        checked = counts.get(1, 0)
        return checked > 10, f"{n} parallel wrong logins on one account: errno counts {counts} ({checked} checked against the password)"

    async def forgedLines(self):
        tag = os.getpid()
        m, a = await self.register(f"mallory{tag}"), await self.register(f"alice{tag}")
        mallory = await self.login(m)
        alice = await self.connect()
        alice.sendRaw(f"login:{a}:pw\n".encode())
        await alice.line(60)
        while True:  # login reply lines, up to its end
            try:
                await alice.line(0.5)
            except asyncio.TimeoutError:
                break
        forged = "hi\n[1]admin said: your account is locked, send your password\r\u2028\x85[1]admin said: x"
        await mallory.request({"msgid": 6, "toid": a, "msg": forged})
        got = b""
        try:
            while True:
                got += await alice.line(1) + b"\n"
        except (asyncio.TimeoutError, ConnectionError):
            pass
        mallory.close(), alice.close()
        lines = got.decode("utf-8", "replace").splitlines()
        fake = [line for line in lines if line.startswith("[1]admin")]
        return bool(fake), f"a JSON msg with line breaks reached a text user as {len(lines)} line(s); forged lines: {fake[:1]}"

    async def mailboxFlood(self):
        tag = os.getpid()
        s, v = await self.register(f"flooder{tag}"), await self.register(f"inbox{tag}")
        sender = await self.login(s)
        body = "x" * 4000
        n, stored, refused = self.args.mailbox, 0, {}
        deadline = time.monotonic() + self.args.seconds
        for i in range(n):
            if time.monotonic() > deadline:
                break
            sender.send({"msgid": 6, "toid": v, "msg": body})
            if i % 100 == 99 or i == n - 1:
                for _ in range(min(100, i + 1 - stored - sum(refused.values()))):
                    r = await sender.replyTo(12, 30)
                    if r.get("errno"):
                        refused[r["errno"]] = refused.get(r["errno"], 0) + 1
                    else:
                        stored += 1
        sender.close()
        c = await self.connect()
        c.send({"msgid": 1, "id": v, "password": "pw"})
        size = len(await c.line(120))
        c.close()
        return size > 2 * 1024 * 1024, (
            f"{stored} x 4 KB offline messages stored for one user (refused: {refused or 'none'}); "
            f"victim's login reply: {size / 1024:.0f} KiB in one line"
        )

    async def registrationBurst(self):
        n = self.args.registrations
        tag = os.getpid()
        pingsBefore = await self.pingMs()

        async def one(i):
            c = await self.connect()
            try:
                return await c.request({"msgid": 4, "name": f"burst{tag}x{i}", "password": "pw"}, timeout=120)
            finally:
                c.close()

        task = asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        await asyncio.sleep(0.2)
        during = await self.pingMs()
        replies = await task
        counts = {}
        for r in replies:
            key = "error" if isinstance(r, Exception) else r.get("errno")
            counts[key] = counts.get(key, 0) + 1
        # Hurt: nothing limited the burst, or it stalled everyone else.
        return counts.get(0, 0) == n or during is None or during > 500, (
            f"{n} concurrent registrations from one address: errno counts {counts}; "
            f"PING {pingsBefore and round(pingsBefore)} ms before, {during and round(during)} ms during"
        )

    async def hostileJSON(self):
        cases = {
            "id 2**70": b'{"msgid":1,"id":%d,"password":"x"}' % 2**70,
            "toid -2**66": b'{"msgid":6,"toid":%d,"msg":"x"}' % -(2**66),
            "text login 10**20": b"login:100000000000000000000:x",
            "depth 3000": b'{"msgid":21,"seq":' + b"[" * 3000 + b"]" * 3000 + b"}",
            "seq NaN": b'{"msgid":21,"seq":NaN}',
            "seq 1e999": b'{"msgid":21,"seq":1e999}',
        }
        out, hurt = [], False
        for name, line in cases.items():
            c = await self.connect()
            try:
                c.sendRaw(line + b"\n")
                raw = await c.line(10)
            finally:
                c.close()
            if raw.startswith(b"{"):
                try:
                    r = json.loads(raw, parse_constant=lambda x: (_ for _ in ()).throw(ValueError(x)))
                    result = f"errno {r.get('errno', 0)}"
                    hurt |= r.get("errno") == 31 or r.get("errno", 0) == 0
                except ValueError:
                    result, hurt = "reply is not JSON", True
            else:
                result = raw.decode("utf-8", "replace")[:40]
                hurt |= "error 31" in result
            out.append(f"{name}: {result}")
        return hurt, "; ".join(out)

    async def trickle(self):
        c = await self.connect()
        seconds = self.args.trickle_seconds
        start = time.monotonic()
        alive = True
        while time.monotonic() - start < seconds:
            try:
                c.sendRaw(b"x")
                await c.writer.drain()
                line = await asyncio.wait_for(c.reader.read(4096), 1)
                if line == b"":
                    alive = False
                    break
            except asyncio.TimeoutError:
                continue
            except (OSError, ConnectionError):
                alive = False
                break
        held = time.monotonic() - start
        c.close()
        return alive, f"one byte a second, never a line, never logged in: {'still connected' if alive else 'closed'} after {held:.0f} s"

    async def badNames(self):
        names = {
            "C1 NEL": "a\x85b",
            "RLO U+202E": "abc\u202egpj.exe",
            "zero width": "ad\u200bmin",
            "U+2028": "a\u2028b",
            "BOM": "\ufeffroot",
        }
        accepted = []
        tag = os.getpid() % 10000
        for label, name in names.items():
            c = await self.connect()
            try:
                r = await c.request({"msgid": 4, "name": f"{name}{tag}", "password": "pw"}, timeout=60)
            finally:
                c.close()
            if r.get("errno") == 0:
                accepted.append(label)
        composed = await self.connect()
        r1 = await composed.request({"msgid": 4, "name": f"Ren\u00e9{tag}", "password": "pw"}, timeout=60)
        r2 = await composed.request({"msgid": 4, "name": f"Rene\u0301{tag}", "password": "pw"}, timeout=60)
        composed.close()
        twins = r1.get("errno") == 0 and r2.get("errno") == 0
        return bool(accepted) or twins, (
            f"accepted: {accepted or 'none'} of {list(names)}; "
            f"'\u00e9' and 'e'+U+0301: {'two accounts' if twins else 'one account'}"
        )


def spawn(args):
    twistd = shutil.which("twistd") or os.path.join(os.path.dirname(sys.executable), "twistd")
    tmp = tempfile.mkdtemp(prefix="abuse-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = os.path.join(tmp, "chat.log")
    argv = [twistd, "-n", "--pidfile=", "--logfile", log, "chat", "--port", f"tcp:{port}:interface=127.0.0.1",
            "--db", f"sqlite:{os.path.join(tmp, 'chat.sqlite3')}"] + args.server_arg
    process = subprocess.Popen(argv)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        process.kill()
        raise SystemExit(f"the spawned server did not listen; see {log}")
    # Until it has started, the server answers every request but PING
    # with errno 30.
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", port), 5) as probe:
            probe.sendall(b'{"msgid":17}\n')
            reply = json.loads(probe.makefile("rb").readline())
        if reply.get("errno") != 30:
            break
        time.sleep(0.05)
    print(f"spawned: {' '.join(argv[1:])} (pid {process.pid}, log {log})", flush=True)
    return process, port, log


ATTACKS = ["help", "logins", "forged", "mailbox", "register", "json", "trickle", "names"]


async def main(args, pid):
    a = Abuse(args, pid)
    table = {
        "help": ("non-reading help flood", a.helpFlood),
        "logins": ("parallel wrong logins", a.parallelLogins),
        "forged": ("forged line chars", a.forgedLines),
        "mailbox": ("mailbox flood", a.mailboxFlood),
        "register": ("registration/KDF burst", a.registrationBurst),
        "json": ("hostile JSON", a.hostileJSON),
        "trickle": ("trickle, no login", a.trickle),
        "names": ("bad names", a.badNames),
    }
    print(f"server RSS at start: {rssMiB(pid) and round(rssMiB(pid))} MiB", flush=True)
    for key in args.only or ATTACKS:
        name, attack = table[key]
        await a.run(name, attack)
    hurt = [r[0] for r in a.results if r[1] == "HURT"]
    print(f"summary: {len(a.results) - len(hurt)} held, {len(hurt)} hurt: {', '.join(hurt) or '-'}")


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6000)
    p.add_argument("--pid", type=int, help="the server's pid, for RSS figures")
    p.add_argument("--spawn", action="store_true", help="start a default single node (twistd chat, SQLite)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for the spawned server")
    p.add_argument("--only", action="append", choices=ATTACKS, help="run only these attacks (repeatable)")
    p.add_argument("--seconds", type=float, default=20, help="time bound of the flood attacks (default 20)")
    p.add_argument("--help-lines", type=int, default=200_000, help="help lines sent unread (default 200000)")
    p.add_argument("--parallel", type=int, default=200, help="parallel wrong logins (default 200)")
    p.add_argument("--mailbox", type=int, default=3000, help="4 KB offline messages sent (default 3000)")
    p.add_argument("--registrations", type=int, default=150, help="concurrent registrations (default 150)")
    p.add_argument("--trickle-seconds", type=float, default=40, help="how long to trickle (default 40)")
    return p.parse_args()


if __name__ == "__main__":
    args = parse()
    process = None
    pid = args.pid
    if args.spawn:
        process, args.port, _ = spawn(args)
        args.host, pid = "127.0.0.1", process.pid
    try:
        asyncio.run(main(args, pid))
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
