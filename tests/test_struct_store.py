"""
L{chatproto.mysqlstore.MySQLStore}'s retry loop and hand-over re-run, on a
L{Clock} and fake pool/connection/cursor (no database, no sleeps).
"""

from __future__ import annotations

import pymysql
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from chatproto._twisted import CommitFailed
from chatproto.interfaces import StoreUnavailable
from chatproto.mysqlstore import MySQLStore

LOST = pymysql.err.OperationalError(2013, "Lost connection")


class FakeCursor:
    def __init__(self, connection) -> None:
        self.connection = connection
        self.rows = []

    def execute(self, sql, params=()):
        self.connection.executed.append((sql.split()[0], params))
        failures = self.connection.failOn.get(sql.split()[0])
        if failures:
            self.connection.failOn[sql.split()[0]] -= 1
            raise LOST
        if sql.startswith("SELECT"):
            self.rows = list(self.connection.offline)

    def fetchall(self):
        return self.rows

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def close(self):
        pass


class FakeConnection:
    def __init__(self) -> None:
        self.executed = []
        self.failOn = {}
        self.offline = []

    def cursor(self):
        return FakeCursor(self)


class FakePool:
    """runWithConnection runs at once in the calling thread."""

    def __init__(self) -> None:
        self.connection = FakeConnection()

    def runWithConnection(self, f, *args):
        return defer.maybeDeferred(f, self.connection, *args)


class RetryTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MySQLStore(FakePool(), self.clock, retryFor=2)
        self.calls = []

    def failing(self, errors):
        """A call failing with each of C{errors} in turn, then "ok"."""
        errors = list(errors)

        def call():
            self.calls.append(self.clock.seconds())
            if errors:
                return defer.fail(errors.pop(0))
            return defer.succeed("ok")

        return call

    def retrying(self, call, **kw) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self.store._retrying("t", call, **kw))

    def test_backOff(self) -> None:
        """Connection errors are retried after 0.05, 0.1, 0.2 ... s."""
        d = self.retrying(self.failing([LOST, LOST, LOST]))
        self.assertNoResult(d)
        self.clock.advance(0.05)
        self.clock.advance(0.1)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual([round(t, 2) for t in self.calls], [0, 0.05, 0.15, 0.35])

    def test_givesUpAfterRetryFor(self) -> None:
        d = self.retrying(self.failing([LOST] * 1000))
        self.clock.pump([0.5] * 5)
        self.failureResultOf(d, StoreUnavailable)
        self.assertLessEqual(self.calls[-1], 2)
        self.assertGreater(len(self.calls), 3)

    def test_commitFailureRetriedOnlyWhenRetryable(self) -> None:
        """A connection lost while committing (outcome unknown) is retried
        for retryable transactions but not for inserts of new rows."""
        d = self.retrying(self.failing([CommitFailed(LOST)]))
        self.clock.advance(0.05)
        self.assertEqual((self.successResultOf(d), len(self.calls)), ("ok", 2))
        del self.calls[:]
        d = self.retrying(self.failing([CommitFailed(LOST)]), retryable=False)
        self.failureResultOf(d, StoreUnavailable)
        self.assertEqual(len(self.calls), 1)

    def test_notRetryableWithoutCommitDetection(self) -> None:
        """With the stock adbapi wrapper (a failed COMMIT looks like any
        connection error) a non-retryable transaction is never re-run."""
        self.store.commitFailuresKnown = False
        d = self.retrying(self.failing([LOST]), retryable=False)
        self.failureResultOf(d, StoreUnavailable)
        self.assertEqual(len(self.calls), 1)
        d = self.retrying(self.failing([LOST]))
        self.clock.advance(0.05)
        self.assertEqual(self.successResultOf(d), "ok")

    def test_insertsAreNotRetryable(self) -> None:
        """createUser, createGroup and storeOffline run with
        retryable=False; reads with retryable=True."""
        seen = {}

        def interact(name, txn, args, retryable=True):
            seen[name] = retryable
            return defer.succeed(1)

        self.store._interact = interact
        self.store.createUser("a", "h")
        self.store.createGroup("g", "d", 1)
        self.store.storeOffline([(1, "m")])
        self.store.getUser(1)
        self.assertEqual(seen, {"createUser": False, "createGroup": False, "storeOffline": False, "getUser": True})


class HandoverRerunTests(unittest.TestCase):
    """The hand-over runs once; a lost connection after it re-runs only the
    (idempotent) deletion."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = FakePool()
        self.pool.connection.offline = [(5, "m1", None), (7, "m2", "X")]
        self.store = MySQLStore(self.pool, self.clock, retryFor=2)
        # The hand-over is called from the database thread; here the
        # "thread" is the test's.
        self.patch(threads, "blockingCallFromThread", lambda reactor, f, *a: self.successResultOf(f(*a)))
        self.handedOver = []

    def handoff(self, payloads):
        self.handedOver.append(payloads)
        return True

    def test_deletionRerunAfterLostConnection(self) -> None:
        self.pool.connection.failOn["DELETE"] = 1
        d = self.store.takeOffline(1, self.handoff)
        self.clock.advance(0.05)
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(self.handedOver, [["m1", "m2"]])
        self.assertEqual(
            self.pool.connection.executed,
            # Any rows?  Then read them locked, and delete them.
            [("SELECT", (1,)), ("SELECT", (1,)), ("DELETE", [5, 7]), ("DELETE", [5, 7])],
        )

    def test_deletedByPrimaryKey(self) -> None:
        """The hand-over deletes the rows it read by primary key (a range
        over the user index deadlocked under concurrent logins); with
        keepAcked, rows with a mid stay until acked."""
        d = self.store.takeOffline(1, self.handoff, keepAcked=True)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(self.pool.connection.executed, [("SELECT", (1,)), ("SELECT", (1,)), ("DELETE", [5])])

    def test_handedOverButNotDeleted(self) -> None:
        """When the deletion never succeeds the messages stay (handed over
        again next time: at least once) and the login is not failed."""
        self.pool.connection.failOn["DELETE"] = 1000
        d = self.store.takeOffline(1, self.handoff)
        self.clock.pump([0.5] * 5)
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.handedOver, [["m1", "m2"]])

    def test_notTakenNothingDeleted(self) -> None:
        d = self.store.takeOffline(1, lambda payloads: False)
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.pool.connection.executed, [("SELECT", (1,)), ("SELECT", (1,))])

    def test_lostBeforeHandoverRetriesWhole(self) -> None:
        """A connection lost before the hand-over re-runs the SELECT; the
        hand-over still happens once."""
        self.pool.connection.failOn["SELECT"] = 1
        d = self.store.takeOffline(1, self.handoff)
        self.clock.advance(0.05)
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(self.handedOver, [["m1", "m2"]])
        # lost at the first (the check), then check, read locked, delete
        self.assertEqual([op for op, _ in self.pool.connection.executed], ["SELECT", "SELECT", "SELECT", "DELETE"])
