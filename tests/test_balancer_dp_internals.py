"""
L{balancer._twisted}'s self-check and public fallbacks, and the lean epoll
dispatch (L{balancer.fastpoll}): errors contained, hang-ups handled,
install/uninstall.
"""

from __future__ import annotations

import socket

from twisted.internet import error, main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from balancer import _twisted, fastpoll
from balancer.listen import SocketEndpoint, serverEndpoint
from balancer.sides import _Side


class _HalfCloseTransport(StringTransport):
    writeClosed = False

    def loseWriteConnection(self):
        self.writeClosed = True


class SelfCheckTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        self.patch(_twisted, "features", _twisted._Features())
        self.patch(_twisted, "log", Logger(observer=self.events.append))
        self.patch(_twisted, "_reactorWarned", [])

    def test_this_twisted_passes(self):
        """
        On the Twisted these tests run with, every private path is there.
        """
        from twisted.internet.epollreactor import EPollReactor

        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        features = _twisted.selfCheck(reactor)
        self.assertEqual(
            (features.fastWrite, features.leanDispatch, features.endpointFields,
             features.adoptSocket),
            (True, True, True, True),
        )
        self.assertEqual(self.events, [])

    def test_missing_transport_attribute_falls_back_to_write(self):
        """
        A Twisted whose transports lack one of the attributes: one log line,
        and forwarding goes through C{transport.write} and
        C{loseWriteConnection}.
        """
        self.patch(_twisted, "_TRANSPORT_ATTRS", _twisted._TRANSPORT_ATTRS + ("_gone",))
        _twisted.selfCheck()
        self.assertFalse(_twisted.features.fastWrite)
        [event] = self.events
        self.assertIn("_gone", event["names"])
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        from twisted.internet import tcp

        t = tcp.Server(a, _ProtocolStub(), ("127.0.0.1", 1), None, 0, _FDSet())
        self.assertIsNone(_twisted.plainSocket(t))
        self.assertFalse(_twisted.shutWriteNow(t, False))
        side = _Side()
        side.transport = _HalfCloseTransport()
        side.sock = _twisted.plainSocket(t)
        self.assertTrue(side.send(b"data"))
        self.assertEqual(side.transport.value(), b"data")
        side.shutdownWrite()
        self.assertTrue(side.transport.writeClosed)

    def test_fast_write_used_when_present(self):
        """
        The counterpart: with the attributes there, a plain TCP transport
        gets its socket used directly.
        """
        _twisted.selfCheck()
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        from twisted.internet import tcp

        t = tcp.Server(a, _ProtocolStub(), ("127.0.0.1", 1), None, 0, _FDSet())
        self.assertIs(_twisted.plainSocket(t), a)
        side = _Side()
        side.transport, side.sock = t, _twisted.plainSocket(t)
        self.assertTrue(side.send(b"now"))
        self.assertEqual(b.recv(10), b"now")
        self.assertEqual(_twisted.queuedBytes(t), 0)

    def test_missing_tcp_server_falls_back_to_adopt(self):
        """
        Without a usable C{tcp.Server}, a connected socket is handed to
        C{adoptStreamConnection} (which dups it) and closed.
        """
        self.patch(_twisted, "_TRANSPORT_METHODS", ("_noSuchMethod",))
        _twisted.selfCheck()
        self.assertFalse(_twisted.features.adoptSocket)
        reactor = MemoryReactor()
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        proto = _ProtocolStub()
        fd = a.fileno()
        self.assertIsNone(_twisted.adoptSocket(reactor, a, proto, ("127.0.0.1", 1), "x"))
        [(adopted, family, factory)] = reactor.adoptedStreamConnections
        self.assertEqual((adopted, family), (fd, socket.AF_UNIX))
        self.assertIs(factory.buildProtocol(None), proto)
        self.assertEqual(a.fileno(), -1)

    def test_missing_endpoint_fields_uses_parsed_endpoint(self):
        self.patch(_twisted, "_ENDPOINT_ATTRS", ("_gone",))
        _twisted.selfCheck()
        self.assertFalse(_twisted.features.endpointFields)
        [event] = self.events
        self.assertIn("_gone", event["names"])
        reactor = MemoryReactor()
        endpoint = serverEndpoint(reactor, "tcp:0:interface=127.0.0.1", False, 50, lean=True)
        self.assertIsInstance(endpoint, TCP4ServerEndpoint)
        self.assertRaises(ValueError, serverEndpoint, reactor, "tcp:0", True, 50)

    def test_endpoint_fields_rebuild_when_present(self):
        _twisted.selfCheck()
        endpoint = serverEndpoint(MemoryReactor(), "tcp:7410:interface=127.0.0.1", False, 77,
                                   lean=True)
        self.assertIsInstance(endpoint, SocketEndpoint)
        self.assertEqual((endpoint.port, endpoint.interface, endpoint.backlog, endpoint.lean),
                         (7410, "127.0.0.1", 77, True))

    def test_missing_reactor_attribute_keeps_stock_loop(self):
        from twisted.internet.epollreactor import EPollReactor

        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.patch(_twisted, "_REACTOR_ATTRS", _twisted._REACTOR_ATTRS + ("_gone",))
        _twisted.selfCheck(reactor)
        self.assertFalse(_twisted.features.leanDispatch)
        self.assertEqual(len(self.events), 1)
        self.assertFalse(fastpoll.install(reactor))
        self.assertNotIn("doPoll", vars(reactor))
        # the lean path's descriptor bookkeeping goes through addReader...
        from balancer.fdset import PublicFDs

        self.assertIsInstance(_twisted.fdOps(reactor), PublicFDs)
        self.assertEqual(len(self.events), 1)

    def test_epoll_fd_ops_keep_the_reactor_consistent(self):
        """
        With the internals, the lean path's bookkeeping is the reactor's
        own: readers and writers it adds are the reactor's, a writer
        switched to a reader is one, and a forgotten one is gone.
        """
        from twisted.internet.epollreactor import EPollReactor

        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        fds = _twisted.fdOps(reactor)
        self.assertNotIsInstance(fds, __import__("balancer.fdset").fdset.PublicFDs)
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        w, r = _Reader(reactor, a, []), _Reader(reactor, a, [])
        fds.addWriter(w)
        self.assertEqual(reactor.getWriters(), [w])
        self.assertNotIn(w, reactor.getReaders())
        fds.writerToReader(w, r)
        self.assertEqual(reactor.getWriters(), [])
        self.assertIn(r, reactor.getReaders())
        b.send(b"x")
        reactor.doIteration(0)
        self.assertEqual(r.log, [("read", r, b"x")])
        fds.forget(r, True, False)
        self.assertNotIn(r, reactor.getReaders())

    def test_missing_socket_accept_falls_back(self):
        self.patch(_twisted, "_SOCKET_ATTRS", ("_gone",))
        _twisted.selfCheck()
        self.assertFalse(_twisted.features.rawAccept)
        [event] = self.events
        self.assertIn("_gone", event["names"])
        listener = socket.socket()
        self.addCleanup(listener.close)
        self.assertEqual(_twisted.acceptor(listener), listener.accept)

    def test_raw_accept_gives_a_working_socket(self):
        _twisted.selfCheck()
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        accepted, addr = _twisted.acceptor(listener)()
        self.addCleanup(accepted.close)
        self.assertEqual(addr, client.getsockname())
        client.send(b"hi")
        self.assertEqual(accepted.recv(10), b"hi")


