"""
SIGTERM of a real C{twistd chat} process (issue 11) while a client has
requests in flight: every request the server read is answered (none with
errno 14), the goodbye (kick notice) comes last, then the connection
closes, and the process exits 0 without Twisted's in-handler log line.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from chatproto import messages as m
from tests.chat_helpers import TCPClientsMixin
from tests.cluster_helpers import canConnect, freePort, twistdChat, until


class SigtermTests(TCPClientsMixin, unittest.TestCase):
    async def test_sigtermAnswersThenSaysGoodbye(self):
        directory = tempfile.mkdtemp(prefix="chat-sigterm-")
        port = freePort()
        args = [
            "--port", f"tcp:{port}:interface=127.0.0.1",
            "--name", "chat-sigterm",
            "--db", f"sqlite:{os.path.join(directory, 'chat.sqlite3')}",
            # A real scrypt cost: a registration takes a while to hash,
            # so requests are still being carried out when SIGTERM comes.
            "--scrypt-n", "16384",
        ]  # fmt: skip
        process = twistdChat(args, os.path.join(directory, "chat.log"))
        self.addCleanup(process.kill)
        await until(
            lambda: (not process.alive() and self.fail(process.output())) or canConnect("127.0.0.1", port),
            30,
            what="twistd chat to listen",
        )
        # Listening comes before the schema migration ends: until then
        # requests get errno 30 ("server is starting"), nothing done.
        async def registerAlice():
            client = await self.connectTo(port)
            reply = await client.request({"msgid": m.REG_MSG, "name": "alice", "password": "pw-alice"})
            client.transport.loseConnection()
            return reply if reply["errno"] != m.E_UNAVAILABLE else None

        reply = await until(lambda: defer.Deferred.fromCoroutine(registerAlice()), 30, 0.1, what="registration")
        self.assertEqual(reply["errno"], 0, reply)
        a = reply["id"]
        b = await self.registerAt(port, "bob")
        alice, _ = await self.loginAt(port, a, "alice")
        bob, _ = await self.loginAt(port, b, "bob")
        # One write: a slow registration, then chats and pings queued
        # behind it.
        lines = [{"msgid": m.REG_MSG, "name": "carol", "password": "pw-carol"}]
        for i in range(20):
            lines.append({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": f"m{i}"})
            lines.append({"msgid": m.PING_MSG})
        alice.transport.write(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        # The first reply proves the server has read the write.
        first = await alice.next(30)
        process.signal(signal.SIGTERM)
        replies = [first]
        while True:
            try:
                replies.append(await alice.next(30))
            except Exception:
                break
        await alice.closed
        expected = [m.REG_MSG_ACK] + [m.ONE_CHAT_MSG_ACK, m.PONG_MSG] * 20
        got = [r["msgid"] for r in replies]
        self.assertEqual(got[-1], m.KICK_NOTICE, got)
        self.assertEqual(replies[-1]["reason"], "server shutting down")
        self.assertEqual(got[:-1], expected, "every request read is answered, in order")
        self.assertEqual([r.get("errno", 0) for r in replies[:-1]], [0] * len(expected))
        # bob got every chat, then the goodbye.
        bobs = []
        while True:
            try:
                bobs.append(await bob.next(30))
            except Exception:
                break
        self.assertEqual([x.get("msg") for x in bobs[:-1]], [f"m{i}" for i in range(20)])
        self.assertEqual(bobs[-1]["msgid"], m.KICK_NOTICE)
        await until(lambda: not process.alive(), 30, what="twistd to exit")
        self.assertEqual(process.proc.returncode, 0, process.output())
        output = process.output()
        self.assertNotIn("Received SIGTERM", output)
        self.assertIn("chat server chat-sigterm stopped", output)
