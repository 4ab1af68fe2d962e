"""
Failures of the parts of a cluster, with real processes stopped by pid: a
private redis-server killed and restarted, a `twistd chat` process killed
with SIGKILL, a private mariadbd killed and restarted.
"""

from __future__ import annotations

import json
import os
import signal

from twisted.internet import reactor
from twisted.trial import unittest

from chatproto import messages as m
from chatproto.tap import Options, makeService
from tests.chat_helpers import TCPClientsMixin, listeningPorts
from tests.cluster_helpers import (
    REDIS_URL,
    MariaDBServer,
    RedisServer,
    SyncRedis,
    canConnect,
    clusterChatArgs,
    deleteRedisPrefix,
    dropDatabase,
    freePort,
    mysqlURL,
    twistdChat,
    uniqueName,
    uniquePrefix,
    until,
    useFreshCluster,
)


class FaultTestCase(TCPClientsMixin, unittest.TestCase):
    """Helpers to run chat servers in this process with short timers."""

    async def startServer(self, name, db, redisURL, prefix, extra=()):
        options = Options()
        options.parseOptions(clusterChatArgs(freePort(), name, db, redisURL, prefix) + list(extra))
        top = makeService(options, reactor)
        chat = next(s for s in top if hasattr(s, "whenReady"))
        cluster = chat.presence.cluster
        # Shorter timers than production so the test is quick.
        cluster.ttl, cluster.refreshInterval, cluster.pingInterval = 2.0, 0.3, 0.3
        cluster.commands.maxDelay = cluster.subscriber.maxDelay = 0.3
        top.startService()
        self.addCleanup(top.stopService)
        [port] = await listeningPorts(top)
        await chat.whenReady()
        return top, chat, port.getHost().port

    def connect(self, port):
        return self.connectTo(port)

    def register(self, port, name):
        return self.registerAt(port, name)

    def login(self, port, uid, name):
        return self.loginAt(port, uid, name)


class RedisRestartTests(FaultTestCase):
    async def setUp(self):
        self.redisServer = RedisServer()
        self.addCleanup(self.redisServer.cleanup)
        await self.redisServer.start()
        self.database = uniqueName("db")
        self.addCleanup(dropDatabase, self.database)
        self.prefix = "chat:"

    def redis(self, *args):
        r = SyncRedis(port=self.redisServer.port)
        try:
            return r(*args)
        finally:
            r.close()

    async def test_relayRecoversAndNothingIsLost(self):
        """Redis killed and restarted empty: meanwhile messages are stored
        offline (none lost); afterwards both servers register again,
        re-assert their users, resubscribe, and relay as before."""
        db = mysqlURL(self.database)
        _, chat1, port1 = await self.startServer("chat1", db, self.redisServer.url, self.prefix)
        _, chat2, port2 = await self.startServer("chat2", db, self.redisServer.url, self.prefix)
        a, b = await self.register(port1, "alice"), await self.register(port2, "bob")
        alice, _ = await self.login(port1, a, "alice")
        bob, _ = await self.login(port2, b, "bob")
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "before"})
        self.assertEqual(ack["state"], "delivered")
        self.assertEqual((await bob.nextOf(m.ONE_CHAT_MSG))["msg"], "before")

        self.redisServer.kill()
        await until(lambda: chat1.presence.cluster.commands.protocol is None, 5, what="chat1 to notice")
        during = []
        for i in range(5):
            ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": f"during{i}"})
            during.append(ack["state"])
        self.assertEqual(during, ["stored"] * 5)
        # Logins still work (checked locally) while Redis is away.
        c = await self.register(port2, "carol")
        carol, _ = await self.login(port2, c, "carol")

        await self.redisServer.start()

        def recovered():
            return (
                self.redis("EXISTS", "chat:server:chat1", "chat:server:chat2") == 2
                and self.redis("GET", f"chat:user:{a}") is not None
                and self.redis("GET", f"chat:user:{b}") is not None
                and self.redis("GET", f"chat:user:{c}") is not None
                and chat1.relay.subscribed
                and chat2.relay.subscribed
            )

        await until(recovered, 10, what="re-registration, re-assertion and resubscription")
        self.assertEqual(self.redis("GET", f"chat:user:{a}").split("\t")[0], "chat1")
        self.assertEqual(self.redis("GET", f"chat:user:{c}").split("\t")[0], "chat2")
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "after"})
        self.assertEqual(ack["state"], "delivered")
        self.assertEqual((await bob.nextOf(m.ONE_CHAT_MSG))["msg"], "after")
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": c, "msg": "to carol"})
        self.assertEqual(ack["state"], "delivered")
        self.assertEqual((await carol.nextOf(m.ONE_CHAT_MSG))["msg"], "to carol")

        # What was stored during the outage is handed over at the next login.
        bob.transport.loseConnection()
        await bob.closed
        await until(lambda: self.redis("GET", f"chat:user:{b}") is None, 5)
        bob, login = await self.login(port1, b, "bob")
        self.assertEqual([json.loads(p)["msg"] for p in login["offlinemsg"]], [f"during{i}" for i in range(5)])


