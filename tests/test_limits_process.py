"""
Issue 9 limits on a real `twistd chat` process: a client that sends `help`
lines and never reads leaves the server's memory bounded; the login
timeout closes a connection that trickles bytes; a server waiting for
Redis answers PING, gives errno 30 to the rest and logs the URL it waits
for, without its password.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from twisted.internet import reactor, task
from twisted.trial import unittest

from chatproto import messages as m
from tests.test_process import Exited, freePort, waitForPort, waitForReady

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def rssMiB(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def request(port: int, message: dict, timeout: float = 10) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(json.dumps(message).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class ProcessLimitTests(unittest.TestCase):
    def spawn(self, *args):
        self.port = freePort()
        self.logfile = os.path.abspath(self.mktemp()) + ".log"
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        exited = Exited()
        process = reactor.spawnProcess(
            exited,
            TWISTD,
            [TWISTD, "-n", "--pidfile=", "--logfile", self.logfile, "chat", "--port", f"tcp:{self.port}:interface=127.0.0.1",
             "--db", f"sqlite:{db}", "--scrypt-n", "16", *args],
            env=dict(os.environ),
        )
        self.addCleanup(lambda: exited.ended if exited.ended.called else (process.signalProcess("KILL"), exited.ended)[1])
        return process

    async def test_helpFloodNeverReadKeepsMemoryBounded(self):
        """Up to 2 MiB of `help` lines (each answered by about 1 KiB) sent
        without reading: before the fix the server queued every reply
        (about 400 MiB for this much); now it stops reading the client."""
        process = self.spawn()
        await waitForReady(self.port)
        before = rssMiB(process.pid)
        sock = socket.create_connection(("127.0.0.1", self.port))
        self.addCleanup(sock.close)
        sock.setblocking(False)
        chunk = b"help\n" * 2000
        sent, stalled = 0, 0
        while sent < 2 * 1024 * 1024 and stalled < 40:
            try:
                sent += sock.send(chunk)
                stalled = 0
            except BlockingIOError:
                stalled += 1
                await sleep(0.05)
        await sleep(0.5)
        grown = rssMiB(process.pid) - before
        self.assertLess(grown, 48, f"RSS grew by {grown:.0f} MiB after {sent} bytes of help lines")
        # The server is fine and the flooding client is still connected.
        self.assertEqual(request(self.port, {"msgid": m.PING_MSG}), {"msgid": m.PONG_MSG})
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), 0)

    async def test_loginTimeoutClosesATrickle(self):
        process = self.spawn("--login-timeout", "1")
        await waitForReady(self.port)
        sock = socket.create_connection(("127.0.0.1", self.port), 10)
        self.addCleanup(sock.close)
        received = b""
        for _ in range(100):
            try:
                sock.send(b"x")
            except OSError:
                break
            await sleep(0.1)
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                data = None
            sock.setblocking(True)
            if data == b"":
                break
            received += data or b""
        self.assertEqual(json.loads(received), {"msgid": m.KICK_NOTICE, "reason": "not logged in within 1 s"})
        self.assertTrue(process.pid)

    async def test_waitingForRedis(self):
        redisPort = freePort()  # nothing listens there
        self.spawn("--redis", f"redis://:s3cret@127.0.0.1:{redisPort}/0")
        await waitForPort(self.port)
        self.assertEqual(request(self.port, {"msgid": m.PING_MSG}), {"msgid": m.PONG_MSG})
        # Storage comes up first (the reply names what is waited for).
        for _ in range(100):
            reply = request(self.port, {"msgid": m.REG_MSG, "name": "a", "password": "pw"})
            self.assertEqual(reply["errno"], m.E_UNAVAILABLE)
            if "waiting for Redis" in reply["errmsg"]:
                break
            await sleep(0.1)
        self.assertIn(f"waiting for Redis at redis://:***@127.0.0.1:{redisPort}/0", reply["errmsg"])
        for _ in range(100):
            with open(self.logfile) as f:
                log = f.read()
            if "waiting for Redis" in log:
                break
            await sleep(0.1)
        self.assertIn(f"starting: waiting for Redis at redis://:***@127.0.0.1:{redisPort}/0", log)
        self.assertNotIn("s3cret", log + reply["errmsg"])
        self.assertNotIn("Traceback", log)
