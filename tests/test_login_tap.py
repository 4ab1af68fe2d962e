"""
The token store as `twistd chat` builds it: in memory on a single server
(pruned hourly), in Redis with --redis; --token-ttl.
"""

from __future__ import annotations

from twisted.application.internet import TimerService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial import unittest

from chatproto.tap import Options, makeService
from chatproto.tokens import MemoryTokenStore
from chatproto.tokenstore_redis import RedisTokenStore


def chatService(top):
    return next(s for s in top if hasattr(s, "loginFlow"))


class TokenWiringTests(unittest.TestCase):
    def build(self, *extra):
        options = Options()
        options.parseOptions(["--port", "tcp:0", "--db", "sqlite::memory:", *extra])
        return makeService(options, MemoryReactorClock())

    def test_singleServerMemory(self):
        """Without --redis: a MemoryTokenStore with the default 7-day ttl,
        pruned hourly by a child service."""
        top = self.build()
        tokens = chatService(top).loginFlow.credentials.tokens
        self.assertIsInstance(tokens, MemoryTokenStore)
        self.assertEqual(tokens.ttl, 7 * 86400)
        [pruner] = [s for s in top if isinstance(s, TimerService)]
        self.assertEqual((pruner.step, pruner.call[0]), (3600, tokens.prune))

    def test_ttlOption(self):
        tokens = chatService(self.build("--token-ttl", "3600")).loginFlow.credentials.tokens
        self.assertEqual(tokens.ttl, 3600)

    def test_badTtl(self):
        for value in ("10", "nope", "inf", str(400 * 86400)):
            options = Options()
            self.assertRaises(
                usage.UsageError, options.parseOptions, ["--db", "sqlite::memory:", "--token-ttl", value]
            )

    def test_clusterRedis(self):
        """With --redis: a RedisTokenStore on the cluster's command
        connection (None while not connected), with the key prefix."""
        top = self.build("--redis", "redis://127.0.0.1:1/0", "--redis-prefix", "x:", "--advertise", "127.0.0.1:5")
        chat = chatService(top)
        tokens = chat.loginFlow.credentials.tokens
        self.assertIsInstance(tokens, RedisTokenStore)
        self.assertEqual((tokens.prefix, tokens.key(3)), ("x:", "x:tokens:3"))
        self.assertIsNone(tokens.connection())
        self.assertEqual([s for s in top if isinstance(s, TimerService)], [])


class LeanDispatchTests(unittest.TestCase):
    """The chat server dispatches through the balancer's lean epoll loop
    while it runs (and gives the reactor its own loop back when it stops);
    --no-lean-dispatch keeps the stock loop."""

    def build(self, *extra):
        options = Options()
        options.parseOptions(["--port", "tcp:0", "--db", "sqlite::memory:", *extra])
        return makeService(options, MemoryReactorClock())

    def test_installedWhileRunning(self):
        from twisted.internet import reactor

        from chatproto.tap import LeanDispatch

        [lean] = [s for s in self.build() if isinstance(s, LeanDispatch)]
        lean.reactor = reactor  # an epoll reactor (the test's)
        self.addCleanup(lambda: lean.running and lean.stopService())
        self.assertNotIn("doPoll", vars(reactor))
        lean.startService()
        self.assertTrue(lean.installed)
        self.assertIn("doPoll", vars(reactor))
        lean.stopService()
        self.assertNotIn("doPoll", vars(reactor))

    def test_otherReactorKeepsItsLoop(self):
        from chatproto.tap import LeanDispatch

        [lean] = [s for s in self.build() if isinstance(s, LeanDispatch)]
        lean.startService()
        self.assertFalse(lean.installed)
        lean.stopService()

    def test_optOut(self):
        from chatproto.tap import LeanDispatch

        self.assertEqual([s for s in self.build("--no-lean-dispatch") if isinstance(s, LeanDispatch)], [])


class BacklogTests(unittest.TestCase):
    """--backlog (default 1024) for tcp:/ssl: ports that name none: a
    reconnect storm overflows Twisted's default of 50."""

    def backlogs(self, *argv):
        from twisted.internet.protocol import Factory

        from chatproto.endpoints import serverEndpoint

        options = Options()
        options.parseOptions(["--db", "sqlite::memory:", *argv])
        reactor = MemoryReactorClock()
        for description in options["port"]:
            serverEndpoint(reactor, description, options["backlog"]).listen(Factory())
        return [port[2] for port in reactor.tcpServers]  # (port, factory, backlog, interface)

    def test_defaultAndOption(self):
        self.assertEqual(self.backlogs("--port", "tcp:0"), [1024])
        self.assertEqual(self.backlogs("--port", "tcp:0", "--backlog", "4096"), [4096])

    def test_descriptionWins(self):
        self.assertEqual(self.backlogs("--port", "tcp:0:backlog=7", "--port", "haproxy:tcp:0"), [7, 1024])

    def test_otherEndpointsUntouched(self):
        from chatproto.common.endpointstr import withBacklog

        self.assertEqual(withBacklog("unix:/tmp/s", 1024), "unix:/tmp/s")
        self.assertEqual(withBacklog("ssl:0:privateKey=k.pem", 9), "ssl:0:privateKey=k.pem:backlog=9")

    def test_badBacklog(self):
        for value in ("0", "70000", "x"):
            self.assertRaises(usage.UsageError, Options().parseOptions, ["--db", "sqlite::memory:", "--backlog", value])


class PipelineDepthOptionTests(unittest.TestCase):
    """--pipeline-depth (default 64) reaches every connection."""

    def depth(self, *argv):
        from chatproto.protocol import ChatFactory

        options = Options()
        options.parseOptions(["--port", "tcp:0", "--db", "sqlite::memory:", *argv])
        top = makeService(options, MemoryReactorClock())
        [factory] = {s.factory for s in top if isinstance(getattr(s, "factory", None), ChatFactory)}
        return factory.buildProtocol(None).pipelineDepth

    def test_defaultAndOption(self):
        self.assertEqual(self.depth(), 64)
        self.assertEqual(self.depth("--pipeline-depth", "1"), 1)

    def test_badDepth(self):
        for value in ("0", "10001", "x"):
            argv = ["--db", "sqlite::memory:", "--pipeline-depth", value]
            self.assertRaises(usage.UsageError, Options().parseOptions, argv)
