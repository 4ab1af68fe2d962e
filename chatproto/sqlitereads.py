"""
Read-only transactions of the embedded SQLite store, run at once in the
reactor thread.

The store's writes go through one database thread, in order.  A login's
read (friends, groups, whether offline messages wait) costs less in SQLite
than the trip to that thread and back (a queue, a wake-up of the reactor,
the GIL passed twice), so it runs here, on a connection of its own: in WAL
mode a reader never waits for the writer, and sees every transaction
committed before it started.  Should SQLite answer "busy" all the same
(WAL recovery, a checkpoint restarting the log), the read is handed to the
database thread as before: the reactor never waits more than
L{BUSY_TIMEOUT_MS}.
"""

from __future__ import annotations

import sqlite3

#: the longest the reactor thread waits for a lock before handing over
BUSY_TIMEOUT_MS = 20


class ReactorThreadReads:
    """
    @param path: the database file (not C{:memory:}: another connection
        would open another database).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.connection: sqlite3.Connection | None = None

    def run(self, txn, *args):
        """C{txn(cursor, *args)}, now; raises L{sqlite3.OperationalError}
        when the database is busy (the caller runs it elsewhere)."""
        if self.connection is None:
            self.connection = sqlite3.connect(self.path, isolation_level=None)
            self.connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor = self.connection.cursor()
        # One snapshot for every statement of the transaction.
        cursor.execute("BEGIN")
        try:
            return txn(cursor, *args)
        finally:
            cursor.execute("ROLLBACK")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
