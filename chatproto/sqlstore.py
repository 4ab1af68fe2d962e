"""
The SQL implementation of L{IChatStore}, shared by SQLite and MySQL.

Each public method is C{async def} (wrapped as a Deferred) and runs a plain
synchronous C{_..._txn} function in a database thread through the pool's
C{runInteraction}, as Synapse's storage layer does.  SQL is written once
with C{?} placeholders and parameterised; a L{Dialect} supplies what differs
between databases (placeholders, DDL, errors).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatproto.interfaces import (
    Group,
    GroupMember,
    IChatStore,
    NameTaken,
    NoSuchGroup,
    User,
)
from chatproto.sqlfriends import SQLITE_MIGRATION as SQLITE_FRIEND_REQUESTS
from chatproto.sqlfriends import FriendRequestsSQL
from chatproto.sqloffline import OfflineMessages


@dataclass(frozen=True)
class Dialect:
    name: str
    #: The DB-API placeholder that replaces C{?} in every statement.
    placeholder: str
    #: C{INSERT ...} that ignores a duplicate key.
    insertIgnore: str
    #: migrations[i] takes the schema from version i to version i + 1.
    migrations: tuple[tuple[str, ...], ...]
    #: Exception classes raised for a unique-key violation.
    integrityErrors: tuple[type[BaseException], ...] = field(default=())
    #: The length in bytes of a text column (C{%} the column), for the
    #: mailbox caps.
    byteLength: str = "LENGTH(CAST(%s AS BLOB))"


SQLITE_MIGRATIONS = (
    (
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            password TEXT NOT NULL,
            created REAL NOT NULL)""",
        """CREATE TABLE friends (
            userid INTEGER NOT NULL REFERENCES users(id),
            friendid INTEGER NOT NULL REFERENCES users(id),
            PRIMARY KEY (userid, friendid))""",
        """CREATE TABLE chat_groups (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            description TEXT NOT NULL,
            created REAL NOT NULL)""",
        """CREATE TABLE group_members (
            groupid INTEGER NOT NULL REFERENCES chat_groups(id),
            userid INTEGER NOT NULL REFERENCES users(id),
            role TEXT NOT NULL,
            PRIMARY KEY (groupid, userid))""",
        "CREATE INDEX group_members_user ON group_members (userid)",
        """CREATE TABLE offline_messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            userid INTEGER NOT NULL,
            payload TEXT NOT NULL,
            created REAL NOT NULL)""",
        "CREATE INDEX offline_messages_user ON offline_messages (userid, id)",
    ),
    # 2: friend requests (chatproto.sqlfriends)
    SQLITE_FRIEND_REQUESTS,
    # 3: message ids: one offline copy per (recipient, mid) (chatproto.acks)
    (
        "ALTER TABLE offline_messages ADD COLUMN mid TEXT",
        "CREATE UNIQUE INDEX offline_messages_mid ON offline_messages (userid, mid)",
    ),
)

SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    insertIgnore="INSERT OR IGNORE",
    migrations=SQLITE_MIGRATIONS,
    integrityErrors=(sqlite3.IntegrityError,),
)


class ImmediatePool:
    """
    A pool that runs each interaction at once in the calling thread on one
    connection.  For tests of the layers above storage (real SQL, no
    threads); production uses L{adbapi.ConnectionPool}.
    """

    def __init__(self, connection) -> None:
        self.connection = connection

    def runInteraction(self, interaction, *args, **kw):
        cursor = self.connection.cursor()
        try:
            result = interaction(cursor, *args, **kw)
        except BaseException:
            self.connection.rollback()
            return defer.fail()
        self.connection.commit()
        return defer.succeed(result)

    def close(self) -> None:
        self.connection.close()


def _sqliteOpen(connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=5000")


def sqlitePool(path: str, reactor) -> adbapi.ConnectionPool:
    """
    One connection in one thread: SQLite serialises writers anyway, and one
    thread keeps transactions in the order they were asked for.
    """
    return adbapi.ConnectionPool(
        "sqlite3",
        path,
        check_same_thread=False,
        cp_min=1,
        cp_max=1,
        cp_openfun=_sqliteOpen,
        cp_reactor=reactor,
    )


def _now() -> float:
    return time.time()


@implementer(IChatStore)
class SQLStore(OfflineMessages, FriendRequestsSQL):
    """
    @param pool: has C{runInteraction(f, *args)} returning a Deferred and
        C{close()}; an L{adbapi.ConnectionPool} in production.
    @param reads: runs read-only transactions in the reactor thread
        (L{chatproto.sqlitereads.ReactorThreadReads}), or None.
    """

    log = Logger()

    def __init__(self, pool, dialect: Dialect = SQLITE, reads=None) -> None:
        self.pool = pool
        self.reads = reads
        self.dialect = dialect
        self._sql: dict[str, str] = {}
        self._offlineQueue: list[tuple[list, defer.Deferred]] = []
        self._inflight: set[defer.Deferred] = set()

    # --- plumbing ----------------------------------------------------------

    def q(self, statement: str) -> str:
        """C{statement} with this dialect's placeholders (cached)."""
        sql = self._sql.get(statement)
        if sql is None:
            sql = statement.replace("?", self.dialect.placeholder)
            sql = sql.replace("INSERT IGNORE", self.dialect.insertIgnore)
            self._sql[statement] = sql
        return sql

    def run(self, name: str, txn: Callable, *args, retryable: bool = True) -> defer.Deferred:
        """
        Run C{txn(cursor, *args)} in a transaction.  C{name} is for logs.
        C{retryable} false marks a transaction that inserts new rows: a
        store that retries after a lost connection must not re-run it when
        its COMMIT's outcome is unknown (see L{chatproto.mysqlstore}).
        Every interaction is tracked until it ends, so that L{close} never
        stops the pool's threads under one (adbapi joins them, and a
        transaction waiting on the reactor thread would never end).
        """
        d = self._interact(name, txn, args, retryable)
        self._inflight.add(d)

        def done(result):
            self._inflight.discard(d)
            return result

        return d.addBoth(done)

    def read(self, name: str, txn: Callable, *args) -> defer.Deferred:
        """A read-only L{run}: at once in the reactor thread with C{reads}
        (unless the database is busy)."""
        if self.reads is not None:
            try:
                return defer.succeed(self.reads.run(txn, *args))
            except sqlite3.OperationalError:
                pass
        return self.run(name, txn, *args)

    def _interact(self, name: str, txn: Callable, args, retryable: bool = True) -> defer.Deferred:
        """One interaction with the database (subclasses add retries)."""
        return self.pool.runInteraction(txn, *args)

    def start(self) -> defer.Deferred:
        return self.run("migrate", self._migrateTxn)

    _closed = False

    def close(self) -> defer.Deferred:
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        d = self._drainOffline()
        d.addCallback(lambda _: defer.DeferredList(list(self._inflight), consumeErrors=True))

        def closePool(_):
            self.pool.close()
            if self.reads is not None:
                self.reads.close()

        return d.addBoth(closePool)

    def _migrateTxn(self, cursor) -> int:
        cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        cursor.execute("SELECT version FROM schema_version")
        row = cursor.fetchone()
        version = row[0] if row else 0
        if row is None:
            cursor.execute(self.q("INSERT INTO schema_version (version) VALUES (?)"), (0,))
        migrations = self.dialect.migrations
        for target in range(version, len(migrations)):
            for statement in migrations[target]:
                cursor.execute(statement)
            cursor.execute(self.q("UPDATE schema_version SET version = ?"), (target + 1,))
            self.log.info("schema migrated to version {version}", version=target + 1)
        return len(migrations)

    # --- users -------------------------------------------------------------

    @defer.inlineCallbacks
    def createUser(self, name: str, passwordHash: str):
        try:
            uid = yield self.run("createUser", self._createUserTxn, name, passwordHash, retryable=False)
        except self.dialect.integrityErrors:
            raise NameTaken(name) from None
        return uid

    def _createUserTxn(self, cursor, name, passwordHash) -> int:
        cursor.execute(
            self.q("INSERT INTO users (name, password, created) VALUES (?, ?, ?)"),
            (name, passwordHash, _now()),
        )
        return cursor.lastrowid

    def getUser(self, uid: int) -> defer.Deferred:
        return self.run("getUser", self._getUserTxn, uid)

    def _getUserTxn(self, cursor, uid) -> User | None:
        cursor.execute(self.q("SELECT id, name, password FROM users WHERE id = ?"), (uid,))
        row = cursor.fetchone()
        return User(row[0], row[1], row[2]) if row else None

    def setPassword(self, uid: int, passwordHash: str) -> defer.Deferred:
        """Store a new password hash; fires with whether C{uid} exists."""
        return self.run("setPassword", self._setPasswordTxn, uid, passwordHash)

    def _setPasswordTxn(self, cursor, uid, passwordHash) -> bool:
        cursor.execute(self.q("UPDATE users SET password = ? WHERE id = ?"), (passwordHash, uid))
        return cursor.rowcount > 0

    def getNames(self, uids) -> defer.Deferred:
        uids = sorted(set(uids))
        if not uids:
            return defer.succeed({})
        return self.run("getNames", self._getNamesTxn, uids)

    def _getNamesTxn(self, cursor, uids) -> dict[int, str]:
        names = {}
        for start in range(0, len(uids), 500):
            chunk = uids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            cursor.execute(self.q(f"SELECT id, name FROM users WHERE id IN ({marks})"), chunk)
            names.update((row[0], row[1]) for row in cursor.fetchall())
        return names

    # --- groups ------------------------------------------------------------

    @defer.inlineCallbacks
    def createGroup(self, name: str, desc: str, creatorId: int):
        try:
            gid = yield self.run("createGroup", self._createGroupTxn, name, desc, creatorId, retryable=False)
        except self.dialect.integrityErrors:
            raise NameTaken(name) from None
        return gid

    def _createGroupTxn(self, cursor, name, desc, creatorId) -> int:
        cursor.execute(
            self.q("INSERT INTO chat_groups (name, description, created) VALUES (?, ?, ?)"),
            (name, desc, _now()),
        )
        gid = cursor.lastrowid
        cursor.execute(
            self.q("INSERT INTO group_members (groupid, userid, role) VALUES (?, ?, ?)"),
            (gid, creatorId, "creator"),
        )
        return gid

    def joinGroup(self, gid: int, uid: int) -> defer.Deferred:
        return self.run("joinGroup", self._joinGroupTxn, gid, uid)

    def _joinGroupTxn(self, cursor, gid, uid) -> bool:
        self._getGroupTxn(cursor, gid)
        cursor.execute(
            self.q("INSERT IGNORE INTO group_members (groupid, userid, role) VALUES (?, ?, ?)"),
            (gid, uid, "normal"),
        )
        return cursor.rowcount > 0

    def getGroup(self, gid: int) -> defer.Deferred:
        """@rtype: Deferred firing with a L{Group} (no members); fails with
        L{NoSuchGroup}."""
        return self.run("getGroup", self._getGroupTxn, gid)

    def _getGroupTxn(self, cursor, gid) -> Group:
        cursor.execute(self.q("SELECT id, name, description FROM chat_groups WHERE id = ?"), (gid,))
        row = cursor.fetchone()
        if row is None:
            raise NoSuchGroup(gid)
        return Group(row[0], row[1], row[2])

    def getGroupMembers(self, gid: int) -> defer.Deferred:
        return self.run("getGroupMembers", self._getGroupMembersTxn, gid)

    def _getGroupMembersTxn(self, cursor, gid) -> list[GroupMember]:
        cursor.execute(
            self.q(
                "SELECT u.id, u.name, m.role FROM group_members m JOIN users u ON u.id = m.userid"
                " WHERE m.groupid = ? ORDER BY u.id"
            ),
            (gid,),
        )
        members = [GroupMember(*row) for row in cursor.fetchall()]
        if not members:
            # A group always has its creator, so no members means no group.
            self._getGroupTxn(cursor, gid)
        return members

    def getUserGroups(self, uid: int) -> defer.Deferred:
        return self.run("getUserGroups", self._getUserGroupsTxn, uid)

    def _getUserGroupsTxn(self, cursor, uid) -> list[Group]:
        cursor.execute(
            self.q(
                "SELECT g.id, g.name, g.description FROM chat_groups g"
                " JOIN group_members m ON m.groupid = g.id WHERE m.userid = ? ORDER BY g.id"
            ),
            (uid,),
        )
        return self._withMembers(cursor, uid, cursor.fetchall())

    def _withMembers(self, cursor, uid, groups) -> list[Group]:
        """C{groups} (rows of id, name, description, all of C{uid}'s) as
        L{Group}s with their members."""
        if not groups:
            return []
        cursor.execute(
            self.q(
                "SELECT m.groupid, u.id, u.name, m.role FROM group_members m"
                " JOIN users u ON u.id = m.userid"
                " WHERE m.groupid IN (SELECT groupid FROM group_members WHERE userid = ?)"
                " ORDER BY m.groupid, u.id"
            ),
            (uid,),
        )
        members: dict[int, list[GroupMember]] = {}
        for gid, mid, name, role in cursor.fetchall():
            members.setdefault(gid, []).append(GroupMember(mid, name, role))
        return [Group(gid, name, desc, tuple(members.get(gid, ()))) for gid, name, desc in groups]
