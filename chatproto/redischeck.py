"""
One session per account, repaired: a server compares all its sessions with
the presence entries in Redis after every (re)connection and
(re)subscription, and whenever its registry entry was found gone (Redis
restarted or failed over); on each other registry refresh (every 2 s) it compares the next
L{SLICE} of them, in rotation, so that the steady cost stays bounded
however many users a server holds (10,000 sessions: a full turn in 20 s).

 - An entry that is missing, or names a server that is gone, is written
   again: Redis lost it (a restart, or a failover: replication is
   asynchronous, so a claim acknowledged by the old master may never have
   reached the new one).
 - An entry naming another live server means the account was taken there;
   the kick that server published may have been lost (pub/sub is
   at-most-once: published while this server's subscriber was
   reconnecting), so this server closes its own session now.
 - An entry naming another session of this server is left alone (a newer
   login here is under way).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from chatproto.redisscripts import REASSERT, RELEASE

log = Logger()

#: sessions per script call
CHUNK = 500
#: sessions compared on a periodic refresh
SLICE = 1000


class SessionCheck:
    """
    @param cluster: the L{chatproto.rediscluster.RedisCluster}.
    """

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self._running: defer.Deferred | None = None
        self._again: bool | None = None  # None, or the next check's C{full}
        #: the sessions of the periodic rotation not compared yet
        self._rotation: list[tuple[int, str]] = []

    def run(self, full: bool = True) -> defer.Deferred:
        """Check now (C{full}: every session, else the next L{SLICE}); a
        check asked for while one runs runs once more after it (with the
        sessions of that moment)."""
        if self._running is not None:
            self._again = full or bool(self._again)
            return self._running
        self._again = None
        d = self._running = defer.Deferred.fromCoroutine(self._check(full))

        def done(result):
            self._running = None
            if self._again is not None and not self.cluster.stopping:
                return self.run(self._again)
            return result

        return d.addBoth(done)

    def afterSubscribe(self, p) -> None:
        """The subscriber connection C{p} is (re)made and its SUBSCRIBE
        sent: once Redis has taken it (a PING answered after it, on the
        same connection), check, since kicks published meanwhile were
        lost."""
        cluster = self.cluster

        def subscribed(_):
            if cluster.registered and not cluster.stopping:
                return self.run()
            return None

        d = p.ping().addCallback(subscribed)
        d.addErrback(lambda f: log.warn("checking sessions after subscribing: {error}", error=f.getErrorMessage()))

    def _next(self, current: list) -> list[tuple[int, str]]:
        """The next L{SLICE} of the rotation that are still sessions here."""
        if not self._rotation:
            self._rotation = current
        some, self._rotation = self._rotation[-SLICE:], self._rotation[:-SLICE]
        live = dict(current)
        return [(uid, sid) for uid, sid in some if live.get(uid) == sid]

    async def _check(self, full: bool = True) -> None:
        cluster = self.cluster
        receiver = cluster.relay.receiver
        if receiver is None:
            return
        sessions = list(receiver.localSessions())
        if not full:
            sessions = self._next(sessions)
        if not sessions:
            return
        sids = dict(sessions)
        lost = []
        for start in range(0, len(sessions), CHUNK):
            args = [cluster.name]
            for uid, sid in sessions[start : start + CHUNK]:
                args += [int(uid), sid]
            lost += await cluster.eval(REASSERT, args)
        if lost:
            log.info(
                "{lost} of the {n} sessions of {name} are logged in elsewhere now; closing them here",
                n=len(sessions),
                name=cluster.name,
                lost=len(lost),
            )
        for uid in lost:
            uid = int(uid)
            receiver.kickLocal(uid, sids[uid], "logged in elsewhere")
        # Sessions that ended while the check ran: it may have written
        # their entry again; take it back (compare-and-delete).
        current = dict(receiver.localSessions())
        for uid, sid in sessions:
            if current.get(uid) != sid:
                await cluster.eval(RELEASE, [cluster.name, int(uid), sid])
