"""The store contract on SQLite: through adbapi threads, and in-memory."""

import sqlite3

from twisted.internet import reactor
from twisted.trial import unittest

from chatproto.sqlitereads import ReactorThreadReads
from chatproto.sqlstore import ImmediatePool, SQLStore, sqlitePool
from tests.contract_store import StoreContract


class SQLiteFileStoreTests(StoreContract, unittest.TestCase):
    async def makeStore(self):
        store = SQLStore(sqlitePool(self.mktemp() + ".sqlite3", reactor))
        await store.start()
        return store


class SQLiteReactorReadsStoreTests(StoreContract, unittest.TestCase):
    """As twistd chat builds it: reads in the reactor thread."""

    async def makeStore(self):
        path = self.mktemp() + ".sqlite3"
        store = SQLStore(sqlitePool(path, reactor), reads=ReactorThreadReads(path))
        await store.start()
        return store


class ReactorThreadReadsTests(unittest.TestCase):
    async def makeStore(self):
        self.path = self.mktemp() + ".sqlite3"
        store = SQLStore(sqlitePool(self.path, reactor), reads=ReactorThreadReads(self.path))
        await store.start()
        self.addCleanup(store.close)
        return store

    async def test_loginDataReadWithoutTheDatabaseThread(self):
        """The login's read answers at once, without a trip to the
        database thread, and sees what that thread committed."""
        store = await self.makeStore()
        a = await store.createUser("alice", "h")
        b = await store.createUser("bob", "h")
        await store.addFriend(a, b)
        runs = []
        interaction = store.pool.runInteraction
        store.pool.runInteraction = lambda *args: (runs.append(args), interaction(*args))[1]
        d = store.getLoginData(a)
        self.assertEqual(self.successResultOf(d), ([(b, "bob")], [], False))
        self.assertEqual(runs, [])

    async def test_busyHandedToTheDatabaseThread(self):
        """SQLite answers "busy" to the reactor thread's read (WAL recovery,
        a checkpoint restarting the log): the read goes to the database
        thread, which waits its turn, instead of the reactor waiting."""
        store = await self.makeStore()
        a = await store.createUser("alice", "h")
        await store.storeOffline([(a, '"x"')])

        def busy(txn, *args):
            raise sqlite3.OperationalError("database is locked")

        store.reads.run = busy
        runs = []
        interaction = store.pool.runInteraction
        store.pool.runInteraction = lambda *args: (runs.append(args), interaction(*args))[1]
        self.assertEqual(await store.getLoginData(a), ([], [], True))
        self.assertEqual(len(runs), 1)


class SQLiteMemoryStoreTests(StoreContract, unittest.TestCase):
    async def makeStore(self):
        store = SQLStore(ImmediatePool(sqlite3.connect(":memory:")))
        await store.start()
        return store


class MigrationTests(unittest.TestCase):
    async def test_schemaSurvivesRestart(self):
        path = self.mktemp() + ".sqlite3"
        store = SQLStore(sqlitePool(path, reactor))
        await store.start()
        uid = await store.createUser("alice", "h")
        await store.storeOffline([(uid, "kept")])
        await store.close()
        store = SQLStore(sqlitePool(path, reactor))
        await store.start()
        self.addCleanup(store.close)
        self.assertEqual((await store.getUser(uid)).name, "alice")
        self.assertEqual(await store.peekOffline(uid), ["kept"])

    def test_failedWriteIsReported(self):
        connection = sqlite3.connect(":memory:")
        store = SQLStore(ImmediatePool(connection))
        # No schema: the insert fails and the caller is told.
        d = store.storeOffline([(1, "x")])
        self.failureResultOf(d, sqlite3.OperationalError)
        connection.close()
