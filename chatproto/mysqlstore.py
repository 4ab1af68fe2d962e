"""
L{IChatStore} on MariaDB/MySQL: L{SQLStore} with a MySQL L{Dialect}, through
C{twisted.enterprise.adbapi} and PyMySQL.

Surviving a database restart
============================

adbapi's C{cp_reconnect} does not re-run the query that found the
connection dead, so it is not used.  L{MySQLStore.run} is the one place
where transactions are retried: a failure that says the connection is gone
(PyMySQL's C{OperationalError} or C{InterfaceError}) drops that thread's
connection and the transaction runs again on a new one, with back-off, for
at most C{retryFor} seconds (5 by default); then the caller gets
L{StoreUnavailable}, which the chat service turns into an error reply
(errno 30).  Nothing hangs, and once the database answers again the next
request simply works.

Which failures are retried
--------------------------

Every transaction runs with autocommit off and commits at its end.  A
connection lost I{before} the commit was sent means the server rolled the
transaction back (InnoDB discards an open transaction when its connection
goes), so running it again cannot duplicate anything: those failures are
always retried.

A connection lost I{during} the commit leaves the outcome unknown.  Then
only idempotent transactions are retried: reads, C{INSERT IGNORE} of
friends and group members, the deletion of offline messages by id, the schema migration.  The three that insert new rows -
C{createUser}, C{createGroup} and C{storeOffline}, run with
C{retryable=False} (see L{SQLStore.run}) - are not: running them
again could create a second copy of an offline message, or report "name
taken" for the account that was in fact just created.  They fail with
L{StoreUnavailable}, so the user is told to try again rather than silently
getting a duplicate.  (This needs the connection to die in the instant
between sending COMMIT and reading its answer; it is the one window where a
message may be reported as failed although it was stored.)  Telling a failed
COMMIT apart needs adbapi internals (L{chatproto._twisted}); without them a
non-retryable transaction is not re-run after any connection error.

C{takeOffline} is one transaction around the hand-over (rows read C{FOR
UPDATE}, handed over, deleted), so that two servers logging one user in at
the same moment cannot both hand over the same messages.  Once the
hand-over has happened it is never repeated; a lost connection after it
only retries the deletion (by id, idempotent).
"""

from __future__ import annotations

import pymysql
from twisted.enterprise import adbapi
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from chatproto import _twisted
from chatproto._twisted import CommitFailed
from chatproto.interfaces import StoreUnavailable
from chatproto.sqlfriends import MYSQL_MIGRATION as MYSQL_FRIEND_REQUESTS
from chatproto.sqloffline import handedOver
from chatproto.sqlstore import Dialect, SQLStore

_TABLE = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"

MYSQL_MIGRATIONS = (
    (
        f"""CREATE TABLE users (
            id BIGINT NOT NULL AUTO_INCREMENT,
            name VARCHAR(191) NOT NULL,
            password VARCHAR(255) NOT NULL,
            created DOUBLE NOT NULL,
            PRIMARY KEY (id),
            UNIQUE KEY users_name (name)) {_TABLE}""",
        f"""CREATE TABLE friends (
            userid BIGINT NOT NULL,
            friendid BIGINT NOT NULL,
            PRIMARY KEY (userid, friendid),
            KEY friends_friend (friendid),
            CONSTRAINT friends_user_fk FOREIGN KEY (userid) REFERENCES users (id),
            CONSTRAINT friends_friend_fk FOREIGN KEY (friendid) REFERENCES users (id)) {_TABLE}""",
        f"""CREATE TABLE chat_groups (
            id BIGINT NOT NULL AUTO_INCREMENT,
            name VARCHAR(191) NOT NULL,
            description TEXT NOT NULL,
            created DOUBLE NOT NULL,
            PRIMARY KEY (id),
            UNIQUE KEY chat_groups_name (name)) {_TABLE}""",
        f"""CREATE TABLE group_members (
            groupid BIGINT NOT NULL,
            userid BIGINT NOT NULL,
            role VARCHAR(16) NOT NULL,
            PRIMARY KEY (groupid, userid),
            KEY group_members_user (userid),
            CONSTRAINT group_members_group_fk FOREIGN KEY (groupid) REFERENCES chat_groups (id),
            CONSTRAINT group_members_user_fk FOREIGN KEY (userid) REFERENCES users (id)) {_TABLE}""",
        f"""CREATE TABLE offline_messages (
            id BIGINT NOT NULL AUTO_INCREMENT,
            userid BIGINT NOT NULL,
            payload MEDIUMTEXT NOT NULL,
            created DOUBLE NOT NULL,
            PRIMARY KEY (id),
            KEY offline_messages_user (userid, id)) {_TABLE}""",
    ),
    # 2: friend requests (chatproto.sqlfriends)
    MYSQL_FRIEND_REQUESTS,
    # 3: message ids: one offline copy per (recipient, mid) (chatproto.acks)
    (
        "ALTER TABLE offline_messages ADD COLUMN mid VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL",
        "ALTER TABLE offline_messages ADD UNIQUE KEY offline_messages_mid (userid, mid)",
    ),
)

