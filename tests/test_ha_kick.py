"""
One session per account, always (issue 11), against the real Redis at
127.0.0.1:6379: a kick lost on the way (published while the owner's
subscriber was away) is repaired by that server's own check after it
subscribes again, or at its next refresh; in reject mode a login whose
previous owner's server announced its stop, or has nobody listening on its
channel, succeeds at once.
"""

from __future__ import annotations

from twisted.trial import unittest

from chatproto.interfaces import ClaimResult, Location
from tests.cluster_helpers import until
from tests.test_presence_redis import ClusterMixin, SessionsReceiver


class KickRepairTests(ClusterMixin, unittest.TestCase):
    # Refreshes are made by hand: the repairs tested here must not come
    # from a timer.
    ttl = 60.0
    refreshInterval = 30.0

    def setUp(self):
        self.setUpPrefix()

    def channel(self, name):
        return f"{self.prefix}relay:{name}"

    def subscribers(self, name):
        return self.redis("PUBSUB", "NUMSUB", self.channel(name))[1]

    async def test_lostKickRepairedAfterResubscribe(self):
        """b takes user 1 while a's subscriber is disconnected: the kick b
        publishes reaches nobody; once a subscribes again it finds the
        entry naming b and closes its own session."""
        receiver = SessionsReceiver({1: "s1", 2: "s2"})
        a = await self.startCluster("a", receiver)
        b = await self.startCluster("b")
        for uid, sid in receiver.localSessions():
            await a.presence.claim(uid, sid, False)
        await a.subscriber.stop()
        await until(lambda: self.subscribers("a") == 0, 5, what="a's subscriber to go")
        claim = await b.presence.claim(1, "t1", True)
        # nobody listens for a: no kick is to be sent
        self.assertEqual(claim, ClaimResult(True, Location("a", "s1"), listening=False))
        self.assertFalse(await b.relay.kick(claim.previous, 1, "logged in elsewhere"), "a kick would be lost")
        self.assertEqual(receiver.kicked, [])
        a.subscriber.start()
        await until(lambda: receiver.kicked, 5, what="the repair")
        self.assertEqual(receiver.kicked, [(1, "s1", "logged in elsewhere")])
        # The other user and the new owner are untouched.
        self.assertEqual(await a.presence.locate([1, 2]), {1: Location("b", "t1"), 2: Location("a", "s2")})

    async def test_lostKickRepairedAtRefresh(self):
        """A kick that never came (the new owner's server died before
        sending it): a's next refresh closes the session."""
        receiver = SessionsReceiver({1: "s1"})
        a = await self.startCluster("a", receiver)
        b = await self.startCluster("b")
        await a.presence.claim(1, "s1", False)
        self.assertEqual((await b.presence.claim(1, "t1", True)).previous, Location("a", "s1"))
        await a._refresh()
        self.assertEqual(receiver.kicked, [(1, "s1", "logged in elsewhere")])
        self.assertEqual(await a.presence.locate([1]), {1: Location("b", "t1")})

    async def test_lostEntryWrittenAgain(self):
        """An entry Redis lost (a failover to a replica that had not got
        it) is written again at the next check; a session that ended
        while a check ran is not brought back."""
        receiver = SessionsReceiver({1: "s1"})
        a = await self.startCluster("a", receiver)
        await a.presence.claim(1, "s1", False)
        await a.checkSessions()  # the one after subscribing, if under way
        self.assertEqual(self.redis("DEL", f"{self.prefix}user:1"), 1)
        await a.checkSessions()
        self.assertEqual(await a.presence.locate([1]), {1: Location("a", "s1")})
        self.assertEqual(receiver.kicked, [])
        # The session ends (released) while a check is under way.
        d = a.checkSessions()
        del receiver.sessions[1]
        await a.presence.release(1, "s1")
        await d
        self.assertEqual(await a.presence.locate([1]), {})

    async def test_periodicRefreshComparesASliceInRotation(self):
        """A periodic refresh compares the next SLICE sessions only (the
        steady cost is bounded); lost entries are all written again within
        one turn, and a refresh that finds the registry entry gone
        compares every session at once."""
        from chatproto import redischeck

        self.patch(redischeck, "SLICE", 2)
        receiver = SessionsReceiver({uid: f"s{uid}" for uid in range(1, 6)})
        a = await self.startCluster("a", receiver)
        for uid, sid in receiver.localSessions():
            await a.presence.claim(uid, sid, False)
        await a.checkSessions()  # the one after subscribing, if under way
        for uid in range(1, 6):
            self.redis("DEL", f"{self.prefix}user:{uid}")

        async def entries():
            return len(await a.presence.locate(list(range(1, 6))))

        counts = []
        for _ in range(3):
            await a._refresh(full=False)
            counts.append(await entries())
        self.assertEqual(counts, [2, 4, 5])
        for uid in range(1, 6):
            self.redis("DEL", f"{self.prefix}user:{uid}")
        self.redis("DEL", f"{self.prefix}server:a")
        await a._refresh(full=False)
        self.assertEqual(await entries(), 5)

    async def test_rejectAfterAnnouncedStop(self):
        """--on-relogin reject: while a lives and listens, a second login
        is refused; once a announced its stop, it succeeds at once."""
        a = await self.startCluster("a")
        b = await self.startCluster("b")
        await a.presence.claim(1, "s1", False)
        self.assertEqual(await b.presence.claim(1, "t1", False), ClaimResult(False, Location("a", "s1")))
        await a.presence.announceStop()
        self.assertEqual(await b.presence.claim(1, "t1", False), ClaimResult(True, None))
        # a deregistered: it does not come back by itself.
        self.assertEqual([s.name for s in await b.presence.servers()], ["b"])
        self.assertEqual(a.registered, False)

    async def test_rejectOwnerNotListening(self):
        """--on-relogin reject: a registered owner with nobody subscribed
        to its channel (killed: its entry has not expired yet) does not
        block the login; the previous owner is returned as not listening
        (no kick: a's check closes the session if a comes back)."""
        receiver = SessionsReceiver({1: "s1"})
        a = await self.startCluster("a", receiver)
        b = await self.startCluster("b")
        await a.presence.claim(1, "s1", False)
        await a.subscriber.stop()
        await until(lambda: self.subscribers("a") == 0, 5, what="a's subscriber to go")
        self.assertEqual(
            await b.presence.claim(1, "t1", False), ClaimResult(True, Location("a", "s1"), listening=False)
        )
        self.assertEqual(await b.presence.locate([1]), {1: Location("b", "t1")})
        a.subscriber.start()
        await until(lambda: receiver.kicked, 5, what="a's check")
        self.assertEqual(receiver.kicked, [(1, "s1", "logged in elsewhere")])

    async def test_ownerNotListeningOneCall(self):
        """The reconnect storm after a server died: a takeover from a
        registered server nobody listens for is one script call (not a
        second one naming that server, and no kick), and a's ``logins``
        is left for a's own refresh."""
        a = await self.startCluster("a")
        b = await self.startCluster("b")
        await a.presence.claim(1, "s1", False)
        await a.subscriber.stop()
        await until(lambda: self.subscribers("a") == 0, 5, what="a's subscriber to go")
        calls = []
        realEval = b.eval
        b.eval = lambda script, args: (calls.append(args), realEval(script, args))[1]
        claim = await b.presence.claim(1, "t1", True)
        self.assertEqual(claim, ClaimResult(True, Location("a", "s1"), listening=False))
        self.assertEqual(len(calls), 1)
        self.assertEqual(self.redis("HGET", f"{self.prefix}server:a", "logins"), "1")
        self.assertEqual(self.redis("HGET", f"{self.prefix}server:b", "logins"), "1")
        self.assertEqual(await b.presence.locate([1]), {1: Location("b", "t1")})
        # a listening again: a takeover from it is the two calls that move
        # its count, and a kick is due
        a.subscriber.start()
        await until(lambda: self.subscribers("a") == 1, 5, what="a's subscriber")
        await a.presence.claim(2, "s2", False)
        calls.clear()
        claim = await b.presence.claim(2, "t2", True)
        self.assertEqual(claim, ClaimResult(True, Location("a", "s2")))
        self.assertEqual(len(calls), 2)
