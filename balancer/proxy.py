"""
The data path: accept a client, pick a backend, connect (retrying the next
backend on failure), then copy bytes both ways.

This module has the selection, retry and accounting code that both data
paths share (L{BalancerFactory}, L{Attempt}, L{RawConnect}) and the Twisted
path (L{ServerSide}, L{BackendSide}: Twisted transports, used for C{ssl:}
listeners and backends given by host name or endpoint string).  Plain
C{tcp:} listeners forward on raw sockets instead (L{balancer.lean}).

Backpressure is Twisted's portforward scheme: each transport is registered
as the other's streaming producer, so a slow reader pauses the fast writer
and the balancer never buffers more than about one transport buffer per
direction.  Client data that arrives before the backend is connected is
held (the client transport is paused meanwhile) and delivered first.

Speed: C{transport.write} only queues and sends on a later reactor turn
(two C{epoll_ctl} calls and an extra loop iteration per message).  When the
destination is a plain TCP transport with nothing queued, L{_Side.forward}
calls C{send()} on its socket at once and queues only what the kernel did
not take, which keeps ordering (queued data always goes first) and
Twisted's flow control (everything beyond the kernel buffer goes through
C{transport.write}).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from ipaddress import ip_address
from typing import Any

from twisted.internet import error, main, protocol, tcp
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IReactorFDSet,
    IWriteDescriptor,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from balancer.selection import Peer, Selector

_EAGAIN = (BlockingIOError, InterruptedError)

# Bytes held from a client before its backend connection is up; beyond
# this the client is no longer read (Twisted's transport buffer size).
HOLD_LIMIT = 65536


def _plain_socket(transport: Any) -> socket.socket | None:
    """
    The socket of a plain (non-TLS) TCP transport, or C{None}.
    """
    if isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False):
        return transport.socket
    return None


def lose_write(transport: Any) -> None:
    """
    C{transport.loseWriteConnection()}, done at once for a plain TCP
    transport with nothing queued: C{shutdown(SHUT_WR)} now instead of
    watching for writability (two C{epoll_ctl}) to do it on a later turn.
    """
    t = transport
    if (
        _plain_socket(t) is not None
        and t.connected
        and not (t.disconnecting or t._writeDisconnecting or t.producerPaused)
        and not (t.dataBuffer or t._tempDataLen)
    ):
        # What FileDescriptor.doWrite does once the buffer is empty.
        t._writeDisconnecting = t._writeDisconnected = True
        # Writing is shut already: close() needs no shutdown() first.
        t._shouldShutdown = False
        t.stopWriting()
        if getattr(t.protocol, "read_eof", False):
            # The peer has finished sending too: this was the last open
            # direction, so close now (close() sends the same FIN).
            t.stopReading()
            t.connectionLost(protocol.connectionDone)
        else:
            t._closeWriteConnection()
    else:
        t.loseWriteConnection()


def set_nodelay(transport: Any) -> None:
    try:
        transport.setTcpNoDelay(True)
        return
    except (AttributeError, OSError, NotImplementedError):
        pass
    try:
        transport.getHandle().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


# -- PROXY protocol ---------------------------------------------------------

_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _ip_port(addr: Any) -> tuple[str, int] | None:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is None or port is None:
        return None
    try:
        ip_address(host)
    except ValueError:
        return None
    return host, port


def proxy_header(version: str, source: Any, destination: Any) -> bytes:
    """
    A PROXY protocol header (C{"v1"} text or C{"v2"} binary) saying the
    connection came from C{source} to C{destination} (Twisted addresses).
    """
    src, dst = _ip_port(source), _ip_port(destination)
    if src and dst and ip_address(src[0]).version != ip_address(dst[0]).version:
        # mixed families: map the v4 one into v6
        src = (_to_v6(src[0]), src[1])
        dst = (_to_v6(dst[0]), dst[1])
    if version == "v1":
        if not (src and dst):
            return b"PROXY UNKNOWN\r\n"
        fam = "TCP6" if ":" in src[0] else "TCP4"
        return f"PROXY {fam} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode("ascii")
    if not (src and dst):
        # LOCAL command, no address
        return _V2_SIGNATURE + b"\x20\x00\x00\x00"
    s, d = ip_address(src[0]), ip_address(dst[0])
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    fam = b"\x11" if s.version == 4 else b"\x21"
    return _V2_SIGNATURE + b"\x21" + fam + struct.pack("!H", len(body)) + body


def _to_v6(host: str) -> str:
    a = ip_address(host)
    return host if a.version == 6 else f"::ffff:{host}"


# -- the two halves of a proxied connection ---------------------------------


@implementer(IHalfCloseableProtocol)
class _Side(protocol.Protocol):
    """
    Common code of both halves: forwarding, half-close, teardown.
    """

    other: _Side | None = None
    _sock: socket.socket | None = None
    _out: Any = None  # the other side's transport
    _out_sock: socket.socket | None = None
    read_eof = False
    write_eof = False
    rx = 0

    def dataReceived(self, data: bytes) -> None:
        self.rx += len(data)
        self.send(data)

    def send(self, data: bytes) -> None:
        """
        Write C{data} to the other side: C{send()} at once when its
        transport is plain TCP with nothing queued, queue the rest.
        """
        out = self._out
        sock = self._out_sock
        if sock is not None and not out._tempDataLen and not out.dataBuffer:
            try:
                sent = sock.send(data)
            except _EAGAIN:
                sent = 0
            except OSError:
                # Let Twisted find the error on its own write.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        out.write(data)

    def link(self, other: _Side) -> None:
        self.other = other
        self._out = other.transport
        self._out_sock = _plain_socket(other.transport)
        sock = _plain_socket(self.transport)
        if sock is not None and self._out_sock is not None:
            # Read straight into the forwarding code, skipping two layers
            # of Python calls per chunk (tcp.Connection.doRead ->
            # _dataReceived -> dataReceived).
            self._sock = sock
            self.transport.doRead = self._fast_read

    def _fast_read(self) -> Any:
        try:
            data = self._sock.recv(65536)
        except _EAGAIN:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.rx += len(data)
        # _Side.send, inlined: this is the hottest path.
        out = self._out
        sock = self._out_sock
        if sock is not None and not out._tempDataLen and not out.dataBuffer:
            try:
                sent = sock.send(data)
            except _EAGAIN:
                sent = 0
            except OSError:
                sent = 0
            if sent == len(data):
                return None
            data = data[sent:]
        if out is not None:
            out.write(data)
        return None

    def readConnectionLost(self) -> None:
        if self.read_eof:
            return
        self.read_eof = True
        if self.other is not None:
            lose_write(self.other.transport)
        self._maybe_close()

    def writeConnectionLost(self) -> None:
        self.write_eof = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.read_eof and self.write_eof:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._sock is not None:
            self._sock = None
            self.transport.__dict__.pop("doRead", None)
        other = self.other
        self.other = None
        self._out = self._out_sock = None
        if other is not None:
            other.other = None
            other._out = other._out_sock = None
            t = other.transport
            if t is not None:
                if getattr(t, "producer", None) is not None:
                    t.unregisterProducer()
                t.loseConnection()


class ServerSide(_Side):
    """
    A client connected to the balancer.
    """

    log = Logger()
    factory: BalancerFactory
    backend: BackendSide | None = None
    peer: Peer | None = None
    _held: list[bytes] | None = None
    _held_len = 0
    _pending_eof = False
    _attempt: Any = None
    _tried: set[Peer] | None = None
    closed = False
    lean = False

    _paused = False

    def connectionMade(self) -> None:
        # Not paused here (that costs two epoll_ctl calls per connection):
        # the transport is paused when data arrives before the backend
        # connection is up, and that data is held.
        self.factory.accepted += 1
        set_nodelay(self.transport)
        self._tried = set()
        self.factory.dispatch(self)

    def dataReceived(self, data: bytes) -> None:
        if self.other is None:
            # Not connected to a backend yet: hold the data, and stop
            # reading once HOLD_LIMIT bytes are held (pausing at once would
            # cost two epoll_ctl for the common request sent right after
            # connecting).  TLS handshakes and data in flight can still
            # arrive while paused.
            if self._held is None:
                self._held = []
            self._held.append(data)
            self._held_len += len(data)
            if self._held_len > HOLD_LIMIT and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            return
        _Side.dataReceived(self, data)

    def readConnectionLost(self) -> None:
        if self.other is None:
            self._pending_eof = True
            return
        _Side.readConnectionLost(self)

    def backend_connected(self, backend: BackendSide, peer: Peer) -> None:
        self._attempt = None
        self._tried = None
        self.peer = peer
        self.backend = backend
        self.link(backend)
        backend.link(self)
        t, bt = self.transport, backend.transport
        header = self.factory.header_for(t.getPeer(), t.getHost())
        held = self._held
        self._held = None
        if header or held:
            self.send(header + b"".join(held or ()))
        bt.registerProducer(t, True)
        t.registerProducer(bt, True)
        if self._pending_eof:
            _Side.readConnectionLost(self)
        elif self._paused:
            self._paused = False
            t.resumeProducing()

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

    def client_address(self) -> Any:
        return self.transport.getPeer()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        self.factory.clients.discard(self)
        attempt = self._attempt
        self._attempt = None
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

    def __init__(self, attempt: Attempt) -> None:
        self.attempt: Attempt | None = attempt

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        attempt = self.attempt
        self.attempt = None
        if attempt is not None:
            attempt.connected(self)


def _sockaddr(peer: Peer) -> tuple[int, Any] | None:
    """
    C{(family, sockaddr)} when C{peer} is a plain TCP address with an IP
    literal (cached on the peer), else C{None}.
    """
    try:
        return peer.extra["sockaddr"]
    except KeyError:
        pass
    found = None
    target = peer.extra.get("tcp")
    if target is not None:
        host, port = target
        try:
            family, _, _, _, addr = socket.getaddrinfo(
                host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
            )[0]
            found = (family, addr)
        except (OSError, IndexError):
            found = None  # a host name: connectTCP resolves it
    peer.extra["sockaddr"] = found
    return found


@implementer(IWriteDescriptor)
class RawConnect:
    """
    A non-blocking C{connect()} done by hand, the way nginx does it:
    C{socket()}, C{connect()}, wait for writability, read C{SO_ERROR}.  On
    success the socket becomes the same transport
    C{reactor.adoptStreamConnection} would build (a L{tcp.Server}, minus
    its C{dup()}); on failure or timeout C{attempt.clientConnectionFailed}
    gets the error C{connectTCP} would have given.  This replaces
    C{connectTCP}'s Connector, resolution Deferreds and their extra
    C{connect()} and C{epoll_ctl} calls.
    """

    def __init__(self, attempt: Attempt, family: int, addr: Any, timeout: float) -> None:
        self.attempt: Attempt | None = attempt
        self.addr = addr
        self.reactor = reactor = attempt.factory.reactor
        try:
            self.sock = sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:  # EMFILE...: as connectTCP reports it
            self.sock = None
            reason = Failure(error.ConnectBindError(e.errno, e.strerror))
            self.timer = reactor.callLater(0, self._failed, reason)
            return
        self.fileno = sock.fileno
        err = sock.connect_ex(addr)
        if err and err not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EINTR):
            # Failed at once (ENETUNREACH...): report it on the next turn,
            # as connectTCP does.
            self.timer = reactor.callLater(0, self._fail, err)
            return
        self.timer = reactor.callLater(timeout, self._timed_out)
        reactor.addWriter(self)

    def logPrefix(self) -> str:
        return "RawConnect"

    def doWrite(self) -> None:
        self._stop()
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(err)
            return
        attempt, self.attempt = self.attempt, None
        if attempt is None:  # pragma: no cover - cancelled meanwhile
            self.sock.close()
            return
        if attempt.server.lean:
            # the lean path forwards on the socket itself
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            attempt.connected(self.sock)
            return
        backend = BackendSide(attempt)
        t = tcp.Server(self.sock, backend, self.addr, None, 0, self.reactor)
        t.repstr = f"<BackendSide to {self.addr}>"
        backend.makeConnection(t)

    def connectionLost(self, reason: Failure) -> None:
        """
        Error or hang-up while connecting (the reactor has already stopped
        watching the socket).
        """
        if self.attempt is None:
            return  # given up already (reactor shutdown)
        self._stop()
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(err)
        else:  # pragma: no cover
            self._failed(reason)

    def _timed_out(self) -> None:
        self.timer = None
        self._stop()
        self._failed(Failure(error.TimeoutError()))

    def _fail(self, err: int) -> None:
        self._failed(Failure(error.getConnectError((err, os.strerror(err)))))

    def _failed(self, reason: Failure) -> None:
        self.timer = None
        if self.sock is not None:
            self.sock.close()
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.clientConnectionFailed(None, reason)

    def _stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.reactor.removeWriter(self)

    def disconnect(self) -> None:
        """
        Give up (the client went away): no callback.
        """
        self.attempt = None
        self._stop()
        if self.sock is not None:
            self.sock.close()


class Attempt(protocol.ClientFactory):
    """
    One connection attempt from the balancer to one backend for one client.
    """

    noisy = False

    def __init__(self, factory: BalancerFactory, server: ServerSide, peer: Peer):
        self.factory = factory
        self.server: ServerSide | None = server
        self.peer = peer
        self.connector: Any = None
        self.deferred: Any = None
        self.done = False

    def start(self) -> None:
        f = self.factory
        sockaddr = _sockaddr(self.peer) if f.raw_connect else None
        if sockaddr is not None:
            self.connector = RawConnect(self, sockaddr[0], sockaddr[1], f.connect_timeout)
            return
        target = self.peer.extra.get("tcp")
        if target is not None:
            host, port = target
            self.connector = f.reactor.connectTCP(
                host, port, self, timeout=f.connect_timeout
            )
        else:
            endpoint = self.peer.extra["endpoint"]
            factory = protocol.Factory.forProtocol(lambda: BackendSide(self))
            factory.noisy = False
            d = endpoint.connect(factory)
            d.addTimeout(f.connect_timeout, f.reactor)
            self.deferred = d
            d.addErrback(lambda reason: self.clientConnectionFailed(None, reason))

    def buildProtocol(self, addr: Any) -> BackendSide:
        return BackendSide(self)

    def connected(self, backend: BackendSide | socket.socket) -> None:
        """
        Connected: C{backend} is a L{BackendSide}, or for a lean client
        (L{balancer.lean.LeanClient}) the connected socket.
        """
        self.connector = self.deferred = None
        if self.done:
            _close_backend(backend)
            return
        self.done = True
        server = self.server
        self.server = None
        self.factory.attempt_succeeded(self.peer)
        assert server is not None
        if server.closed:
            _close_backend(backend)
            self.factory.release(self.peer)
            return
        server.backend_connected(backend, self.peer)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connector = self.deferred = None
        if self.done:
            return
        self.done = True
        server = self.server
        self.server = None
        self.factory.attempt_failed(self.peer, reason)
        if server is not None and not server.closed:
            self.factory.dispatch(server)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        pass

    def cancel(self) -> None:
        """
        The client went away while connecting.
        """
        if self.done:
            return
        self.done = True
        self.server = None
        self.factory.release(self.peer)
        if self.connector is not None:
            self.connector.disconnect()
        elif self.deferred is not None:
            self.deferred.cancel()


def _close_backend(backend: BackendSide | socket.socket) -> None:
    if isinstance(backend, socket.socket):
        backend.close()
    else:
        backend.transport.abortConnection()


class BalancerFactory(protocol.Factory):
    """
    Accepts clients and hands each to a backend chosen by C{selector}.

    @ivar accepted: clients accepted.
    @ivar rejected: clients closed because no backend could be reached.
    """

    log = Logger()
    protocol = ServerSide
    noisy = False

    def __init__(
        self,
        reactor: Any,
        selector: Selector,
        connect_timeout: float = 1.0,
        tries: int | None = None,
        proxy_protocol: str | None = None,
    ) -> None:
        self.reactor = reactor
        # connect to IP literals with L{RawConnect} (needs a real reactor)
        self.raw_connect = IReactorFDSet.providedBy(reactor)
        self.selector = selector
        self.connect_timeout = connect_timeout
        self.tries = tries
        self.proxy_protocol = proxy_protocol
        self.accepted = 0
        self.rejected = 0
        self.connect_failures = 0
        self.clients: set[ServerSide] = set()
        self.on_finished: list[Any] = []

    def buildProtocol(self, addr: Any) -> ServerSide:
        p = ServerSide()
        p.factory = self
        self.clients.add(p)
        return p

    def accept(self, client: Any) -> None:
        """
        A client accepted by a L{balancer.lean.LeanPort}.
        """
        self.accepted += 1
        self.clients.add(client)
        client.start_reading()
        self.dispatch(client)

    def header_for(self, client: Any, local: Any) -> bytes:
        """
        The PROXY header for a client at address C{client} connected to our
        address C{local}, or C{b""}.
        """
        if self.proxy_protocol is None:
            return b""
        return proxy_header(self.proxy_protocol, client, local)

    def dispatch(self, server: ServerSide) -> None:
        """
        Pick the next backend for C{server} and connect, or give up.
        """
        tried = server._tried
        assert tried is not None
        limit = self.tries or len(self.selector.peers)
        peer = None
        if len(tried) < limit:
            peer = self.selector.pick(tried)
        if peer is None:
            if tried:
                self.log.warn(
                    "no backend reachable for {client} after {n} tries",
                    client=server.client_address(), n=len(tried),
                )
            else:
                self.log.warn("no live backend for {client}", client=server.client_address())
            server._attempt = None
            server._tried = None
            self.rejected += 1
            server.abort()
            self.clients.discard(server)
            return
        if server.lean and _sockaddr(peer) is None:
            # a host name or an endpoint string: Twisted's transports
            server = server.to_twisted()
        tried.add(peer)
        peer.connection_started()
        attempt = Attempt(self, server, peer)
        server._attempt = attempt
        attempt.start()

    def attempt_succeeded(self, peer: Peer) -> None:
        peer.total += 1
        self.selector.succeeded(peer)

    def attempt_failed(self, peer: Peer, reason: Failure) -> None:
        self.connect_failures += 1
        self.release(peer)
        self.selector.failed(peer)
        if reason.check(error.TimeoutError, error.ConnectingCancelledError):
            why = "timed out"
        else:
            why = reason.getErrorMessage()
        peer.active.last_error = f"connect: {why}"
        self.log.warn("connect to backend {peer} failed: {why}", peer=peer.key, why=why)

    def release(self, peer: Peer) -> None:
        """
        A connection (or attempt) of C{peer} is over.
        """
        peer.connection_ended()
        for callback in self.on_finished:
            callback(peer)

    def close_all(self) -> None:
        for client in list(self.clients):
            client.abort()
