"""
L{chatproto.mysqlstore.MySQLStore} against a real MariaDB (127.0.0.1:3306,
root), each test in its own database, dropped afterwards.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from chatproto.config import parseDatabaseURL
from chatproto.interfaces import NameTaken, StoreUnavailable
from chatproto.mysqlstore import MYSQL_MIGRATIONS, MySQLStore
from tests.cluster_helpers import (
    dropDatabase,
    freePort,
    killConnections,
    mysqlConnect,
    mysqlURL,
    uniqueName,
    until,
)
from tests.contract_store import StoreContract


class MySQLStoreMixin:
    """Makes started stores on a fresh database; closes and drops them."""

    def setUp(self):
        self.database = uniqueName("db")
        self.addCleanup(dropDatabase, self.database)
        self._stores = []

    def tearDown(self):
        return defer.gatherResults([s.close() for s in self._stores])

    def newStore(self, database=None, **kw) -> MySQLStore:
        url = parseDatabaseURL(mysqlURL(database or self.database))
        store = MySQLStore.fromURL(url, reactor, **kw)
        self._stores.append(store)
        return store

    @defer.inlineCallbacks
    def makeStore(self):
        store = self.newStore()
        yield store.start()
        return store


class MySQLStoreContractTests(StoreContract, unittest.TestCase):
    """The L{IChatStore} contract on MariaDB (the contract closes the
    store; the database is dropped after it)."""

    async def setUp(self):
        self.database = uniqueName("db")
        self.addCleanup(dropDatabase, self.database)
        await StoreContract.setUp(self)

    async def makeStore(self):
        store = MySQLStore.fromURL(parseDatabaseURL(mysqlURL(self.database)), reactor)
        await store.start()
        return store


class MySQLSpecificTests(MySQLStoreMixin, unittest.TestCase):
    def query(self, sql, args=()):
        connection = mysqlConnect(database=self.database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, args)
                return cursor.fetchall()
        finally:
            connection.close()

    @defer.inlineCallbacks
    def test_createsDatabaseAndSchema(self):
        """start() creates the missing database, InnoDB utf8mb4 tables with
        real keys, and records the schema version."""
        yield self.makeStore()
        tables = dict(
            self.query(
                "SELECT table_name, engine FROM information_schema.tables WHERE table_schema = %s",
                (self.database,),
            )
        )
        for table in ("users", "friends", "chat_groups", "group_members", "offline_messages", "schema_version"):
            self.assertIn(table, tables)
        self.assertEqual(tables["offline_messages"], "InnoDB")
        self.assertEqual(self.query("SELECT version FROM schema_version"), ((len(MYSQL_MIGRATIONS),),))
        keys = self.query(
            "SELECT table_name, index_name, non_unique FROM information_schema.statistics"
            " WHERE table_schema = %s AND seq_in_index = 1",
            (self.database,),
        )
        keys = {(t, i): n for t, i, n in keys}
        self.assertEqual(keys[("users", "users_name")], 0)
        self.assertEqual(keys[("chat_groups", "chat_groups_name")], 0)
        self.assertEqual(keys[("friends", "PRIMARY")], 0)
        self.assertEqual(keys[("group_members", "PRIMARY")], 0)
        charset = self.query(
            "SELECT character_set_name FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'offline_messages' AND column_name = 'payload'",
            (self.database,),
        )
        self.assertEqual(charset, (("utf8mb4",),))

    @defer.inlineCallbacks
    def test_concurrentStartsMigrateOnce(self):
        """Servers starting together on an empty database both start; the
        schema is created once."""
        stores = [self.newStore() for _ in range(3)]
        yield defer.gatherResults([s.start() for s in stores])
        self.assertEqual(self.query("SELECT version FROM schema_version"), ((len(MYSQL_MIGRATIONS),),))
        # And again on an existing schema.
        yield self.newStore().start()
        self.assertEqual(self.query("SELECT COUNT(*) FROM schema_version"), ((1,),))

    @defer.inlineCallbacks
    def test_utf8mb4(self):
        """Four-byte characters survive in names and offline payloads."""
        store = yield self.makeStore()
        uid = yield store.createUser("snow\u2603\U0001f600", "h")
        user = yield store.getUser(uid)
        self.assertEqual(user.name, "snow\u2603\U0001f600")
        payload = json.dumps({"msg": "\U0001f680 007"}, ensure_ascii=False)
        yield store.storeOffline([(uid, payload)])
        self.assertEqual((yield store.peekOffline(uid)), [payload])

    @defer.inlineCallbacks
    def test_namesAreCaseSensitiveAndUnique(self):
        """Names compare byte-wise as in SQLite: "Bob" and "bob" are two
        users; a second "bob" is NameTaken."""
        store = yield self.makeStore()
        yield store.createUser("Bob", "h")
        yield store.createUser("bob", "h")
        yield self.assertFailure(store.createUser("bob", "h"), NameTaken)

    @defer.inlineCallbacks
    def test_offlineOrderKept(self):
        """Offline messages come back in the order they were stored, across
        batches, and only the ones handed over are deleted."""
        store = yield self.makeStore()
        uid = yield store.createUser("carol", "h")
        ds = [store.storeOffline([(uid, json.dumps({"n": i}))]) for i in range(50)]
        yield defer.gatherResults(ds)
        taken = []
        n = yield store.takeOffline(uid, lambda payloads: taken.extend(payloads) or True)
        self.assertEqual(n, 50)
        self.assertEqual([json.loads(p)["n"] for p in taken], list(range(50)))
        self.assertEqual((yield store.peekOffline(uid)), [])

    @defer.inlineCallbacks
    def test_emptyMailboxHandedOverWithoutHoldingAConnection(self):
        def chain(frame):
            while frame is not None:
                yield frame
                frame = frame.f_back

        """No offline messages (the usual login): the hand-over (the login
        reply) runs after the transaction has ended, not while a database
        thread and its connection wait for the reactor thread."""
        store = yield self.makeStore()
        uid = yield store.createUser("dave", "h")
        busy = []

        def handoff(payloads):
            # Database threads waiting in blockingCallFromThread for this.
            frames = sys._current_frames().values()
            waiting = [f for f in frames if any(c.f_code.co_name == "blockingCallFromThread" for c in chain(f))]
            busy.append((payloads, len(waiting)))
            return True

        n = yield store.takeOffline(uid, handoff)
        self.assertEqual((n, busy), (0, [([], 0)]))
        yield store.storeOffline([(uid, '"one"')])
        n = yield store.takeOffline(uid, handoff)
        # With messages, the exactly-once hand-over holds its rows locked.
        self.assertEqual((n, busy[1]), (1, (['"one"'], 1)))

    @defer.inlineCallbacks
    def test_takeOfflineOnceAcrossServers(self):
        """Two servers (two stores) taking one user's offline messages at
        the same moment: one gets them all, the other waits for it and gets
        none; none is handed over twice."""
        s1 = yield self.makeStore()
        s2 = yield self.makeStore()
        uid = yield s1.createUser("gina", "h")
        yield s1.storeOffline([(uid, f'"m{i}"') for i in range(5)])
        got1, got2 = [], []
        release = defer.Deferred()

        def handoff1(payloads):
            got1.extend(payloads)
            return release.addCallback(lambda _: True)

        d1 = s1.takeOffline(uid, handoff1)
        yield until(lambda: got1, 5, what="the first hand-over")
        d2 = s2.takeOffline(uid, lambda payloads: got2.append(payloads) or True)

        def waitingForLock():
            rows = self.query(
                "SELECT COUNT(*) FROM information_schema.innodb_trx t"
                " JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id"
                " WHERE t.trx_state = 'LOCK WAIT' AND p.db = %s",
                (self.database,),
            )
            return rows[0][0] > 0

        yield until(waitingForLock, 5, what="the second server to wait for the first")
        release.callback(None)
        self.assertEqual((yield d1), 5)
        self.assertEqual((yield d2), 0)
        self.assertEqual(got1, [f'"m{i}"' for i in range(5)])
        self.assertEqual(got2, [[]])
        self.assertEqual((yield s1.peekOffline(uid)), [])

    @defer.inlineCallbacks
    def test_retriesAfterConnectionsKilled(self):
        """Connections killed server-side (as in a MySQL restart) are
        replaced and the failed transaction runs again: the caller sees no
        error."""
        store = yield self.makeStore()
        uid = yield store.createUser("dave", "h")
        # Use several pool connections, then kill them all.
        yield defer.gatherResults([store.getUser(uid) for _ in range(8)])
        self.assertGreater(killConnections(self.database), 0)
        users = yield defer.gatherResults([store.getUser(uid) for _ in range(8)])
        self.assertEqual({u.name for u in users}, {"dave"})
        killConnections(self.database)
        yield store.storeOffline([(uid, '"after kill"')])
        self.assertEqual((yield store.peekOffline(uid)), ['"after kill"'])
        killConnections(self.database)
        other = yield store.createUser("erin", "h")
        self.assertTrue((yield store.addFriend(uid, other)))
        self.assertEqual((yield store.getFriends(uid)), [(other, "erin")])

    @defer.inlineCallbacks
    def test_unreachableIsStoreUnavailable(self):
        """With nothing listening, a call fails with StoreUnavailable after
        retrying for C{retryFor} seconds, not hanging."""
        url = parseDatabaseURL(f"mysql://root@127.0.0.1:{freePort()}/{self.database}")
        store = MySQLStore.fromURL(url, reactor, retryFor=0.3)
        self._stores.append(store)
        started = reactor.seconds()
        yield self.assertFailure(store.getUser(1), StoreUnavailable)
        self.assertLess(reactor.seconds() - started, 5)
        yield self.assertFailure(store.start(), StoreUnavailable)

    # The retry loop itself (back-off, commit failures, the hand-over
    # re-run) is tested on a Clock in tests/test_struct_store.py.

    @defer.inlineCallbacks
    def test_integrityErrorsNotRetried(self):
        """A duplicate name is answered at once (no retry loop)."""
        store = yield self.makeStore()
        yield store.createGroup("g", "d", (yield store.createUser("frank", "h")))
        started = reactor.seconds()
        yield self.assertFailure(store.createGroup("g", "d", 1), NameTaken)
        self.assertLess(reactor.seconds() - started, 1)


class CloseTests(MySQLStoreMixin, unittest.TestCase):
    async def test_closeWaitsForHandoverInsideTransaction(self):
        """
        The hand-over runs in the reactor thread while a database thread
        holds the transaction open; closing the store meanwhile must wait
        for it rather than join that thread (which would never return).
        """
        store = await self.makeStore()
        uid = await store.createUser("alice", "h")
        await store.storeOffline([(uid, "m1")])
        handedOver = defer.Deferred()
        reached = defer.Deferred()
        # Whatever happens below, let the transaction end (it holds row
        # locks the database drop in the cleanup would wait for).
        self.addCleanup(lambda: handedOver.called or handedOver.callback(False))

        def handoff(payloads):
            reactor.callLater(0, reached.callback, payloads)
            return handedOver

        taking = store.takeOffline(uid, handoff)
        self.assertEqual(await reached, ["m1"])
        closed = []
        closing = store.close().addCallback(closed.append)
        self.assertEqual(closed, [])
        self.assertTrue(store.pool.running)
        handedOver.callback(True)
        self.assertEqual(await taking, 1)
        await closing
        self.assertEqual(len(closed), 1)
