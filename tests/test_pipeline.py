"""
Pipelined chats (chatproto.pipeline) and chats to users elsewhere
(chatproto.remotechat): a connection's next chat starts once
the one before is routed, its replies still leave in request order,
anything else waits for the chats before it, chats to one recipient are
routed in the order sent, and at most PIPELINE_DEPTH chats of a connection
wait unanswered.  In memory, with a Clock and a relay that confirms only
when the test says so.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from chatproto import messages as m
from chatproto.acks import Confirmations, midFor, midOf
from chatproto.embedded import LocalRelay
from chatproto.interfaces import PresenceUnavailable, StoreUnavailable
from chatproto.pipeline import PIPELINE_DEPTH
from tests.test_acks import AckHarness, chat


class _RecordingRelay(LocalRelay):
    """Every remote user is taken by another server, which confirms only
    when the test calls L{confirm}; what was handed over is in C{sent}."""

    def __init__(self):
        self.sent = []

    def deliver(self, uids, message, store, line=None):
        self.sent.append((list(uids), message["msg"]))
        return defer.succeed([])


class _RecordingRelayMixin:
    """alice, bob and carol registered, alice logged in here; the relay
    says bob and carol are elsewhere."""

    def setUp(self):
        self.h = AckHarness()
        self.relay = _RecordingRelay()
        self.h.service.relay = self.h.service.delivery.relay = self.relay
        self.a, self.b = self.h.register("alice"), self.h.register("bob")
        self.c = self.h.register("carol")
        self.alice = self.h.login(self.a)


class PipelineTests(_RecordingRelayMixin, unittest.TestCase):

    def confirm(self, uid, cid, state="delivered"):
        self.h.service.delivery.confirmed([[uid, midFor(self.a, cid), state]])

    def sendChats(self, n, toid=None):
        toid = self.b if toid is None else toid
        self.alice.sendRaw(b"".join(b'{"msgid":6,"toid":%d,"msg":"m%d","cid":%d}\n' % (toid, i, i) for i in range(n)))

    def test_nextChatRoutedBeforeTheFirstIsConfirmed(self):
        self.sendChats(3)
        self.assertEqual(self.relay.sent, [([self.b], "m0"), ([self.b], "m1"), ([self.b], "m2")])
        self.assertEqual(self.alice.replies(), [])
        self.assertEqual(self.alice.protocol.unanswered(), 3)

    def test_repliesInRequestOrder(self):
        """Confirmations that come back in another order: the acks still
        leave in the order of the chats, each as soon as it can."""
        self.sendChats(3)
        self.confirm(self.b, 2)
        self.confirm(self.b, 1, "stored")
        self.assertEqual(self.alice.replies(), [])
        self.confirm(self.b, 0)
        acks = self.alice.replies()
        self.assertEqual([(a["msgid"], a["state"]) for a in acks], [(12, "delivered"), (12, "stored"), (12, "delivered")])
        self.assertEqual(self.alice.protocol.unanswered(), 0)

    def test_fastPathReplyWaitsItsTurn(self):
        """A chat to a local session is answered at once, but not before
        the chat to a remote user sent before it."""
        carol = self.h.login(self.c)
        self.alice.send(chat(self.b, "remote", cid=0))
        self.alice.send(chat(self.c, "local", cid=1))
        self.assertEqual([p["msg"] for p in carol.replies()], ["local"])
        self.assertEqual(self.alice.replies(), [])
        self.confirm(self.b, 0)
        self.assertEqual([a["toid"] for a in self.alice.replies()], [self.b, self.c])

    def test_otherRequestsWaitForTheChatsBefore(self):
        """A ping, an unparseable line and a text command after an
        unanswered chat are carried out only once it is answered."""
        self.sendChats(1)
        self.alice.send({"msgid": m.PING_MSG, "seq": "p"})
        self.alice.sendRaw(b"{nope\n")
        self.assertEqual(self.alice.replies(), [])
        self.confirm(self.b, 0)
        replies = self.alice.replies()
        self.assertEqual([r["msgid"] for r in replies], [m.ONE_CHAT_MSG_ACK, m.PONG_MSG, m.ERROR_MSG])
        self.assertEqual(replies[1]["seq"], "p")

    def test_logoutAfterTheChatsBefore(self):
        self.sendChats(2)
        self.alice.send({"msgid": m.LOGINOUT_MSG})
        self.assertIsNotNone(self.alice.protocol.uid)
        self.confirm(self.b, 0)
        self.confirm(self.b, 1)
        self.assertEqual([r["msgid"] for r in self.alice.replies()], [12, 12, m.LOGINOUT_MSG_ACK])
        self.assertIsNone(self.alice.protocol.uid)

    def test_errorAnsweredInTurn(self):
        """A chat to nobody after a remote one: its error comes second."""
        self.sendChats(1)
        self.alice.send(chat(999999, "nobody"))
        self.assertEqual(self.alice.replies(), [])
        self.confirm(self.b, 0)
        self.assertEqual([r["errno"] for r in self.alice.replies()], [0, m.E_NO_SUCH_USER])

    def test_orderKeptWhileTheRecipientIsLookedUp(self):
        """The first chat's recipient is not known yet (a store read): the
        chats after it are not routed before it."""
        names = self.h.service.registry.names
        del names[self.b]
        held = defer.Deferred()
        store = self.h.service.store
        real = store.getNames
        store.getNames = lambda uids: held.addCallback(lambda _: real(uids))
        self.sendChats(2)
        self.alice.send(chat(self.c, "other"))
        self.assertEqual(self.relay.sent, [])
        held.callback(None)
        self.assertEqual([msg for _, msg in self.relay.sent], ["m0", "m1", "other"])

    def test_depthBoundsAHostileClient(self):
        """A client that floods chats to a user whose server never confirms
        has at most PIPELINE_DEPTH of them routed; the rest wait, reading
        pauses, and they go on as the first ones time out."""
        n = PIPELINE_DEPTH + 100
        self.sendChats(n)
        self.assertEqual(len(self.relay.sent), PIPELINE_DEPTH)
        self.assertEqual(self.alice.protocol.unanswered(), PIPELINE_DEPTH)
        self.assertEqual(self.alice.transport.producerState, "paused")
        answered = 0
        while answered < n:
            self.h.clock.advance(Confirmations.timeout)
            acks = self.alice.replies()
            self.assertEqual({a["state"] for a in acks}, {"stored"})
            answered += len(acks)
            self.assertEqual(len(self.relay.sent), min(n, answered + PIPELINE_DEPTH))
            self.assertLessEqual(self.alice.protocol.unanswered(), PIPELINE_DEPTH)
        self.assertEqual(self.alice.transport.producerState, "producing")
        self.assertEqual(len(self.h.stored(self.b)), n)

    def test_depthSetting(self):
        self.alice.protocol.pipelineDepth = 2
        self.sendChats(5)
        self.assertEqual(len(self.relay.sent), 2)
        self.confirm(self.b, 0)
        self.assertEqual(len(self.relay.sent), 3)

    def test_halfCloseWaitsForTheAnswers(self):
        """The client half-closes after its chats: the connection closes
        once they are all answered, not before."""
        self.sendChats(2)
        self.alice.protocol.readConnectionLost()
        self.assertFalse(self.alice.closed)
        self.confirm(self.b, 0)
        self.assertFalse(self.alice.closed)
        self.confirm(self.b, 1)
        self.assertEqual(len(self.alice.replies()), 2)
        self.assertTrue(self.alice.closed)

    def test_textDialect(self):
        self.alice.sendRaw(b"chat:%d:one\r\nchat:%d:two\r\nPING\r\n" % (self.b, self.b))
        self.assertEqual([msg for _, msg in self.relay.sent], ["one", "two"])
        self.assertEqual(self.alice.lines(), [])
        for pending in list(self.h.service.confirmations.pending):
            self.h.service.confirmations.resolve(*pending, "delivered")
        lines = self.alice.lines()
        self.assertEqual(len(lines), 3)
        self.assertIn("PONG", lines[2])

    def test_offlineStoredBeforeTheNextIsRouted(self):
        """Nobody has the recipient: the chat is stored before the next
        chat is routed, so their offline order is the order sent."""
        self.relay.deliver = lambda uids, message, store, line=None: (
            self.relay.sent.append((list(uids), message["msg"])) or defer.succeed(list(uids))
        )
        store = self.h.service.store
        real, held = store.storeOffline, []

        def storeOffline(rows):
            d = defer.Deferred()
            held.append(d)
            return d.addCallback(lambda _: real(rows))

        store.storeOffline = storeOffline
        self.sendChats(3)
        self.assertEqual(len(self.relay.sent), 1)
        while held:
            held.pop(0).callback(None)
        self.assertEqual(len(self.relay.sent), 3)
        self.assertEqual([a["state"] for a in self.alice.replies()], ["stored"] * 3)
        stored = self.h.stored(self.b)
        self.assertEqual([s.split('"msg":"')[1].split('"')[0] for s in stored], ["m0", "m1", "m2"])


    def test_requestsWaitingAreDroppedWithTheConnection(self):
        """A request waiting behind a chat is not carried out once the
        connection is gone (as for any queued line); the chat goes on."""
        handled = []
        service = self.h.service
        real = service.handle
        service.handle = lambda session, request: handled.append(request.spec.name) or real(session, request)
        self.sendChats(1)
        self.alice.send({"msgid": m.FRIEND_LIST_MSG})
        self.alice.disconnect()
        self.confirm(self.b, 0)
        self.assertEqual(handled, ["chat"])
        self.assertEqual(self.alice.protocol.unanswered(), 0)

class RemoteChatFailureTests(_RecordingRelayMixin, unittest.TestCase):
    """chatproto.remotechat: a chat to a user elsewhere when the relay or
    the store fails; the connection goes on either way."""

    def test_relayDownStores(self):
        """The relay fails (Redis down): the chat is stored offline here,
        acked "stored", and the next chat is carried out."""
        self.relay.deliver = lambda uids, message, store, line=None: defer.fail(PresenceUnavailable("down"))
        self.alice.send(chat(self.b, "one"))
        self.alice.send(chat(self.b, "two"))
        self.assertEqual([a["state"] for a in self.alice.replies()], ["stored", "stored"])
        self.assertEqual([midOf(p) is not None for p in self.h.stored(self.b)], [True, True])
        self.assertEqual(self.h.service.confirmations.pending, {})
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_relayRaisesStores(self):
        def broken(uids, message, store, line=None):
            raise PresenceUnavailable("not connected")

        self.relay.deliver = broken
        self.assertEqual(self.alice.request(chat(self.b, "one"))["state"], "stored")
        self.assertEqual(len(self.h.stored(self.b)), 1)

    def test_storeDownAnswersAndGoesOn(self):
        """Nobody has the user and the store is down: errno 30 for that
        chat, and the connection's next request is still answered."""
        self.relay.deliver = lambda uids, message, store, line=None: defer.succeed(list(uids))
        self.h.service.store.storeOffline = lambda rows: defer.fail(StoreUnavailable("database down"))
        self.alice.send(chat(self.b, "one"))
        self.alice.send({"msgid": m.PING_MSG})
        replies = self.alice.replies()
        self.assertEqual([(r["msgid"], r.get("errno")) for r in replies], [(12, m.E_UNAVAILABLE), (m.PONG_MSG, None)])

    def test_fallbackStoreAfterTimeoutNudges(self):
        """No confirmation within the timeout: stored here, acked
        "stored", and the user's live session (if any) is nudged."""
        nudged = []
        self.h.service.delivery.nudge = nudged.append
        self.alice.send(chat(self.b, "one"))
        self.h.clock.advance(Confirmations.timeout)
        self.assertEqual(self.alice.reply()["state"], "stored")
        self.assertEqual(nudged, [[self.b]])
        self.assertEqual(len(self.h.stored(self.b)), 1)

