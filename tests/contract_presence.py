"""
The L{IPresence} / L{IRelay} contract.  Every implementation runs it: a
TestCase mixes in L{PresenceContract} and provides
C{makePresence(serverName, receiver)}, returning a Deferred that fires with
a started C{(presence, relay)} pair (the relay started with C{receiver}).
Each call within one test joins the same cluster; the mixin stops them
after the test.
"""

from twisted.internet import defer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from chatproto.interfaces import ClaimResult, IPresence, IRelay, IRelayReceiver, Location


class RecordingBatch:
    """An L{IWriteBatch} that counts."""

    def __init__(self):
        self.depth = 0
        self.ended = 0

    def begin(self):
        self.depth += 1

    def end(self):
        self.depth -= 1
        self.ended += 1


@implementer(IRelayReceiver)
class RecordingReceiver:
    """A receiver that records what it is handed; users in C{online} take
    messages."""

    def __init__(self, online=()):
        self.writeBatch = RecordingBatch()
        self.online = set(online)
        self.delivered = []
        self.stored = []
        self.kicked = []
        self.origins = []
        self.confirmations = []

    def confirmed(self, entries):
        self.confirmations.append(entries)

    def deliverLocal(self, uids, message, store, origin=None):
        self.origins.append(origin)
        missed = [uid for uid in uids if uid not in self.online]
        self.delivered += [(uid, message) for uid in uids if uid in self.online]
        if store:
            self.stored += [(uid, message) for uid in missed]
        return missed

    def localSessions(self):
        return []

    def kickLocal(self, uid, session, reason):
        self.kicked.append((uid, session, reason))


class PresenceContract:
    def makePresence(self, serverName, receiver):
        raise NotImplementedError

    async def setUp(self):
        self.receiver = RecordingReceiver()
        self.presence, self.relay = await self.startServer("server-a", self.receiver)

    async def startServer(self, name, receiver):
        presence, relay = await self.makePresence(name, receiver)
        self.addCleanup(presence.stop)
        self.addCleanup(relay.stop)
        return presence, relay

    def test_interfaces(self):
        self.assertTrue(verifyObject(IPresence, self.presence))
        self.assertTrue(verifyObject(IRelay, self.relay))
        self.assertEqual(self.presence.serverName, "server-a")

    async def test_claimFree(self):
        result = await self.presence.claim(1, "s1", False)
        self.assertEqual(result, ClaimResult(True, None))
        self.assertEqual(await self.presence.locate([1, 2]), {1: Location("server-a", "s1")})

    async def test_claimAgainBySameSession(self):
        await self.presence.claim(1, "s1", False)
        self.assertEqual(await self.presence.claim(1, "s1", False), ClaimResult(True, None))

    async def test_rejectWhenOwned(self):
        await self.presence.claim(1, "s1", False)
        result = await self.presence.claim(1, "s2", False)
        self.assertEqual(result, ClaimResult(False, Location("server-a", "s1")))
        self.assertEqual(await self.presence.locate([1]), {1: Location("server-a", "s1")})

    async def test_replaceWhenOwned(self):
        await self.presence.claim(1, "s1", True)
        result = await self.presence.claim(1, "s2", True)
        self.assertEqual(result, ClaimResult(True, Location("server-a", "s1")))
        self.assertEqual(await self.presence.locate([1]), {1: Location("server-a", "s2")})

    async def test_concurrentClaimsOneWins(self):
        results = await defer.gatherResults([self.presence.claim(7, f"s{i}", False) for i in range(5)])
        self.assertEqual(sum(r.won for r in results), 1)

    async def test_releaseOnlyByOwner(self):
        await self.presence.claim(1, "s1", True)
        await self.presence.claim(1, "s2", True)
        # The replaced session going away must not log out the new one.
        self.assertFalse(await self.presence.release(1, "s1"))
        self.assertEqual(await self.presence.locate([1]), {1: Location("server-a", "s2")})
        self.assertTrue(await self.presence.release(1, "s2"))
        self.assertEqual(await self.presence.locate([1]), {})
        self.assertFalse(await self.presence.release(1, "s2"))

    async def test_locateMany(self):
        for uid in (1, 3, 5):
            await self.presence.claim(uid, f"s{uid}", False)
        located = await self.presence.locate([1, 2, 3, 4, 5, 6])
        self.assertEqual(sorted(located), [1, 3, 5])
        self.assertEqual(await self.presence.locate([]), {})

    async def test_serversListsThisOne(self):
        await self.presence.claim(1, "s1", False)
        servers = {s.name: s for s in await self.presence.servers()}
        self.assertIn("server-a", servers)
        self.assertEqual(servers["server-a"].logins, 1)

    async def test_deliverToNobody(self):
        missed = await self.relay.deliver([41, 42], {"msgid": 6, "msg": "hi"}, True)
        self.assertEqual(sorted(missed), [41, 42])
        self.assertEqual(self.receiver.delivered, [])
