"""
Friend requests of L{chatproto.sqlstore.SQLStore} (C{--friend-requests
approve}): one row per request, requester -> target, with its creation time
(from the service's clock) and whether the target refused it.

A refused request stays in the table until it expires, so that its
requester sees no difference between "refused" and "not answered yet" and
cannot pester the target with a new one.  Expired rows are ignored by every
query (they are older than the C{since} the caller passes) and deleted when
next touched.

Every transaction that changes a pair first locks both users' rows (MySQL:
C{SELECT ... FOR UPDATE} in id order; SQLite serialises writers anyway), so
two servers handling crossed requests A->B and B->A at the same moment make
one of them see the other: they end as friends, never as two pending
requests.
"""

from __future__ import annotations

from twisted.internet import defer

from chatproto.interfaces import FriendRequest, NoSuchUser, TooManyRequests

#: What L{FriendRequestsSQL.requestFriend} did.
REQUESTED = "requested"  # a new pending request
PENDING = "pending"  # one was pending already (or refused, unexpired): nothing done
ACCEPTED = "accepted"  # the target had asked first: both are friends now
FRIENDS = "friends"  # they were friends already

_SQLITE_TABLE = (
    """CREATE TABLE friend_requests (
        requester INTEGER NOT NULL REFERENCES users(id),
        target INTEGER NOT NULL REFERENCES users(id),
        created REAL NOT NULL,
        refused INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (requester, target))""",
    "CREATE INDEX friend_requests_target ON friend_requests (target, created)",
)

