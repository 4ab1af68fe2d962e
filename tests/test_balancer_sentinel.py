"""
The balancer's discovery through Redis Sentinel (C{--redis
redis+sentinel://h1:26379,h2:26379/mymaster}).

The logic on a L{MemoryReactorClock} with a fake master look-up and fake
connections: look-up before each connection, the ROLE check on connecting
and at every poll, the connection dropped (and the master looked up anew)
on connection loss, on a demoted master and after repeated failures, a
connection that arrives after its poll gave up is closed.

Then for real: a private master, replica and three sentinels; discovery
finds the chat registry entries, the master is killed (SIGKILL, by pid),
the replica promoted, and discovery reads the registry on the new master.
"""

from __future__ import annotations

import txredisapi
from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from balancer.config import buildConfig
from balancer.discovery import RedisDiscovery
from chatproto.common.sentinel import roleOf
from chatproto.common.sentinel import MasterNotFound
from tests.cluster_helpers import SentinelGroup, SyncRedis, until

URL = "redis+sentinel://u:topsecret@127.0.0.1:26379,127.0.0.1:26380/mymaster/2"


class FakeConn:
    """A connection to one fake server: its role, its registry."""

    def __init__(self, address, role="master", servers=None):
        self.address = address
        self.role = role
        self.servers = servers if servers is not None else {"chat-a": ("127.0.0.1", "6000")}
        self.disconnected = False
        self.hang = False
        self.commands = []

    def execute_command(self, *args):
        self.commands.append(args)
        if self.disconnected:
            return defer.fail(txredisapi.ConnectionError("Not connected"))
        if self.hang:
            return defer.Deferred()
        return defer.succeed([self.role.encode(), 0, []])

    def smembers(self, key):
        self.commands.append(("SMEMBERS", key))
        if self.disconnected:
            return defer.fail(txredisapi.ConnectionError("Not connected"))
        return defer.succeed(set(self.servers))

    def pipeline(self):
        conn = self

        class Pipe:
            keys = []

            def hgetall(self, key):
                self.keys.append(key)

            def execute_pipeline(self):
                out = []
                for key in self.keys:
                    name = key.rsplit(":", 1)[1]
                    host, port = conn.servers[name]
                    out.append({"name": name, "host": host, "port": port, "weight": "1", "logins": "0", "updated": "0"})
                return defer.succeed(out)

        return defer.succeed(Pipe())

    def disconnect(self):
        self.disconnected = True
        return defer.succeed(None)


class SentinelDiscoveryLogicTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.seen = []
        self.d = RedisDiscovery(self.clock, URL, "p:", 1.0, lambda specs, logins: self.seen.append(specs))
        self.masters = [("127.0.0.1", 7001)]  # what the sentinels answer, in turn
        self.lookups = 0
        self.conns = []
        self.pending = None  # set to a Deferred to make connecting hang

        def findMaster():
            self.lookups += 1
            if not self.masters:
                return defer.fail(MasterNotFound("127.0.0.1:26379: no master named 'mymaster'"))
            return defer.succeed(self.masters[0])

        def connectMaster(host, port):
            if self.pending is not None:
                return self.pending
            conn = FakeConn((host, port), role=self.roles.get(port, "master"))
            self.conns.append(conn)
            return defer.succeed(conn)

        self.roles = {}
        self.d.findMaster = findMaster
        self.d.connectMaster = connectMaster
        self.d.running = True  # as started, without the LoopingCall

    def poll(self):
        self.successResultOf(self.d._pollLogged())

    def test_accepted_and_redacted(self):
        self.assertTrue(self.d.sentinel)
        self.assertEqual(self.d.redactedURL, "redis+sentinel://u:***@127.0.0.1:26379,127.0.0.1:26380/mymaster/2")
        # and through the balancer's own configuration
        self.assertEqual(buildConfig({"redis": URL}).redis, URL)

    def test_start_makes_no_connection_before_the_lookup(self):
        self.d.running = False
        self.d.startService()
        self.addCleanup(self.d.stopService)
        self.assertEqual(self.lookups, 1)  # the first poll runs at once
        self.assertEqual([c.address for c in self.conns], [("127.0.0.1", 7001)])
        self.assertEqual(self.clock.tcpClients, [])  # no lazy connection to the sentinel's address

    def test_lookup_connect_role_read(self):
        self.poll()
        self.assertEqual(self.lookups, 1)
        self.assertEqual(self.d.master, ("127.0.0.1", 7001))
        self.assertEqual([s.address for s in self.seen[-1]], ["127.0.0.1:6000"])
        self.assertEqual(self.conns[0].commands[0], ("ROLE",))
        # the next poll reuses the connection, checking ROLE again first
        self.poll()
        self.assertEqual((self.lookups, len(self.conns), self.d.polls, self.d.errors), (1, 1, 2, 0))
        self.assertEqual([c[0] for c in self.conns[0].commands], ["ROLE", "SMEMBERS", "ROLE", "SMEMBERS"])

    def test_replica_refused(self):
        """A sentinel that names a replica: refused, dropped, asked again."""
        self.roles[7001] = "slave"
        self.poll()
        self.assertEqual((self.d.polls, self.d.errors), (0, 1))
        self.assertIn("127.0.0.1:7001 is a slave, not the master 'mymaster'", self.d.lastError)
        self.assertTrue(self.conns[0].disconnected)
        self.assertIsNone(self.d.conn)
        self.assertEqual(self.seen, [])
        self.masters[0] = ("127.0.0.1", 7002)
        self.poll()
        self.assertEqual(self.lookups, 2)
        self.assertEqual(self.d.master, ("127.0.0.1", 7002))
        self.assertEqual(len(self.seen), 1)

    def test_demoted_master_left_at_once(self):
        """The master in use turns replica: the next poll fails, the one
        after asks the sentinels and moves to the new master."""
        self.poll()
        self.conns[0].role = "slave"
        self.masters[0] = ("127.0.0.1", 7002)
        self.poll()
        self.assertEqual((self.d.errors, self.d.polls), (1, 1))
        self.assertIsInstance(self.d.lastError, str)
        self.assertTrue(self.conns[0].disconnected)
        self.poll()
        self.assertEqual((self.lookups, self.d.master, self.d.consecutiveErrors), (2, ("127.0.0.1", 7002), 0))

    def test_connection_loss_resolves_again(self):
        self.poll()
        self.conns[0].disconnected = True  # the master died
        self.masters[0] = ("127.0.0.1", 7002)
        self.poll()
        self.assertEqual(self.d.consecutiveErrors, 1)
        self.assertIsNone(self.d.conn)
        self.poll()
        self.assertEqual((self.lookups, self.d.master, len(self.seen)), (2, ("127.0.0.1", 7002), 2))

    def test_no_master_counted_and_retried(self):
        self.masters.clear()
        for _ in range(4):
            self.poll()
        self.assertEqual((self.d.errors, self.d.polls, self.lookups), (4, 0, 4))
        self.assertIn("no master named 'mymaster'", self.d.lastError)
        self.masters.append(("127.0.0.1", 7003))
        self.poll()
        self.assertEqual((self.d.consecutiveErrors, self.d.master), (0, ("127.0.0.1", 7003)))

    def test_hung_role_drops_after_repeated_failures(self):
        """A master that stops answering (no connection error): every poll
        times out; after RECONNECT_AFTER of them the connection is dropped
        and the sentinels asked again."""
        self.poll()
        self.conns[0].hang = True
        for _ in range(2):
            polled = self.d._pollLogged()
            self.clock.advance(self.d.pollTimeout())
            self.successResultOf(polled)
        self.assertIs(self.d.conn, self.conns[0])
        polled = self.d._pollLogged()
        self.clock.advance(self.d.pollTimeout())
        self.successResultOf(polled)
        self.assertIsNone(self.d.conn)
        self.assertTrue(self.conns[0].disconnected)
        self.poll()
        self.assertEqual((self.lookups, len(self.conns)), (2, 2))

    def test_late_connection_is_closed(self):
        """A connection that completes after its poll timed out is closed,
        not kept (nor leaked)."""
        self.pending = defer.Deferred()
        polled = self.d._pollLogged()
        self.clock.advance(self.d.pollTimeout())
        self.successResultOf(polled)
        self.assertEqual(self.d.errors, 1)
        late = FakeConn(("127.0.0.1", 7001))
        self.pending.callback(late)
        self.assertTrue(late.disconnected)
        self.assertIsNone(self.d.conn)

    def test_stopped_while_connecting(self):
        """The service stops while a connection is being made: when it
        arrives it is closed and not kept."""
        self.pending = defer.Deferred()
        polled = self.d._pollLogged()
        self.d.running = False
        late = FakeConn(("127.0.0.1", 7001))
        self.pending.callback(late)
        self.successResultOf(polled)
        self.assertTrue(late.disconnected)
        self.assertIsNone(self.d.conn)
        self.assertEqual(self.seen, [])

    def test_roleOf(self):
        self.assertEqual(roleOf([b"master", 1, []]), "master")
        self.assertEqual(roleOf(["slave", "h", 1]), "slave")
        self.assertEqual(roleOf(b"sentinel"), "sentinel")


class SentinelDiscoveryFailoverTests(TestCase):
    """Real processes: master, replica, three sentinels (stopped by pid)."""

    timeout = 180

    async def setUp(self):
        self.group = SentinelGroup()
        self.addCleanup(self.group.cleanup)
        await self.group.start()

    def register(self, port, name, chatPort):
        r = SyncRedis(port=port)
        try:
            r("SADD", "p:servers", name)
            r("HSET", f"p:server:{name}", "name", name, "host", "127.0.0.1", "port", str(chatPort),
              "weight", "1", "logins", "0", "updated", "0")
            return r("WAIT", "1", "2000")  # on the replica too before the kill
        finally:
            r.close()

    async def test_master_killed(self):
        self.assertEqual(self.register(self.group.master.port, "chat-a", 6000), 1)
        seen = []
        d = RedisDiscovery(reactor, self.group.url, "p:", 0.2, lambda specs, logins: seen.append(specs))
        d.startService()
        self.addCleanup(d.stopService)

        def names():
            return seen and sorted(s.name for s in seen[-1])

        await until(lambda: names() == ["chat-a"], 20, 0.05, what="discovery through the sentinels")
        self.assertEqual(d.master, ("127.0.0.1", self.group.master.port))

        self.group.master.kill()
        await until(lambda: self.group.currentMaster() == self.group.replica.port, 60, 0.1, what="the failover")
        # a chat server that registers on the new master is found there
        r = SyncRedis(port=self.group.replica.port)
        try:
            r("SADD", "p:servers", "chat-b")
            r("HSET", "p:server:chat-b", "name", "chat-b", "host", "127.0.0.1", "port", "6001",
              "weight", "1", "logins", "0", "updated", "0")
        finally:
            r.close()
        await until(lambda: names() == ["chat-a", "chat-b"], 30, 0.05, what="discovery on the new master")
        self.assertEqual(d.master, ("127.0.0.1", self.group.replica.port))
        self.assertGreaterEqual(d.errors, 1)  # the dead master was noticed, counted
        self.assertEqual(d.consecutiveErrors, 0)
        self.assertEqual(sorted(s.address for s in seen[-1]), ["127.0.0.1:6000", "127.0.0.1:6001"])
