"""
The friend-request schema migration: a database made before friend
requests (schema version 1) is upgraded in place, keeping its data.
"""

from __future__ import annotations

import dataclasses

from twisted.internet import reactor
from twisted.trial import unittest

from chatproto.sqlstore import SQLITE, SQLStore, sqlitePool


class MigrationTests(unittest.TestCase):
    async def test_versionOneUpgraded(self):
        path = self.mktemp() + ".sqlite3"
        old = SQLStore(sqlitePool(path, reactor), dataclasses.replace(SQLITE, migrations=SQLITE.migrations[:1]))
        await old.start()
        a = await old.createUser("alice", "h")
        b = await old.createUser("bob", "h")
        await old.addFriend(a, b)
        await old.close()
        store = SQLStore(sqlitePool(path, reactor))
        self.addCleanup(store.close)
        self.assertEqual(await store.start(), len(SQLITE.migrations))
        self.assertEqual(await store.getFriends(a), [(b, "bob")])
        c = await store.createUser("carol", "h")
        self.assertEqual(await store.requestFriend(c, a, 10.0, 0.0, 5), "requested")
        self.assertEqual([r.id for r in await store.getFriendRequests(a, 0.0)], [c])
