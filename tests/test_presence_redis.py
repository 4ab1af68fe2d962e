"""
L{chatproto.redispresence} against a real Redis at 127.0.0.1:6379: the
presence contract, and what only a cluster has (registry TTL, relay and
kick between servers, concurrent claims on two servers).  Each test uses
its own random key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import json

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface import implementer

from chatproto.config import RedisURL, parseRedisURL
from chatproto.interfaces import ClaimResult, IRelayReceiver, Location, PresenceUnavailable
from chatproto.redispresence import RedisCluster
from tests.cluster_helpers import (
    REDIS_URL as _REDIS_URL,
    SyncRedis,
    deleteRedisPrefix,
    freePort,
    uniquePrefix,
    until,
)
from tests.contract_presence import PresenceContract, RecordingReceiver

REDIS_URL = parseRedisURL(_REDIS_URL)


@implementer(IRelayReceiver)
class SessionsReceiver(RecordingReceiver):
    """A receiver with local sessions: C{sessions} maps uid to session id."""

    def __init__(self, sessions=None):
        self.sessions = dict(sessions or {})
        super().__init__(self.sessions)

    def localSessions(self):
        return list(self.sessions.items())

    def kickLocal(self, uid, session, reason):
        super().kickLocal(uid, session, reason)
        if self.sessions.get(uid) == session:
            del self.sessions[uid]
            self.online.discard(uid)


class ClusterMixin:
    """Starts L{RedisCluster}s sharing one random prefix; stops them and
    deletes the prefix's keys after the test."""

    ttl = 6.0
    refreshInterval = 2.0

    def setUpPrefix(self):
        self.prefix = uniquePrefix()
        self.addCleanup(deleteRedisPrefix, self.prefix)
        self.redis = SyncRedis()
        self.addCleanup(self.redis.close)

    def newCluster(self, name, url=REDIS_URL, **kw) -> RedisCluster:
        kw.setdefault("ttl", self.ttl)
        kw.setdefault("refreshInterval", self.refreshInterval)
        cluster = RedisCluster(url, name, host="127.0.0.1", port=7000, weight=2, prefix=self.prefix, reactor=reactor, **kw)
        return cluster

    async def startCluster(self, name, receiver=None, loginCount=None, **kw) -> RedisCluster:
        cluster = self.newCluster(name, **kw)
        self.addCleanup(cluster.presence.stop)
        self.addCleanup(cluster.relay.stop)
        await cluster.presence.start(loginCount or (lambda: 0))
        await cluster.relay.start(receiver if receiver is not None else RecordingReceiver())
        return cluster


class RedisPresenceContractTests(ClusterMixin, PresenceContract, unittest.TestCase):
    """The L{IPresence}/L{IRelay} contract on Redis."""

    async def setUp(self):
        self.setUpPrefix()
        await PresenceContract.setUp(self)

    async def makePresence(self, serverName, receiver):
        # No refresh during a test: it would set logins from loginCount()
        # (here always 0) between a claim and a look at the registry.
        cluster = self.newCluster(serverName, ttl=120, refreshInterval=60)
        await cluster.presence.start(lambda: 0)
        await cluster.relay.start(receiver)
        return cluster.presence, cluster.relay