_MYSQL_TABLE = (
    """CREATE TABLE friend_requests (
        requester BIGINT NOT NULL,
        target BIGINT NOT NULL,
        created DOUBLE NOT NULL,
        refused TINYINT NOT NULL DEFAULT 0,
        PRIMARY KEY (requester, target),
        KEY friend_requests_target (target, created),
        CONSTRAINT friend_requests_requester_fk FOREIGN KEY (requester) REFERENCES users (id),
        CONSTRAINT friend_requests_target_fk FOREIGN KEY (target) REFERENCES users (id))
        ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
)

#: The schema migration adding the table, one per dialect.
SQLITE_MIGRATION = _SQLITE_TABLE
MYSQL_MIGRATION = _MYSQL_TABLE


class FriendRequestsSQL:
    """
    The friends and friend requests of L{chatproto.sqlstore.SQLStore} (a
    mixin: it uses the store's C{run}, C{q} and C{dialect}).  Times are seconds since
    the epoch, from the caller's clock; C{since} is the oldest creation
    time still valid (now minus the expiry).
    """

    def addFriend(self, uid: int, friendId: int) -> defer.Deferred:
        return self.run("addFriend", self._addFriendTxn, uid, friendId)

    def _addFriendTxn(self, cursor, uid, friendId) -> bool:
        cursor.execute(self.q("SELECT COUNT(*) FROM users WHERE id IN (?, ?)"), (uid, friendId))
        if cursor.fetchone()[0] != len({uid, friendId}):
            raise NoSuchUser(friendId)
        insert = self.q("INSERT IGNORE INTO friends (userid, friendid) VALUES (?, ?)")
        cursor.execute(insert, (uid, friendId))
        new = cursor.rowcount > 0
        cursor.execute(insert, (friendId, uid))
        return new or cursor.rowcount > 0

    def getFriends(self, uid: int) -> defer.Deferred:
        return self.run("getFriends", self._getFriendsTxn, uid)

    def _getFriendsTxn(self, cursor, uid) -> list[tuple[int, str]]:
        cursor.execute(
            self.q(
                "SELECT u.id, u.name FROM friends f JOIN users u ON u.id = f.friendid"
                " WHERE f.userid = ? ORDER BY u.id"
            ),
            (uid,),
        )
        return [(row[0], row[1]) for row in cursor.fetchall()]

    def requestFriend(self, uid: int, friendId: int, now: float, since: float, cap: int) -> defer.Deferred:
        return self.run("requestFriend", self._requestFriendTxn, uid, friendId, now, since, cap)

    def answerFriendRequest(self, uid: int, requesterId: int, accept: bool, since: float) -> defer.Deferred:
        return self.run("answerFriendRequest", self._answerFriendRequestTxn, uid, requesterId, accept, since)

    def getFriendRequests(self, uid: int, since: float, limit: int = 100) -> defer.Deferred:
        return self.run("getFriendRequests", self._getFriendRequestsTxn, uid, since, limit)

    # --- transactions ------------------------------------------------------

    def _lockPair(self, cursor, uid: int, other: int) -> bool:
        """Lock both users' rows; false when one of them does not exist."""
        sql = "SELECT id FROM users WHERE id IN (?, ?) ORDER BY id"
        if self.dialect.name == "mysql":
            sql += " FOR UPDATE"
        cursor.execute(self.q(sql), (uid, other))
        return len(cursor.fetchall()) == len({uid, other})

    def _befriend(self, cursor, uid: int, other: int) -> None:
        insert = self.q("INSERT IGNORE INTO friends (userid, friendid) VALUES (?, ?)")
        cursor.execute(insert, (uid, other))
        cursor.execute(insert, (other, uid))
        cursor.execute(
            self.q(
                "DELETE FROM friend_requests WHERE (requester = ? AND target = ?) OR (requester = ? AND target = ?)"
            ),
            (uid, other, other, uid),
        )

    def _requestFriendTxn(self, cursor, uid, friendId, now, since, cap) -> str:
        if not self._lockPair(cursor, uid, friendId):
            raise NoSuchUser(friendId)
        cursor.execute(self.q("SELECT 1 FROM friends WHERE userid = ? AND friendid = ?"), (uid, friendId))
        if cursor.fetchone():
            return FRIENDS
        # Expired requests of this requester, and the other way round.
        cursor.execute(
            self.q("DELETE FROM friend_requests WHERE created < ? AND (requester = ? OR (requester = ? AND target = ?))"),
            (since, uid, friendId, uid),
        )
        cursor.execute(
            self.q("SELECT 1 FROM friend_requests WHERE requester = ? AND target = ?"), (friendId, uid)
        )
        if cursor.fetchone():
            # Crossed requests: the other asked first; both agree.
            self._befriend(cursor, uid, friendId)
            return ACCEPTED
        cursor.execute(
            self.q("SELECT 1 FROM friend_requests WHERE requester = ? AND target = ?"), (uid, friendId)
        )
        if cursor.fetchone():
            return PENDING
        cursor.execute(self.q("SELECT COUNT(*) FROM friend_requests WHERE requester = ?"), (uid,))
        if cursor.fetchone()[0] >= cap:
            raise TooManyRequests(uid)
        cursor.execute(
            self.q("INSERT INTO friend_requests (requester, target, created, refused) VALUES (?, ?, ?, 0)"),
            (uid, friendId, now),
        )
        return REQUESTED

    def _answerFriendRequestTxn(self, cursor, uid, requesterId, accept, since) -> bool:
        if not self._lockPair(cursor, uid, requesterId):
            return False
        cursor.execute(
            self.q(
                "SELECT 1 FROM friend_requests WHERE requester = ? AND target = ? AND created >= ? AND refused = 0"
            ),
            (requesterId, uid, since),
        )
        if not cursor.fetchone():
            return False
        if accept:
            self._befriend(cursor, uid, requesterId)
        else:
            cursor.execute(
                self.q("UPDATE friend_requests SET refused = 1 WHERE requester = ? AND target = ?"),
                (requesterId, uid),
            )
        return True

    def _getFriendRequestsTxn(self, cursor, uid, since, limit) -> list[FriendRequest]:
        cursor.execute(
            self.q(
                "SELECT r.requester, u.name, r.created FROM friend_requests r JOIN users u ON u.id = r.requester"
                " WHERE r.target = ? AND r.created >= ? AND r.refused = 0 ORDER BY r.created, r.requester LIMIT ?"
            ),
            (uid, since, limit),
        )
        return [FriendRequest(row[0], row[1], row[2]) for row in cursor.fetchall()]
