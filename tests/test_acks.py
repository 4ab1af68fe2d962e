"""
End-to-end acknowledgements on one server (issue 11, chatproto.acks): mid
and cid, PUSH_ACK bookkeeping, redelivery of what an acking session did not
ack however it ends, deletion of handed-over offline messages only on ack,
the sender's "delivered"/"stored" and its confirmation timeout, and the
login reply of NUL-terminated sessions.  In memory, with a Clock.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial import unittest

from chatproto import messages as m
from chatproto.acks import Confirmations, midFor, midOf
from chatproto.embedded import LocalRelay
from chatproto.sqloffline import NUL_LOGIN_REPLY_BYTES
from tests.chat_helpers import Harness


def chat(toid, msg, **extra):
    return dict({"msgid": m.ONE_CHAT_MSG, "toid": toid, "msg": msg}, **extra)


class AckHarness(Harness):
    def loginAcking(self, uid, end=b"\n"):
        client = self.connect()
        client.send({"msgid": 1, "id": uid, "password": "secret", "ack": True}, end)
        replies = client.replies()
        assert replies[0]["errno"] == 0, replies
        return client, replies

    def stored(self, uid):
        return self.service.store.peekOffline(uid).result


class MidTests(unittest.TestCase):
    def setUp(self):
        self.h = AckHarness()
        self.a, self.b = self.h.register("alice"), self.h.register("bob")
        self.alice, self.bob = self.h.login(self.a), self.h.login(self.b)

    def test_cidGivesStableMid(self):
        """The same sender and cid give the same mid, computed from them
        alone (any server gets the same); other cids, other senders and
        messages without cid get other mids."""
        self.alice.request(chat(self.b, "one", cid="c-1"))
        self.alice.request(chat(self.b, "one again", cid="c-1"))
        self.alice.request(chat(self.b, "two", cid=7))
        self.alice.request(chat(self.b, "three"))
        self.alice.request(chat(self.b, "four"))
        mids = [p["mid"] for p in self.bob.replies()]
        self.assertEqual(mids[0], mids[1])
        self.assertEqual(mids[0], midFor(self.a, "c-1"))
        self.assertEqual(mids[2], midFor(self.a, 7))
        self.assertNotEqual(midFor(self.a, 7), midFor(self.a, "7"))
        self.assertNotEqual(midFor(self.a, "c-1"), midFor(self.b, "c-1"))
        self.assertEqual(len(set(mids[2:])), 3)
        self.assertEqual(AckHarness().service.mid(self.alice.protocol, m.validate(6, chat(2, "x", cid="c-1"))), mids[0])

    def test_groupChatCarriesMid(self):
        self.alice.request({"msgid": 8, "groupname": "devs"})
        self.bob.request({"msgid": 9, "groupid": 1})
        ack = self.alice.request({"msgid": 10, "groupid": 1, "msg": "hi", "cid": "g1"})
        self.assertEqual(ack["delivered"], 1)
        self.assertEqual(self.bob.reply()["mid"], midFor(self.a, "g1"))

    def test_badCid(self):
        """A cid must be a string of 1-64 characters or a 64-bit integer."""
        for cid in ("x" * 65, "", True, 1.5, [1], 2**63):
            reply = self.alice.request(chat(self.b, "hi", cid=cid))
            self.assertEqual((reply["msgid"], reply["errno"]), (m.ONE_CHAT_MSG_ACK, m.E_BAD_FIELD), cid)
        self.assertEqual(self.bob.replies(), [])
        self.assertEqual(self.alice.request(chat(self.b, "ok", cid="x" * 64))["errno"], 0)

    def test_offlineDeduplicated(self):
        """A resend (same cid) to an offline user is stored once."""
        self.bob.disconnect()
        for _ in range(3):
            self.assertEqual(self.alice.request(chat(self.b, "hi", cid="once"))["state"], "stored")
        self.assertEqual(len(self.h.stored(self.b)), 1)
        self.alice.request(chat(self.b, "hi"))
        self.assertEqual(len(self.h.stored(self.b)), 2)

    def test_legacyLoginUnchanged(self):
        """Without "ack" offline messages are deleted once written, and the
        sender's ack comes at once."""
        self.bob.disconnect()
        self.alice.request(chat(self.b, "hi"))
        bob = self.h.connect()
        login = bob.request({"msgid": 1, "id": self.b, "password": "secret"})
        self.assertEqual([json.loads(p)["msg"] for p in login["offlinemsg"]], ["hi"])
        self.assertEqual(self.h.stored(self.b), [])
        self.assertEqual(self.alice.request(chat(self.b, "live"))["state"], "delivered")