class RegistryTests(ClusterMixin, unittest.TestCase):
    def setUp(self):
        self.setUpPrefix()

    async def test_format(self):
        """The registry is exactly what the balancer reads: a SET of names
        and a HASH per server with a TTL."""
        await self.startCluster("alpha", loginCount=lambda: 3)
        self.assertEqual(self.redis("SMEMBERS", self.prefix + "servers"), ["alpha"])
        fields = self.redis("HGETALL", self.prefix + "server:alpha")
        entry = dict(zip(fields[::2], fields[1::2]))
        self.assertEqual(set(entry), {"name", "host", "port", "weight", "logins", "updated"})
        self.assertEqual(
            (entry["name"], entry["host"], entry["port"], entry["weight"], entry["logins"]),
            ("alpha", "127.0.0.1", "7000", "2", "3"),
        )
        self.assertLess(abs(int(entry["updated"]) - reactor.seconds()), 5)
        ttl = self.redis("PTTL", self.prefix + "server:alpha")
        self.assertTrue(0 < ttl <= 6000, ttl)

    async def test_refreshKeepsAliveAndCorrectsLogins(self):
        """The entry is refreshed before it expires, and each refresh sets
        logins from the server's own count."""
        count = [1]
        cluster = await self.startCluster("alpha", loginCount=lambda: count[0], ttl=0.6, refreshInterval=0.15)
        await cluster.presence.claim(1, "s1", False)
        self.assertEqual(self.redis("HGET", self.prefix + "server:alpha", "logins"), "2")
        count[0] = 5
        await until(lambda: self.redis("HGET", self.prefix + "server:alpha", "logins") == "5", 5, what="logins corrected")
        # Alive well past several TTLs.
        for _ in range(3):
            await until(lambda: self.redis("PTTL", self.prefix + "server:alpha") > 400, 2)
        self.assertEqual(await cluster.presence.locate([1]), {1: Location("alpha", "s1")})

    async def test_loginsMoveWithClaims(self):
        """logins follows claims, replacements across servers and releases
        atomically."""
        a = await self.startCluster("a")
        b = await self.startCluster("b")

        def logins():
            return [int(self.redis("HGET", self.prefix + f"server:{n}", "logins")) for n in "ab"]

        await a.presence.claim(1, "s1", False)
        await a.presence.claim(2, "s2", False)
        self.assertEqual(logins(), [2, 0])
        # Same server, new session: no change.
        await a.presence.claim(1, "s1b", True)
        self.assertEqual(logins(), [2, 0])
        # Moves to b.
        result = await b.presence.claim(1, "t1", True)
        self.assertEqual(result, ClaimResult(True, Location("a", "s1b")))
        self.assertEqual(logins(), [1, 1])
        self.assertFalse(await a.presence.release(1, "s1b"))
        self.assertEqual(logins(), [1, 1])
        self.assertTrue(await b.presence.release(1, "t1"))
        self.assertEqual(logins(), [1, 0])

    async def test_deadServerExpires(self):
        """A server that stops refreshing (killed) is gone from the registry
        within its TTL, its users count as offline, nobody cleans up, and
        users of other servers are untouched."""
        a = await self.startCluster("a", ttl=0.8, refreshInterval=0.2)
        b = await self.startCluster("b", ttl=0.8, refreshInterval=0.2)
        await a.presence.claim(1, "s1", False)
        await b.presence.claim(2, "s2", False)
        self.assertEqual(sorted(s.name for s in await b.presence.servers()), ["a", "b"])
        # "Kill" a: it stops refreshing, nothing is deleted.
        a._refresher.stop()
        a._refresher = None
        await until(lambda: self.redis("EXISTS", self.prefix + "server:a") == 0, 5, what="a's entry to expire")
        self.assertEqual([s.name for s in await b.presence.servers()], ["b"])
        self.assertEqual(await b.presence.locate([1, 2]), {2: Location("b", "s2")})
        # Its user may log in elsewhere without a conflict.
        self.assertEqual(await b.presence.claim(1, "t1", False), ClaimResult(True, None))
        # And a's name leaves the set at b's next refresh.
        await until(lambda: self.redis("SMEMBERS", self.prefix + "servers") == ["b"], 5, what="set tidied")

    async def test_cleanStop(self):
        """A clean stop deletes the server's entry and name, and nothing of
        the other servers."""
        a = await self.startCluster("a")
        b = await self.startCluster("b")
        await b.presence.claim(2, "s2", False)
        await a.presence.claim(1, "s1", False)
        await a.relay.stop()
        await a.presence.stop()
        self.assertEqual(self.redis("EXISTS", self.prefix + "server:a"), 0)
        self.assertEqual(self.redis("SMEMBERS", self.prefix + "servers"), ["b"])
        self.assertEqual(await b.presence.locate([1, 2]), {2: Location("b", "s2")})

    async def test_reassertAfterDataLoss(self):
        """When Redis forgets everything (a restart), each server registers
        again and re-asserts its logged-in users; a user another server
        took meanwhile is kicked here."""
        receiver = SessionsReceiver({1: "s1", 2: "s2"})
        # Refreshes are made by hand here, to order them.
        a = await self.startCluster("a", receiver, ttl=60, refreshInterval=30)
        b = await self.startCluster("b", ttl=60, refreshInterval=30)
        for uid, sid in receiver.localSessions():
            await a.presence.claim(uid, sid, False)
        # A restart loses all keys; b refreshes first and user 2 logs in
        # there; then a refreshes.
        self.redis.deletePrefix(self.prefix)
        await b.register()
        self.assertEqual(await b.presence.claim(2, "t2", False), ClaimResult(True, None))
        self.assertEqual(await b.presence.locate([1, 2]), {2: Location("b", "t2")})
        await a._refresh()
        self.assertEqual(receiver.kicked, [(2, "s2", "logged in elsewhere")])
        self.assertEqual(
            await b.presence.locate([1, 2]),
            {1: Location("a", "s1"), 2: Location("b", "t2")},
        )


