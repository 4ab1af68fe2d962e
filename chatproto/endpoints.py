"""
Listening endpoints for C{--port}.

Any Twisted server endpoint string works.  C{haproxy:...} is Twisted's PROXY
protocol wrapper with one addition: it passes a client's half-close on to
the chat protocol (Twisted's wrapper does not, so an EOF from the balancer
would close the session before its last replies are written).  The wrapper
class is private to Twisted: L{chatproto._twisted} reaches it, and falls
back to the stock C{proxyEndpoint} when it is not there.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamServerEndpoint
from zope.interface import implementer

from chatproto import _twisted
from chatproto.common.endpointstr import withBacklog


def halfCloseable(wrapperBase):
    """A subclass of Twisted's PROXY wrapper C{wrapperBase} that passes a
    half-close on to the wrapped protocol."""

    @implementer(IHalfCloseableProtocol)
    class HalfCloseableHAProxyWrapper(wrapperBase):
        def readConnectionLost(self) -> None:
            wrapped = IHalfCloseableProtocol(self.wrappedProtocol, None)
            if wrapped is not None:
                wrapped.readConnectionLost()
            else:
                self.loseConnection()

        def writeConnectionLost(self) -> None:
            wrapped = IHalfCloseableProtocol(self.wrappedProtocol, None)
            if wrapped is not None:
                wrapped.writeConnectionLost()
            else:
                self.loseConnection()

    return HalfCloseableHAProxyWrapper


@implementer(IStreamServerEndpoint)
class HAProxyEndpoint:
    """C{haproxy:ENDPOINT}: C{ENDPOINT} reading a PROXY header first."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def listen(self, factory):
        wrapping = _twisted.haproxyFactory(factory, halfCloseable)
        if wrapping is None:
            return _twisted.haproxyEndpoint(self.wrapped).listen(factory)
        return self.wrapped.listen(wrapping)


def serverEndpoint(reactor: Any, description: str, backlog: int | None = None) -> Any:
    """The endpoint for C{--port DESCRIPTION} (C{backlog}: the listen
    backlog unless the description gives one)."""
    description = withBacklog(description, backlog)
    if description.startswith("haproxy:"):
        return HAProxyEndpoint(serverFromString(reactor, description[len("haproxy:") :]))
    return serverFromString(reactor, description)