class PushAckTests(unittest.TestCase):
    def setUp(self):
        self.h = AckHarness(maxLength=65536)
        self.a, self.b = self.h.register("alice"), self.h.register("bob")
        self.alice = self.h.login(self.a)
        self.bob, _ = self.h.loginAcking(self.b)

    def test_deliveredOnlyWhenAcked(self):
        self.alice.send(chat(self.b, "hi", cid=1))
        self.assertEqual(self.alice.replies(), [])
        [push] = self.bob.replies()
        self.assertEqual(list(self.bob.protocol.unacked), [push["mid"]])
        # Unknown mids are ignored; PUSH_ACK has no reply.
        self.bob.send({"msgid": 26, "mids": ["nope", push["mid"]]})
        self.assertEqual(self.bob.replies(), [])
        self.assertEqual(self.alice.reply()["state"], "delivered")
        self.assertEqual(self.bob.protocol.unacked, {})
        self.assertEqual(self.h.stored(self.b), [])
        self.assertFalse(any(c.active() and c.func.__name__ == "resolve" for c in self.h.clock.getDelayedCalls()))

    def test_timeoutStores(self):
        """No ack within the confirmation timeout: the sender stores it and
        acks "stored"; a late ack then changes nothing, and the message
        waits in the store with its mid."""
        self.alice.send(chat(self.b, "hi"))
        self.h.clock.advance(Confirmations.timeout - 0.1)
        self.assertEqual(self.alice.replies(), [])
        self.h.clock.advance(0.1)
        self.assertEqual(self.alice.reply()["state"], "stored")
        [push] = self.bob.replies()
        self.assertEqual([midOf(p) for p in self.h.stored(self.b)], [push["mid"]])
        # The late ack: the stored copy is the one bob has (the nudge after
        # the fallback store found it pushed already), so it is deleted;
        # nothing is pushed or stored twice.
        self.bob.send({"msgid": 26, "mids": [push["mid"]]})
        self.assertEqual(self.bob.replies(), [])
        self.bob.disconnect()
        self.assertEqual(self.h.stored(self.b), [])

    def test_redeliveredAfterDrop(self):
        self.alice.send(chat(self.b, "hi", cid="a"))
        [push] = self.bob.replies()
        self.bob.disconnect()
        self.assertEqual(self.alice.reply()["state"], "stored")
        bob, replies = self.h.loginAcking(self.b)
        self.assertEqual([json.loads(p)["mid"] for p in replies[0]["offlinemsg"]], [push["mid"]])

    def test_redeliveredAfterKick(self):
        """A newer login kicks the acking session: what it did not ack is in
        the new session's login reply."""
        self.alice.send(chat(self.b, "hi"))
        [push] = self.bob.replies()
        bob2, replies = self.h.loginAcking(self.b)
        self.assertTrue(self.bob.closed)
        self.assertEqual([json.loads(p)["mid"] for p in replies[0]["offlinemsg"]], [push["mid"]])
        self.assertEqual(self.alice.reply()["state"], "stored")

    def test_redeliveredAfterStop(self):
        self.alice.send(chat(self.b, "hi"))
        [push] = self.bob.replies()
        self.h.service.store.close = lambda: defer.succeed(None)  # to look at it after
        d = self.h.service.stopService()
        self.h.clock.pump([0.1] * 5)
        self.successResultOf(d)
        self.assertEqual([midOf(p) for p in self.h.stored(self.b)], [push["mid"]])
        self.assertEqual([r.get("state") for r in self.alice.replies() if r["msgid"] == 12], ["stored"])

    def test_tooManyUnacked(self):
        """A client that never acks is logged out past maxUnacked (its
        messages are stored), not kept without bound."""
        self.h.service.delivery.maxUnacked = 3
        for n in range(4):
            # (alice's requests are carried out in order: each waits for
            # its confirmation, here until the timeout)
            self.alice.send(chat(self.b, str(n)))
            self.assertEqual(self.bob.closed, n == 3)
            self.h.clock.advance(Confirmations.timeout if n < 3 else 0)
        self.assertEqual(self.bob.protocol.unacked, {})
        self.assertEqual(sorted(json.loads(p)["msg"] for p in self.h.stored(self.b)), ["0", "1", "2", "3"])
        self.assertEqual([r["state"] for r in self.alice.replies()], ["stored"] * 4)

    def test_pushAckBounds(self):
        for mids, _ in ((["x"] * 1001, "too many"), ([1], "not strings"), ("abc", "not a list"), (["x" * 65], "long")):
            reply = self.bob.request({"msgid": 26, "mids": mids})
            self.assertEqual((reply["msgid"], reply["errno"]), (m.ERROR_MSG, m.E_BAD_FIELD))
        self.assertEqual(self.bob.request({"msgid": 21}), {"msgid": 22})
        anon = self.h.connect()
        self.assertEqual(anon.request({"msgid": 26, "mids": []})["errno"], m.E_NOT_LOGGED_IN)

    def test_ackMustBeBoolean(self):
        client = self.h.connect()
        reply = client.request({"msgid": 1, "id": self.a, "password": "secret", "ack": 1})
        self.assertEqual((reply["msgid"], reply["errno"]), (m.LOGIN_MSG_ACK, m.E_BAD_FIELD))


class OfflineHandOverTests(unittest.TestCase):
    def setUp(self):
        self.h = AckHarness()
        self.a, self.b = self.h.register("alice"), self.h.register("bob")
        self.alice = self.h.login(self.a)
        for n in range(3):
            self.alice.request(chat(self.b, str(n)))

    def test_deletedOnlyWhenAcked(self):
        bob, replies = self.h.loginAcking(self.b)
        mids = [json.loads(p)["mid"] for p in replies[0]["offlinemsg"]]
        self.assertEqual(len(mids), 3)
        self.assertEqual(len(self.h.stored(self.b)), 3)
        bob.send({"msgid": 26, "mids": mids[:1]})
        self.assertEqual(len(self.h.stored(self.b)), 2)
        # Gone without acking the rest: they come again.
        bob.disconnect()
        bob, replies = self.h.loginAcking(self.b)
        self.assertEqual([json.loads(p)["mid"] for p in replies[0]["offlinemsg"]], mids[1:])
        bob.send({"msgid": 26, "mids": mids[1:]})
        self.assertEqual(self.h.stored(self.b), [])


class NulSessionPagingTests(unittest.TestCase):
    """The tutorial client reads 1,024 bytes at a time: its login reply
    stays within that, the rest of the offline messages follow as pushes."""

    def eightStoredForBob(self):
        """Eight chats stored for bob; a connection for him, not logged in."""
        h = AckHarness()
        a, b = h.register("alice"), h.register("bob")
        alice = h.login(a)
        for n in range(8):
            alice.request(chat(b, f"message number {n} " + "x" * 40))
        bob = h.connect()
        return h, b, bob

    def test_loginReplyWithin1024Bytes(self):
        h, b, bob = self.eightStoredForBob()
        bob.send({"msgid": 1, "id": b, "password": "secret"}, b"\0")
        data = bob.transport.value()
        first = data.split(b"\n")[0]
        self.assertLess(len(first) + 1, NUL_LOGIN_REPLY_BYTES)
        replies = bob.replies()
        self.assertEqual(replies[0]["msgid"], m.LOGIN_MSG_ACK)
        self.assertLess(len(replies[0]["offlinemsg"]), 8)
        shown = [json.loads(p)["msg"] for p in replies[0]["offlinemsg"]] + [r["msg"] for r in replies[1:]]
        self.assertEqual([s.split()[2] for s in shown], [str(n) for n in range(8)])
        self.assertEqual(h.stored(b), [])

    def test_newlineSessionKeepsBigPage(self):
        h, b, bob = self.eightStoredForBob()
        login = bob.request({"msgid": 1, "id": b, "password": "secret"})
        self.assertEqual(len(login["offlinemsg"]), 8)


class _SilentRelay(LocalRelay):
    """Every remote user is 'taken' by some server, which never confirms."""

    def __init__(self):
        self.missed = False

    def deliver(self, uids, message, store, line=None):
        return defer.succeed(list(uids) if self.missed else [])


class _SilentRelayMixin:
    """alice logged in on a server whose relay never confirms (bob is
    elsewhere, as far as the relay says)."""

    def setUp(self):
        self.h = AckHarness()
        self.relay = _SilentRelay()
        self.h.service.relay = self.h.service.delivery.relay = self.relay
        self.a, self.b = self.h.register("alice"), self.h.register("bob")
        self.alice = self.h.login(self.a)


class SenderSideTests(_SilentRelayMixin, unittest.TestCase):
    """The sending server's wait for a remote recipient's server."""

    def test_confirmationTimeoutStores(self):
        self.alice.send(chat(self.b, "hi", cid="t"))
        self.h.clock.advance(Confirmations.timeout - 0.01)
        self.assertEqual(self.alice.replies(), [])
        self.h.clock.advance(0.01)
        self.assertEqual(self.alice.reply()["state"], "stored")
        self.assertEqual([midOf(p) for p in self.h.stored(self.b)], [midFor(self.a, "t")])
        # A late confirmation: ignored, nothing duplicated.
        self.h.service.delivery.confirmed([[self.b, midFor(self.a, "t"), "delivered"]])
        self.assertEqual(len(self.h.stored(self.b)), 1)

    def test_confirmedDelivered(self):
        self.alice.send(chat(self.b, "hi", cid="d"))
        self.h.service.delivery.confirmed([[self.b, midFor(self.a, "d"), "delivered"]])
        self.assertEqual(self.alice.reply()["state"], "delivered")
        self.assertEqual(self.h.stored(self.b), [])
        self.assertEqual([c for c in self.h.clock.getDelayedCalls() if c.active() and c.func.__name__ == "resolve"], [])

    def test_storedByRecipientServer(self):
        self.alice.send(chat(self.b, "hi", cid="s"))
        self.h.service.delivery.confirmed([[self.b, midFor(self.a, "s"), "stored"]])
        self.assertEqual(self.alice.reply()["state"], "stored")
        self.assertEqual(self.h.stored(self.b), [])

    def test_missedStoresAtOnce(self):
        """The recipient's server is gone from the registry (or nobody there
        took it): stored and acked "stored" without waiting."""
        self.relay.missed = True
        self.assertEqual(self.alice.request(chat(self.b, "hi"))["state"], "stored")
        self.assertEqual(len(self.h.stored(self.b)), 1)


