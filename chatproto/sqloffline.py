"""
Offline messages of L{chatproto.sqlstore.SQLStore}: written by one
transaction at a time, in the order they were accepted, batched under load;
capped per recipient (count and bytes); handed over at login and deleted
once taken.
"""

from __future__ import annotations

import json
import time

from twisted.internet import defer
from twisted.python.failure import Failure

from chatproto.acks import midOf

_string = json.encoder.encode_basestring

#: Offline messages carried in the login reply itself; the rest follow it as
#: pushes (L{pageOffline}).
LOGIN_PAGE_MESSAGES = 100
LOGIN_PAGE_BYTES = 64 * 1024


class MailboxFull(Exception):
    """
    Some recipients' mailboxes are full: their copies were not stored (the
    others' were).

    @ivar refused: the uids whose copy was refused.
    @ivar stored: the uids whose copy was stored.
    """

    def __init__(self, refused, stored) -> None:
        super().__init__(f"the mailbox of {len(refused)} recipient(s) is full")
        self.refused = list(refused)
        self.stored = list(stored)


#: The login reply of a NUL-terminated session (the tutorial's C++ client
#: reads 1,024 bytes at a time), terminator included, stays below this.
NUL_LOGIN_REPLY_BYTES = 1024


def pageWithin(payloads, base: int, limit: int = NUL_LOGIN_REPLY_BYTES):
    """
    Split offline messages so that a login reply of C{base} bytes (encoded
    with an empty C{offlinemsg} and its terminator) carrying the first part
    stays under C{limit} bytes; possibly none.

    @return: C{(first, rest)}
    """
    size = base
    for i, payload in enumerate(payloads):
        # each is a JSON string in the list, comma-separated
        size += len(_string(payload).encode("utf-8")) + (1 if i else 0)
        if size >= limit:
            return payloads[:i], payloads[i:]
    return payloads, []


def pageOffline(payloads, maxMessages: int = LOGIN_PAGE_MESSAGES, maxBytes: int = LOGIN_PAGE_BYTES):
    """
    Split offline messages (JSON texts, oldest first) into those the login
    reply carries (at most C{maxMessages} and C{maxBytes}, at least one) and
    the rest, which are sent after it as pushes, in order.

    @return: C{(first, rest)}
    """
    size = 0
    for i, payload in enumerate(payloads):
        size += len(payload)
        if i >= maxMessages or (i and size > maxBytes):
            return payloads[:i], payloads[i:]
    return payloads, []