class RedisFrozenTests(unittest.TestCase):
    async def setUp(self):
        self.redisServer = RedisServer()
        self.addCleanup(self.redisServer.cleanup)
        await self.redisServer.start()

    async def test_halfOpenConnectionDetected(self):
        """Redis stopped (SIGSTOP: connections stay open, nothing answers):
        calls fail within the reply timeout instead of hanging, the dead
        connections are replaced, and all works again after SIGCONT."""
        from chatproto.config import parseRedisURL
        from chatproto.interfaces import Location, PresenceUnavailable
        from chatproto.redispresence import RedisCluster
        from tests.contract_presence import RecordingReceiver

        clusters = []
        for name in ("a", "b"):
            cluster = RedisCluster(
                parseRedisURL(self.redisServer.url), name, reactor=reactor,
                ttl=5, refreshInterval=0.2, pingInterval=0.2, replyTimeout=0.5,
            )  # fmt: skip
            cluster.commands.maxDelay = cluster.subscriber.maxDelay = 0.2
            self.addCleanup(cluster.presence.stop)
            self.addCleanup(cluster.relay.stop)
            await cluster.presence.start(lambda: 0)
            await cluster.relay.start(RecordingReceiver({1}))
            clusters.append(cluster)
        a, b = clusters
        await b.presence.claim(1, "s1", False)
        subscriber = b.subscriber.protocol

        self.redisServer.process.signal(signal.SIGSTOP)
        t0 = reactor.seconds()
        with self.assertRaises(PresenceUnavailable):
            await a.presence.claim(2, "s2", False)
        self.assertLess(reactor.seconds() - t0, 2)
        # The pings find the subscriber connection dead too.
        await until(lambda: b.subscriber.protocol is not subscriber, 5, what="the subscriber to be replaced")

        self.redisServer.process.signal(signal.SIGCONT)
        await until(lambda: b.relay.subscribed and a.commands.protocol is not None, 10, what="recovery")
        self.assertEqual((await a.presence.claim(2, "s2", False)).won, True)
        self.assertEqual(await a.presence.locate([1, 2]), {1: Location("b", "s1"), 2: Location("a", "s2")})
        self.assertEqual(await a.relay.deliver([1], {"m": 1}, True), [])


class ServerKilledTests(FaultTestCase):
    async def setUp(self):
        useFreshCluster(self)

    async def test_killedServersUsersGoOffline(self):
        """chat2 (a twistd process) is killed with SIGKILL: its users count
        as offline within the registry TTL, without anybody cleaning up,
        and chat1's users are unaffected."""
        redisURL = REDIS_URL
        db = mysqlURL(self.database)
        _, chat1, port1 = await self.startServer("chat1", db, redisURL, self.prefix)
        port2 = freePort()
        directory = self.mktemp()
        os.makedirs(directory)
        process = twistdChat(
            clusterChatArgs(port2, "chat2", db, redisURL, self.prefix), os.path.join(directory, "chat2.log")
        )
        self.addCleanup(process.kill)
        await until(
            lambda: (not process.alive() and self.fail(process.output()))
            or self.redis("EXISTS", f"{self.prefix}server:chat2"),
            30,
            what="the twistd chat2 to register",
        )
        await until(lambda: canConnect("127.0.0.1", port2), 10)
        a = await self.register(port1, "alice")
        b = await self.register(port2, "bob")
        c = await self.register(port1, "carol")
        alice, _ = await self.login(port1, a, "alice")
        carol, _ = await self.login(port1, c, "carol")
        bob, _ = await self.login(port2, b, "bob")
        self.assertEqual((await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": b}))["friend"]["state"], "online")
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "hi bob"})
        self.assertEqual(ack["state"], "delivered")
        self.assertEqual((await bob.nextOf(m.ONE_CHAT_MSG))["msg"], "hi bob")

        process.kill()
        killedAt = reactor.seconds()
        await until(
            lambda: self.redis("EXISTS", f"{self.prefix}server:chat2") == 0, 10, what="chat2's entry to expire"
        )
        self.assertLess(reactor.seconds() - killedAt, 6.0 + 1.5)
        self.assertEqual([s.name for s in await chat1.presence.servers()], ["chat1"])
        friends = await alice.request({"msgid": m.FRIEND_LIST_MSG})
        self.assertEqual(friends["friends"][0]["state"], "offline")
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "are you there"})
        self.assertEqual(ack["state"], "stored")
        # chat1's users were never touched.
        self.assertEqual(self.redis("GET", f"{self.prefix}user:{a}").split("\t")[0], "chat1")
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": c, "msg": "hi carol"})
        self.assertEqual(ack["state"], "delivered")
        self.assertEqual((await carol.nextOf(m.ONE_CHAT_MSG))["msg"], "hi carol")
        # bob can log in again at once, elsewhere, and gets what was stored.
        bob, login = await self.login(port1, b, "bob")
        self.assertEqual([json.loads(p)["msg"] for p in login["offlinemsg"]], ["are you there"])


