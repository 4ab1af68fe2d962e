"""
The graceful stop (issue 11), in process on StringTransports with a Clock:
requests read before the stop are answered, then the goodbye (a kick
notice), and only then is the user logged out; a session logging in gets
its held messages stored offline; the stop is bounded for a request that
never finishes.  And the SIGTERM/SIGINT handlers that never log.
"""

from __future__ import annotations

import json
import signal

from twisted.trial import unittest

from chatproto import messages as m
from chatproto.common.stopsignals import installStopHandlers
from tests.chat_helpers import Harness

KICK = {"msgid": m.KICK_NOTICE, "reason": "server shutting down"}


class GracefulStopTests(unittest.TestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.a, self.b = self.h.register("alice"), self.h.register("bob")
        self.alice, self.bob = self.h.login(self.a), self.h.login(self.b)
        self.alice.lines(), self.bob.lines()

    def test_requestsInFlightAnsweredThenGoodbye(self) -> None:
        """alice's register request waits on the hasher and three more
        lines queue behind it when the stop begins: all four are answered
        (none with errno 14), bob gets her chat, and the kick notice is the
        last thing each client reads; only then are they logged out."""
        self.h.hasher.hold = True
        self.alice.send({"msgid": m.REG_MSG, "name": "carol", "password": "secret"})
        self.alice.send({"msgid": m.PING_MSG})
        self.alice.send({"msgid": m.ONE_CHAT_MSG, "toid": self.b, "msg": "bye"})
        self.alice.send({"msgid": m.FRIEND_LIST_MSG})
        stopped = self.h.service.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(self.alice.transport.producerState, "paused", "nothing more is read")
        self.assertEqual(self.alice.lines(), [])
        # Still logged in while its requests are carried out.
        self.assertIn(self.a, self.h.service.sessions)
        self.h.hasher.release()
        self.successResultOf(stopped)
        replies = self.alice.replies()
        self.assertEqual(
            [r["msgid"] for r in replies],
            [m.REG_MSG_ACK, m.PONG_MSG, m.ONE_CHAT_MSG_ACK, m.FRIEND_LIST_MSG_ACK, m.KICK_NOTICE],
        )
        self.assertEqual([r.get("errno", 0) for r in replies[:-1]], [0, 0, 0, 0])
        self.assertEqual(replies[-1], KICK)
        bobs = self.bob.replies()
        self.assertEqual([r["msgid"] for r in bobs], [m.ONE_CHAT_MSG, m.KICK_NOTICE])
        self.assertEqual(bobs[0]["msg"], "bye")
        self.assertTrue(self.alice.closed and self.bob.closed)
        self.assertEqual(self.h.service.sessions, {})
        self.assertEqual(self.successResultOf(self.h.presence.locate([self.a, self.b])), {})

    def test_loginInFlightAnsweredThenGoodbye(self) -> None:
        """A session still logging in when the stop comes (its password
        check pending) gets its login reply, then the goodbye."""
        self.h.hasher.hold = True
        carol = self.h.connect()
        carol.send({"msgid": m.LOGIN_MSG, "id": self.a, "password": "secret"})
        stopped = self.h.service.stopService()
        self.h.hasher.release()
        self.successResultOf(stopped)
        # The new login replaced alice's old session (kick mode): it was
        # answered, then said goodbye to.
        replies = carol.replies()
        self.assertEqual([r["msgid"] for r in replies], [m.LOGIN_MSG_ACK, m.KICK_NOTICE])
        self.assertEqual(replies[0]["errno"], 0)

    def test_stopBoundedByTimeout(self) -> None:
        """A request that never finishes does not hold the stop forever:
        after C{timeout} seconds the sessions are kicked anyway."""
        self.h.hasher.hold = True
        self.alice.send({"msgid": m.REG_MSG, "name": "carol", "password": "secret"})
        stopped = self.h.service.stopService()
        self.h.clock.advance(self.h.service.shutdown.timeout - 1)
        self.assertNoResult(stopped)
        self.h.clock.advance(1)
        self.successResultOf(stopped)
        self.assertEqual(self.alice.replies()[-1], KICK)
        self.flushLoggedErrors()

    def test_heldChatKeptOffline(self) -> None:
        """What was held for a session logging in (a chat that arrived
        between its claim and its login reply) is stored when the stop
        closes it before the reply."""
        stored = []
        storeOffline = self.h.store.storeOffline

        def recording(rows):
            stored.extend(rows)
            return storeOffline(rows)

        self.h.store.storeOffline = recording
        carol = self.h.connect()
        session = carol.protocol
        session.hold(self.a)
        session.send({"msgid": m.ONE_CHAT_MSG, "id": self.b, "name": "bob", "toid": self.a, "msg": "held"})
        self.successResultOf(self.h.service.stopService())
        self.assertEqual(carol.replies(), [KICK])
        self.assertEqual([(uid, json.loads(payload)["msg"]) for uid, payload in stored], [(self.a, "held")])


class StopSignalTests(unittest.TestCase):
    def test_handlerOnlyAsksTheReactorToStop(self) -> None:
        """The installed handler calls nothing but callFromThread(stop):
        it logs nothing (a logging call would go through the reactor
        fake's other methods or the log observers)."""
        installed = {}
        calls = []

        class FakeReactor:
            def stop(self):
                calls.append("stop")

            def callFromThread(self, f, *args):
                calls.append(("callFromThread", f))

        reactor = FakeReactor()
        installStopHandlers(reactor, install=lambda number, handler: installed.__setitem__(number, handler))
        self.assertEqual(set(installed), {signal.SIGTERM, signal.SIGINT})
        observed = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(observed.append)
        self.addCleanup(globalLogPublisher.removeObserver, observed.append)
        installed[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual(calls, [("callFromThread", reactor.stop)])
        self.assertEqual(observed, [])
