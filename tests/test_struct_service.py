"""
The chat service's parts: start-up (requests queued until ready, start-up
failure), the session interface, the registry and delivery seams.
"""

from __future__ import annotations

import json
import sqlite3

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from chatproto import messages as m
from chatproto.embedded import LocalPresence, LocalRelay
from chatproto.interfaces import IChatSession, IRelayReceiver
from chatproto.protocol import ChatProtocol
from chatproto.service import ChatService
from chatproto.sqlstore import ImmediatePool, SQLStore
from tests.chat_helpers import Client, ControlledHasher, Harness


class StartupTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = SQLStore(ImmediatePool(sqlite3.connect(":memory:")))
        self.gate = defer.Deferred()
        start = self.store.start
        self.store.start = lambda: self.gate.addCallback(lambda _: start())
        self.service = ChatService(self.store, LocalPresence("t"), LocalRelay(), ControlledHasher(), self.clock)
        self.failures = []
        self.service.onStartFailure = self.failures.append
        self.service.startService()

    def connect(self) -> Client:
        protocol = ChatProtocol(self.service, self.clock)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1))
        protocol.makeConnection(transport)
        return Client(protocol, transport)

    def test_startingAnswersPingAndRefusesTheRest(self) -> None:
        """While storage starts, PING is answered and every other request
        gets errno 30 at once (nothing is queued); once ready, requests are
        carried out."""
        client = self.connect()
        client.send({"msgid": m.PING_MSG, "seq": 1})
        client.send({"msgid": 4, "name": "alice", "password": "secret", "seq": 2})
        self.assertFalse(self.service.isReady)
        replies = client.replies()
        self.assertEqual([(r["msgid"], r["seq"]) for r in replies], [(m.PONG_MSG, 1), (m.REG_MSG_ACK, 2)])
        self.assertEqual(replies[1]["errno"], m.E_UNAVAILABLE)
        self.assertIn("server is starting", replies[1]["errmsg"])
        self.gate.callback(None)
        self.assertTrue(self.service.isReady)
        reply = client.request({"msgid": 4, "name": "alice", "password": "secret"})
        self.assertEqual(reply["errno"], 0)
        self.assertEqual(self.failures, [])

    def test_whenReadyAfterReady(self) -> None:
        self.gate.callback(None)
        self.assertIsNone(self.successResultOf(self.service.whenReady()))

    def test_startFailureAnswersRequests(self) -> None:
        """When start-up fails, PING is still answered and every other
        request gets errno 30 (the connection stays usable);
        C{onStartFailure} is told once, and no traceback is logged."""
        client = self.connect()
        waiter = self.service.whenReady()
        self.gate.errback(RuntimeError("no database"))
        self.failureResultOf(waiter, m.RequestError)
        [failure] = self.failures
        self.assertTrue(failure.check(RuntimeError))
        self.assertFalse(self.service.isReady)
        self.assertEqual(client.request({"msgid": m.PING_MSG}), {"msgid": m.PONG_MSG})
        reply = client.request({"msgid": m.FRIEND_LIST_MSG})
        self.assertEqual(reply["errno"], m.E_UNAVAILABLE)
        self.assertFalse(client.closed)
        self.assertEqual(self.flushLoggedErrors(RuntimeError), [])


class SeamTests(unittest.TestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def test_sessionInterface(self) -> None:
        """The protocol provides the session interface the service writes
        to; delivery is the relay's receiver."""
        client = self.h.connect()
        self.assertTrue(verifyObject(IChatSession, client.protocol))
        self.assertTrue(verifyObject(IRelayReceiver, self.h.service.delivery))

    def test_registryViews(self) -> None:
        """C{service.sessions}/C{connections} are the registry's."""
        uid = self.h.register("alice")
        client = self.h.login(uid)
        registry = self.h.service.registry
        self.assertIs(self.h.service.sessions, registry.sessions)
        self.assertIs(registry.sessions[uid], client.protocol)
        self.assertIs(registry.connections[client.protocol.sid], client.protocol)
        self.assertEqual(registry.localSessions(), [(uid, client.protocol.sid)])
        self.assertEqual(registry.names[uid], "alice")

    def test_kickLocalWhileLoggingIn(self) -> None:
        """A kick for a session still claiming the account closes it."""
        client = self.h.connect()
        client.protocol.loggingIn = 7
        self.h.service.registry.kickLocal(7, client.protocol.sid, "logged in elsewhere")
        self.assertTrue(client.closed)
        [notice] = client.replies()
        self.assertEqual(notice, {"msgid": m.KICK_NOTICE, "reason": "logged in elsewhere"})

    def test_kickLocalOtherUserIgnored(self) -> None:
        uid = self.h.register("alice")
        client = self.h.login(uid)
        self.h.service.registry.kickLocal(uid + 1, client.protocol.sid, "x")
        self.assertFalse(client.closed)
        self.assertIn(uid, self.h.service.sessions)

    async def test_heldChatsStoredNoticesDropped(self) -> None:
        """What was held for a session that never finished logging in is
        stored offline if it is a chat; notices are not."""
        uid = self.h.register("bob")
        client = self.h.connect()
        client.protocol.hold(uid)
        chat = {"msgid": m.ONE_CHAT_MSG, "id": 1, "name": "a", "toid": uid, "msg": "hi", "time": "t"}
        client.protocol.send(chat)
        client.protocol.send({"msgid": m.FRIEND_STATE_NOTICE, "id": 1, "name": "a", "state": "online"})
        self.h.service.delivery.storeHeld(client.protocol)
        await self.h.service.tasks.wait()
        [stored] = await self.h.store.peekOffline(uid)
        self.assertEqual(json.loads(stored), chat)