class MySQLRestartTests(FaultTestCase):
    async def setUp(self):
        self.mariadb = MariaDBServer()
        self.addCleanup(self.mariadb.cleanup)
        await self.mariadb.start()
        self.prefix = uniquePrefix()
        self.addCleanup(deleteRedisPrefix, self.prefix)

    async def test_storeSurvivesDatabaseRestart(self):
        """mariadbd killed: requests that need the database get an error
        reply (errno 30) within the retry time, no hang; after a restart
        the same chat server works again by itself, with its data."""
        redisURL = REDIS_URL
        _, chat, port = await self.startServer("chat1", self.mariadb.url("chat"), redisURL, self.prefix)
        chat.store.retryFor = 1.0
        a, b = await self.register(port, "alice"), await self.register(port, "bob")
        alice, _ = await self.login(port, a, "alice")
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "kept"})
        self.assertEqual(ack["state"], "stored")

        self.mariadb.kill()
        t0 = reactor.seconds()
        client = await self.connect(port)
        reply = await client.request({"msgid": m.REG_MSG, "name": "carol", "password": "pw-carol"})
        self.assertEqual(reply["errno"], m.E_UNAVAILABLE, reply)
        self.assertLess(reactor.seconds() - t0, 4)
        reply = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "lost?"})
        self.assertEqual(reply["errno"], m.E_UNAVAILABLE, reply)

        await self.mariadb.start()
        reply = await client.request({"msgid": m.REG_MSG, "name": "carol", "password": "pw-carol"})
        self.assertEqual(reply["errno"], 0, reply)
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "after"})
        self.assertEqual(ack["state"], "stored")
        bob, login = await self.login(port, b, "bob")
        self.assertEqual([json.loads(p)["msg"] for p in login["offlinemsg"]], ["kept", "after"])

    async def test_restartDuringTraffic(self):
        """A restart while requests are in flight: each gets either its
        answer or errno 30, never silence; afterwards all work."""
        redisURL = REDIS_URL
        _, chat, port = await self.startServer("chat1", self.mariadb.url("chat"), redisURL, self.prefix)
        chat.store.retryFor = 3.0
        a = await self.register(port, "alice")
        alice, _ = await self.login(port, a, "alice")
        for i in range(20):
            alice.send({"msgid": m.FRIEND_LIST_MSG})
        self.mariadb.kill()
        restarted = self.mariadb.start()
        replies = [await alice.next(10) for _ in range(20)]
        await restarted
        # Each is the answer (errno 0) or "unavailable" (errno 30); an
        # internal error (31) also carries the ack's msgid, so look at errno.
        self.assertEqual([r["msgid"] for r in replies], [m.FRIEND_LIST_MSG_ACK] * 20)
        self.assertEqual([r for r in replies if r.get("errno") not in (m.OK, m.E_UNAVAILABLE)], [])
        self.assertEqual((await alice.request({"msgid": m.FRIEND_LIST_MSG}))["msgid"], m.FRIEND_LIST_MSG_ACK)

