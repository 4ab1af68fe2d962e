"""
C{--half-close} / C{--no-half-close}: whether an EOF from one side is passed
on as a half-close (the default) or closes both connections once the bytes
read before it are sent (nginx's C{proxy_half_close off}); on both data
paths, with in-memory transports, socket pairs and real loopback sockets.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from balancer import tap
from balancer.config import BalancerConfig
from balancer.sides import BackendSide, ServerSide

from tests.balancer_helpers import AnswerAtEOF, connect, makeConfig, startBalancer, waitFor


def parse(*argv: str) -> BalancerConfig:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options.config


class OptionTests(SynchronousTestCase):
    def test_default_on(self):
        self.assertTrue(parse("--backend", "h:1").halfClose)

    def test_command_line(self):
        self.assertFalse(parse("--backend", "h:1", "--no-half-close").halfClose)
        self.assertTrue(parse("--backend", "h:1", "--half-close").halfClose)

    def test_ini_key_and_command_line_wins(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[balancer]\nbackend = h:1\nhalf_close = off\n")
        self.assertFalse(parse("--config", path).halfClose)
        self.assertTrue(parse("--config", path, "--half-close").halfClose)
        with open(path, "w") as f:
            f.write("[balancer]\nbackend = h:1\nhalf-close = sometimes\n")
        with self.assertRaises(usage.UsageError) as c:
            parse("--config", path)
        self.assertIn("--half-close", str(c.exception))


class _Transport(StringTransport):
    writeClosed = False

    def loseWriteConnection(self):
        self.writeClosed = True


class _Factory:
    proxyProtocol = None

    def __init__(self, halfClose: bool) -> None:
        self.halfClose = halfClose


class TwistedPathTests(SynchronousTestCase):
    """
    L{ServerSide} and L{BackendSide} linked over in-memory transports.
    """

    def pair(self, halfClose: bool):
        class Attempt:
            peer = None

            def connected(self, backend):
                pass

        server = ServerSide()
        server.factory = _Factory(halfClose)
        backend = BackendSide(Attempt())
        ts, tb = _Transport(), _Transport()
        server.transport = ts
        backend.makeConnection(tb)
        server.linkBackend(backend)
        return server, backend, ts, tb

    def test_client_eof_half_closes_by_default(self):
        server, backend, ts, tb = self.pair(True)
        server.dataReceived(b"question")
        server.readConnectionLost()
        self.assertEqual(tb.value(), b"question")
        self.assertTrue(tb.writeClosed)
        self.assertFalse(tb.disconnecting or ts.disconnecting)

    def test_client_eof_closes_both(self):
        server, backend, ts, tb = self.pair(False)
        server.dataReceived(b"question")
        server.readConnectionLost()
        self.assertEqual(tb.value(), b"question")  # sent before the close
        self.assertTrue(tb.disconnecting)
        self.assertTrue(ts.disconnecting)

    def test_backend_eof_closes_both(self):
        server, backend, ts, tb = self.pair(False)
        backend.dataReceived(b"bye")
        backend.readConnectionLost()
        self.assertEqual(ts.value(), b"bye")
        self.assertTrue(ts.disconnecting)
        self.assertTrue(tb.disconnecting)


class LeanPathTests(SynchronousTestCase):
    """
    L{balancer.lean.LeanClient} and its backend half on socket pairs.
    """

    def socketPair(self):
        app, lb = socket.socketpair()
        self.addCleanup(app.close)
        self.addCleanup(lb.close)
        lb.setblocking(False)
        return app, lb

    def client(self, halfClose: bool):
        from balancer.lean import LeanClient

        from tests.test_balancer_fastpath import _Factory as FakeFactory

        factory = FakeFactory()
        factory.halfClose = halfClose
        cApp, cLb = self.socketPair()
        client = LeanClient(factory, cLb, ("127.0.0.1", 1))
        factory.clients.add(client)
        client.startReading()
        return factory, client, cApp

    def connect(self, factory, client):
        from tests.test_balancer_fastpath import connected

        bApp, bLb = self.socketPair()
        client.backendConnected(connected(factory, bLb), "peer")
        return bApp

    def readAll(self, sock: socket.socket) -> bytes:
        sock.settimeout(5)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def test_client_eof_half_closes_by_default(self):
        factory, client, cApp = self.client(True)
        bApp = self.connect(factory, client)
        cApp.sendall(b"question")
        cApp.shutdown(socket.SHUT_WR)
        client.doRead()
        client.doRead()
        self.assertEqual(self.readAll(bApp), b"question")
        self.assertFalse(client.closed)
        bApp.sendall(b"answer")
        client.backend.doRead()
        self.assertEqual(cApp.recv(100), b"answer")

    def test_client_eof_closes_both(self):
        factory, client, cApp = self.client(False)
        bApp = self.connect(factory, client)
        cApp.sendall(b"question")
        cApp.shutdown(socket.SHUT_WR)
        client.doRead()
        self.assertFalse(client.closed)
        client.doRead()  # the EOF
        self.assertTrue(client.closed)
        self.assertEqual(self.readAll(bApp), b"question")
        self.assertEqual(self.readAll(cApp), b"")
        self.assertEqual(factory.clients, set())
        self.assertEqual(factory.released, ["peer"])
        self.assertEqual(factory.reactor.readers | factory.reactor.writers, set())

    def test_backend_eof_closes_both(self):
        factory, client, cApp = self.client(False)
        bApp = self.connect(factory, client)
        bApp.sendall(b"bye")
        bApp.shutdown(socket.SHUT_WR)
        client.backend.doRead()
        client.backend.doRead()
        self.assertTrue(client.closed)
        self.assertEqual(self.readAll(cApp), b"bye")
        self.assertEqual(self.readAll(bApp), b"")

    def test_early_eof_closes_after_the_held_bytes(self):
        """
        A client that sends and shuts down before the backend is connected:
        the held bytes reach the backend, then both are closed.
        """
        factory, client, cApp = self.client(False)
        cApp.sendall(b"early")
        cApp.shutdown(socket.SHUT_WR)
        client.doRead()
        client.doRead()
        self.assertFalse(client.closed)
        bApp = self.connect(factory, client)
        self.assertTrue(client.closed)
        self.assertEqual(self.readAll(bApp), b"early")
        self.assertEqual(self.readAll(cApp), b"")


@implementer(IHalfCloseableProtocol)
class _ByeThenListen(protocol.Protocol):
    """
    A backend that says bye and shuts down its writing side at once, then
    keeps reading.
    """

    def connectionMade(self):
        self.got = b""
        self.lost = False
        self.factory.conns.append(self)
        self.transport.write(b"bye")
        self.transport.loseWriteConnection()

    def dataReceived(self, data):
        self.got += data

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason=None):
        self.lost = True


@implementer(IHalfCloseableProtocol)
class _Patient(protocol.Protocol):
    """A client that does not close at the server's EOF."""

    def connectionMade(self):
        self.data = b""
        self.eof = False

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.eof = True

    def writeConnectionLost(self):
        pass


