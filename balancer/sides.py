"""
The Twisted data path: the two halves of a proxied connection as Twisted
protocols (used for C{ssl:} listeners and for backends given by host name
or endpoint string; plain C{tcp:} listeners use L{balancer.lean}).

Backpressure is Twisted's portforward scheme: each transport is registered
as the other's streaming producer, so a slow reader pauses the fast writer
and the balancer never buffers more than about one transport buffer per
direction.  Forwarding, half-close and closing are
L{balancer.forward.Half}'s, the client's start L{balancer.clientcore}'s.

Speed: C{transport.write} only queues and sends on a later reactor turn.
When the destination is a plain TCP transport with nothing queued,
L{_Side.send} calls C{send()} on its socket at once and queues only what
the kernel did not take (ordering and flow control are kept); an EOF and
a close are done at once too (L{balancer._twisted.shutWriteNow}); without
Twisted's internals it is plain C{transport.write}.
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
from balancer.forward import Half, sendSome
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


def _unproduce(transport: Any) -> None:
    # a paused producer would keep a closing transport open
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()


@implementer(IHalfCloseableProtocol)
class _Side(Half, protocol.Protocol):
    """
    One half of a proxied pair on a Twisted transport: the
    L{balancer.forward.Half} state machine, with the transport's buffer and
    producers in place of a pending chunk.
    """

    other: _Side | None = None
    sock: socket.socket | None = None  # the transport's, for send()
    _fastRead = False
    eof = False
    shut = False
    halfClose = True  # the client's setting (ServerSide, BackendSide)
    pending = False  # the transport queues (and flushes before an EOF)
    rx = 0

    def dataReceived(self, data: bytes) -> None:
        self.forward(data)

    def readConnectionLost(self) -> None:
        if not self.eof:
            self.readEnded()

    def writeConnectionLost(self) -> None:
        pass  # the pair is closed once both directions are done (Half)

    def link(self, other: _Side) -> None:
        self.other = other
        self.sock = _twisted.plainSocket(self.transport)
        if self.sock is not None:
            self._fastRead = _twisted.installFastRead(self.transport, self.forward)

    # -- Half's primitives over a Twisted transport -------------------------------

    def send(self, data: bytes) -> bool:
        """
        Write C{data} to this transport: C{send()} on its socket at once when
        nothing is queued (L{balancer._twisted.plainSocket}), and queue only
        what the kernel did not take, which keeps ordering and flow control.
        """
        sock, t = self.sock, self.transport
        if sock is not None and not _twisted.queuedBytes(t):
            sent = sendSome(sock, data)
            if sent == len(data):
                return True
            if sent > 0:
                data = data[sent:]
        t.write(data)  # an error is Twisted's to find
        return True

    def pauseReading(self) -> None:
        self.transport.pauseProducing()

    def resumeReading(self) -> None:
        self.transport.resumeProducing()

    def readingDone(self) -> None:
        pass  # Twisted stopped reading at the EOF

    def shutdownWrite(self) -> None:
        t = self.transport
        if not _twisted.shutWriteNow(t, False):
            t.loseWriteConnection()

    def closePair(self) -> None:
        """
        Close both transports once what they queued is sent.
        """
        for side in (self, self.other):
            t = side.transport if side is not None else None
            if t is not None:
                _unproduce(t)
                if not _twisted.shutWriteNow(t, True):
                    t.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._fastRead:
            self._fastRead = False
            _twisted.removeFastRead(self.transport)
        other = self.other
        self.other = None
        if other is not None:
            other.other = None
            t = other.transport
            if t is not None:
                _unproduce(t)
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

    def activity(self) -> int:
        backend = self.backend
        return self.rx + (backend.rx if backend is not None else 0)

    @property
    def halfClose(self) -> bool:
        return self.factory.halfClose

    # -- ClientCore's primitives over Twisted transports ---------------------------

    def pauseReading(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resumeReading(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def localAddress(self) -> Any:
        return self.transport.getHost()

    def linkBackend(self, backend: BackendSide) -> None:
        self.backend = backend
        self.link(backend)
        backend.link(self)
        t, bt = self.transport, backend.transport
        bt.registerProducer(t, True)
        t.registerProducer(bt, True)

    def close(self) -> None:
        """
        Close both connections after flushing what is queued (a drain
        deadline).
        """
        self.closePair()

    def clientAddress(self) -> Any:
        return self.transport.getPeer()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        self.factory.clients.discard(self)
        self.endAccounting()
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

    @property
    def halfClose(self) -> bool:
        # the client's (its factory's) setting; read only once linked
        other = self.other
        return other is None or other.halfClose

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
