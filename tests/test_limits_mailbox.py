"""
Issue 9, item 4: offline mailboxes are capped per recipient (count and
bytes) in both stores; the sender of a chat to a full mailbox gets errno 25;
a login reply carries a bounded page of offline messages, the rest follow it.
"""

from __future__ import annotations

import json
import sqlite3

from twisted.internet import defer, reactor
from twisted.trial import unittest

from chatproto import messages as m
from chatproto.acks import Confirmations
from chatproto.config import parseDatabaseURL
from chatproto.mysqlstore import MySQLStore
from chatproto.sqloffline import LOGIN_PAGE_MESSAGES, MailboxFull, pageOffline
from chatproto.sqlstore import ImmediatePool, SQLStore
from tests.chat_helpers import Harness
from tests.cluster_helpers import dropDatabase, mysqlURL, uniqueName


class MailboxCapContract:
    """Mixed into a TestCase providing C{makeStore()} (a started store)."""

    async def setUp(self):
        self.store = await self.makeStore()
        self.addCleanup(self.store.close)
        self.a = await self.store.createUser("a", "h")
        self.b = await self.store.createUser("b", "h")

    async def test_countCap(self):
        """Past C{mailboxMaxMessages} a recipient's copies are refused
        (MailboxFull naming them); other recipients are not affected."""
        self.store.mailboxMaxMessages = 3
        for i in range(3):
            await self.store.storeOffline([(self.a, f"m{i}")])
        d = self.store.storeOffline([(self.a, "m3"), (self.b, "x")])
        error = await self.assertFailure(d, MailboxFull)
        self.assertEqual((error.refused, error.stored), ([self.a], [self.b]))
        self.assertEqual(await self.store.peekOffline(self.a), ["m0", "m1", "m2"])
        self.assertEqual(await self.store.peekOffline(self.b), ["x"])

    async def test_byteCapCountsUTF8Bytes(self):
        """C{mailboxMaxBytes} counts the payloads' UTF-8 bytes, also within
        one batch; a mailbox emptied by a login takes messages again."""
        self.store.mailboxMaxBytes = 10
        await self.store.storeOffline([(self.a, "\u00e9" * 4)])  # 8 bytes
        await self.assertFailure(self.store.storeOffline([(self.a, "abc")]), MailboxFull)
        await self.store.storeOffline([(self.a, "ab")])
        self.assertEqual(await self.store.peekOffline(self.a), ["\u00e9" * 4, "ab"])
        await self.store.takeOffline(self.a, lambda payloads: True)
        await self.store.storeOffline([(self.a, "abcdefghij")])
        self.assertEqual(await self.store.peekOffline(self.a), ["abcdefghij"])

    async def test_batchedWritersEachToldTheirOwn(self):
        """Concurrent writers batched into one transaction: only the one
        whose copy was refused fails."""
        self.store.mailboxMaxMessages = 2
        ds = [self.store.storeOffline([(self.a, f"m{i}")]) for i in range(4)]
        ds.append(self.store.storeOffline([(self.b, "other")]))
        results = await defer.DeferredList(ds, consumeErrors=True)
        failed = [i for i, (ok, _) in enumerate(results) if not ok]
        self.assertEqual(failed, [2, 3])
        for i in failed:
            self.assertTrue(results[i][1].check(MailboxFull))
        self.assertEqual(await self.store.peekOffline(self.a), ["m0", "m1"])
        self.assertEqual(await self.store.peekOffline(self.b), ["other"])


class SQLiteMailboxTests(MailboxCapContract, unittest.TestCase):
    async def makeStore(self):
        store = SQLStore(ImmediatePool(sqlite3.connect(":memory:")))
        await store.start()
        return store


class MySQLMailboxTests(MailboxCapContract, unittest.TestCase):
    async def setUp(self):
        self.database = uniqueName("db")
        self.addCleanup(dropDatabase, self.database)
        await MailboxCapContract.setUp(self)

    async def makeStore(self):
        store = MySQLStore.fromURL(parseDatabaseURL(mysqlURL(self.database)), reactor)
        await store.start()
        return store


class SenderTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness()
        self.h.store.mailboxMaxMessages = 2
        self.a, self.b, self.c = (self.h.register(n) for n in ("alice", "bob", "carol"))

    def test_chatToFullMailboxIsErrno25(self):
        alice = self.h.login(self.a)
        for i in range(2):
            ack = alice.request({"msgid": m.ONE_CHAT_MSG, "toid": self.b, "msg": f"m{i}"})
            self.assertEqual((ack["errno"], ack["state"]), (0, "stored"))
        ack = alice.request({"msgid": m.ONE_CHAT_MSG, "toid": self.b, "msg": "one too many"})
        self.assertEqual(
            ack, {"msgid": m.ONE_CHAT_MSG_ACK, "errno": m.E_MAILBOX_FULL, "errmsg": "the recipient's mailbox is full"}
        )
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(alice.request({"msgid": m.PING_MSG}), {"msgid": m.PONG_MSG})

    def groupWithBobFull(self):
        """alice (logged in), bob and carol (logged out) in a group; bob's
        mailbox is full."""
        alice = self.h.login(self.a)
        gid = alice.request({"msgid": m.CREATE_GROUP_MSG, "groupname": "g", "groupdesc": ""})["groupid"]
        for uid in (self.b, self.c):
            client = self.h.login(uid)
            client.request({"msgid": m.ADD_GROUP_MSG, "groupid": gid})
            client.request({"msgid": m.LOGINOUT_MSG})
        for i in range(2):
            self.h.store.storeOffline([(self.b, f"old{i}")])
        return alice, gid

    def test_groupChatCountsFullMailboxes(self):
        """A full member's mailbox does not stop a group chat: the others
        get it and the ack counts the full ones."""
        alice, gid = self.groupWithBobFull()
        ack = alice.request({"msgid": m.GROUP_CHAT_MSG, "groupid": gid, "msg": "hi"})
        self.assertEqual((ack["errno"], ack["delivered"], ack["stored"], ack["full"]), (0, 0, 1, 1))

    def test_groupChatFullMailboxDoesNotDropTheUnconfirmed(self):
        """bob's mailbox is full and carol is elsewhere, on a server that
        never confirms: after the wait carol's copy is stored here all the
        same (one store call for both, as before pipelining)."""
        alice, gid = self.groupWithBobFull()
        # The relay: nobody has bob; carol is taken by a server that never confirms.
        delivery = self.h.service.delivery
        delivery.relay.deliver = lambda uids, message, store, line=None: defer.succeed([u for u in uids if u == self.b])
        alice.send({"msgid": m.GROUP_CHAT_MSG, "groupid": gid, "msg": "hi"})
        self.assertEqual(alice.replies(), [])
        self.h.clock.advance(Confirmations.timeout)
        ack = alice.reply()
        self.assertEqual((ack["errno"], ack["stored"], ack["full"]), (0, 1, 1))
        self.assertEqual(len(self.h.store.peekOffline(self.c).result), 1)


class LoginPagingTests(unittest.TestCase):
    def test_pageOffline(self):
        self.assertEqual(pageOffline(["a", "b", "c"], 2, 100), (["a", "b"], ["c"]))
        self.assertEqual(pageOffline(["aaa", "bbb", "c"], 10, 5), (["aaa"], ["bbb", "c"]))
        # One message always fits, however large.
        self.assertEqual(pageOffline(["x" * 50], 10, 5), (["x" * 50], []))
        self.assertEqual(pageOffline([], 10, 5), ([], []))

    def test_loginReplyIsBounded(self):
        """With more offline messages than a page, the login reply carries
        the first page and the rest follow it as chat pushes, in order;
        all are deleted."""
        h = Harness()
        a, b = h.register("alice"), h.register("bob")
        total = LOGIN_PAGE_MESSAGES + 30
        alice = h.login(a)
        for i in range(total):
            alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": f"n{i}"})
        bob = h.connect()
        bob.send({"msgid": m.LOGIN_MSG, "id": b, "password": "secret"})
        ack, *pushes = bob.replies()
        self.assertEqual(ack["msgid"], m.LOGIN_MSG_ACK)
        self.assertEqual(len(ack["offlinemsg"]), LOGIN_PAGE_MESSAGES)
        self.assertEqual({p["msgid"] for p in pushes}, {m.ONE_CHAT_MSG})
        texts = [json.loads(x)["msg"] for x in ack["offlinemsg"]] + [p["msg"] for p in pushes]
        self.assertEqual(texts, [f"n{i}" for i in range(total)])
        self.assertEqual(self.successResultOf(h.store.peekOffline(b)), [])
