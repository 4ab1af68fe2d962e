"""
The one place where the balancer touches private Twisted (and stdlib
socket) internals.  The speed-ups that need them:

 - B{fast write}: send on a plain TCP transport's socket at once when
   nothing is queued, and shut its writing side at once (C{dataBuffer},
   C{_tempDataLen}, C{_writeDisconnecting}, C{_shouldShutdown},
   C{_closeWriteConnection}), and read straight into the forwarding code
   (an instance C{doRead});
 - B{lean dispatch}: an epoll loop without C{log.callWithLogger}
   (C{_poller}, C{_selectables}, C{_doReadOrWrite},
   C{_disconnectSelectable});
 - B{endpoint fields}: the port, interface, backlog and TLS context of a
   parsed C{tcp:}/C{ssl:} server endpoint (C{_port}, C{_interface},
   C{_backlog}, C{_sslContextFactory}), to rebuild it with
   C{SO_REUSEPORT} or as a lean listener;
 - B{txredisapi}: the reconnect back-off ceiling of a lazy connection
   (C{_factory.maxDelay});
 - B{lean path}: a C{tcp.Server} built around a connected socket without
   the C{dup()} of C{adoptStreamConnection}; the epoll reactor's
   descriptor bookkeeping (C{_reads}, C{_writes}, C{_selectables}) kept
   directly (L{fdOps}: one C{epoll_ctl} to switch a connected backend
   socket from writing to reading, none before a close); C{socket._accept}
   without the Python C{socket} wrapper (L{acceptor}).

L{selfCheck} verifies at start-up that this Twisted version has them all;
each feature that is missing falls back to the public path (plain
C{transport.write}/C{loseWriteConnection}, the stock epoll loop, the parsed
endpoint as it is, C{adoptStreamConnection}, txredisapi's back-off) with
one log line saying so.
No other balancer module names a private attribute of another library.
"""

from __future__ import annotations

import select
import socket
from typing import Any, Callable

from twisted.internet import main, protocol, tcp
from twisted.logger import Logger

from balancer.fdset import PublicFDs

log = Logger()

_EAGAIN = (BlockingIOError, InterruptedError)

_TRANSPORT_ATTRS = (
    "dataBuffer", "_tempDataLen", "_writeDisconnecting", "_writeDisconnected",
    "_shouldShutdown", "producerPaused", "disconnecting", "connected", "socket",
)
_TRANSPORT_METHODS = ("_closeWriteConnection", "stopWriting", "stopReading", "doRead")
_REACTOR_ATTRS = (
    "_poller", "_selectables", "_doReadOrWrite", "_disconnectSelectable", "_reads", "_writes",
)
_SOCKET_ATTRS = ("_accept",)
_ENDPOINT_ATTRS = ("_port", "_interface", "_backlog")


class _Features:
    """Which private paths are usable (set by L{selfCheck})."""

    fastWrite = True
    leanDispatch = True
    endpointFields = True
    adoptSocket = True
    rawAccept = True
    redisMaxDelay = True
    checked = False


features = _Features()


def _probeTransport() -> list[str]:
    # checked on a real tcp.Server around a socket pair, never started
    a, b = socket.socketpair()
    try:
        t = tcp.Server(a, protocol.Protocol(), ("127.0.0.1", 0), None, 0, _NoReactor())
        missing = [n for n in _TRANSPORT_ATTRS if not hasattr(t, n)]
        missing += [n for n in _TRANSPORT_METHODS if not callable(getattr(t, n, None))]
        return missing
    except Exception as e:  # the constructor itself changed
        return [f"tcp.Server(...): {e}"]
    finally:
        a.close()
        b.close()


class _NoReactor:
    # just enough reactor for a tcp.Server that is never started
    addReader = removeReader = staticmethod(lambda reader: None)


