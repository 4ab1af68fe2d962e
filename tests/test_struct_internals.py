"""
L{chatproto._twisted}: the start-up check of the private internals relied
on, and the public fallback taken when one is missing.
"""

from __future__ import annotations

import txredisapi
from twisted.enterprise import adbapi
from twisted.internet import abstract, endpoints
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.trial import unittest

from chatproto import _twisted
from chatproto.endpoints import HAProxyEndpoint


class Recorder:
    """Records log events (C{Logger(observer=...)})."""

    def __init__(self) -> None:
        self.events = []

    def __call__(self, event) -> None:
        self.events.append(event)


class CheckTests(unittest.TestCase):
    def setUp(self) -> None:
        self.addCleanup(_twisted.reset, None)
        _twisted.reset(None)
        self.logged = Recorder()
        self.patch(_twisted, "log", Logger(observer=self.logged))

    def test_allPresentNoLogLine(self) -> None:
        """With the tested versions every private path is usable and the
        check says nothing."""
        internals = _twisted.check()
        self.assertEqual(internals.fallbacks(), [])
        self.assertEqual(self.logged.events, [])

    def removeAttribute(self, obj, name: str) -> None:
        value = getattr(obj, name)
        delattr(obj, name)
        self.addCleanup(setattr, obj, name, value)

    def test_missingAttributesFallBackWithOneLogLine(self) -> None:
        """Removing private attributes turns those paths off; one log line
        names every fallback taken."""
        self.removeAttribute(endpoints, "_parse")
        original = abstract.FileDescriptor.__init__

        def withoutTempDataLen(fd, *args, **kw):
            original(fd, *args, **kw)
            del fd._tempDataLen

        self.patch(abstract.FileDescriptor, "__init__", withoutTempDataLen)
        internals = _twisted.check()
        self.assertEqual(internals.fallbacks(), ["writeThrough", "endpointArgs"])
        [event] = self.logged.events
        self.assertIn("writeThrough, endpointArgs", event["fallbacks"])

    def test_checkedOnceAtStartup(self) -> None:
        """The chat service runs the check when it starts; the fallback
        line is logged once however often the internals are used."""
        from tests.chat_helpers import Harness

        self.removeAttribute(endpoints, "_parse")
        h = Harness()
        self.assertEqual(len(self.logged.events), 1)
        self.assertFalse(_twisted.internals().endpointArgs)
        client = h.connect()
        client.send({"msgid": 21})
        self.assertEqual(client.reply()["msgid"], 22)
        _twisted.endpointArgs("tcp:1")
        self.assertEqual(len(self.logged.events), 1)

    def test_endpointArgsFallback(self) -> None:
        """Without C{endpoints._parse} endpoint strings are split on
        unescaped colons, to the same result for the usual forms."""
        self.removeAttribute(endpoints, "_parse")
        _twisted.check()
        self.assertFalse(_twisted.internals().endpointArgs)
        self.assertEqual(_twisted.endpointArgs("tcp:6000:interface=127.0.0.1"), (["6000"], {"interface": "127.0.0.1"}))
        self.assertEqual(_twisted.endpointArgs("tcp:6000:interface=\\:\\:1"), (["6000"], {"interface": "::1"}))

    def test_endpointArgsPrivate(self) -> None:
        self.assertEqual(_twisted.endpointArgs("tcp:6000:interface=\\:\\:1"), (["6000"], {"interface": "::1"}))

    def test_pendingBytesFallback(self) -> None:
        """Without C{_tempDataLen} the pending-bytes figure counts only the
        buffer Twisted is sending from (it never over-counts), and raw
        sockets are not used."""
        transport = StringTransport()
        transport._tempDataLen = 100
        transport.dataBuffer = b"x" * 50
        transport.offset = 10
        _twisted.reset(_twisted.Internals())
        self.assertEqual(_twisted.pendingBytes(transport), 140)
        _twisted.reset(_twisted.Internals(writeThrough=False))
        self.assertEqual(_twisted.pendingBytes(transport), 40)
        self.assertEqual(_twisted.pendingBytes(StringTransport()), 0)

    def test_writeThroughWithoutSocketUsesWrite(self) -> None:
        transport = StringTransport()
        _twisted.writeThrough(transport, None, b"hello")
        self.assertEqual(transport.value(), b"hello")

    def test_adbapiFallback(self) -> None:
        """Without adbapi's private connection attributes the MySQL pool
        keeps the stock (reconnecting) wrapper, and the store never re-runs
        a transaction marked not retryable after a connection error."""
        from chatproto.mysqlstore import MySQLStore, mysqlPool

        def init(connection, pool):
            connection._connection = pool.connect()

        self.patch(adbapi.Connection, "__init__", init)
        self.assertFalse(_twisted.check().adbapi)
        pool = mysqlPool({"host": "127.0.0.1"}, MemoryReactorClock())
        self.assertIs(pool.connectionFactory, adbapi.Connection)
        self.assertTrue(pool.reconnect)
        self.assertFalse(MySQLStore(pool, MemoryReactorClock()).commitFailuresKnown)

    def test_adbapiPrivate(self) -> None:
        from chatproto.mysqlstore import MySQLStore, mysqlPool

        pool = mysqlPool({"host": "127.0.0.1"}, MemoryReactorClock())
        self.assertTrue(issubclass(pool.connectionFactory, adbapi.Connection))
        self.assertIsNot(pool.connectionFactory, adbapi.Connection)
        self.assertFalse(pool.reconnect)
        self.assertTrue(MySQLStore(pool, MemoryReactorClock()).commitFailuresKnown)

    def test_redisReadyFallback(self) -> None:
        """Without txredisapi's C{_ready}, a protocol is ready when it is
        connected and not closing (a failed AUTH closes it)."""
        original = txredisapi.RedisProtocol.__init__

        def init(p, *args, **kw):
            original(p, *args, **kw)
            del p._ready

        self.patch(txredisapi.RedisProtocol, "__init__", init)
        self.assertFalse(_twisted.check().redisReady)

        class P:
            connected = 1
            transport = StringTransport()

        p = P()
        self.assertTrue(_twisted.redisReady(p))
        p.transport.loseConnection()
        self.assertFalse(_twisted.redisReady(p))

    def test_packCommandPrivate(self) -> None:
        """Commands on the cluster's command connection are encoded by
        hiredis, byte for byte as txredisapi encodes them."""
        from chatproto.redislink import CommandProtocol

        self.assertTrue(_twisted.check().packCommand)
        args = ("EVALSHA", "abc", 3, "\u00e9", b"\x00\xff", -1)
        self.assertEqual(CommandProtocol()._build_command(*args), txredisapi.RedisProtocol()._build_command(*args))
        self.assertIsNot(_twisted.packedCommands(txredisapi.RedisProtocol), txredisapi.RedisProtocol)

    def test_packCommandFallback(self) -> None:
        """Without txredisapi's C{_build_command}, or when hiredis encodes
        differently, txredisapi's own encoding stays."""
        import hiredis

        self.patch(hiredis, "pack_command", lambda args: b"different")
        self.assertFalse(_twisted.check().packCommand)
        _twisted.reset(_twisted.Internals(packCommand=False))
        self.assertIs(_twisted.packedCommands(txredisapi.RedisProtocol), txredisapi.RedisProtocol)

    def test_haproxyFallback(self) -> None:
        """Without Twisted's private PROXY wrapper, C{haproxy:} listens
        through the stock, public C{proxyEndpoint}."""
        _twisted.reset(_twisted.Internals(haproxy=False))
        reactor = MemoryReactorClock()
        endpoint = HAProxyEndpoint(endpoints.TCP4ServerEndpoint(reactor, 0))
        calls = []
        self.patch(_twisted, "haproxyEndpoint", lambda wrapped: calls.append(wrapped) or wrapped)
        endpoint.listen(object())
        self.assertEqual(calls, [endpoint.wrapped])

    def test_haproxyPrivate(self) -> None:
        """With it, the listener gets the half-close-aware wrapper."""
        from twisted.internet.interfaces import IHalfCloseableProtocol

        reactor = MemoryReactorClock()
        endpoint = HAProxyEndpoint(endpoints.TCP4ServerEndpoint(reactor, 0))
        endpoint.listen(object())
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertTrue(IHalfCloseableProtocol.implementedBy(factory.protocol))