class ReceiverSideTests(unittest.TestCase):
    """The recipient's server confirms to the sending one over the relay."""

    def setUp(self):
        self.h = AckHarness()
        self.sent = []
        self.h.service.relay.confirm = lambda server, entries: self.sent.append((server, entries))
        self.b, self.c = self.h.register("bob"), self.h.register("carol")
        self.bob = self.h.login(self.b)

    def relayed(self, uids, mid="M1"):
        message = {"msgid": 6, "id": 9, "name": "x", "toid": uids[0], "msg": "hi", "time": "t", "mid": mid}
        return self.h.service.delivery.deliverLocal(uids, message, True, "other")

    def test_legacyConfirmedWhenWritten(self):
        self.assertEqual(self.relayed([self.b]), [])
        self.h.clock.advance(0)
        self.assertEqual(self.sent, [("other", [[self.b, "M1", "delivered"]])])

    def test_confirmationsLostAreOnlyWarned(self):
        """Redis down when confirming: warned (once, then counted), never an
        unhandled error; the sender's timeout covers it."""
        warned = []
        self.h.service.confirmations.warnings.warn = lambda key, text, **kw: warned.append(key)
        self.h.service.relay.confirm = lambda server, entries: defer.fail(RuntimeError("Redis down"))
        self.relayed([self.b])
        self.h.clock.advance(0)
        self.assertEqual(warned, ["confirmations lost"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_missedReportedNotStoredHere(self):
        """A user not here: the sender is told (it stores it, and can tell
        its client if that fails)."""
        self.assertEqual(self.relayed([self.c]), [self.c])
        self.h.clock.advance(0)
        self.assertEqual(self.sent, [("other", [[self.c, "M1", "missed"]])])
        self.assertEqual(self.h.stored(self.c), [])

    def test_ackingConfirmedWhenAcked(self):
        self.bob.disconnect()
        bob, _ = self.h.loginAcking(self.b)
        self.relayed([self.b])
        self.h.clock.advance(0)
        self.assertEqual(self.sent, [])
        bob.send({"msgid": 26, "mids": ["M1"]})
        self.h.clock.advance(0)
        self.assertEqual(self.sent, [("other", [[self.b, "M1", "delivered"]])])

    def test_ackingDroppedReportsStored(self):
        self.bob.disconnect()
        bob, _ = self.h.loginAcking(self.b)
        self.relayed([self.b])
        bob.disconnect()
        self.h.clock.advance(0)
        self.assertEqual(self.sent, [("other", [[self.b, "M1", "stored"]])])
        self.assertEqual([midOf(p) for p in self.h.stored(self.b)], ["M1"])


class ImmediateAnswersTests(unittest.TestCase):
    """Requests answered at once (their Deferred fired already) do not
    recurse: found by the cluster benchmark, whose 1,000 pipelined
    registrations past the per-address burst (errno 3 at once) overflowed
    the stack."""

    def test_thousandsOfImmediateErrors(self):
        h = AckHarness(maxLength=65536)
        client = h.connect()
        # The first registrations wait for their hash: the rest queue.
        h.hasher.hold = True
        lines = b"".join(
            json.dumps({"msgid": 4, "name": f"u{i}", "password": "pw"}).encode() + b"\n" for i in range(3000)
        )
        client.sendRaw(lines)
        while h.hasher.waiting:
            h.hasher.release()
        replies = client.replies()
        self.assertEqual(len(replies), 3000)
        self.assertEqual({r["errno"] for r in replies[100:]}, {m.E_THROTTLED})
        self.assertEqual(self.flushLoggedErrors(), [])


class NudgeTests(_SilentRelayMixin, unittest.TestCase):
    """A chat stored as a fallback for a user who is logged in (elsewhere,
    or here again) is handed over to that session at once."""

    def test_timeoutFallbackHandedToSessionNowHere(self):
        """bob's server (as the relay says) never confirms; meanwhile bob
        logged in here: the fallback store is handed to him live, once."""
        self.alice.send(chat(self.b, "hi", cid="n"))
        bob = self.h.login(self.b)
        self.h.clock.advance(Confirmations.timeout)
        self.assertEqual(self.alice.reply()["state"], "stored")
        self.assertEqual([p["mid"] for p in bob.replies() if p["msgid"] == 6], [midFor(self.a, "n")])
        self.assertEqual(self.h.stored(self.b), [])

    def test_acking(self):
        self.alice.send(chat(self.b, "hi", cid="n"))
        bob, _ = self.h.loginAcking(self.b)
        self.h.clock.advance(Confirmations.timeout)
        [push] = [p for p in bob.replies() if p["msgid"] == 6]
        self.assertEqual(len(self.h.stored(self.b)), 1)
        bob.send({"msgid": 26, "mids": [push["mid"]]})
        self.assertEqual(self.h.stored(self.b), [])

    def test_plainOfflineNotNudged(self):
        """The relay found nobody: stored, no nudge (no relay call)."""
        self.relay.missed = True
        calls = []
        self.h.service.delivery.nudge = calls.append
        self.assertEqual(self.alice.request(chat(self.b, "hi"))["state"], "stored")
        self.assertEqual([uid for uids in calls for uid in uids], [])

    def test_nudgeBeforeTheHandOverWaitsForTheLoginReply(self):
        """A nudge that comes after the login has bound the session but
        before its hand-over started (while the friends and groups are
        read) pushes nothing before the login reply either."""
        bob = self.h.connect()
        store = self.h.service.store
        original = store.getLoginData
        nudged = []

        def getLoginData(uid):
            if not nudged:
                nudged.append(True)
                store.storeOffline([(uid, '{"msgid":6,"msg":"early","mid":"EARLY"}')])
                self.h.service.delivery.deliverLocal([uid], {"nudge": 1}, False)
            return original(uid)

        store.getLoginData = getLoginData
        bob.send({"msgid": 1, "id": self.b, "password": "secret"})
        replies = bob.replies()
        self.assertEqual(replies[0]["msgid"], m.LOGIN_MSG_ACK)
        shown = [json.loads(p)["mid"] for p in replies[0]["offlinemsg"]] + [r.get("mid") for r in replies[1:]]
        self.assertEqual(shown, ["EARLY"])

    def test_nudgeDuringLoginWaitsForItsReply(self):
        """A nudge that comes while a login hands over is carried out after
        it: nothing is pushed before the login reply."""
        bob = self.h.connect()
        store = self.h.service.store
        original = store.takeOffline
        nudged = []

        def takeOffline(uid, handoff, keepAcked=False):
            # the nudge arrives in the middle of the login's hand-over
            if not nudged:
                nudged.append(True)
                store.storeOffline([(uid, '{"msgid":6,"msg":"late","mid":"LATE"}')])
                self.h.service.delivery.deliverLocal([uid], {"nudge": 1}, False)
            return original(uid, handoff, keepAcked)

        store.takeOffline = takeOffline
        store.storeOffline([(self.b, '{"msgid":6,"msg":"first","mid":"FIRST"}')])
        bob.send({"msgid": 1, "id": self.b, "password": "secret"})
        replies = bob.replies()
        self.assertEqual(replies[0]["msgid"], m.LOGIN_MSG_ACK)
        shown = [json.loads(p)["mid"] for p in replies[0]["offlinemsg"]] + [r.get("mid") for r in replies[1:]]
        self.assertEqual(shown, ["FIRST", "LATE"])

    def test_storedAfterTheLoginFoundNoneIsNudgedAfterTheReply(self):
        """The login read an empty mailbox (and skips the hand-over's
        transaction); a chat stored and nudged right after is pushed after
        the login reply."""
        bob = self.h.connect()
        store = self.h.service.store
        original = store.getLoginData

        def getLoginData(uid):
            def meanwhile(data):
                store.storeOffline([(uid, '{"msgid":6,"msg":"late","mid":"LATE"}')])
                self.h.service.delivery.deliverLocal([uid], {"nudge": 1}, False)
                return data

            return original(uid).addCallback(meanwhile)

        store.getLoginData = getLoginData
        bob.send({"msgid": 1, "id": self.b, "password": "secret"})
        replies = bob.replies()
        self.assertEqual((replies[0]["msgid"], replies[0]["offlinemsg"]), (m.LOGIN_MSG_ACK, []))
        self.assertEqual([r.get("mid") for r in replies[1:]], ["LATE"])
        self.assertEqual(self.successResultOf(store.peekOffline(self.b)), [])