class EndToEndTests(TestCase):
    """
    Real loopback clients and backends; the lean path here, the Twisted
    path in L{EndToEndTwistedPathTests}.
    """

    twistedPath = False

    def backend(self, proto):
        factory = protocol.Factory.forProtocol(proto)
        factory.conns = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, f"127.0.0.1:{port.getHost().port}"

    @defer.inlineCallbacks
    def test_client_eof_closes_both(self):
        """
        Without half-close, a backend that answers only at the client's EOF
        gets the question, but its answer never reaches the client: the
        balancer closed both connections at the EOF (with half-close the
        client gets "got question").
        """
        factory, addr = self.backend(AnswerAtEOF)
        svc = yield startBalancer(self, makeConfig([addr], checkInterval=0, halfClose=False))
        client = yield connect(svc.port)
        client.transport.write(b"question")
        client.transport.loseWriteConnection()
        data = yield client.done
        self.assertEqual(data, b"")
        yield waitFor(lambda: factory.conns and factory.conns[0].got == b"question")
        yield waitFor(lambda: not svc.factory.clients)

    @defer.inlineCallbacks
    def test_backend_eof_closes_both(self):
        """
        Without half-close, the backend's EOF closes the client's connection
        too, after the backend's last bytes, although the client is still
        open; with half-close the client would stay connected.
        """
        factory, addr = self.backend(_ByeThenListen)
        svc = yield startBalancer(self, makeConfig([addr], checkInterval=0, halfClose=False))
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", svc.port), _Patient()
        )
        self.addCleanup(client.transport.abortConnection)
        yield waitFor(lambda: client.eof)
        self.assertEqual(client.data, b"bye")
        yield waitFor(lambda: not svc.factory.clients)
        yield waitFor(lambda: factory.conns[0].lost)

    @defer.inlineCallbacks
    def test_backend_eof_half_closes_by_default(self):
        factory, addr = self.backend(_ByeThenListen)
        svc = yield startBalancer(self, makeConfig([addr], checkInterval=0))
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", svc.port), _Patient()
        )
        yield waitFor(lambda: client.eof)
        client.transport.write(b"still here")
        yield waitFor(lambda: factory.conns[0].got == b"still here")
        self.assertEqual(len(svc.factory.clients), 1)
        client.transport.loseConnection()
        yield waitFor(lambda: not svc.factory.clients)

    @defer.inlineCallbacks
    def test_reload_turns_it_off(self):
        factory, addr = self.backend(AnswerAtEOF)
        svc = yield startBalancer(self, makeConfig([addr], checkInterval=0))
        self.assertTrue(svc.factory.halfClose)
        svc.apply(makeConfig([addr], checkInterval=0, halfClose=False))
        self.assertFalse(svc.factory.halfClose)


class EndToEndTwistedPathTests(EndToEndTests):
    twistedPath = True