class RelayTests(ClusterMixin, unittest.TestCase):
    def setUp(self):
        self.setUpPrefix()

    async def test_crossServer(self):
        """A delivery reaches the owning server's receiver; offline users
        are returned as missed."""
        ra, rb = RecordingReceiver(), RecordingReceiver({1})
        a = await self.startCluster("a", ra)
        b = await self.startCluster("b", rb)
        await b.presence.claim(1, "s1", False)
        message = {"msgid": 6, "id": 5, "msg": "hi \U0001f600"}
        missed = await a.relay.deliver([1, 2], message, True)
        self.assertEqual(missed, [2])
        await until(lambda: rb.delivered, 5)
        self.assertEqual(rb.delivered, [(1, message)])
        self.assertEqual(ra.delivered, [])

    async def test_userLeftMeanwhileStoredByReceiver(self):
        """A server taking a message for a user who has just left stores
        it (the receiver is told to)."""
        rb = RecordingReceiver()  # nobody online locally
        a = await self.startCluster("a")
        b = await self.startCluster("b", rb)
        await b.presence.claim(1, "s1", False)
        self.assertEqual(await a.relay.deliver([1], {"msg": "x"}, True), [])
        await until(lambda: rb.stored, 5)
        self.assertEqual(rb.stored, [(1, {"msg": "x"})])

    async def test_numbersStayStrings(self):
        """convertNumbers is off: "007" stays a string, a session id of
        digits stays a string."""
        rb = RecordingReceiver({1})
        a = await self.startCluster("a")
        b = await self.startCluster("b", rb)
        await b.presence.claim(1, "0012", False)
        self.assertEqual(await a.presence.locate([1]), {1: Location("b", "0012")})
        await a.relay.deliver([1], {"msg": "007", "n": "1e3", "t": "a\tb\nc;1:2"}, False)
        await until(lambda: rb.delivered, 5)
        self.assertEqual(rb.delivered, [(1, {"msg": "007", "n": "1e3", "t": "a\tb\nc;1:2"})])

    async def test_fanOutAndOrder(self):
        """Many deliveries in one reactor turn, to users on two servers,
        arrive in order, each to the right users, in one round trip."""
        ra, rb = RecordingReceiver(range(0, 50)), RecordingReceiver(range(50, 100))
        a = await self.startCluster("a", ra)
        b = await self.startCluster("b", rb)
        c = await self.startCluster("c")
        for uid in range(100):
            await (a if uid < 50 else b).presence.claim(uid, f"s{uid}", False)
        calls = []
        original = c.eval
        c.eval = lambda script, args: calls.append(script) or original(script, args)
        ds = [c.relay.deliver(list(range(100)) + [999], {"n": n}, True) for n in range(200)]
        results = await defer.gatherResults(ds)
        self.assertEqual(results, [[999]] * 200)
        self.assertEqual(len(calls), 1)
        await until(lambda: len(ra.delivered) == 50 * 200 and len(rb.delivered) == 50 * 200, 10)
        for receiver, uids in ((ra, range(0, 50)), (rb, range(50, 100))):
            for uid in uids:
                got = [m["n"] for u, m in receiver.delivered if u == uid]
                self.assertEqual(got, list(range(200)))

    async def test_kickAcrossServers(self):
        """A replacing claim on b returns a's session; b's kick reaches a's
        receiver."""
        ra = RecordingReceiver()
        a = await self.startCluster("a", ra)
        b = await self.startCluster("b")
        await a.presence.claim(1, "s1", True)
        result = await b.presence.claim(1, "t1", True)
        self.assertEqual(result, ClaimResult(True, Location("a", "s1")))
        self.assertTrue(await b.relay.kick(result.previous, 1, "logged in elsewhere"))
        await until(lambda: ra.kicked, 5)
        self.assertEqual(ra.kicked, [(1, "s1", "logged in elsewhere")])
        self.assertFalse(await b.relay.kick(Location("nowhere", "x"), 1, "r"))

    async def test_concurrentClaimsOnTwoServers(self):
        """Logins of one account on two servers at once (reject mode):
        exactly one wins, and the loser is told who owns it."""
        a = await self.startCluster("a")
        b = await self.startCluster("b")
        for uid in range(20):
            ra, rb = await defer.gatherResults(
                [a.presence.claim(uid, f"a{uid}", False), b.presence.claim(uid, f"b{uid}", False)]
            )
            self.assertEqual(ra.won + rb.won, 1)
            winner, loser = (ra, rb) if ra.won else (rb, ra)
            owner = (await a.presence.locate([uid]))[uid]
            self.assertEqual(loser.previous, owner)

    async def test_stoppingOneServerKeepsOthersUsers(self):
        """Stopping a server (cleanly or by dying) never marks users of
        other servers offline."""
        a = await self.startCluster("a")
        b = await self.startCluster("b")
        await a.presence.claim(1, "s1", False)
        await b.presence.claim(2, "s2", False)
        await a.relay.stop()
        await a.presence.stop()
        self.assertEqual(await b.presence.locate([1, 2]), {2: Location("b", "s2")})
        self.assertEqual(await b.relay.deliver([2], {"m": 1}, True), [])


