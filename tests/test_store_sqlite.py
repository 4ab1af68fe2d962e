"""The store contract on SQLite: through adbapi threads, and in-memory."""

import sqlite3

from twisted.internet import reactor
from twisted.trial import unittest

from chatproto.sqlstore import ImmediatePool, SQLStore, sqlitePool
from tests.contract_store import StoreContract


class SQLiteFileStoreTests(StoreContract, unittest.TestCase):
    async def makeStore(self):
        store = SQLStore(sqlitePool(self.mktemp() + ".sqlite3", reactor))
        await store.start()
        return store


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