def _probeEndpoint() -> list[str]:
    from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint

    tcpEndpoint = TCP4ServerEndpoint(None, 0, 50, "127.0.0.1")
    missing = [n for n in _ENDPOINT_ATTRS if not hasattr(tcpEndpoint, n)]
    sslEndpoint = SSL4ServerEndpoint(None, 0, None, 50, "127.0.0.1")
    if not hasattr(sslEndpoint, "_sslContextFactory"):
        missing.append("_sslContextFactory")
    return missing


def _probeSocket() -> list[str]:
    return [n for n in _SOCKET_ATTRS if not hasattr(socket.socket, n)]


_reactorWarned = []


def _reactorMissing(reactor: Any) -> list[str]:
    """L{_probeReactor}, logging once what is missing."""
    missing = _probeReactor(reactor)
    if missing and not _reactorWarned:
        _reactorWarned.append(True)
        features.leanDispatch = False
        log.warn(
            "the epoll reactor lacks {names}: using the stock epoll loop and reactor.addReader",
            names=", ".join(missing),
        )
    return missing


def _isEpoll(reactor: Any) -> bool:
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - not Linux
        return False
    return isinstance(reactor, EPollReactor)


def _probeReactor(reactor: Any) -> list[str]:
    # another reactor has nothing to speed up: not a failure of the check
    return [n for n in _REACTOR_ATTRS if not hasattr(reactor, n)] if _isEpoll(reactor) else []


def _leanEpoll(reactor: Any) -> bool:
    """Whether C{reactor} is an epoll reactor whose internals may be used."""
    ensureChecked()
    return not _reactorMissing(reactor) and features.leanDispatch and _isEpoll(reactor)


def selfCheck(reactor: Any = None) -> _Features:
    """
    Verify that this Twisted has every private attribute used here; turn
    off (with one log line each) the features whose attributes are
    missing.  With C{reactor}, also check the lean dispatch against it.
    """
    for probe, what, names, fallback in _PROBES:
        missing = probe()
        if missing:
            for name in names:
                setattr(features, name, False)
            log.warn("{what} lack {names}: " + fallback, what=what, names=", ".join(missing))
    if reactor is not None:
        del _reactorWarned[:]
        _reactorMissing(reactor)
    features.checked = True
    return features


def ensureChecked(reactor: Any = None) -> None:
    """L{selfCheck} once (the balancer's factory calls it at start-up)."""
    if not features.checked:
        selfCheck(reactor)


# -- transports ----------------------------------------------------------------


def plainSocket(transport: Any) -> socket.socket | None:
    """
    The socket of a plain (non-TLS) TCP transport, to send on at once, or
    C{None} (then use the transport's public methods).
    """
    plain = isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)
    return transport.socket if plain and features.fastWrite else None


def queuedBytes(transport: Any) -> int:
    """Bytes queued in C{transport} and not yet sent."""
    return len(transport.dataBuffer) + transport._tempDataLen


def shutWriteNow(transport: Any, lastDirection: bool) -> bool:
    """
    C{transport.loseWriteConnection()} done at once for a plain TCP
    transport with nothing queued: C{shutdown(SHUT_WR)} now instead of
    watching for writability to do it on a later turn.  When
    C{lastDirection} (the peer has finished sending too), the transport is
    closed instead.  Returns C{False} when it could not (then call
    C{loseWriteConnection}).
    """
    t = transport
    if plainSocket(t) is None or not t.connected or queuedBytes(t) or (
        t.disconnecting or t._writeDisconnecting or t.producerPaused
    ):
        return False
    # What FileDescriptor.doWrite does once the buffer is empty.
    t._writeDisconnecting = t._writeDisconnected = True
    # Writing is shut already: close() needs no shutdown() first.
    t._shouldShutdown = False
    t.stopWriting()
    if lastDirection:
        t.stopReading()
        t.connectionLost(protocol.connectionDone)
    else:
        t._closeWriteConnection()
    return True


