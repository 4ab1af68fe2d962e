"""
Offline messages of L{chatproto.sqlstore.SQLStore}: written by one
transaction at a time, in the order they were accepted, batched under load;
handed over at login and deleted once taken.
"""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.python.failure import Failure


class OfflineMessages:
    """
    The offline-message half of L{chatproto.sqlstore.SQLStore} (a mixin: it
    uses the store's C{run} and C{q}).
    """

    #: (items, Deferred) accepted and not yet written
    _offlineQueue: list
    #: the write under way, if any
    _offlineFlushing: defer.Deferred | None = None

    def storeOffline(self, items) -> defer.Deferred:
        items = list(items)
        if not items:
            return defer.succeed(None)
        d = defer.Deferred()
        self._offlineQueue.append((items, d))
        if self._offlineFlushing is None:
            self._flushOffline()
        return d

    def _flushOffline(self) -> None:
        batch, self._offlineQueue = self._offlineQueue, []
        rows = [item for items, _ in batch for item in items]
        if rows:
            flushing = self.run("storeOffline", self._storeOfflineTxn, rows, retryable=False)
        else:
            flushing = defer.succeed(None)
        self._offlineFlushing = flushing

        def done(result):
            self._offlineFlushing = None
            for _, waiter in batch:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            if self._offlineQueue:
                self._flushOffline()

        flushing.addBoth(done)

    def _storeOfflineTxn(self, cursor, rows) -> None:
        now = time.time()
        cursor.executemany(
            self.q("INSERT INTO offline_messages (userid, payload, created) VALUES (?, ?, ?)"),
            [(uid, payload, now) for uid, payload in rows],
        )

    def _drainOffline(self) -> defer.Deferred:
        """Fires once every offline message accepted so far is written (or
        failed)."""
        if self._offlineFlushing is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._offlineQueue.append(([], d))
        return d.addErrback(lambda _: None)

    @defer.inlineCallbacks
    def takeOffline(self, uid: int, handoff):
        yield self._drainOffline()
        rows = yield self.run("fetchOffline", self._fetchOfflineTxn, uid)
        taken = yield defer.maybeDeferred(handoff, [payload for _, payload in rows])
        if not (taken and rows):
            return 0
        # Delete exactly what was handed over: a message stored meanwhile
        # has a larger id and stays.
        yield self.run("deleteOffline", self._deleteOfflineTxn, uid, rows[-1][0])
        return len(rows)

    def _fetchOfflineTxn(self, cursor, uid) -> list[tuple[int, str]]:
        cursor.execute(
            self.q("SELECT id, payload FROM offline_messages WHERE userid = ? ORDER BY id"), (uid,)
        )
        return [(row[0], row[1]) for row in cursor.fetchall()]

    def _deleteOfflineTxn(self, cursor, uid, lastId) -> None:
        cursor.execute(
            self.q("DELETE FROM offline_messages WHERE userid = ? AND id <= ?"), (uid, lastId)
        )

    def peekOffline(self, uid: int) -> defer.Deferred:
        d = self._drainOffline()
        d.addCallback(lambda _: self.run("fetchOffline", self._fetchOfflineTxn, uid))
        return d.addCallback(lambda rows: [payload for _, payload in rows])