class UnreachableTests(ClusterMixin, unittest.TestCase):
    def setUp(self):
        self.setUpPrefix()

    async def test_failsPromptly(self):
        """With Redis unreachable, presence calls raise PresenceUnavailable
        and deliveries fail at once; start waits (and retries) meanwhile,
        and stop ends the retrying."""
        url = RedisURL("127.0.0.1", freePort())
        cluster = self.newCluster("a", url=url)
        started = cluster.presence.start(lambda: 0)
        await until(lambda: cluster.commands._failures >= 2, 5, what="reconnection attempts")
        self.assertFalse(started.called)
        t0 = reactor.seconds()
        for d in (
            cluster.presence.claim(1, "s", False),
            cluster.presence.release(1, "s"),
            cluster.presence.locate([1]),
            cluster.presence.servers(),
            cluster.relay.deliver([1], {}, True),
            cluster.relay.kick(Location("b", "s"), 1, "r"),
        ):
            with self.assertRaises(PresenceUnavailable):
                await d
        self.assertLess(reactor.seconds() - t0, 0.5)
        await cluster.presence.stop()
        await cluster.relay.stop()
        self.assertFalse(cluster.commands.running)
        started.addErrback(lambda f: None)

    async def test_wrongPasswordKeepsRetrying(self):
        """A failed AUTH does not turn reconnection off: the link keeps
        trying (here it never succeeds, and stop ends it)."""
        url = RedisURL(REDIS_URL.host, REDIS_URL.port, password="not-the-password")
        cluster = self.newCluster("a", url=url)
        cluster.presence.start(lambda: 0).addErrback(lambda f: None)
        await until(lambda: cluster.commands._failures >= 3, 10, what="repeated attempts")
        self.assertTrue(cluster.commands.running)
        self.flushLoggedErrors()
        await cluster.presence.stop()
        self.assertIsNone(cluster.commands.protocol)

    def test_tlsVerifiesCertificates(self):
        """rediss:// builds a TLS connection whose creator checks the
        server's certificate against the host name."""
        from twisted.internet.testing import MemoryReactorClock

        memory = MemoryReactorClock()
        cluster = RedisCluster(parseRedisURL("rediss://:pw@redis.example:6380/2"), "a", prefix="p:", reactor=memory)
        cluster.commands.start()
        [(host, port, factory, creator, timeout, bind)] = memory.sslClients
        self.assertEqual((host, port), ("redis.example", 6380))
        self.assertEqual(creator._hostnameASCII, "redis.example")
        from OpenSSL import SSL

        from twisted.protocols.tls import TLSMemoryBIOFactory

        tlsProtocol = TLSMemoryBIOFactory(creator, True, factory).buildProtocol(None)
        connection = creator.clientConnectionForTLS(tlsProtocol)
        self.assertTrue(connection.get_verify_mode() & SSL.VERIFY_PEER)
        p = factory.buildProtocol(None)
        self.assertEqual((p.password, p.dbid, p.convertNumbers), ("pw", 2, False))
        cluster.commands.stop()


class RelayPayloadTests(unittest.TestCase):
    def test_receivedDispatch(self):
        """A relayed payload is a JSON list of deliveries or a kick
        object; a malformed one is logged, never fatal."""
        receiver = RecordingReceiver({1})
        cluster = RedisCluster(REDIS_URL, "a", reactor=reactor)
        cluster.relay.receiver = receiver
        cluster.relay.received(json.dumps([[1, [1, 2], {"m": "007"}], [0, [1], {"m": 2}]]))
        self.assertEqual(receiver.delivered, [(1, {"m": "007"}), (1, {"m": 2})])
        self.assertEqual(receiver.stored, [(2, {"m": "007"})])
        cluster.relay.received(json.dumps({"kick": 1, "session": "s", "reason": "r"}))
        self.assertEqual(receiver.kicked, [(1, "s", "r")])
        cluster.relay.received("not json")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
