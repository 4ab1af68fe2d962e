"""
The Twisted data path: the two halves of a proxied connection as Twisted
protocols (used for C{ssl:} listeners and for backends given by host name
or endpoint string; plain C{tcp:} listeners use L{balancer.lean}).

Backpressure is Twisted's portforward scheme: each transport is registered
as the other's streaming producer, so a slow reader pauses the fast writer
and the balancer never buffers more than about one transport buffer per
direction.  Client data that arrives before the backend is connected is
held (L{balancer.earlydata}) and delivered first.

Speed: C{transport.write} only queues and sends on a later reactor turn.
When the destination is a plain TCP transport with nothing queued,
L{balancer._twisted.sendNow} calls C{send()} on its socket at once and
queues only what the kernel did not take (ordering and flow control are
kept); without Twisted's internals it is plain C{transport.write}.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from balancer import _twisted
from balancer.checker import tlsFailureReason
from balancer.clientcore import ClientCore
from balancer.earlydata import EarlyData
from balancer.interfaces import IProxiedClient


def setNoDelay(transport: Any) -> None:
    try:
        transport.setTcpNoDelay(True)
        return
    except (AttributeError, OSError, NotImplementedError):
        pass
    try:
        transport.getHandle().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def loseWrite(transport: Any) -> None:
    """
    C{transport.loseWriteConnection()}, done at once when possible
    (L{balancer._twisted.shutWriteNow}).
    """
    last = getattr(getattr(transport, "protocol", None), "readEOF", False)
    if not _twisted.shutWriteNow(transport, last):
        transport.loseWriteConnection()


@implementer(IHalfCloseableProtocol)
class _Side(protocol.Protocol):
    """
    Common code of both halves: forwarding, half-close, teardown.
    """

    other: _Side | None = None
    _out: Any = None  # the other side's transport
    _outSock: socket.socket | None = None
    _fastRead = False
    readEOF = False
    writeEOF = False
    rx = 0

    def dataReceived(self, data: bytes) -> None:
        self.rx += len(data)
        _twisted.sendNow(self._out, self._outSock, data)

    def _forward(self, data: bytes) -> None:
        # dataReceived without the protocol layers (fast read)
        self.rx += len(data)
        out = self._out
        if out is not None:
            _twisted.sendNow(out, self._outSock, data)

    def send(self, data: bytes) -> None:
        """
        Write C{data} to the other side.
        """
        _twisted.sendNow(self._out, self._outSock, data)

    def link(self, other: _Side) -> None:
        self.other = other
        self._out = other.transport
        self._outSock = _twisted.plainSocket(other.transport)
        if self._outSock is not None:
            self._fastRead = _twisted.installFastRead(self.transport, self._forward)

    def readConnectionLost(self) -> None:
        if self.readEOF:
            return
        self.readEOF = True
        if self.other is not None:
            loseWrite(self.other.transport)
        self._maybeClose()

    def writeConnectionLost(self) -> None:
        self.writeEOF = True
        self._maybeClose()

    def _maybeClose(self) -> None:
        if self.readEOF and self.writeEOF:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._fastRead:
            self._fastRead = False
            _twisted.removeFastRead(self.transport)
        other = self.other
        self.other = None
        self._out = self._outSock = None
        if other is not None:
            other.other = None
            other._out = other._outSock = None
            t = other.transport
            if t is not None:
                if getattr(t, "producer", None) is not None:
                    t.unregisterProducer()
                t.loseConnection()


@implementer(IProxiedClient)
class ServerSide(ClientCore, _Side):
    """
    A client connected to the balancer (the client-side state machine is
    L{ClientCore}'s).
    """

    log = Logger()
    factory: Any = None
    backend: BackendSide | None = None
    peer: Any = None
    held: EarlyData | None = None
    pendingEOF = False
    attempt: Any = None
    tried: set[Any] | None = None
    closed = False
    lean = False
    paused = False
    handedOver = False
    idleMark = 0
    idleSteps = 0

    def connectionMade(self) -> None:
        if self.handedOver:
            return  # a lean client moved here (LeanClient.toTwisted)
        # Not paused here (that costs two epoll_ctl calls per connection):
        # the transport is paused when data arrives before the backend
        # connection is up, and that data is held.
        self.factory.accepted += 1
        setNoDelay(self.transport)
        self.tried = set()
        self.factory.dispatch(self)

    def dataReceived(self, data: bytes) -> None:
        if self.other is None:
            # Not connected to a backend yet.  TLS handshakes and data in
            # flight can still arrive while paused.
            self.rx += len(data)
            self.hold(data)
            return
        _Side.dataReceived(self, data)

    def readConnectionLost(self) -> None:
        if self.other is None:
            self.pendingEOF = True
            return
        _Side.readConnectionLost(self)

    def activity(self) -> int:
        backend = self.backend
        return self.rx + (backend.rx if backend is not None else 0)

    # -- ClientCore's primitives over Twisted transports ---------------------------

    def pauseReading(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resumeReading(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def eofReceived(self) -> bool:
        return self.pendingEOF

    def passEOF(self) -> None:
        _Side.readConnectionLost(self)

    def localAddress(self) -> Any:
        return self.transport.getHost()

    def sendToBackend(self, data: bytes) -> bool:
        # the transport queues what the kernel does not take; the producer
        # registration does the backpressure
        self.send(data)
        return True

    def linkBackend(self, backend: BackendSide) -> None:
        self.backend = backend
        self.link(backend)
        backend.link(self)
        t, bt = self.transport, backend.transport
        bt.registerProducer(t, True)
        t.registerProducer(bt, True)

    def close(self) -> None:
        """
        Close both connections after flushing what is buffered (used at a
        drain deadline); producers are unregistered first, or a paused one
        would keep a transport from closing.
        """
        for side in (self, self.backend):
            t = side.transport if side is not None else None
            if t is not None:
                if getattr(t, "producer", None) is not None:
                    t.unregisterProducer()
                t.loseConnection()

    def clientAddress(self) -> Any:
        return self.transport.getPeer()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        self.factory.clients.discard(self)
        attempt = self.attempt
        self.attempt = None
        if attempt is not None:
            attempt.cancel()
        peer = self.peer
        self.peer = None
        if peer is not None:
            self.factory.release(peer)
        _Side.connectionLost(self, reason)


class BackendSide(_Side):
    """
    The balancer's connection to a backend for one client.
    """

    log = Logger()
    tls = False

    def __init__(self, attempt: Any) -> None:
        self.attempt: Any = attempt
        self.peer = attempt.peer

    def connectionMade(self) -> None:
        self.tls = ISSLTransport.providedBy(self.transport)
        setNoDelay(self.transport)
        attempt = self.attempt
        self.attempt = None
        if attempt is not None:
            attempt.connected(self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.tls:
            why = tlsFailureReason(reason, self.transport)
            if why is not None:
                # a tls: backend whose handshake failed after the TCP
                # connect: the client is closed, and the log says why
                self.log.warn("backend {peer}: {why}", peer=self.peer.key, why=why)
        _Side.connectionLost(self, reason)