MYSQL = Dialect(
    name="mysql",
    placeholder="%s",
    insertIgnore="INSERT IGNORE",
    migrations=MYSQL_MIGRATIONS,
    integrityErrors=(pymysql.err.IntegrityError,),
    byteLength="LENGTH(%s)",
)

#: Failures that mean the connection is gone (or never came): retried.
#: (adbapi's C{ConnectionLost} only with the stock connection wrapper.)
CONNECTION_ERRORS = (pymysql.err.OperationalError, pymysql.err.InterfaceError, adbapi.ConnectionLost)

# Transactions that insert new rows are run with C{retryable=False} (see
# L{SQLStore.run}): not re-run when their commit's outcome is unknown (see
# the module docstring).


def _openConnection(connection) -> None:
    """cp_openfun: every connection speaks utf8mb4 and commits explicitly."""
    connection.set_character_set("utf8mb4")
    connection.autocommit(False)
    with connection.cursor() as cursor:
        cursor.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',STRICT_ALL_TABLES')")
        cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")


class _Handoff:
    """What a L{MySQLStore.takeOffline} transaction has done so far (it may
    run again after a lost connection)."""

    called = False
    taken = False
    #: the primary keys of the rows to delete
    ids: list = []


def quoteIdentifier(name: str) -> str:
    """A MySQL identifier in backquotes (identifiers cannot be parameters)."""
    if not name or "\x00" in name:
        raise ValueError(f"bad database name {name!r}")
    return "`" + name.replace("`", "``") + "`"


