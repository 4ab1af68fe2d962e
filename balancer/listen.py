"""
Listening endpoints: optionally with C{SO_REUSEPORT}, so that several
balancer processes (C{--workers}) can each accept on the same port and the
kernel spreads new connections across them, and for plain C{tcp:}
listeners of the proxy optionally lean (L{balancer.lean.LeanPort}).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)
from twisted.protocols.tls import TLSMemoryBIOFactory

from balancer import _twisted
from chatproto.common.endpointstr import withBacklog


class SocketEndpoint:
    """
    A TCP (or TLS-over-TCP) server endpoint that makes its listening socket
    itself: with C{SO_REUSEPORT} set before C{bind()} when C{reusePort},
    and accepting with a L{balancer.lean.LeanPort} when C{lean} (no TLS;
    the factory is then a L{balancer.proxy.BalancerFactory}).
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        interface: str = "",
        backlog: int = 1024,
        tlsContext: Any = None,
        reusePort: bool = True,
        lean: bool = False,
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.tlsContext = tlsContext
        self.reusePort = reusePort
        self.lean = lean

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return defer.execute(self._listen, factory)

    def _listen(self, factory: Any) -> Any:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reusePort:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            if self.lean:
                from balancer.lean import LeanPort

                # accepted sockets inherit it (Linux): one setsockopt less
                # per client
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                port = LeanPort(self.reactor, sock, factory)
                sock = None
                return port
            if self.tlsContext is not None:
                factory = TLSMemoryBIOFactory(self.tlsContext, False, factory)
            return self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        finally:
            # adoptStreamPort dup()s the descriptor
            if sock is not None:
                sock.close()


def serverEndpoint(
    reactor: Any, description: str, reusePort: bool, backlog: int, lean: bool = False
) -> Any:
    """
    The endpoint for C{--listen DESCRIPTION}.  With C{reusePort}, C{tcp:}
    and C{ssl:} endpoints are rebuilt as L{SocketEndpoint}s; with C{lean},
    C{tcp:} endpoints are rebuilt as lean L{SocketEndpoint}s.  Without
    Twisted's endpoint internals (L{balancer._twisted.endpointFields}) the
    parsed endpoint is used as it is (C{--workers} then fails).
    """
    endpoint = serverFromString(reactor, withBacklog(description, backlog))
    isTCP = isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint))
    isSSL = isinstance(endpoint, SSL4ServerEndpoint)
    if isTCP or isSSL:
        fields = _twisted.endpointFields(endpoint) if (reusePort or lean) else None
        if fields is None:
            if reusePort:
                raise ValueError(
                    f"--workers cannot rebuild {description!r} on this Twisted version"
                )
            return endpoint
        port, interface, endpointBacklog, tlsContext = fields
        if isTCP:
            return SocketEndpoint(
                reactor, port, interface, endpointBacklog, reusePort=reusePort, lean=lean
            )
        if reusePort:
            return SocketEndpoint(reactor, port, interface, endpointBacklog, tlsContext)
        return endpoint
    if reusePort:
        raise ValueError(f"--workers needs tcp: or ssl: listen endpoints, not {description!r}")
    return endpoint
