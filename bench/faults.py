#!/usr/bin/env python3
"""
What a fault costs a two-server cluster under load: one-to-one chat from
P senders on chat1 to P receivers on chat2 (numbered messages, open loop at
--rate messages/s in all), then, --warmup seconds in, one fault:

  sigterm-receivers   SIGTERM of chat2 (graceful stop)
  sigterm-senders     SIGTERM of chat1
  kill-receivers      SIGKILL of chat2
  kill-senders        SIGKILL of chat1
  kill-redis          SIGKILL of redis-server, restarted on its port --down s later
  kill-mariadb        SIGKILL of a private mariadbd, restarted --down s later

Clients whose server goes away log in on the other one.  Everything is
private (Redis, the chat servers, MariaDB for kill-mariadb) and on
loopback; every run is bounded in time.

With end-to-end acks (issue 11; the default mode) the clients are the
issue's: receivers log in with "ack": true, confirm every push's "mid"
with PUSH_ACK (26) and show a message only the first time its mid comes;
senders number their messages, put cid = the number and, after
reconnecting, send again every message that has no errno-0 ack yet (a
message answered with an error is also sent again, a second later).
Before the load a probe message checks that pushes carry "mid"; a server
without acks is reported and the exit status is 2 (measure such a server
with --legacy: today's clients, no resend, no acks).

Per run it prints: sent (numbers) and sends (with resends); acknowledged
delivered / stored; error replies (by errno); unacknowledged at the end;
delivered live (first shown on a push in a session that was up when the
message was first sent) and later (login hand-over, redelivery, resend);
lost (a number whose sender got errno 0 and its receiver never showed);
shown twice after de-duplication by mid (a number shown under two
different mids); raw duplicates (pushes of a mid already shown, which
de-duplication hides); and the recovery time (from the fault until every
client that lost its connection is logged in again and a message sent
after the fault has been acked "delivered").

    .venv/bin/python bench/faults.py                       # 4 kills x 1,000 and 2,000 msg/s
    .venv/bin/python bench/faults.py --fault kill-receivers --rate 2000
    .venv/bin/python bench/faults.py --legacy --fault all --rate 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cluster_bench  # noqa: E402

FAULTS = ("sigterm-receivers", "sigterm-senders", "kill-receivers", "kill-senders", "kill-redis", "kill-mariadb")
#: the issue's benchmark: SIGKILL of each component
ACK_FAULTS = ("kill-receivers", "kill-senders", "kill-redis", "kill-mariadb")
LEGACY_FAULTS = FAULTS

ONE_CHAT_MSG, LOGIN, LOGIN_ACK, PUSH_ACK = 6, 1, 2, 26
NO_ACKS_STATUS = 2


class NoAcks(Exception):
    """The chat server does not implement end-to-end acks."""


def register(port: int, name: str) -> int:
    # A server answers PING before its store is up, and errno 30
    # ("starting") to the rest: wait for it (up to 30 s).
    deadline = time.monotonic() + 30
    while True:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(json.dumps({"msgid": 4, "name": name, "password": "pw"}).encode() + b"\n")
            reply = json.loads(s.makefile("rb").readline())
        if reply.get("errno") != 30 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if reply.get("errno") != 0:
        raise SystemExit(f"cannot register {name}: {reply}")
    return reply["id"]


def line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


async def pushedChats(reader, quiet: float | None = None):
    """The chats pushed on a session's connection until it ends (or
    nothing comes for C{quiet} s)."""
    while True:
        try:
            data = await (reader.readline() if quiet is None else asyncio.wait_for(reader.readline(), quiet))
        except (asyncio.TimeoutError, OSError):
            return
        if not data:
            return
        message = json.loads(data)
        if message.get("msgid") == ONE_CHAT_MSG:
            yield message


def numberOf(text: str) -> tuple[int, int] | None:
    try:
        sender, n = (int(x) for x in text.split(":"))
    except (ValueError, AttributeError):
        return None
    return sender, n


class Run:
    def __init__(self, ports, alive, acks: bool) -> None:
        self.ports = ports  # [chat1, chat2]
        self.alive = alive  # callable(index) -> bool
        self.ackMode = acks
        self.sent: dict[tuple[int, int], float] = {}  # (sender, n) -> first send time
        self.sends = 0  # with resends
        self.acks: dict[tuple[int, int], str] = {}  # the first errno-0 state, else the last error
        self.errors: Counter = Counter()  # every error reply, by errno
        self.shown: Counter = Counter()  # (sender, n) -> times shown (after de-dup by mid)
        self.mids: defaultdict = defaultdict(set)  # (sender, n) -> mids shown for it
        self.seenMids: set = set()
        self.rawDuplicates = 0
        self.withoutMid = 0
        self.live: set = set()
        self.later: set = set()
        self.faultAt: float | None = None
        self.recovered: float | None = None  # legacy definition
        self.firstDelivered: float | None = None  # a post-fault message acked "delivered"
        self.dropped: set = set()  # clients that lost their connection after the fault
        self.backAt: dict[int, float] = {}  # ... and when they logged in again
        self.sending = True
        self.drainUntil = float("inf")
        self.done = False

    # -- bookkeeping ---------------------------------------------------------

    def note(self, sender: int, n: int, reply: dict) -> None:
        key = (sender, n)
        if reply.get("errno") == 0:
            if self.acks.get(key) not in ("delivered", "stored"):
                self.acks[key] = reply.get("state", "?")
            if (
                self.faultAt is not None
                and reply.get("state") == "delivered"
                and self.sent.get(key, 0) > self.faultAt
            ):
                if self.recovered is None:
                    self.recovered = time.monotonic() - self.faultAt
                if self.firstDelivered is None:
                    self.firstDelivered = time.monotonic()
        else:
            self.errors[reply.get("errno")] += 1
            if self.acks.get(key) not in ("delivered", "stored"):
                self.acks[key] = f"errno {reply.get('errno')}"

    def shownMessage(self, text: str, later: bool, sessionStart: float = 0.0) -> None:
        """Legacy: every push is shown (no mid to de-duplicate by); a push
        of a message sent before this session began is the rest of a paged
        hand-over: later."""
        key = numberOf(text)
        if key is None:
            return
        self.shown[key] += 1
        later = later or self.sent.get(key, 0) < sessionStart
        (self.later if later else self.live).add(key)

    async def legacySession(self, reader, login, quiet: float | None = None) -> None:
        """Show the hand-over and every push until the connection ends (or
        nothing comes for C{quiet} s)."""
        start = time.monotonic()
        for payload in login.get("offlinemsg", []):
            self.shownMessage(json.loads(payload).get("msg", ""), later=True)
        async for message in pushedChats(reader, quiet):
            self.shownMessage(message.get("msg", ""), later=False, sessionStart=start)

    def showPush(self, push: dict, sessionStart: float, handedOver: bool) -> str | None:
        """
        Ack mode: show C{push} unless its mid was shown already; its mid
        (to acknowledge), if any.
        """
        mid = push.get("mid")
        key = numberOf(push.get("msg", ""))
        if mid is None:
            self.withoutMid += 1
        elif mid in self.seenMids:
            self.rawDuplicates += 1
            return mid
        else:
            self.seenMids.add(mid)
        if key is None:
            return mid
        if mid is not None:
            self.mids[key].add(mid)
        self.shown[key] += 1
        if key not in self.live and key not in self.later:
            live = not handedOver and self.sent.get(key, 0) >= sessionStart
            (self.live if live else self.later).add(key)
        return mid

    def lostConnection(self, uid: int) -> None:
        if self.faultAt is not None and not self.done:
            self.dropped.add(uid)

    def loggedIn(self, uid: int) -> None:
        if uid in self.dropped and uid not in self.backAt:
            self.backAt[uid] = time.monotonic()

    def recoveryTime(self) -> float | None:
        if not self.ackMode:
            return self.recovered
        if self.faultAt is None or self.firstDelivered is None or set(self.backAt) != self.dropped:
            return None
        return max([self.firstDelivered, *self.backAt.values()]) - self.faultAt

    # -- clients -------------------------------------------------------------

    async def connect(self, prefer: int, uid: int, ack: bool = False):
        """Log in at the preferred server, else the other; (reader,
        writer, login reply, server index)."""
        for index in (prefer, 1 - prefer) * 50:
            if not self.alive(index):
                await asyncio.sleep(0.1)
                continue
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.ports[index])
                request = {"msgid": LOGIN, "id": uid, "password": "pw"}
                if ack:
                    request["ack"] = True
                writer.write(line(request))
                while True:
                    data = await asyncio.wait_for(reader.readline(), 10)
                    if not data:
                        raise ConnectionError("closed")
                    reply = json.loads(data)
                    if reply.get("msgid") == LOGIN_ACK:
                        break
                if reply.get("errno") == 0:
                    self.loggedIn(uid)
                    return reader, writer, reply, index
                writer.close()
            except (OSError, ConnectionError, asyncio.TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.1)
        raise SystemExit(f"user {uid} could not log in anywhere")

    async def receiver(self, uid: int, home: int) -> None:
        index = home
        while True:
            reader, writer, login, index = await self.connect(index, uid, ack=self.ackMode)
            if index != home and self.faultAt is not None and self.recovered is None:
                self.recovered = time.monotonic() - self.faultAt
            if self.ackMode:
                await self.ackingSession(reader, writer, login)
            else:
                await self.legacySession(reader, login)
            writer.close()
            self.lostConnection(uid)
            if not self.sending and self.done:
                return

    async def ackingSession(self, reader, writer, login, quiet: float | None = None) -> None:
        """Show and acknowledge the hand-over and every push until the
        connection ends (or nothing comes for C{quiet} s)."""
        start = time.monotonic()
        mids = [self.showPush(json.loads(p), start, handedOver=True) for p in login.get("offlinemsg", [])]
        if any(m is not None for m in mids):
            writer.write(line({"msgid": PUSH_ACK, "mids": [m for m in mids if m is not None]}))
        async for message in pushedChats(reader, quiet):
            mid = self.showPush(message, start, handedOver=False)
            if mid is not None:
                writer.write(line({"msgid": PUSH_ACK, "mids": [mid]}))

    async def sender(self, uid: int, toid: int, interval: float, home: int) -> None:
        """Legacy: no resend."""
        index = home
        n = 0
        while self.sending:
            reader, writer, _, index = await self.connect(index, uid)
            pending: set[int] = set()

            async def read():
                while True:
                    data = await reader.readline()
                    if not data:
                        return
                    reply = json.loads(data)
                    if reply.get("seq") is None:
                        continue
                    pending.discard(reply["seq"])
                    self.note(uid, reply["seq"], reply)

            readTask = asyncio.ensure_future(read())
            next_ = time.monotonic()
            while self.sending and not readTask.done():
                n += 1
                self.sent[(uid, n)] = time.monotonic()
                self.sends += 1
                pending.add(n)
                writer.write(line({"msgid": ONE_CHAT_MSG, "toid": toid, "msg": f"{uid}:{n}", "seq": n}))
                next_ += interval
                await asyncio.sleep(max(0.0, next_ - time.monotonic()))
            if not self.sending:
                try:
                    await asyncio.wait_for(asyncio.shield(readTask), 3) if pending else None
                except asyncio.TimeoutError:
                    pass
            readTask.cancel()
            writer.close()

    async def ackSender(self, uid: int, toid: int, interval: float, home: int) -> None:
        """
        Numbered messages with cid = the number; whatever has no errno-0
        ack is sent again after reconnecting (and a second after an error
        reply); after the load, keep at it until everything is acked or
        the drain time is over.
        """
        index = home
        n = 0
        pending: set[int] = set()  # numbers without an errno-0 ack
        retry: dict[int, float] = {}  # numbers answered with an error -> when to send again

        def send(writer, k: int) -> None:
            self.sends += 1
            self.sent.setdefault((uid, k), time.monotonic())
            writer.write(line({"msgid": ONE_CHAT_MSG, "toid": toid, "msg": f"{uid}:{k}", "cid": k, "seq": k}))

        first = True
        while self.sending or (pending and time.monotonic() < self.drainUntil):
            reader, writer, _, index = await self.connect(index, uid)
            if not first:
                retry.clear()
                for k in sorted(pending):
                    send(writer, k)
            first = False

            async def read():
                while True:
                    data = await reader.readline()
                    if not data:
                        return
                    reply = json.loads(data)
                    k = reply.get("seq", reply.get("cid"))  # cid: in case a late ack echoes only that
                    if not isinstance(k, int):
                        continue
                    self.note(uid, k, reply)
                    if k not in pending:
                        continue
                    if reply.get("errno") == 0:
                        pending.discard(k)
                        retry.pop(k, None)
                    else:
                        retry[k] = time.monotonic() + 1.0

            readTask = asyncio.ensure_future(read())
            next_ = time.monotonic()
            while not readTask.done():
                now = time.monotonic()
                if self.sending:
                    n += 1
                    pending.add(n)
                    send(writer, n)
                elif not pending or now >= self.drainUntil:
                    break
                for k, due in list(retry.items()) if retry else ():
                    if due <= now:
                        del retry[k]
                        send(writer, k)
                next_ = next_ + interval if self.sending else now + 0.05
                await asyncio.sleep(max(0.0, next_ - time.monotonic()))
            lost = readTask.done()
            readTask.cancel()
            writer.close()
            if lost:
                self.lostConnection(uid)
            else:
                return


async def probeAcks(run: Run, senderUid: int, receiverUid: int) -> None:
    """
    One message from chat1 to chat2 between two spare users: its push
    must carry "mid" (end-to-end acks), else L{NoAcks}.
    """
    rReader, rWriter, _, _ = await run.connect(1, receiverUid, ack=True)
    sReader, sWriter, _, _ = await run.connect(0, senderUid)
    try:
        sWriter.write(line({"msgid": ONE_CHAT_MSG, "toid": receiverUid, "msg": "probe", "cid": "probe", "seq": "probe"}))
        deadline = time.monotonic() + 10
        while True:
            left = deadline - time.monotonic()
            data = await asyncio.wait_for(rReader.readline(), max(0.01, left)) if left > 0 else b""
            if not data:
                raise SystemExit("the probe message was not delivered within 10 s")
            push = json.loads(data)
            if push.get("msgid") == ONE_CHAT_MSG:
                break
        if "mid" not in push:
            raise NoAcks(f'a pushed ONE_CHAT_MSG has no "mid": {json.dumps(push)}')
        rWriter.write(line({"msgid": PUSH_ACK, "mids": [push["mid"]]}))
        while True:
            data = await asyncio.wait_for(sReader.readline(), 10)
            if not data:
                raise SystemExit("the probe's sender was disconnected before its ack")
            ack = json.loads(data)
            if ack.get("msgid") in (12, 99):  # ONE_CHAT_MSG_ACK, ERROR_MSG
                break
        if ack.get("errno") != 0:
            raise SystemExit(f"the probe message got {ack}")
        if "probe" not in (ack.get("seq"), ack.get("cid")):
            raise SystemExit(f'the probe\'s ack carries neither its "seq" nor its "cid": {ack}; acks cannot be matched')
    except asyncio.TimeoutError:
        raise SystemExit("the probe message was not delivered within 10 s") from None
    finally:
        rWriter.close()
        sWriter.close()


async def drive(args, ports, alive, fault, rate: float) -> Run:
    run = Run(ports, alive, acks=not args.legacy)
    if not args.legacy:
        await probeAcks(run, *args.probe)
    senders = list(range(args.pairs))
    interval = args.pairs / rate
    tasks = [asyncio.ensure_future(run.receiver(args.uids[1][i], 1)) for i in senders]
    await asyncio.sleep(1)
    sender = run.sender if args.legacy else run.ackSender
    tasks += [asyncio.ensure_future(sender(args.uids[0][i], args.uids[1][i], interval, 0)) for i in senders]
    await asyncio.sleep(args.warmup)
    run.faultAt = time.monotonic()
    await asyncio.get_event_loop().run_in_executor(None, fault)
    await asyncio.sleep(args.duration)
    run.drainUntil = time.monotonic() + args.drain
    run.sending = False
    if args.legacy:
        await asyncio.sleep(3)
    else:
        senderTasks = tasks[len(senders):]
        await asyncio.wait(senderTasks, timeout=args.drain + 15)
        await asyncio.sleep(2)  # the last pushes
    run.done = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Collect what was stored: every receiver logs in once more.
    async def collect(uid: int) -> None:
        reader, writer, login, _ = await run.connect(1, uid, ack=not args.legacy)
        # the rest of a paged hand-over (and redeliveries) follow as pushes
        if args.legacy:
            await run.legacySession(reader, login, quiet=1.0)
        else:
            await run.ackingSession(reader, writer, login, quiet=1.0)
        writer.close()

    await asyncio.gather(*(collect(args.uids[1][i]) for i in senders))
    return run


def report(name: str, rate: float, run: Run) -> dict:
    states = Counter(s for s in run.acks.values())
    acked = {k for k, s in run.acks.items() if s in ("delivered", "stored")}
    lost = sorted(k for k in acked if run.shown[k] == 0)
    if run.ackMode:
        twice = sum(1 for k in run.mids if len(run.mids[k]) > 1)
    else:
        twice = sum(1 for c in run.shown.values() if c > 1)
    recovery = run.recoveryTime()
    row = {
        "fault": name,
        "rate": rate,
        "mode": "ack" if run.ackMode else "legacy",
        "sent": len(run.sent),
        "sends": run.sends,
        "acked": len(acked),
        "delivered": states.pop("delivered", 0),
        "stored": states.pop("stored", 0),
        "errors": {str(k): v for k, v in sorted(run.errors.items(), key=str)},
        "unacked": len(set(run.sent) - acked),
        "live": len(run.live),
        "later": len(run.later - run.live),
        "lost": len(lost),
        "twice": twice,
        "raw duplicates": run.rawDuplicates if run.ackMode else None,
        "recovery s": None if recovery is None else round(recovery, 2),
    }
    if lost:
        row["lost sample"] = lost[:10]
    if run.withoutMid:
        row["pushes without mid"] = run.withoutMid
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> None:
    print("\n| fault | msg/s | sent | acked | delivered | stored | errors | unacked | live | later | lost | twice | raw dups | recovery |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        errors = ", ".join(f"{v}×{k}" for k, v in r["errors"].items()) or "0"
        recovery = "-" if r["recovery s"] is None else f"{r['recovery s']} s"
        dups = "-" if r["raw duplicates"] is None else f"{r['raw duplicates']:,}"
        print(
            f"| {r['fault']} | {r['rate']:,.0f} | {r['sent']:,} | {r['acked']:,} | {r['delivered']:,} | {r['stored']:,}"
            f" | {errors} | {r['unacked']:,} | {r['live']:,} | {r['later']:,} | {r['lost']} | {r['twice']} | {dups} | {recovery} |"
        )


class PrivateMariaDB:
    """A private mariadbd (own data directory, free port, no grant tables)
    to kill and restart by pid."""

    MARIADBD = shutil.which("mariadbd") or shutil.which("mysqld") or "/usr/sbin/mariadbd"
    INSTALL = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db") or "/usr/bin/mariadb-install-db"

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="chat-faults-mariadb-")
        self.datadir = os.path.join(self.directory, "data")
        self.tmpdir = os.path.join(self.directory, "tmp")
        os.makedirs(self.tmpdir)
        self.port = cluster_bench.freePort()
        self.proc: subprocess.Popen | None = None
        subprocess.run(
            [
                self.INSTALL, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
                "--auth-root-authentication-method=normal", "--skip-test-db", f"--tmpdir={self.tmpdir}",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120,
            env=dict(os.environ, TMPDIR=self.tmpdir),
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [
            self.MARIADBD, "--no-defaults", f"--datadir={self.datadir}",
            f"--socket={os.path.join(self.directory, 'mysqld.sock')}",
            f"--pid-file={os.path.join(self.directory, 'mysqld.pid')}",
            f"--port={self.port}", "--bind-address=127.0.0.1", "--user=root", f"--tmpdir={self.tmpdir}",
            "--skip-grant-tables", "--skip-log-bin", "--innodb-buffer-pool-size=64M",
        ]  # fmt: skip
        log = open(os.path.join(self.directory, "server.log"), "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        import pymysql

        def ready():
            if self.proc.poll() is not None:
                raise SystemExit(f"mariadbd exited; see {self.directory}/server.log")
            try:
                pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=1).close()
                return True
            except pymysql.err.MySQLError:
                return False

        cluster_bench.waitFor(ready, 60, "the private mariadbd")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def once(args, name: str, rate: float) -> dict:
    workdir = tempfile.mkdtemp(prefix="chat-faults-")
    mariadb = None
    if name == "kill-mariadb":
        mariadb = PrivateMariaDB()
        mariadb.start()
    server = mariadb.url if mariadb else args.db.rstrip("/")
    dbURL = f"{server}/chatfaults_{os.getpid()}"
    procs = {}
    try:
        procs["redis"], redisPort = cluster_bench.startRedis(workdir)
        procs["chat1"], port1 = cluster_bench.startChat("chat1", workdir, dbURL, redisPort)
        procs["chat2"], port2 = cluster_bench.startChat("chat2", workdir, dbURL, redisPort)
        ports = [port1, port2]
        args.uids = [[register(port1, f"s{i}") for i in range(args.pairs)], [register(port2, f"r{i}") for i in range(args.pairs)]]
        args.probe = (register(port1, "probe-s"), register(port2, "probe-r"))
        chats = ["chat1", "chat2"]

        def alive(index):
            return procs[chats[index]].poll() is None

        def fault():
            kind, _, who = name.partition("-")
            if who == "redis":
                procs["redis"].kill()
                procs["redis"].wait()
                time.sleep(args.down)
                redis = shutil.which("redis-server") or "/usr/bin/redis-server"
                procs["redis"] = subprocess.Popen(
                    [redis, "--port", str(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                )  # fmt: skip
                return
            if who == "mariadb":
                mariadb.kill()
                time.sleep(args.down)
                mariadb.start()
                return
            proc = procs["chat2" if who == "receivers" else "chat1"]
            proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
            proc.wait()

        bound = args.warmup + args.duration + args.drain + 60 + 10 * args.pairs / 50
        try:
            run = asyncio.run(asyncio.wait_for(drive(args, ports, alive, fault, rate), bound))
        except asyncio.TimeoutError:
            raise SystemExit(f"{name} at {rate:g} msg/s did not finish within {bound:.0f} s; logs in {workdir}") from None
        return report(name, rate, run)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if mariadb is not None:
            mariadb.cleanup()
        else:
            try:
                cluster_bench.dropDatabase(dbURL)
            except Exception as e:  # the report matters more than the clean-up
                print(f"could not drop {dbURL}: {e}", file=sys.stderr)


def rates(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of rates: {text!r}") from None
    if not values or any(not 0 < v <= 50000 for v in values):
        raise argparse.ArgumentTypeError("rates must be between 0 and 50,000 messages/s")
    return values


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="mysql://root@127.0.0.1:3306", help="MySQL server URL, without database (kill-mariadb starts its own)")
    ap.add_argument("--fault", choices=(*FAULTS, "all"), default="all")
    ap.add_argument("--legacy", action="store_true", help="today's clients: no acks, no cid, no resend")
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--rate", type=rates, default=None, help="messages/s, all senders together; a list runs each (default 1000,2000; --legacy 1000)")
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--duration", type=float, default=8, help="seconds of load after the fault")
    ap.add_argument("--down", type=float, default=5, help="seconds Redis / MariaDB stay down")
    ap.add_argument("--drain", type=float, default=15, help="seconds senders keep resending after the load")
    args = ap.parse_args(argv)
    if args.pairs < 1 or args.pairs > 1000:
        ap.error("--pairs must be between 1 and 1000")
    for name in ("warmup", "duration", "down", "drain"):
        if not 0 <= getattr(args, name) <= 600:
            ap.error(f"--{name} must be between 0 and 600 s")
    if args.rate is None:
        args.rate = [1000.0] if args.legacy else [1000.0, 2000.0]
    if args.fault == "all":
        faults = LEGACY_FAULTS if args.legacy else ACK_FAULTS
    else:
        faults = (args.fault,)
    rows = []
    try:
        for rate in args.rate:
            for name in faults:
                rows.append(once(args, name, rate))
    except NoAcks as e:
        print(
            f"faults.py: this chat server has no end-to-end acks (issue 11): {e}\n"
            "faults.py: the ack benchmark needs them; run with --legacy to measure today's clients",
            file=sys.stderr,
        )
        sys.exit(NO_ACKS_STATUS)
    table(rows)


if __name__ == "__main__":
    main()
