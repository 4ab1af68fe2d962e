"""
Unit tests of the data paths, with in-memory transports and socket pairs.
"""

from ipaddress import ip_address

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.trial.unittest import SynchronousTestCase

from balancer.earlydata import HOLD_LIMIT
from balancer.proxyheader import proxyHeader
from balancer.sides import BackendSide, ServerSide, _Side


class HeaderTests(SynchronousTestCase):
    def test_v1_tcp4(self):
        h = proxyHeader("v1", IPv4Address("TCP", "10.1.2.3", 5555),
                         IPv4Address("TCP", "127.0.0.1", 8000))
        self.assertEqual(h, b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 8000\r\n")
        info = V1Parser.parse(h.rstrip(b"\r\n"))
        self.assertEqual((info.source.host, info.source.port), ("10.1.2.3", 5555))

    def test_v1_tcp6(self):
        h = proxyHeader("v1", IPv6Address("TCP", "::1", 5555),
                         IPv6Address("TCP", "::1", 8000))
        self.assertEqual(h, b"PROXY TCP6 ::1 ::1 5555 8000\r\n")

    def test_v2_parses(self):
        h = proxyHeader("v2", IPv4Address("TCP", "192.0.2.7", 40000),
                         IPv4Address("TCP", "127.0.0.1", 8000))
        info = V2Parser.parse(h)
        self.assertEqual((info.source.host, info.source.port), ("192.0.2.7", 40000))
        self.assertEqual(ip_address(info.destination.host), ip_address("127.0.0.1"))

    def test_v2_local_without_addresses(self):
        h = proxyHeader("v2", None, None)
        self.assertEqual(len(h), 16)
        self.assertEqual(h[12], 0x20)


class HalfCloseTransport(StringTransport):
    writeClosed = False

    def loseWriteConnection(self):
        self.writeClosed = True


class ForwardTests(SynchronousTestCase):
    def pair(self):
        a, b = _Side(), _Side()
        ta, tb = HalfCloseTransport(), HalfCloseTransport()
        a.makeConnection(ta)
        b.makeConnection(tb)
        a.link(b)
        b.link(a)
        return a, b, ta, tb

    def test_forwards_both_ways(self):
        a, b, ta, tb = self.pair()
        a.dataReceived(b"to-b")
        b.dataReceived(b"to-a")
        self.assertEqual(tb.value(), b"to-b")
        self.assertEqual(ta.value(), b"to-a")
        self.assertEqual((a.rx, b.rx), (1, 1))

    def test_half_close_propagates(self):
        """
        An EOF from one side shuts the other's writing only; once the other
        direction ends too, both transports are closed (after flushing).
        """
        a, b, ta, tb = self.pair()
        a.readConnectionLost()
        self.assertTrue(a.eof)
        self.assertTrue(tb.writeClosed)
        self.assertFalse(tb.disconnecting)
        self.assertFalse(ta.disconnecting)
        b.dataReceived(b"reply after the client's EOF")
        self.assertEqual(ta.value(), b"reply after the client's EOF")
        b.readConnectionLost()
        self.assertFalse(ta.writeClosed)  # closed, not half-closed: last direction
        self.assertTrue(ta.disconnecting)
        self.assertTrue(tb.disconnecting)

    def test_connection_lost_closes_other(self):
        a, b, ta, tb = self.pair()
        tb.registerProducer(ta, True)
        a.connectionLost(None)
        self.assertIsNone(tb.producer)
        self.assertTrue(tb.disconnecting)
        self.assertIsNone(b.other)

    def test_backend_side_reports_connect(self):
        seen = []

        class FakeAttempt:
            peer = None

            def connected(self, backend):
                seen.append(backend)

        side = BackendSide(FakeAttempt())
        side.makeConnection(StringTransport())
        self.assertEqual(seen, [side])
        self.assertIsNone(side.attempt)

    def test_server_holds_early_data(self):
        """
        Data that arrives before the backend is connected is held; the
        client is paused only once more than HOLD_LIMIT bytes are held.
        """
        s = ServerSide()
        t = StringTransport()
        s.transport = t
        s.dataReceived(b"early")
        s.dataReceived(b"-data")
        self.assertEqual(s.held.chunks, [b"early", b"-data"])
        self.assertEqual(t.producerState, "producing")
        s.dataReceived(b"x" * HOLD_LIMIT)
        self.assertEqual(t.producerState, "paused")


class FastPollTests(SynchronousTestCase):
    def test_dispatches_events(self):
        import socket

        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.epollreactor import EPollReactor
        from twisted.internet.selectreactor import SelectReactor

        from balancer import fastpoll

        self.assertFalse(fastpoll.install(SelectReactor()))
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.assertTrue(fastpoll.install(reactor))
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        got = []

        class Reader(FileDescriptor):
            def fileno(self):
                return a.fileno()

            def doRead(self):
                got.append(a.recv(100))

        reader = Reader(reactor)
        reactor.addReader(reader)
        b.send(b"ping")
        reactor.doIteration(0.5)
        self.assertEqual(got, [b"ping"])
        reactor.removeReader(reader)


class RawConnectUnitTests(SynchronousTestCase):
    def _attempt(self):
        from twisted.internet.task import Clock

        class FDClock(Clock):
            def addWriter(self, writer):
                pass

            def removeWriter(self, writer):
                pass

        from balancer.rawconnect import ConnectDeadlines

        class FakeFactory:
            reactor = FDClock()
            fds = reactor
            deadlines = ConnectDeadlines(reactor)

        class FakeAttempt:
            factory = FakeFactory()

            def __init__(self):
                self.failures = []

            def clientConnectionFailed(self, connector, reason):
                self.failures.append(reason)

        return FakeAttempt()

    def test_socket_failure_reported_on_next_turn(self):
        """
        When no socket can be made (EMFILE), the attempt fails on the next
        reactor turn with the error connectTCP would give.
        """
        import errno
        import socket

        from twisted.internet import error

        from balancer import rawconnect

        def noSocket(*args, **kw):
            raise OSError(errno.EMFILE, "Too many open files")

        attempt = self._attempt()
        self.patch(rawconnect, "_newSocket", noSocket)
        rawconnect.RawConnect(attempt, socket.AF_INET, ("127.0.0.1", 1), 1.0)
        self.assertEqual(attempt.failures, [])
        attempt.factory.reactor.advance(0)
        [reason] = attempt.failures
        self.assertTrue(reason.check(error.ConnectBindError))

    def test_disconnect_before_failure_is_reported(self):
        import socket

        from balancer import rawconnect

        attempt = self._attempt()
        raw = rawconnect.RawConnect(attempt, socket.AF_INET, ("255.255.255.255", 1), 1.0)
        raw.disconnect()
        attempt.factory.reactor.advance(1)
        self.assertEqual(attempt.failures, [])
        self.assertEqual(raw.sock.fileno(), -1)


class _FDSet:
    """
    The reactor's reader/writer sets, without a reactor.
    """

    def __init__(self):
        self.readers, self.writers = set(), set()

    def addReader(self, r):
        self.readers.add(r)

    def removeReader(self, r):
        self.readers.discard(r)

    def addWriter(self, w):
        self.writers.add(w)

    def removeWriter(self, w):
        self.writers.discard(w)


def connected(factory, sock):
    """
    What L{RawConnect} hands a lean client once C{sock} is connected: an
    object with the socket, registered as its writer.
    """

    class Connected:
        pass

    c = Connected()
    c.sock, c.fileno = sock, sock.fileno
    factory.fds.addWriter(c)
    return c


class _Factory:
    proxyProtocol = None
    halfClose = True

    def __init__(self):
        from balancer._twisted import fdOps

        self.reactor = _FDSet()
        self.fds = fdOps(self.reactor)
        self.clients = set()
        self.released = []

    def release(self, peer):
        self.released.append(peer)


class LeanUnitTests(SynchronousTestCase):
    """
    L{LeanClient} and its backend half on socket pairs, driven by hand.
    """

    def pair(self):
        import socket

        app, lb = socket.socketpair()
        self.addCleanup(app.close)
        self.addCleanup(lb.close)
        lb.setblocking(False)
        return app, lb

    def client(self):
        from balancer.lean import LeanClient

        factory = _Factory()
        cApp, cLb = self.pair()
        client = LeanClient(factory, cLb, ("127.0.0.1", 1))
        factory.clients.add(client)
        client.startReading()
        return factory, client, cApp

    def test_hold_stops_reading_past_limit(self):
        factory, client, cApp = self.client()
        cApp.setblocking(False)
        chunk = b"x" * 16384
        while client.reading:
            cApp.send(chunk)
            client.doRead()
        self.assertGreater(client.held.size, HOLD_LIMIT)
        self.assertNotIn(client, factory.reactor.readers)
        # all of it reaches the backend once connected, and reading resumes
        held = client.held.size
        bApp, bLb = self.pair()
        client.backendConnected(connected(factory, bLb), "peer")
        got = 0
        while got < held:
            got += len(bApp.recv(1 << 20))
            if client.backend.pending:
                client.backend.doWrite()
        self.assertEqual(got, held)
        self.assertTrue(client.reading)

    def test_backpressure_and_drain_close(self):
        """
        A client that does not read stops the reads from the backend, one
        chunk at most is kept; close() (a drain deadline) sends it, then
        shuts and closes both sockets.
        """
        factory, client, cApp = self.client()
        cApp.send(b"early")
        client.doRead()
        bApp, bLb = self.pair()
        client.backendConnected(connected(factory, bLb), "peer")
        self.assertEqual(bApp.recv(100), b"early")
        backend = client.backend
        bApp.setblocking(False)
        sent = 0
        while backend.reading:
            try:
                sent += bApp.send(b"y" * 65536)
            except BlockingIOError:
                pass
            backend.doRead()
        self.assertTrue(client.pending)
        self.assertLessEqual(len(client.pending), 65536)
        self.assertIn(client, factory.reactor.writers)

        client.close()
        self.assertEqual(factory.reactor.readers, set())
        self.assertEqual(bApp.recv(100), b"")  # the backend got its EOF
        self.assertIn(client, factory.clients)  # the client's bytes are not out yet
        unread = 0  # what the balancer had not read from the backend
        while True:
            try:
                unread += len(bLb.recv(1 << 20))
            except BlockingIOError:
                break
        received = 0
        cApp.setblocking(False)
        while not client.closed:
            try:
                received += len(cApp.recv(1 << 20))
            except BlockingIOError:
                pass
            client.doWrite()
        # every byte the balancer took from the backend reached the client
        cApp.setblocking(True)
        while True:
            data = cApp.recv(1 << 20)
            if not data:
                break
            received += len(data)
        self.assertEqual(received + unread, sent)
        self.assertEqual(factory.clients, set())
        self.assertEqual(factory.released, ["peer"])
        self.assertEqual((client.sock.fileno(), backend.sock.fileno()), (-1, -1))
        self.assertEqual(factory.reactor.writers, set())


class LeanPortAcceptTests(SynchronousTestCase):
    """
    L{LeanPort}'s accept loop, on a fake listening socket and a clock.
    """

    def port(self, outcomes):
        from twisted.internet.testing import MemoryReactorClock

        from balancer.lean import LeanPort

        class FakeListener:
            def __init__(self):
                self.calls = 0

            def fileno(self):
                return 99

            def accept(self):
                self.calls += 1
                outcome = outcomes.pop(0) if outcomes else BlockingIOError()
                raise outcome

            def close(self):
                pass

        reactor = MemoryReactorClock()
        factory = _Factory()
        factory.reactor = reactor
        factory.fds = reactor
        listener = FakeListener()
        return reactor, listener, LeanPort(reactor, listener, factory)

    def test_out_of_descriptors_pauses_accepting(self):
        """
        EMFILE does not make the loop spin on a listening socket that stays
        readable: accepting stops for ACCEPT_PAUSE, then resumes.
        """
        import errno

        from balancer.lean import ACCEPT_PAUSE

        reactor, listener, port = self.port([OSError(errno.EMFILE, "Too many open files")])
        self.assertIn(port, reactor.getReaders())
        port.doRead()
        self.assertEqual(listener.calls, 1)
        self.assertNotIn(port, reactor.getReaders())
        reactor.advance(ACCEPT_PAUSE / 2)
        self.assertNotIn(port, reactor.getReaders())
        reactor.advance(ACCEPT_PAUSE / 2)
        self.assertIn(port, reactor.getReaders())
        self.flushLoggedErrors()

    def test_aborted_client_is_skipped(self):
        """
        A client gone before accept() (ECONNABORTED) is skipped and the
        loop goes on until EAGAIN, still watching the socket.
        """
        import errno

        reactor, listener, port = self.port([OSError(errno.ECONNABORTED, "aborted")])
        port.doRead()
        self.assertEqual(listener.calls, 2)
        self.assertIn(port, reactor.getReaders())

    def test_stop_listening_cancels_resume(self):
        import errno

        reactor, listener, port = self.port([OSError(errno.ENFILE, "table full")])
        port.doRead()
        port.stopListening()
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertNotIn(port, reactor.getReaders())
