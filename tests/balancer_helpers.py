"""
Helpers for the balancer's end-to-end tests: loopback backends, clients,
and waiting on conditions without fixed sleeps.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import deferLater
from zope.interface import implementer

from balancer.config import BalancerConfig, parseBackend
from balancer.service import BalancerService


@defer.inlineCallbacks
def waitFor(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """
    Poll C{predicate} until it is true; fail after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        yield deferLater(reactor, interval, lambda: None)


@implementer(IHalfCloseableProtocol)
class EchoBackendProtocol(protocol.Protocol):
    """
    Echoes everything.  A connection whose first bytes are C{PING\\n} is a
    health check: it gets C{PONG\\n} and is not counted as served.
    """

    factory: EchoBackend
    first = True

    def connectionMade(self) -> None:
        self.factory.conns.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.first:
            self.first = False
            if data.startswith(b"PING\n"):
                self.factory.checks += 1
                self.transport.write(b"PONG\n")
                return
            self.factory.served += 1
        self.factory.received += len(data)
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.conns.discard(self)


class EchoBackend(protocol.Factory):
    protocol = EchoBackendProtocol
    noisy = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.conns: set[EchoBackendProtocol] = set()
        self.served = 0
        self.checks = 0
        self.received = 0
        self.port: Any = None
        self.portnum = 0

    def start(self, portnum: int = 0) -> Any:
        self.port = reactor.listenTCP(portnum, self, interface="127.0.0.1")
        self.portnum = self.port.getHost().port
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.portnum}"

    @defer.inlineCallbacks
    def stop(self) -> Any:
        port, self.port = self.port, None
        if port is not None:
            yield port.stopListening()
        for c in list(self.conns):
            c.transport.abortConnection()
        yield waitFor(lambda: not self.conns)


@implementer(IHalfCloseableProtocol)
class Client(protocol.Protocol):
    """
    Collects what it receives; C{done} fires with it at connection close.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.eof = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.data))


def connect(port: int) -> defer.Deferred[Client]:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Client())


@defer.inlineCallbacks
def roundtrip(port: int, payload: bytes = b"hello") -> Any:
    """
    Connect, send C{payload}, half-close, return everything received.
    """
    client = yield connect(port)
    client.transport.write(payload)
    client.transport.loseWriteConnection()
    data = yield client.done
    return data


def makeConfig(backends: list[str], **kw: Any) -> BalancerConfig:
    kw.setdefault("listen", ["tcp:0:interface=127.0.0.1"])
    kw.setdefault("checkInterval", 0.05)
    kw.setdefault("checkTimeout", 0.5)
    return BalancerConfig(backends=[parseBackend(b) for b in backends], **kw)


@defer.inlineCallbacks
def startBalancer(test: Any, cfg: BalancerConfig, **kw: Any) -> Any:
    """
    Start a balancer; C{svc.port} is its port.  Its C{tcp:} listeners take
    the lean path; a test with C{twistedPath = True} gets C{svc.port} from
    an extra Twisted listener (C{listenTCP}) on the same factory instead.
    """
    kw.setdefault("handleSighup", False)
    svc = BalancerService(cfg, reactor, **kw)
    svc.startService()
    test.addCleanup(stopBalancer, svc)
    yield svc.listening
    svc.port = svc.proxyPorts[0].getHost().port
    if getattr(test, "twistedPath", False):
        port = reactor.listenTCP(0, svc.factory, interface="127.0.0.1")
        test.addCleanup(port.stopListening)
        svc.port = port.getHost().port
    return svc


def buffered(server: Any) -> int:
    """
    Bytes the balancer holds for a client (either path).
    """
    if server.lean:
        return len(server.pending)
    from balancer._twisted import queuedBytes

    return queuedBytes(server.transport)


@defer.inlineCallbacks
def stopBalancer(svc: BalancerService) -> Any:
    if svc.running:
        yield svc.stopService()
    yield waitFor(lambda: not svc.factory.clients)
    # let aborted connections finish closing
    yield deferLater(reactor, 0, lambda: None)


def startBackends(test: Any, *names: str) -> list[EchoBackend]:
    backends = [EchoBackend(n).start() for n in names]
    for b in backends:
        test.addCleanup(b.stop)
    return backends


@implementer(IHalfCloseableProtocol)
class AnswerAtEOF(protocol.Protocol):
    """
    A backend that answers what it got once the client has finished
    (C{b"got " + data}), then closes.
    """

    def connectionMade(self):
        self.got = b""
        getattr(self.factory, "conns", []).append(self)

    def dataReceived(self, data):
        self.got += data

    def readConnectionLost(self):
        self.transport.write(b"got " + self.got)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass
