"""
The shortcut for loopback backends: L{balancer.rawconnect.connectStart}
tells a connect that the kernel completed inside the C{connect()} call,
which the factory links to the lean client at once; a L{RawConnect} (any
other connect) waits for writability.
"""

from __future__ import annotations

import errno
import socket

from twisted.internet import error
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


def freeAddress():
    """A loopback address nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    free = sock.getsockname()
    sock.close()
    return free


class LoopbackShortcutTests(SynchronousTestCase):
    def listener(self, host="127.0.0.1", family=socket.AF_INET, backlog=8):
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind((host, 0))
        sock.listen(backlog)
        return sock.getsockname()

    def start(self, addr, family=socket.AF_INET, loopback=True):
        sock, err, connected = rawconnect.connectStart(family, addr, loopback)
        if sock is not None:
            self.addCleanup(sock.close)
        return sock, err, connected

    def connect(self, attempt, addr, family=socket.AF_INET, started=None):
        raw = RawConnect(attempt, family, addr, 1.0, started)
        self.addCleanup(raw.sock.close)
        return raw

    def test_loopback_connect_done_at_once(self):
        sock, err, connected = self.start(self.listener())
        self.assertEqual((err, connected), (0, True))
        self.assertEqual(sock.getpeername()[0], "127.0.0.1")
        self.assertEqual(sock.gettimeout(), 0.0)

    def test_ipv6_loopback(self):
        if not socket.has_ipv6:
            raise self.skipTest("no IPv6")
        try:
            addr = self.listener("::1", socket.AF_INET6)
        except OSError:
            raise self.skipTest("no ::1")
        self.assertEqual(self.start(addr, socket.AF_INET6)[1:], (0, True))

    def test_only_asked_for_loopback(self):
        """
        For other addresses the connect is left to complete (no second
        C{connect()}): the caller waits for writability.
        """
        sock, err, connected = self.start(self.listener(), loopback=False)
        self.assertEqual((err, connected), (0, False))

    def test_refused_at_once(self):
        free = freeAddress()
        sock, err, connected = self.start(free)
        self.assertEqual((err, connected), (errno.ECONNREFUSED, False))

    def test_no_socket(self):
        def noSocket(family, kind):
            raise OSError(errno.EMFILE, "Too many open files")

        self.patch(rawconnect, "_newSocket", noSocket)
        self.assertEqual(self.start(("127.0.0.1", 1)), (None, errno.EMFILE, False))

    def test_connect_waits_for_writability(self):
        """
        A L{RawConnect} (a connect not done at once, or not on loopback)
        waits for writability, then hands the socket to the lean client.
        """
        attempt = _Attempt()
        started = self.start(self.listener(), loopback=False)
        raw = self.connect(attempt, self.listener(), started=started)
        self.assertIs(raw.sock, started[0])
        self.assertEqual(attempt.connects, [])
        self.assertEqual(attempt.factory.fds.writers, {raw})
        raw.doWrite()
        self.assertEqual(attempt.connects, [raw])
        self.assertEqual(raw.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    def test_twisted_path_client_waits_for_writability(self):
        attempt = _Attempt(lean=False)
        raw = self.connect(attempt, self.listener())
        self.assertEqual(attempt.connects, [])
        self.assertEqual(attempt.factory.fds.writers, {raw})
        raw.disconnect()

    def test_failed_start_reported_next_turn(self):
        """
        A connect that failed inside L{connectStart} is reported as
        C{connectTCP} reports it: on the next turn.
        """
        attempt = _Attempt()
        free = freeAddress()
        raw = self.connect(attempt, free, started=self.start(free))
        self.assertEqual((attempt.failures, attempt.factory.fds.writers), ([], set()))
        attempt.factory.reactor.advance(0)
        [reason] = attempt.failures
        self.assertTrue(reason.check(error.ConnectionRefusedError))
        self.assertEqual(raw.sock.fileno(), -1)

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