class _ProtocolStub:
    def makeConnection(self, transport):
        self.transport = transport

    def logPrefix(self):
        return "stub"


class _FDSet:
    def addReader(self, r):
        pass

    def removeReader(self, r):
        pass


class _Reader(FileDescriptor):
    """
    Reads a socket; can be told to raise in C{doRead}/C{connectionLost}.
    """

    def __init__(self, reactor, sock, log, failRead=False, failLost=False):
        FileDescriptor.__init__(self, reactor)
        self.sock = sock
        self.log = log
        self.failRead = failRead
        self.failLost = failLost

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        if self.failRead:
            raise RuntimeError("doRead broke")
        try:
            data = self.sock.recv(100)
        except OSError:
            self.log.append(("error", self, None))
            return main.CONNECTION_LOST
        self.log.append(("read", self, data))
        if not data:
            return main.CONNECTION_DONE

    def connectionLost(self, reason):
        self.log.append(("lost", self, reason.type))
        FileDescriptor.connectionLost(self, reason)
        if self.failLost:
            raise RuntimeError("connectionLost broke")


class LeanDispatchTests(SynchronousTestCase):
    def setUp(self):
        from twisted.internet.epollreactor import EPollReactor

        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.assertTrue(fastpoll.install(self.reactor))
        self.logged = []
        self.patch(fastpoll, "log", Logger(observer=self.logged.append))
        self.seen = []

    def reader(self, **kw):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setblocking(False)
        r = _Reader(self.reactor, a, self.seen, **kw)
        self.reactor.addReader(r)
        self.addCleanup(self.reactor.removeReader, r)
        return r, b

    def test_error_in_do_read_is_contained(self):
        """
        A C{doRead} that raises is logged and disconnects that selectable
        only; the other ready descriptor is still read in the same poll.
        """
        bad, badPeer = self.reader(failRead=True)
        good, goodPeer = self.reader()
        badPeer.send(b"x")
        goodPeer.send(b"y")
        self.reactor.doIteration(0)
        self.assertIn(("read", good, b"y"), self.seen)
        self.assertIn(("lost", bad, RuntimeError), self.seen)
        self.assertTrue(any(e.get("log_failure") for e in self.logged))

    def test_error_in_do_write_is_contained(self):
        """
        The writable-only fast branch: a C{doWrite} that raises is logged
        and disconnects that selectable only.
        """

        class Writer(_Reader):
            def doWrite(self):
                raise RuntimeError("doWrite broke")

        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        bad = Writer(self.reactor, a, self.seen)
        self.reactor.addWriter(bad)
        good, goodPeer = self.reader()
        goodPeer.send(b"y")
        self.reactor.doIteration(0)
        self.assertIn(("read", good, b"y"), self.seen)
        self.assertIn(("lost", bad, RuntimeError), self.seen)
        self.assertNotIn(bad, self.reactor.getWriters())

    def test_error_in_connection_lost_does_not_escape(self):
        """
        A C{connectionLost} that raises (after a hang-up) is logged like
        C{callWithLogger} would; it neither escapes C{doIteration} nor
        drops the other ready events.
        """
        bad, badPeer = self.reader(failLost=True)
        good, goodPeer = self.reader()
        badPeer.close()  # hang-up: EPOLLIN|EPOLLHUP
        goodPeer.send(b"y")
        self.reactor.doIteration(0)  # must not raise
        self.assertIn(("lost", bad, error.ConnectionDone), self.seen)
        self.assertIn(("read", good, b"y"), self.seen)
        failures = [e for e in self.logged if e.get("log_failure")]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0]["log_failure"].check(RuntimeError))

    def test_hang_up_disconnects(self):
        """
        A peer that hangs up (POLLHUP with POLLIN) gets the EOF read and
        the selectable disconnected cleanly.
        """
        r, peer = self.reader()
        peer.send(b"last")
        peer.close()
        self.reactor.doIteration(0)
        self.reactor.doIteration(0)
        reads = [e[2] for e in self.seen if e[0] == "read"]
        self.assertEqual(reads[0], b"last")
        self.assertIn(("lost", r, error.ConnectionDone), self.seen)
        self.assertNotIn(r, self.reactor.getReaders())

    def test_error_event_disconnects(self):
        """
        A socket reset by its peer (POLLERR/POLLHUP) is disconnected with a
        connection-lost reason.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        server, _ = listener.accept()
        client.setblocking(False)
        r = _Reader(self.reactor, client, self.seen)
        self.reactor.addReader(r)
        self.addCleanup(self.reactor.removeReader, r)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        server.close()  # RST
        for _ in range(3):
            self.reactor.doIteration(0)
        self.assertIn(("lost", r, error.ConnectionLost), self.seen)
        self.assertNotIn(r, self.reactor.getReaders())

    def test_uninstall_restores_stock_loop(self):
        self.assertIn("doPoll", vars(self.reactor))
        fastpoll.uninstall(self.reactor)
        self.assertNotIn("doPoll", vars(self.reactor))
        self.assertNotIn("doIteration", vars(self.reactor))
        # the stock loop still dispatches
        r, peer = self.reader()
        peer.send(b"z")
        self.reactor.doIteration(0)
        self.assertIn(("read", r, b"z"), self.seen)
        self.assertTrue(fastpoll.install(self.reactor))


class RedisMaxDelayTests(SynchronousTestCase):
    def test_sets_factory_max_delay(self):
        class Factory:
            maxDelay = 3600

        class Conn:
            _factory = Factory()

        conn = Conn()
        self.assertTrue(_twisted.setRedisMaxDelay(conn, 5))
        self.assertEqual(conn._factory.maxDelay, 5)

    def test_fallback_without_factory(self):
        events = []
        self.patch(_twisted, "log", Logger(observer=events.append))
        self.assertFalse(_twisted.setRedisMaxDelay(object(), 5))
        self.assertEqual(len(events), 1)

    def test_self_check_without_the_attribute_falls_back(self):
        """
        A txredisapi without C{_factory.maxDelay}: the start-up check says
        so once and the back-off is left alone.
        """
        events = []
        self.patch(_twisted, "features", _twisted._Features())
        self.patch(_twisted, "log", Logger(observer=events.append))
        self.patch(_twisted, "_redisFactory", lambda conn: None)
        _twisted.selfCheck()
        self.assertFalse(_twisted.features.redisMaxDelay)
        self.assertIn("_factory.maxDelay", [e.get("names") for e in events])

        class Factory:
            maxDelay = 3600

        class Conn:
            _factory = Factory()

        self.assertFalse(_twisted.setRedisMaxDelay(Conn(), 5))
        self.assertEqual(Conn._factory.maxDelay, 3600)

    def test_real_lazy_connection_passes(self):
        import txredisapi

        conn = txredisapi.lazyConnection("127.0.0.1", 1, reconnect=False)
        self.addCleanup(conn.disconnect)
        self.assertTrue(_twisted.setRedisMaxDelay(conn, 5))
        self.assertEqual(conn._factory.maxDelay, 5)

    def test_real_txredisapi_connection_has_it(self):
        """
        The txredisapi this project runs has the private attribute.
        """
        import txredisapi

        factory = txredisapi.RedisFactory(None, 0, 1, isLazy=True, convertNumbers=False)
        conn = txredisapi.ConnectionHandler(factory)
        self.assertTrue(_twisted.setRedisMaxDelay(conn, 5))
        self.assertEqual(factory.maxDelay, 5)