def installFastRead(transport: Any, onData: Callable[[bytes], None]) -> bool:
    """
    Make C{transport} (with a L{plainSocket}) read straight into
    C{onData}, skipping two layers of Python calls per chunk
    (C{tcp.Connection.doRead} -> C{_dataReceived} -> C{dataReceived}).
    """
    sock = plainSocket(transport)
    if sock is None:
        return False
    recv = sock.recv

    def doRead() -> Any:
        try:
            data = recv(65536)
        except _EAGAIN:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        onData(data)
        return None

    transport.doRead = doRead
    return True


def removeFastRead(transport: Any) -> None:
    transport.__dict__.pop("doRead", None)


def adoptSocket(
    reactor: Any, sock: socket.socket, proto: protocol.Protocol, addr: Any, describe: str
) -> Any:
    """
    Make connected C{sock} the transport of C{proto}, reading at once: a
    C{tcp.Server} built around it (no C{dup()}; returned, the caller
    connects C{proto}), or C{None} after the fallback
    C{reactor.adoptStreamConnection} (which dups C{sock}, then closed).
    """
    ensureChecked()
    if features.adoptSocket:
        t = tcp.Server(sock, proto, addr, None, 0, reactor)
        t.repstr = describe
        return t
    factory = protocol.Factory.forProtocol(lambda: proto)
    factory.noisy = False
    try:
        reactor.adoptStreamConnection(sock.fileno(), sock.family, factory)
    finally:
        sock.close()
    return None


# -- the epoll reactor -------------------------------------------------------------


def epollInternals(reactor: Any) -> tuple[Any, dict[int, Any], Any, Any] | None:
    """
    C{(poller, selectables, doReadOrWrite, disconnectSelectable)} of an
    epoll reactor, or C{None} (another reactor, or lean dispatch turned
    off by L{selfCheck}).
    """
    if not _leanEpoll(reactor):
        return None
    return (
        reactor._poller, reactor._selectables, reactor._doReadOrWrite,
        reactor._disconnectSelectable,
    )


# -- endpoints -----------------------------------------------------------------------


def endpointFields(endpoint: Any) -> tuple[int, str, int, Any] | None:
    """
    C{(port, interface, backlog, sslContextFactory or None)} of a parsed
    C{tcp:}/C{ssl:} server endpoint, or C{None} when unavailable.
    """
    ensureChecked()
    if not features.endpointFields:
        return None
    try:
        return (
            endpoint._port, endpoint._interface, endpoint._backlog,
            getattr(endpoint, "_sslContextFactory", None),
        )
    except AttributeError:
        return None


class _EpollFDs:
    """L{fdOps} kept in an epoll reactor's state: its C{_add}/C{_remove}, leaner."""

    def __init__(self, reactor: Any) -> None:
        self.poller = reactor._poller
        self.reads: set[int] = reactor._reads
        self.writes: set[int] = reactor._writes
        self.selectables: dict[int, Any] = reactor._selectables

    def addReader(self, x: Any) -> None:
        self._add(x, self.reads, self.writes, _EPOLLIN)

    def addWriter(self, x: Any) -> None:
        self._add(x, self.writes, self.reads, _EPOLLOUT)

    def _add(self, x: Any, primary: set[int], other: set[int], flags: int) -> None:
        fd = x.fileno()
        if fd in primary:
            return
        if fd in other:
            self.poller.modify(fd, _EPOLLIN | _EPOLLOUT)
        else:
            self.poller.register(fd, flags)
        primary.add(fd)
        self.selectables[fd] = x

    def removeReader(self, x: Any) -> None:
        self._remove(x.fileno(), self.reads, self.writes, _EPOLLOUT)

    def removeWriter(self, x: Any) -> None:
        self._remove(x.fileno(), self.writes, self.reads, _EPOLLIN)

    def _remove(self, fd: int, primary: set[int], other: set[int], otherFlags: int) -> None:
        if fd not in primary:
            return
        if fd in other:
            self.poller.modify(fd, otherFlags)
        else:
            del self.selectables[fd]
            self.poller.unregister(fd)
        primary.remove(fd)

    def writerToReader(self, old: Any, new: Any) -> None:
        fd = new.fileno()
        if fd in self.writes and fd not in self.reads and self.selectables.get(fd) is old:
            # one epoll_ctl instead of a delete and an add
            self.poller.modify(fd, _EPOLLIN)
            self.writes.remove(fd)
            self.reads.add(fd)
            self.selectables[fd] = new
        else:
            self.removeWriter(old)
            self.addReader(new)

    def forget(self, selectable: Any, reading: bool, writing: bool) -> None:
        # close() takes the socket out of the epoll set (nothing dup()s it)
        fd = selectable.fileno()
        self.reads.discard(fd)
        self.writes.discard(fd)
        if self.selectables.get(fd) is selectable:
            del self.selectables[fd]


