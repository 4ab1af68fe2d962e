"""
Listening endpoints for C{--port}.

Any Twisted server endpoint string works.  C{haproxy:...} is Twisted's PROXY
protocol wrapper with one addition: it passes a client's half-close on to
the chat protocol (Twisted's wrapper does not, so an EOF from the balancer
would close the session before its last replies are written).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamServerEndpoint
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import implementer


@implementer(IHalfCloseableProtocol)
class HalfCloseableHAProxyWrapper(HAProxyProtocolWrapper):
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


class HalfCloseableHAProxyFactory(HAProxyWrappingFactory):
    protocol = HalfCloseableHAProxyWrapper


@implementer(IStreamServerEndpoint)
class HAProxyEndpoint:
    """C{haproxy:ENDPOINT}: C{ENDPOINT} reading a PROXY header first."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def listen(self, factory):
        return self.wrapped.listen(HalfCloseableHAProxyFactory(factory))


def serverEndpoint(reactor: Any, description: str) -> Any:
    """The endpoint for C{--port DESCRIPTION}."""
    if description.startswith("haproxy:"):
        return HAProxyEndpoint(serverFromString(reactor, description[len("haproxy:") :]))
    return serverFromString(reactor, description)
