#!/usr/bin/env python3
"""
What a fault costs a two-server cluster under load: one-to-one chat from
P senders on chat1 to P receivers on chat2 (numbered messages, open loop at
--rate messages/s in all), then, --warmup seconds in, one fault:

  sigterm-receivers   SIGTERM of chat2 (graceful stop)
  sigterm-senders     SIGTERM of chat1
  kill-receivers      SIGKILL of chat2
  kill-senders        SIGKILL of chat1
  kill-redis          SIGKILL of redis-server, restarted on its port 5 s later

Clients whose server goes away reconnect to the other server (receivers
collect their offline messages at the new login).  At the end every
receiver logs in once more to collect what was stored for it meanwhile.
Per run it prints: sent; acknowledged delivered / stored; error replies
(by errno); unanswered (no reply before the connection ended); shown live;
handed over later; lost (acknowledged with errno 0 and never shown); shown
twice; and the recovery time (from the fault until a receiver that had to
move is logged in again, or until the first "delivered" after the fault).

Without end-to-end acks (issue 11, a later round) the senders do not
resend, so "unanswered" messages are the senders' to retry.

    .venv/bin/python bench/faults.py --fault sigterm-receivers --rate 1000 --pairs 50
    .venv/bin/python bench/faults.py --fault all
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cluster_bench  # noqa: E402

FAULTS = ("sigterm-receivers", "sigterm-senders", "kill-receivers", "kill-senders", "kill-redis")


def register(port: int, name: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(json.dumps({"msgid": 4, "name": name, "password": "pw"}).encode() + b"\n")
        reply = json.loads(s.makefile("rb").readline())
    if reply.get("errno") != 0:
        raise SystemExit(f"cannot register {name}: {reply}")
    return reply["id"]


class Run:
    def __init__(self, ports, alive) -> None:
        self.ports = ports  # [chat1, chat2]
        self.alive = alive  # callable(index) -> bool
        self.sent: dict[tuple[int, int], float] = {}  # (sender, n) -> time
        self.acks: dict[tuple[int, int], str] = {}
        self.shown: Counter = Counter()
        self.live: set = set()
        self.later: set = set()
        self.faultAt: float | None = None
        self.recovered: float | None = None
        self.sending = True

    def note(self, sender: int, n: int, reply: dict) -> None:
        key = (sender, n)
        if reply.get("errno") == 0:
            self.acks[key] = reply.get("state", "?")
            if (
                self.faultAt is not None
                and self.recovered is None
                and reply.get("state") == "delivered"
                and self.sent.get(key, 0) > self.faultAt
            ):
                self.recovered = time.monotonic() - self.faultAt
        else:
            self.acks[key] = f"errno {reply.get('errno')}"

    def shownMessage(self, text: str, later: bool) -> None:
        try:
            sender, n = (int(x) for x in text.split(":"))
        except ValueError:
            return
        self.shown[(sender, n)] += 1
        (self.later if later else self.live).add((sender, n))

    async def connect(self, prefer: int, uid: int):
        """Log in at the preferred server, else the other; (reader,
        writer, login reply, server index)."""
        for index in (prefer, 1 - prefer) * 50:
            if not self.alive(index):
                continue
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.ports[index])
                writer.write(json.dumps({"msgid": 1, "id": uid, "password": "pw"}).encode() + b"\n")
                while True:
                    line = await asyncio.wait_for(reader.readline(), 10)
                    if not line:
                        raise ConnectionError("closed")
                    reply = json.loads(line)
                    if reply.get("msgid") == 2:
                        break
                if reply.get("errno") == 0:
                    return reader, writer, reply, index
                writer.close()
            except (OSError, ConnectionError, asyncio.TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.1)
        raise SystemExit(f"user {uid} could not log in anywhere")

    async def receiver(self, uid: int, home: int) -> None:
        index = home
        while True:
            reader, writer, login, index = await self.connect(index, uid)
            if index != home and self.faultAt is not None and self.recovered is None:
                self.recovered = time.monotonic() - self.faultAt
            for payload in login.get("offlinemsg", []):
                self.shownMessage(json.loads(payload).get("msg", ""), later=True)
            while True:
                line = await reader.readline()
                if not line:
                    break
                message = json.loads(line)
                if message.get("msgid") == 6:  # ONE_CHAT_MSG
                    self.shownMessage(message.get("msg", ""), later=False)
            writer.close()
            if not self.sending and self.done:
                return

    done = False

    async def sender(self, uid: int, toid: int, interval: float, home: int) -> None:
        index = home
        n = 0
        while self.sending:
            reader, writer, _, index = await self.connect(index, uid)
            pending: set[int] = set()

            async def read():
                while True:
                    line = await reader.readline()
                    if not line:
                        return
                    reply = json.loads(line)
                    if reply.get("seq") is None:
                        continue
                    pending.discard(reply["seq"])
                    self.note(uid, reply["seq"], reply)

            readTask = asyncio.ensure_future(read())
            next_ = time.monotonic()
            while self.sending and not readTask.done():
                n += 1
                self.sent[(uid, n)] = time.monotonic()
                pending.add(n)
                writer.write(json.dumps({"msgid": 6, "toid": toid, "msg": f"{uid}:{n}", "seq": n}).encode() + b"\n")
                next_ += interval
                await asyncio.sleep(max(0.0, next_ - time.monotonic()))
            if not self.sending:
                try:
                    await asyncio.wait_for(asyncio.shield(readTask), 3) if pending else None
                except asyncio.TimeoutError:
                    pass
            readTask.cancel()
            writer.close()


async def drive(args, ports, alive, fault) -> Run:
    run = Run(ports, alive)
    senders = list(range(args.pairs))
    interval = args.pairs / args.rate
    tasks = [asyncio.ensure_future(run.receiver(args.uids[1][i], 1)) for i in senders]
    await asyncio.sleep(1)
    tasks += [
        asyncio.ensure_future(run.sender(args.uids[0][i], args.uids[1][i], interval, 0)) for i in senders
    ]
    await asyncio.sleep(args.warmup)
    run.faultAt = time.monotonic()
    await asyncio.get_event_loop().run_in_executor(None, fault)
    await asyncio.sleep(args.duration)
    run.sending = False
    await asyncio.sleep(3)
    run.done = True
    for t in tasks:
        t.cancel()
    # Collect what was stored: every receiver logs in once more.
    for i in senders:
        reader, writer, login, _ = await run.connect(1, args.uids[1][i])
        for payload in login.get("offlinemsg", []):
            run.shownMessage(json.loads(payload).get("msg", ""), later=True)
        writer.close()
    return run


def report(name: str, run: Run) -> dict:
    states = Counter(run.acks.values())
    acked = {k for k, s in run.acks.items() if s in ("delivered", "stored")}
    lost = sorted(k for k in acked if run.shown[k] == 0)
    row = {
        "fault": name,
        "sent": len(run.sent),
        "delivered": states.pop("delivered", 0),
        "stored": states.pop("stored", 0),
        "errors": dict(states),
        "unanswered": len(set(run.sent) - set(run.acks)),
        "shown live": len(run.live),
        "later": len(run.later - run.live),
        "lost": len(lost),
        "twice": sum(1 for c in run.shown.values() if c > 1),
        "recovery s": None if run.recovered is None else round(run.recovered, 2),
    }
    print(json.dumps(row))
    return row


def once(args, name: str) -> dict:
    workdir = tempfile.mkdtemp(prefix="chat-faults-")
    dbURL = f"{args.db.rstrip('/')}/chatfaults_{os.getpid()}"
    procs = {}
    try:
        procs["redis"], redisPort = cluster_bench.startRedis(workdir)
        procs["chat1"], port1 = cluster_bench.startChat("chat1", workdir, dbURL, redisPort)
        procs["chat2"], port2 = cluster_bench.startChat("chat2", workdir, dbURL, redisPort)
        ports = [port1, port2]
        args.uids = [[register(port1, f"s{i}") for i in range(args.pairs)], [register(port2, f"r{i}") for i in range(args.pairs)]]
        chats = ["chat1", "chat2"]

        def alive(index):
            return procs[chats[index]].poll() is None

        def fault():
            kind, _, who = name.partition("-")
            if who == "redis":
                procs["redis"].kill()
                procs["redis"].wait()
                time.sleep(5)
                redis = cluster_bench.shutil.which("redis-server") or "/usr/bin/redis-server"
                procs["redis"] = subprocess.Popen(
                    [redis, "--port", str(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                )  # fmt: skip
                return
            proc = procs["chat2" if who == "receivers" else "chat1"]
            proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
            proc.wait()

        run = asyncio.run(drive(args, ports, alive, fault))
        return report(name, run)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        try:
            cluster_bench.dropDatabase(dbURL)
        except Exception as e:  # the report matters more than the clean-up
            print(f"could not drop {dbURL}: {e}", file=sys.stderr)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="mysql://root@127.0.0.1:3306", help="MySQL server URL, without database")
    ap.add_argument("--fault", choices=(*FAULTS, "all"), default="all")
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--rate", type=float, default=1000, help="messages/s, all senders together")
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--duration", type=float, default=8, help="seconds of load after the fault")
    args = ap.parse_args(argv)
    for name in FAULTS if args.fault == "all" else (args.fault,):
        once(args, name)


if __name__ == "__main__":
    main()
