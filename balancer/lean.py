"""
The lean data path for plain C{tcp:} listeners, without Twisted transports.

Per proxied connection Twisted's path builds a C{tcp.Server} transport per
socket (with its address objects, logging context and producer machinery)
and tears them down through C{connectionLost} chains: about 100 µs of
Python per connection.  Here, as in nginx:

 - L{LeanPort} is the listening socket as a reactor reader that
   C{accept()}s until C{EAGAIN} (nginx's C{multi_accept}); accepted sockets
   inherit C{TCP_NODELAY} from it (Linux copies it to the child socket);
 - L{LeanClient} (the client's socket) and a L{_Half} (the backend's
   socket, from L{balancer.rawconnect.RawConnect}) are the reactor's read and
   write descriptors themselves, and L{balancer.forward.Half}s: a read is
   C{send()} to the other socket at once; what the kernel does not take is
   kept (one chunk at most), the destination is watched for writability and
   the source is not read until it is sent (backpressure); an EOF becomes
   C{shutdown(SHUT_WR)} of the other socket once its pending bytes are out
   (half-close), and the pair is closed when both directions are done, or
   at once on an error; with C{--no-half-close} an EOF closes the pair once
   the bytes read before it are sent.

Selection, retries, counting, draining, the early-data hold and the
proxy timeout are shared with the Twisted path: a L{LeanClient} is an
L{IProxiedClient} that goes through L{BalancerFactory.dispatch} and
L{balancer.attempt.Attempt} like a L{balancer.sides.ServerSide}.  A client
whose chosen backend L{balancer.rawconnect.RawConnect} cannot reach (a host
name, C{tls:}) is handed over to the Twisted path (L{LeanClient.toTwisted}).
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from balancer import _twisted
from balancer.clientcore import ClientCore
from balancer.earlydata import HOLD_LIMIT, EarlyData
from balancer.forward import Half, sendSome
from balancer.interfaces import IProxiedClient
from balancer.sides import ServerSide

_EAGAIN = (BlockingIOError, InterruptedError)

# Bytes read from a socket at a time (Twisted's transport buffer size).
READ_SIZE = 65536

# Connections accepted per readiness event at most (then other events get
# their turn; the listening socket stays readable).
ACCEPT_BATCH = 256

# Seconds without accepting after accept() ran out of descriptors or memory.
ACCEPT_PAUSE = 0.1


def _address(addr: tuple[Any, ...]) -> IPv4Address | IPv6Address:
    """
    The Twisted address of a C{getpeername()}/C{getsockname()} tuple.
    """
    if len(addr) == 2:
        return IPv4Address("TCP", addr[0], addr[1])
    return IPv6Address("TCP", addr[0], addr[1], addr[2], addr[3])


@implementer(IReadDescriptor, IWriteDescriptor)
class _Half(Half):
    """
    One socket of a proxied pair as a reactor descriptor: the
    L{balancer.forward.Half} state machine over a raw socket.

    @ivar pending: bytes read from C{other} that this socket did not take
        yet; while there are any, this socket is watched for writability
        and C{other} is not read.
    @ivar reading: this socket is watched for reading.
    """

    __slots__ = (
        "sock", "fileno", "fds", "client", "other", "pending", "reading", "eof", "shut", "rx"
    )

    def __init__(self, sock: socket.socket, fds: Any, client: LeanClient) -> None:
        self.sock = sock
        self.fileno = sock.fileno
        self.fds = fds  # the factory's balancer._twisted.fdOps
        self.client: LeanClient | None = client
        self.other: _Half | None = None
        self.pending = b""
        self.reading = False
        self.eof = False
        self.shut = False
        self.rx = 0

    def logPrefix(self) -> str:
        return "balancer"

    @property
    def halfClose(self) -> bool:
        client = self.client
        return client is None or client.factory.halfClose

    def startReading(self) -> None:
        if not self.reading:
            self.reading = True
            self.fds.addReader(self)

    def stopReading(self) -> None:
        if self.reading:
            self.reading = False
            self.fds.removeReader(self)

    pauseReading = readingDone = stopReading
    resumeReading = startReading

    def doRead(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except _EAGAIN:
            return
        except OSError:
            self.client.abort()
            return
        if data:
            self.forward(data)
        else:
            self.readEnded()

    def send(self, data: bytes) -> bool:
        """
        Send C{data} to this socket; keep what the kernel did not take and
        send it when the socket is writable.  Returns whether the sender may
        go on reading (C{False}: bytes are pending, or the pair is closed).
        """
        sent = sendSome(self.sock, data)
        if sent == len(data):
            return True
        if sent < 0:
            self.client.abort()
            return False
        self.pending = data[sent:]
        self.fds.addWriter(self)
        return False

    def doWrite(self) -> None:
        data = self.pending
        sent = sendSome(self.sock, data)
        if sent < 0:
            self.client.abort()
        elif sent < len(data):
            self.pending = data[sent:]
        else:
            self.pending = b""
            self.fds.removeWriter(self)
            self.drained()

    def shutdownWrite(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.client.abort()

    def closePair(self) -> None:
        self.client.abort()

    def connectionLost(self, reason: Any) -> None:
        """
        The reactor saw an error or hang-up on this socket, or is stopping.
        """
        if self.client is not None:
            self.client.abort()


@implementer(IProxiedClient)
class LeanClient(ClientCore, _Half):
    """
    A client accepted by a L{LeanPort}: its socket, and the proxied
    connection's state (an L{IProxiedClient}; the client-side state machine
    is L{ClientCore}'s).
    """

    __slots__ = (
        "factory", "addr", "backend", "peer", "attempt", "tried", "held", "closed",
        "idleMark", "idleSteps",
    )

    lean = True

    def __init__(self, factory: Any, sock: socket.socket, addr: tuple[Any, ...]) -> None:
        _Half.__init__(self, sock, factory.fds, self)
        self.factory = factory
        self.addr = addr
        self.backend: _Half | None = None
        self.peer: Any = None
        self.attempt: Any = None
        self.tried: set[Any] | None = set()
        self.held: EarlyData | None = None
        self.closed = False
        self.idleMark = 0
        self.idleSteps = 0

    def clientAddress(self) -> IPv4Address | IPv6Address:
        return _address(self.addr)

    def activity(self) -> int:
        backend = self.backend
        return self.rx + (backend.rx if backend is not None else 0)

    # -- ClientCore's primitives over raw sockets ----------------------------------

    def localAddress(self) -> IPv4Address | IPv6Address:
        return _address(self.sock.getsockname())

    def linkBackend(self, connect: Any) -> None:
        """
        C{connect}, a L{balancer.rawconnect.RawConnect}, connected its
        socket: the socket, watched for writability while connecting, is
        now watched for reading by the backend half.  Or C{connect} is a
        socket connected at once (L{BalancerFactory.dispatch}), not watched
        yet.
        """
        if isinstance(connect, socket.SocketType):
            backend = _Half(connect, self.fds, self)
            self.fds.addReader(backend)
        else:
            backend = _Half(connect.sock, self.fds, self)
            self.fds.writerToReader(connect, backend)
        self.backend = self.other = backend
        backend.other = self
        backend.reading = True

    def toTwisted(self) -> ServerSide:
        """
        Hand this client over to the Twisted path (for a backend that
        L{balancer.rawconnect.RawConnect} cannot reach): the same socket in
        a Twisted transport with a L{ServerSide}, which gets the held bytes.
        An EOF already read is read again by the transport.
        """
        f = self.factory
        self.stopReading()
        server = ServerSide()
        server.factory = f
        server.tried = self.tried
        server.held = self.held
        server.handedOver = True
        server.rx = self.rx
        f.clients.discard(self)
        f.clients.add(server)
        self.closed = True
        self.client = None
        t = _twisted.adoptSocket(
            f.reactor, self.sock, server, self.addr, f"<ServerSide from {self.addr}>"
        )
        if t is not None:
            server.connected = 1
            server.transport = t
        if self.held is not None and self.held.size > HOLD_LIMIT:
            server.paused = True
            server.transport.pauseProducing()
        return server

    def close(self) -> None:
        """
        Close both connections once their pending bytes are sent (a drain
        deadline): both are no longer read, and each is shut as if its
        sender had finished.
        """
        backend = self.backend
        if backend is None:
            self.abort()
            return
        for half in (self, backend):
            half.stopReading()
            half.eof = True
        for half in (self, backend):
            if not (self.closed or half.pending or half.shut):
                half.shutWrite()

    def abort(self) -> None:
        """
        Close both sockets now and end the connection's accounting.
        """
        if self.closed:
            return
        self.closed = True
        f = self.factory
        f.clients.discard(self)
        fds = self.fds
        for half in (self, self.backend):
            if half is not None:
                if half.reading or half.pending:
                    fds.forget(half, half.reading, bool(half.pending))
                    half.reading = False
                half.sock.close()
                half.client = half.other = None
        self.endAccounting()


@implementer(IReadDescriptor)
class LeanPort:
    """
    A listening socket as a reactor reader, accepting into L{LeanClient}s
    (see L{balancer.listen.SocketEndpoint}).
    """

    log = Logger()

    def __init__(self, reactor: Any, sock: socket.socket, factory: Any) -> None:
        self.reactor = reactor
        self.sock = sock
        self.fileno = sock.fileno
        self.factory = factory
        self._resume: Any = None
        self.acceptOne = _twisted.acceptor(sock)
        reactor.addReader(self)

    def logPrefix(self) -> str:
        return "LeanPort"

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address(self.sock.getsockname())

    def doRead(self) -> None:
        accept = self.acceptOne
        factory = self.factory
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = accept()
            except _EAGAIN:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the listening socket
                    # stays readable, so stop watching it for a while
                    # rather than spin (nginx waits too); the kernel keeps
                    # new clients in the backlog meanwhile.
                    self.log.error(
                        "accept: {e}; not accepting for {delay}s", e=e, delay=ACCEPT_PAUSE
                    )
                    self.reactor.removeReader(self)
                    self._resume = self.reactor.callLater(ACCEPT_PAUSE, self._resumeAccepting)
                    return
                continue  # ECONNABORTED...: that client is gone
            sock.setblocking(False)
            factory.accept(LeanClient(factory, sock, addr))

    def _resumeAccepting(self) -> None:
        self._resume = None
        self.reactor.addReader(self)

    def connectionLost(self, reason: Any) -> None:
        self.sock.close()

    def stopListening(self) -> defer.Deferred[None]:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self.reactor.removeReader(self)
        self.sock.close()
        return defer.succeed(None)
