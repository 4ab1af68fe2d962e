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
   socket, from L{balancer.proxy.RawConnect}) are the reactor's read and
   write descriptors themselves: a read is C{send()} to the other socket at
   once; what the kernel does not take is kept (one chunk at most), the
   destination is watched for writability and the source is not read until
   it is sent (backpressure); an EOF becomes C{shutdown(SHUT_WR)} of the
   other socket once its pending bytes are out (half-close), and the pair is
   closed when both directions are done, or at once on an error.

Selection, retries, counting and draining are L{balancer.proxy}'s, shared
with the Twisted path: a L{LeanClient} goes through
L{BalancerFactory.dispatch} and L{Attempt} like a L{ServerSide}.  A client
whose chosen backend L{RawConnect} cannot reach (a host name, C{tls:}) is
handed over to the Twisted path (L{LeanClient.to_twisted}).
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from balancer.proxy import HOLD_LIMIT, ServerSide

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
class _Half:
    """
    One socket of a proxied pair; C{other} is the pair's other socket.

    @ivar pending: bytes read from C{other} that this socket did not take
        yet; while there are any, this socket is watched for writability
        and C{other} is not read.
    @ivar reading: this socket is watched for reading.
    @ivar eof: this socket's peer has finished sending.
    @ivar shut: nothing more will be sent to this socket.
    """

    __slots__ = (
        "sock", "fileno", "reactor", "client", "other", "pending", "reading", "eof", "shut"
    )

    def __init__(self, sock: socket.socket, reactor: Any, client: LeanClient) -> None:
        self.sock = sock
        self.fileno = sock.fileno
        self.reactor = reactor
        self.client: LeanClient | None = client
        self.other: _Half | None = None
        self.pending = b""
        self.reading = False
        self.eof = False
        self.shut = False

    def logPrefix(self) -> str:
        return "balancer"

    def start_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.reactor.addReader(self)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.reactor.removeReader(self)

    def doRead(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except _EAGAIN:
            return
        except OSError:
            self.client.abort()
            return
        other = self.other
        if not data:
            self.eof = True
            self.stop_reading()
            if other is not None and not other.pending:
                other.shut_write()
            # else: once other's pending bytes are out (doWrite), or once
            # the backend is connected (LeanClient.backend_connected)
        elif other is None:
            self.client.hold(data)
        elif not other.send(data):
            self.stop_reading()

    def send(self, data: bytes) -> bool:
        """
        Send C{data} to this socket; keep what the kernel did not take and
        send it when the socket is writable.  Returns whether the sender may
        go on reading (C{False}: bytes are pending, or the pair is closed).
        """
        try:
            sent = self.sock.send(data)
        except _EAGAIN:
            sent = 0
        except OSError:
            self.client.abort()
            return False
        if sent == len(data):
            return True
        self.pending = data[sent:]
        self.reactor.addWriter(self)
        return False

    def doWrite(self) -> None:
        data = self.pending
        try:
            sent = self.sock.send(data)
        except _EAGAIN:
            return
        except OSError:
            self.client.abort()
            return
        if sent < len(data):
            self.pending = data[sent:]
            return
        self.pending = b""
        self.reactor.removeWriter(self)
        source = self.other
        if source.eof:
            self.shut_write()
        else:
            source.start_reading()

    def shut_write(self) -> None:
        """
        Nothing more is sent to this socket: pass the EOF on with
        C{shutdown(SHUT_WR)}, or close the pair when this was the last open
        direction (C{close()} sends the same FIN).
        """
        self.shut = True
        if self.other.shut:
            self.client.abort()
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.client.abort()

    def connectionLost(self, reason: Any) -> None:
        """
        The reactor saw an error or hang-up on this socket, or is stopping.
        """
        if self.client is not None:
            self.client.abort()


class LeanClient(_Half):
    """
    A client accepted by a L{LeanPort}: its socket, and the proxied
    connection's state (the same attributes L{BalancerFactory.dispatch},
    L{Attempt} and the L{balancer.pool.Pool} use on a L{ServerSide}).
    """

    __slots__ = (
        "factory", "addr", "backend", "peer", "_attempt", "_tried", "_held", "_held_len", "closed"
    )

    lean = True

    def __init__(self, factory: Any, sock: socket.socket, addr: tuple[Any, ...]) -> None:
        _Half.__init__(self, sock, factory.reactor, self)
        self.factory = factory
        self.addr = addr
        self.backend: _Half | None = None
        self.peer: Any = None
        self._attempt: Any = None
        self._tried: set[Any] | None = set()
        self._held: list[bytes] | None = None
        self._held_len = 0
        self.closed = False

    def client_address(self) -> IPv4Address | IPv6Address:
        return _address(self.addr)

    def hold(self, data: bytes) -> None:
        """
        Keep bytes that arrive before the backend connection is up; stop
        reading once more than L{HOLD_LIMIT} are held.
        """
        if self._held is None:
            self._held = [data]
        else:
            self._held.append(data)
        self._held_len += len(data)
        if self._held_len > HOLD_LIMIT:
            self.stop_reading()

    def backend_connected(self, sock: socket.socket, peer: Any) -> None:
        """
        L{RawConnect} connected C{sock} to C{peer}: send the PROXY header and
        the held bytes, then forward both ways.
        """
        self._attempt = None
        self._tried = None
        self.peer = peer
        backend = _Half(sock, self.reactor, self)
        self.backend = self.other = backend
        backend.other = self
        backend.start_reading()
        f = self.factory
        data = b""
        if f.proxy_protocol is not None:
            data = f.header_for(self.client_address(), _address(self.sock.getsockname()))
        if self._held is not None:
            data += b"".join(self._held)
            self._held = None
        if data and not backend.send(data):
            self.stop_reading()  # until the held bytes are out (doWrite)
        elif self.eof:
            backend.shut_write()
        else:
            self.start_reading()

    def to_twisted(self) -> ServerSide:
        """
        Hand this client over to the Twisted path (for a backend that
        L{RawConnect} cannot reach): the same socket in a L{tcp.Server}
        transport with a L{ServerSide}, which gets the held bytes.  An EOF
        already read is read again by the transport.
        """
        f = self.factory
        self.stop_reading()
        server = ServerSide()
        server.factory = f
        server._tried = self._tried
        server._held, server._held_len = self._held, self._held_len
        server.connected = 1
        server.transport = t = tcp.Server(self.sock, server, self.addr, None, 0, self.reactor)
        if self._held_len > HOLD_LIMIT:
            server._paused = True
            t.pauseProducing()
        f.clients.discard(self)
        f.clients.add(server)
        self.closed = True
        self.client = None
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
            half.stop_reading()
            half.eof = True
        for half in (self, backend):
            if not (self.closed or half.pending or half.shut):
                half.shut_write()

    def abort(self) -> None:
        """
        Close both sockets now and end the connection's accounting.
        """
        if self.closed:
            return
        self.closed = True
        f = self.factory
        f.clients.discard(self)
        reactor = self.reactor
        for half in (self, self.backend):
            if half is not None:
                if half.reading:
                    half.reading = False
                    reactor.removeReader(half)
                if half.pending:
                    reactor.removeWriter(half)
                half.sock.close()
                half.client = half.other = None
        attempt = self._attempt
        self._attempt = None
        if attempt is not None:
            attempt.cancel()
        peer = self.peer
        self.peer = None
        if peer is not None:
            f.release(peer)


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
        reactor.addReader(self)

    def logPrefix(self) -> str:
        return "LeanPort"

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address(self.sock.getsockname())

    def doRead(self) -> None:
        accept = self.sock.accept
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