_EPOLLIN = getattr(select, "EPOLLIN", 1)
_EPOLLOUT = getattr(select, "EPOLLOUT", 4)


def fdOps(reactor: Any) -> Any:
    """
    Descriptor bookkeeping for the lean data path (C{IReactorFDSet}'s four,
    C{writerToReader(old, new)}, C{forget(selectable, reading, writing)}
    before a close): in an epoll reactor's state, or through its methods.
    """
    return _EpollFDs(reactor) if _leanEpoll(reactor) else PublicFDs(reactor)


def acceptor(listener: socket.socket) -> Callable[[], tuple[Any, Any]]:
    """
    C{listener.accept}, or a leaner equivalent (a C-level socket object
    without the Python wrapper class) when L{selfCheck} allows.  The
    accepted socket is blocking, as with C{accept}.
    """
    ensureChecked()
    if not (features.rawAccept and isinstance(listener, socket.socket)):
        return listener.accept
    rawAccept = listener._accept
    make = socket.SocketType
    family, kind = int(listener.family), socket.SOCK_STREAM

    def accept() -> tuple[Any, Any]:
        fd, addr = rawAccept()
        return make(family, kind, 0, fd), addr

    return accept


# -- txredisapi ---------------------------------------------------------------------


def _probeRedis() -> list[str]:
    import txredisapi

    conn = txredisapi.ConnectionHandler(
        txredisapi.RedisFactory(None, 0, 1, isLazy=True, convertNumbers=False)
    )
    return [] if _redisFactory(conn) is not None else ["_factory.maxDelay"]


def _redisFactory(connection: Any) -> Any:
    factory = getattr(connection, "_factory", None)
    return factory if isinstance(getattr(factory, "maxDelay", None), (int, float)) else None


def setRedisMaxDelay(connection: Any, maxDelay: float) -> bool:
    """
    Cap the reconnection back-off of a txredisapi lazy connection (its
    factory's C{maxDelay}, reached through the private C{_factory}).
    Returns C{False}, with one log line, when it has no such factory (the
    library's longer default back-off then applies).
    """
    ensureChecked()
    factory = _redisFactory(connection) if features.redisMaxDelay else None
    if factory is None:
        log.warn("txredisapi connection has no _factory.maxDelay: default reconnect back-off")
        return False
    factory.maxDelay = maxDelay
    return True


# probe, what it probes, the features it guards, the fallback its log line names
_PROBES: list[tuple[Callable[[], list[str]], str, tuple[str, ...], str]] = [
    (_probeTransport, "Twisted transports", ("fastWrite", "adoptSocket"),
     "forwarding with transport.write"),
    (_probeEndpoint, "Twisted endpoints", ("endpointFields",),
     "listening on endpoints as parsed (no SO_REUSEPORT, no lean listener)"),
    (_probeSocket, "Python sockets", ("rawAccept",), "accepting with socket.accept"),
    (_probeRedis, "txredisapi connections", ("redisMaxDelay",), "default reconnect back-off"),
]
