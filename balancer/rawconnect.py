"""
Connecting to a backend by hand, the way nginx does it: C{socket()},
C{connect()}, wait for writability, read C{SO_ERROR}.

This replaces C{connectTCP}'s Connector, resolution Deferreds and their
extra C{connect()} and C{epoll_ctl} calls for backends given as IP
literals; connect timeouts are kept in one L{ConnectDeadlines} queue per
factory instead of one C{DelayedCall} per attempt.  For a lean client and a
loopback backend, L{balancer.proxy.BalancerFactory.dispatch} first tries
L{connectStart}: a connect the kernel completed inside the call is linked
at once, without a L{RawConnect} or a writability event.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
from collections import deque
from typing import Any

from twisted.internet import error
from twisted.internet.interfaces import IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from balancer import _twisted


def peerSockaddr(peer: Any) -> tuple[int, Any] | None:
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


class ConnectDeadlines:
    """
    The connect timeouts of all L{RawConnect}s of a factory: a FIFO of
    C{(deadline, connect)} and one timer for its head.  All attempts use
    the same timeout, so deadlines come in order (after a reload that
    changes it, an attempt may time out late by at most the difference).
    A finished attempt is not removed: it is skipped when its deadline
    comes.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.queue: deque[tuple[float, RawConnect]] = deque()
        self.call: Any = None

    def add(self, connect: RawConnect, timeout: float) -> None:
        self.queue.append((self.clock.seconds() + timeout, connect))
        if self.call is None:
            self.call = self.clock.callLater(timeout, self._expire)

    def _expire(self) -> None:
        self.call = None
        now = self.clock.seconds()
        queue = self.queue
        while queue and queue[0][0] <= now:
            connect = queue.popleft()[1]
            if connect.attempt is not None and connect.waiting:
                connect.timedOut()
        if queue and self.call is None:
            self.call = self.clock.callLater(max(0.0, queue[0][0] - now), self._expire)

    def stop(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        self.queue.clear()


_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EINTR)


def _newSocket(family: int, kind: int) -> socket.socket:
    return socket.SocketType(family, kind)


@functools.lru_cache(maxsize=4096)
def isLoopback(host: str) -> bool:
    """
    Whether C{host} (an IP literal) is a loopback address (cached, for at
    most 4,096 addresses: backends come and go with discovery).
    """
    return ipaddress.ip_address(host.split("%")[0]).is_loopback


def connectStart(family: int, addr: Any, loopback: bool = False) -> tuple[Any, int, bool]:
    """
    A non-blocking socket and its C{connect()} to C{addr}: C{(sock, 0,
    connected)} when connected or connecting, C{(sock, errno, False)} when
    the connect failed at once, C{(None, errno, False)} when no socket
    could be made.

    For a C{loopback} address the kernel runs the whole handshake inside
    the call (unless the backend's accept queue is full), so the socket is
    often C{connected} at once: a second C{connect()} tells (0 or
    C{EISCONN}), without the address formatting of C{getpeername()}.
    """
    try:
        # the C socket type (public as SocketType): no Python wrapper
        sock = _newSocket(family, _NONBLOCKING_STREAM)
    except OSError as e:  # EMFILE...
        return None, e.errno or errno.EMFILE, False
    err = sock.connect_ex(addr)
    if not err:
        return sock, 0, True
    if err in _IN_PROGRESS:
        if not loopback:
            return sock, 0, False
        err = sock.connect_ex(addr)
        if not err or err == errno.EISCONN:
            return sock, 0, True
        if err in _IN_PROGRESS or err == errno.EALREADY:
            return sock, 0, False
    return sock, err, False


@implementer(IWriteDescriptor)
class RawConnect:
    """
    One non-blocking C{connect()}.  On success the socket goes to the lean
    client, or becomes the transport of a L{balancer.sides.BackendSide}
    (the one C{reactor.adoptStreamConnection} would build, minus its
    C{dup()}); on failure or timeout C{attempt.clientConnectionFailed} gets
    the error C{connectTCP} would have given.
    """

    def __init__(
        self, attempt: Any, family: int, addr: Any, timeout: float, started: Any = None
    ) -> None:
        """
        Connect to C{addr}, or go on with C{started}: what L{connectStart}
        returned for it, not connected yet.
        """
        self.attempt: Any = attempt
        self.addr = addr
        self.waiting = False  # watched for writability
        factory = attempt.factory
        self.reactor = factory.reactor
        self.fds = factory.fds
        self.timer: Any = None
        self.sock, err, _ = started or connectStart(family, addr)
        if self.sock is None:  # EMFILE...: as connectTCP reports it
            reason = Failure(error.ConnectBindError(err, os.strerror(err)))
            self.timer = self.reactor.callLater(0, self._failed, reason)
            return
        self.fileno = self.sock.fileno
        if err:
            # Failed at once (ENETUNREACH...): report it on the next turn,
            # as connectTCP does.
            self.timer = self.reactor.callLater(0, self._fail, err)
            return
        self.waiting = True
        factory.deadlines.add(self, timeout)
        self.fds.addWriter(self)

    def _toLean(self, attempt: Any) -> None:
        # The lean path forwards on the socket itself; the backend half
        # takes over its reactor registration (LeanClient.linkBackend).
        self.waiting = False
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        attempt.connected(self)

    def logPrefix(self) -> str:
        return "RawConnect"

    def doWrite(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._stop()
            self._fail(err)
            return
        attempt, self.attempt = self.attempt, None
        if attempt is None:  # pragma: no cover - cancelled meanwhile
            self._stop()
            self.sock.close()
            return
        if attempt.client.lean:
            self._toLean(attempt)
            return
        self._stop()
        from balancer.sides import BackendSide

        backend = BackendSide(attempt)
        t = _twisted.adoptSocket(
            self.reactor, self.sock, backend, self.addr, f"<BackendSide to {self.addr}>"
        )
        if t is not None:
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

    def timedOut(self) -> None:
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
        if self.waiting:
            self.waiting = False
            self.fds.removeWriter(self)

    def disconnect(self) -> None:
        """
        Give up (the client went away): no callback.
        """
        self.attempt = None
        self._stop()
        if self.sock is not None:
            self.sock.close()
