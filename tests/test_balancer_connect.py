"""
L{balancer.rawconnect.RawConnect}'s shortcut for loopback backends: a
connect that the kernel completed inside the C{connect()} call is handed to
the lean client at once, without waiting for writability.
"""

from __future__ import annotations

import socket

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from balancer import rawconnect
from balancer.rawconnect import ConnectDeadlines, RawConnect


class _FDs(Clock):
    def __init__(self):
        super().__init__()
        self.writers = set()

    def addWriter(self, writer):
        self.writers.add(writer)

    def removeWriter(self, writer):
        self.writers.discard(writer)


class _Attempt:
    def __init__(self, lean=True):
        fds = _FDs()

        class Factory:
            reactor = fds
            deadlines = ConnectDeadlines(fds)

        Factory.fds = fds

        class Client:
            pass

        self.factory = Factory()
        self.client = Client()
        self.client.lean = lean
        self.connects = []
        self.failures = []

    def connected(self, connect):
        self.connects.append(connect)

    def clientConnectionFailed(self, connector, reason):
        self.failures.append(reason)


class LoopbackShortcutTests(SynchronousTestCase):
    def listener(self, host="127.0.0.1", family=socket.AF_INET):
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind((host, 0))
        sock.listen(8)
        return sock.getsockname()

    def connect(self, attempt, addr, family=socket.AF_INET):
        raw = RawConnect(attempt, family, addr, 1.0)
        self.addCleanup(raw.sock.close)
        return raw

    def test_loopback_connect_handed_over_at_once(self):
        attempt = _Attempt()
        raw = self.connect(attempt, self.listener())
        self.assertEqual(attempt.connects, [raw])
        self.assertIsNone(raw.attempt)
        self.assertEqual(attempt.factory.fds.writers, set())
        self.assertEqual(list(attempt.factory.deadlines.queue), [])
        self.assertEqual(raw.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    def test_ipv6_loopback(self):
        if not socket.has_ipv6:
            raise self.skipTest("no IPv6")
        try:
            addr = self.listener("::1", socket.AF_INET6)
        except OSError:
            raise self.skipTest("no ::1")
        attempt = _Attempt()
        raw = self.connect(attempt, addr, socket.AF_INET6)
        self.assertEqual(attempt.connects, [raw])

    def test_not_connected_yet_waits_for_writability(self):
        """
        When the handshake is not done (a full accept queue, a remote
        backend), the connect waits for writability as before.
        """
        self.patch(rawconnect, "connectedNow", lambda sock: False)
        attempt = _Attempt()
        raw = self.connect(attempt, self.listener())
        self.assertEqual(attempt.connects, [])
        self.assertEqual(attempt.factory.fds.writers, {raw})
        raw.doWrite()
        self.assertEqual(attempt.connects, [raw])

    def test_twisted_path_client_waits_for_writability(self):
        attempt = _Attempt(lean=False)
        raw = self.connect(attempt, self.listener())
        self.assertEqual(attempt.connects, [])
        self.assertEqual(attempt.factory.fds.writers, {raw})
        raw.disconnect()

    def test_only_loopback_addresses_are_tried(self):
        self.assertTrue(rawconnect.isLoopback("127.0.0.1"))
        self.assertTrue(rawconnect.isLoopback("127.1.2.3"))
        self.assertTrue(rawconnect.isLoopback("::1"))
        self.assertFalse(rawconnect.isLoopback("10.0.0.1"))
        self.assertFalse(rawconnect.isLoopback("fe80::1%eth0"))

    def test_loopback_cache_is_bounded(self):
        """Backends come and go with discovery: the cache of addresses
        keeps at most 4,096."""
        for i in range(5000):
            rawconnect.isLoopback(f"10.{i >> 8}.{i & 255}.1")
        self.assertEqual(rawconnect.isLoopback.cache_info().currsize, 4096)

    def test_connected_now(self):
        addr = self.listener()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.addCleanup(sock.close)
        self.assertFalse(rawconnect.connectedNow(sock))
        sock.connect_ex(addr)
        self.assertTrue(rawconnect.connectedNow(sock))
