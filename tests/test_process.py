"""`twistd chat` as a real process: start-up, and SIGTERM ends it cleanly."""

import os
import socket
import sys

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from chatproto import messages as m
from tests.chat_helpers import connectClient


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Exited(protocol.ProcessProtocol):
    def __init__(self):
        self.ended = defer.Deferred()
        self.output = b""

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback((reason.value.exitCode, reason.value.signal))


async def waitForPort(port: int, timeout: float = 20) -> None:
    """Poll until something listens on C{port}."""
    for _ in range(int(timeout / 0.05)):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"nothing listens on {port}")


async def waitForReady(port: int, timeout: float = 20) -> None:
    """Poll until the server on C{port} has started (until then it answers
    every request but PING with errno 30)."""
    await waitForPort(port, timeout)
    for _ in range(int(timeout / 0.05)):
        client = await connectClient(reactor, port)
        reply = await client.request({"msgid": m.FRIEND_LIST_MSG})
        client.transport.loseConnection()
        if reply.get("errno") != m.E_UNAVAILABLE:
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"the server on {port} did not start")


class ProcessTests(unittest.TestCase):
    async def test_sigtermEndsSessionsAndExits(self):
        port = freePort()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        logfile = os.path.abspath(self.mktemp()) + ".log"
        exited = Exited()
        process = reactor.spawnProcess(
            exited,
            twistd,
            [twistd, "-n", "--pidfile=", "--logfile", logfile, "chat", "--port", f"tcp:{port}:interface=127.0.0.1", "--db", f"sqlite:{db}", "--scrypt-n", "16"],
            env=dict(os.environ),
        )
        self.addCleanup(lambda: exited.ended if exited.ended.called else (process.signalProcess("KILL"), exited.ended)[1])
        await waitForReady(port)
        client = await connectClient(reactor, port)
        uid = (await client.request({"msgid": 4, "name": "alice", "password": "pw"}))["id"]
        self.assertEqual((await client.request({"msgid": 1, "id": uid, "password": "pw"}))["errno"], 0)
        process.signalProcess("TERM")
        self.assertEqual(await client.next(), {"msgid": m.KICK_NOTICE, "reason": "server shutting down"})
        await client.closed
        # twistd re-raises the signal once it has shut down cleanly.
        self.assertIn(await exited.ended, [(0, None), (None, 15)])
        with open(logfile) as f:
            log = f.read()
        self.assertIn("[1] logged out", log)
        self.assertIn("chat server", log)
        self.assertIn("stopped", log)