class OfflineMessages:
    """
    The offline-message half of L{chatproto.sqlstore.SQLStore} (a mixin: it
    uses the store's C{run} and C{q}).
    """

    #: (items, Deferred) accepted and not yet written
    _offlineQueue: list
    #: the write under way, if any
    _offlineFlushing: defer.Deferred | None = None
    #: per-recipient caps (None: none), C{--mailbox-max-messages/-bytes}
    mailboxMaxMessages: int | None = None
    mailboxMaxBytes: int | None = None

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
            # the indexes of the rows refused (mailbox full)
            refused = result if isinstance(result, set) else set()
            start = 0
            for items, waiter in batch:
                first, start = start, start + len(items)
                if isinstance(result, Failure):
                    waiter.errback(result)
                elif refused.isdisjoint(range(first, start)):
                    waiter.callback(None)
                else:
                    full = [uid for i, (uid, _) in enumerate(items, first) if i in refused]
                    stored = [uid for i, (uid, _) in enumerate(items, first) if i not in refused]
                    waiter.errback(MailboxFull(full, stored))
            if self._offlineQueue:
                self._flushOffline()

        flushing.addBoth(done)

    def _storeOfflineTxn(self, cursor, rows) -> set[int]:
        """Insert C{rows} within the mailbox caps; the indexes of the rows
        refused."""
        now = time.time()
        refused = self._overCapTxn(cursor, rows)
        # A copy with the same (recipient, mid) is there already: one is kept.
        cursor.executemany(
            self.q("INSERT IGNORE INTO offline_messages (userid, payload, created, mid) VALUES (?, ?, ?, ?)"),
            [(uid, payload, now, midOf(payload)) for i, (uid, payload) in enumerate(rows) if i not in refused],
        )
        return refused

    def _overCapTxn(self, cursor, rows) -> set[int]:
        maxMessages, maxBytes = self.mailboxMaxMessages, self.mailboxMaxBytes
        if maxMessages is None and maxBytes is None:
            return set()
        uids = sorted({uid for uid, _ in rows})
        usage = {uid: [0, 0] for uid in uids}
        for chunk in range(0, len(uids), 500):
            some = uids[chunk : chunk + 500]
            cursor.execute(
                self.q(
                    f"SELECT userid, COUNT(*), COALESCE(SUM({self.dialect.byteLength % 'payload'}), 0) "
                    f"FROM offline_messages WHERE userid IN ({', '.join('?' * len(some))}) GROUP BY userid"
                ),
                some,
            )
            for uid, count, size in cursor.fetchall():
                usage[uid] = [int(count), int(size)]
        refused = set()
        for i, (uid, payload) in enumerate(rows):
            used = usage[uid]
            size = len(payload.encode("utf-8"))
            if (maxMessages is not None and used[0] + 1 > maxMessages) or (
                maxBytes is not None and used[1] + size > maxBytes
            ):
                refused.add(i)
            else:
                used[0] += 1
                used[1] += size
        return refused

    def _drainOffline(self) -> defer.Deferred:
        """Fires once every offline message accepted so far is written (or
        failed)."""
        if self._offlineFlushing is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._offlineQueue.append(([], d))
        return d.addErrback(lambda _: None)

    @defer.inlineCallbacks
    def takeOffline(self, uid: int, handoff, keepAcked: bool = False):
        yield self._drainOffline()
        rows = yield self.run("fetchOffline", self._fetchOfflineTxn, uid)
        taken = yield defer.maybeDeferred(handoff, [payload for _, payload, _ in rows])
        if not (taken and rows):
            return 0
        # Delete exactly what was handed over (a message stored meanwhile
        # stays), by primary key; with C{keepAcked} those with a mid stay
        # until acked (L{deleteOffline}).
        ids = handedOver(rows, keepAcked)
        yield self.run("deleteOffline", self._deleteIdsTxn, ids)
        return len(ids)

    def getLoginData(self, uid: int) -> defer.Deferred:
        """Friends, groups and whether any offline message waits (after
        those accepted so far are written), in one transaction."""
        d = self._drainOffline()
        return d.addCallback(lambda _: self.read("getLoginData", self._loginDataTxn, uid))

    def _loginDataTxn(self, cursor, uid) -> tuple[list, list, bool]:
        # One statement for the three (a round trip each on MySQL), then
        # the members of the groups, if any.
        cursor.execute(
            self.q(
                "SELECT 0, u.id, u.name, NULL FROM friends f JOIN users u ON u.id = f.friendid WHERE f.userid = ?"
                " UNION ALL SELECT 1, g.id, g.name, g.description FROM chat_groups g"
                " JOIN group_members m ON m.groupid = g.id WHERE m.userid = ?"
                " UNION ALL SELECT 2, COUNT(*), NULL, NULL"
                " FROM (SELECT 1 FROM offline_messages WHERE userid = ? LIMIT 1) o"
                " ORDER BY 1, 2"
            ),
            (uid, uid, uid),
        )
        friends, groups, anyOffline = [], [], False
        for kind, rowId, name, desc in cursor.fetchall():
            if kind == 0:
                friends.append((rowId, name))
            elif kind == 1:
                groups.append((rowId, name, desc))
            else:
                anyOffline = rowId > 0
        return friends, self._withMembers(cursor, uid, groups), anyOffline

    def _anyOfflineTxn(self, cursor, uid) -> bool:
        cursor.execute(self.q("SELECT 1 FROM offline_messages WHERE userid = ? LIMIT 1"), (uid,))
        return cursor.fetchone() is not None

    def _fetchOfflineTxn(self, cursor, uid, lock: str = "") -> list[tuple[int, str, str | None]]:
        cursor.execute(
            self.q(f"SELECT id, payload, mid FROM offline_messages WHERE userid = ? ORDER BY id{lock}"), (uid,)
        )
        return [(row[0], row[1], row[2]) for row in cursor.fetchall()]

    def _deleteIdsTxn(self, cursor, ids) -> None:
        # By primary key: a range over the user index (userid = ? AND id <=
        # ?) takes gap locks, and concurrent logins deadlocked in InnoDB.
        self._deleteInTxn(cursor, "id", ids)

    def _deleteInTxn(self, cursor, column: str, values, userid=None) -> None:
        """Delete the offline rows whose C{column} is one of C{values} (and
        whose userid is C{userid}, if given), 500 values per statement."""
        where = "" if userid is None else "userid = ? AND "
        for start in range(0, len(values), 500):
            some = values[start : start + 500]
            placeholders = ", ".join("?" * len(some))
            query = self.q(f"DELETE FROM offline_messages WHERE {where}{column} IN ({placeholders})")
            cursor.execute(query, some if userid is None else [userid, *some])

    def deleteOffline(self, uid: int, mids) -> defer.Deferred:
        """Delete C{uid}'s offline copies of C{mids} (acked by the client)."""
        mids = list(mids)
        if not mids:
            return defer.succeed(None)
        return self.run("deleteAcked", self._deleteMidsTxn, uid, mids)

    def _deleteMidsTxn(self, cursor, uid, mids) -> None:
        self._deleteInTxn(cursor, "mid", mids, uid)

    def peekOffline(self, uid: int) -> defer.Deferred:
        d = self._drainOffline()
        d.addCallback(lambda _: self.run("fetchOffline", self._fetchOfflineTxn, uid))
        return d.addCallback(lambda rows: [payload for _, payload, _ in rows])


def handedOver(rows, keepAcked: bool) -> list[int]:
    """The ids of the handed-over C{rows} to delete now: all, or with
    C{keepAcked} those without a mid (notices: nobody acks them)."""
    return [rowId for rowId, _, mid in rows if not (keepAcked and mid)]
