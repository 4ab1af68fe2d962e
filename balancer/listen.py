"""
Listening endpoints, optionally with C{SO_REUSEPORT} so that several
balancer processes (C{--workers}) can each accept on the same port and the
kernel spreads new connections across them.
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


class ReusePortEndpoint:
    """
    A TCP (or TLS-over-TCP) server endpoint whose socket has
    C{SO_REUSEPORT} set before C{bind()}.
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        interface: str = "",
        backlog: int = 1024,
        tls_context: Any = None,
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.tls_context = tls_context

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return defer.execute(self._listen, factory)

    def _listen(self, factory: Any) -> Any:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            if self.tls_context is not None:
                factory = TLSMemoryBIOFactory(self.tls_context, False, factory)
            return self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        finally:
            # adoptStreamPort dup()s the descriptor
            sock.close()


def server_endpoint(reactor: Any, description: str, reuse_port: bool, backlog: int) -> Any:
    """
    The endpoint for C{--listen DESCRIPTION}.  With C{reuse_port}, C{tcp:}
    and C{ssl:} endpoints are rebuilt as L{ReusePortEndpoint}s.
    """
    endpoint = serverFromString(reactor, description)
    if isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        if "backlog=" not in description:
            endpoint._backlog = backlog
        if reuse_port:
            return ReusePortEndpoint(
                reactor, endpoint._port, endpoint._interface, endpoint._backlog
            )
    elif isinstance(endpoint, SSL4ServerEndpoint):
        if "backlog=" not in description:
            endpoint._backlog = backlog
        if reuse_port:
            return ReusePortEndpoint(
                reactor,
                endpoint._port,
                endpoint._interface,
                endpoint._backlog,
                endpoint._sslContextFactory,
            )
    elif reuse_port:
        raise ValueError(f"--workers needs tcp: or ssl: listen endpoints, not {description!r}")
    return endpoint