class MySQLStore(SQLStore):
    """
    @param pool: an L{adbapi.ConnectionPool} for PyMySQL (see L{mysqlPool}).
    @param connectArgs: PyMySQL's C{connect} keywords, to create the
        database when it does not exist.
    @param retryFor: seconds a transaction is retried while the database is
        unreachable before L{StoreUnavailable}.
    """

    log = Logger()

    #: back-off between attempts: first delay, factor, longest delay
    retryDelays = (0.05, 2.0, 1.0)

    def __init__(self, pool, reactor, connectArgs: dict | None = None, retryFor: float = 5.0) -> None:
        super().__init__(pool, MYSQL)
        #: whether a failed COMMIT is told apart from other connection
        #: errors (L{CommitFailed}); without it nothing non-retryable is
        #: ever re-run after a connection error
        self.commitFailuresKnown = getattr(pool, "connectionFactory", None) is not adbapi.Connection
        self.reactor = reactor
        self.connectArgs = connectArgs
        self.retryFor = retryFor

    @classmethod
    def fromURL(cls, url, reactor, **kw) -> "MySQLStore":
        """A store for a L{chatproto.config.DatabaseURL} of kind C{mysql}."""
        connectArgs = dict(
            host=url.host,
            port=url.port,
            user=url.user,
            password=url.password,
            database=url.database,
            charset="utf8mb4",
            connect_timeout=3,
            read_timeout=30,
            write_timeout=30,
        )
        return cls(mysqlPool(connectArgs, reactor), reactor, connectArgs, **kw)

    # --- plumbing ----------------------------------------------------------

    def _interact(self, name: str, txn, args, retryable: bool = True) -> defer.Deferred:
        """
        Run C{txn(cursor, *args)} in a transaction, retrying while the
        connection is lost (see the module docstring).
        """
        return defer.Deferred.fromCoroutine(
            self._retrying(name, self.pool.runWithConnection, self._runTxn, txn, args, retryable=retryable)
        )

    async def _retrying(self, name: str, call, *args, retryable: bool = True):
        """
        Await C{call(*args)}, again after a connection error, with back-off,
        for at most C{retryFor} seconds.  With C{retryable} false a failure
        during COMMIT is not retried (the outcome is unknown); nor is any
        connection error when the pool could not tell a failed COMMIT apart
        (L{chatproto._twisted} fell back to the stock adbapi connection).
        """
        deadline = self.reactor.seconds() + self.retryFor
        first, factor, longest = self.retryDelays
        delay = first
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(*args)
            except CommitFailed as e:
                if not retryable:
                    self.log.warn(
                        "{name}: connection lost while committing ({error}); not retried",
                        name=name,
                        error=e.error,
                    )
                    raise StoreUnavailable(f"database connection lost while committing {name}") from None
                error = e.error
            except CONNECTION_ERRORS as e:
                if not retryable and not self.commitFailuresKnown:
                    self.log.warn("{name}: connection lost ({error}); not retried", name=name, error=e)
                    raise StoreUnavailable(f"database connection lost during {name}") from None
                error = e
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                self.log.warn(
                    "{name}: database unavailable after {attempt} attempts: {error}",
                    name=name,
                    attempt=attempt,
                    error=error,
                )
                raise StoreUnavailable(f"database unavailable: {error}") from None
            if attempt == 1:
                self.log.info("{name}: database connection failed ({error}); retrying", name=name, error=error)
            await task.deferLater(self.reactor, min(delay, remaining), lambda: None)
            delay = min(delay * factor, longest)

    @staticmethod
    def _runTxn(connection, txn, args):
        """In a database thread, on a pooled connection (see
        L{chatproto._twisted.pooledConnectionClass})."""
        try:
            cursor = connection.cursor()
        except Exception:
            _twisted.dropConnection(connection)
            raise
        try:
            result = txn(cursor, *args)
        except BaseException:
            try:
                cursor.close()
            except Exception:
                pass
            raise
        cursor.close()
        # adbapi commits next (L{CommitFailed} when that fails) or, when this
        # raised, rolls back.
        return result

    async def _createDatabase(self) -> None:
        if not self.connectArgs:
            return
        args = dict(self.connectArgs)
        database = args.pop("database")

        def create():
            connection = pymysql.connect(**args)
            try:
                with connection.cursor() as cursor:
                    cursor.execute(
                        f"CREATE DATABASE IF NOT EXISTS {quoteIdentifier(database)}"
                        " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                    )
            finally:
                connection.close()

        def attempt():
            return threads.deferToThreadPool(self.reactor, self.pool.threadpool, create)

        await self._retrying("createDatabase", attempt)

    # --- offline messages --------------------------------------------------

    @defer.inlineCallbacks
    def takeOffline(self, uid: int, handoff, keepAcked: bool = False):
        """
        Exactly-once hand-over across servers: the user's offline rows are
        read C{FOR UPDATE}, handed over (C{handoff} runs in the reactor
        thread while the transaction waits) and deleted by primary key in
        one transaction (with C{keepAcked}, those with a mid stay until
        acked).  A login of the same user on another server at the same
        moment waits for that transaction and then finds the messages gone,
        rather than getting them a second time.  (READ COMMITTED: messages
        stored meanwhile are not locked out and stay for next time.)
        """
        yield self._drainOffline()
        state = _Handoff()
        try:
            count = yield self.run("takeOffline", self._takeOfflineTxn, uid, handoff, state, keepAcked)
            if count is None:
                # Nothing stored: handed over (the login reply sent) after
                # the transaction, not while a database thread and its
                # connection wait for the reactor thread.
                yield defer.maybeDeferred(handoff, [])
                return 0
        except StoreUnavailable:
            if not (state.called and state.taken):
                raise
            # Handed over but the deletion could not be committed: they
            # are handed over again at the next login (at least once).
            self.log.warn("offline messages of {uid} handed over but not deleted", uid=uid)
            return 0
        return count

    def _takeOfflineTxn(self, cursor, uid, handoff, state: _Handoff, keepAcked: bool) -> int | None:
        if state.called:
            # Running again after a lost connection: never hand over twice,
            # only finish the (idempotent) deletion.
            if state.taken and state.ids:
                self._deleteIdsTxn(cursor, state.ids)
            return len(state.ids)
        if not self._anyOfflineTxn(cursor, uid):
            return None  # the common case: the hand-over runs once this ends
        rows = self._fetchOfflineTxn(cursor, uid, " FOR UPDATE")
        state.called = True
        taken = threads.blockingCallFromThread(
            self.reactor, defer.maybeDeferred, handoff, [payload for _, payload, _ in rows]
        )
        state.taken = bool(taken)
        if not (taken and rows):
            return 0
        state.ids = handedOver(rows, keepAcked)
        self._deleteIdsTxn(cursor, state.ids)
        return len(state.ids)

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> defer.Deferred:
        async def start():
            await self._createDatabase()
            await self.run("migrate", self._migrateTxn)

        return defer.Deferred.fromCoroutine(start())

    def _migrateTxn(self, cursor) -> int:
        # Servers starting together must not both run a migration: DDL is
        # not transactional in MySQL, so take a named lock for it.
        cursor.execute("SELECT DATABASE()")
        lock = f"chatproto-migrate:{cursor.fetchone()[0]}"
        cursor.execute("SELECT GET_LOCK(%s, 60)", (lock,))
        if cursor.fetchone()[0] != 1:
            raise StoreUnavailable("timed out waiting for another server's schema migration")
        try:
            return super()._migrateTxn(cursor)
        finally:
            cursor.execute("SELECT RELEASE_LOCK(%s)", (lock,))


def mysqlPool(connectArgs: dict, reactor, minConnections: int = 1, maxConnections: int = 8) -> adbapi.ConnectionPool:
    pool = adbapi.ConnectionPool(
        "pymysql",
        cp_min=minConnections,
        cp_max=maxConnections,
        cp_openfun=_openConnection,
        cp_reconnect=False,
        cp_reactor=reactor,
        **connectArgs,
    )
    connectionClass = _twisted.pooledConnectionClass(CONNECTION_ERRORS)
    if connectionClass is not None:
        pool.connectionFactory = connectionClass
    else:
        # The stock wrapper: let adbapi drop a dead connection itself.
        pool.reconnect = True
    return pool
