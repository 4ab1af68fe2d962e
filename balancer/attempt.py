"""
One connection attempt from the balancer to one backend for one client,
on either data path.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.python.failure import Failure

from balancer.interfaces import IProxiedClient
from balancer.rawconnect import RawConnect, peerSockaddr
from balancer.sides import BackendSide


class Attempt(protocol.ClientFactory):
    """
    Connects to C{peer} for C{client} (an L{IProxiedClient}) with a
    L{RawConnect} (IP literals), C{connectTCP} (host names) or the peer's
    client endpoint, and reports the outcome to the factory and the client.
    """

    noisy = False

    def __init__(self, factory: Any, client: IProxiedClient, peer: Any):
        self.factory = factory
        self.client: IProxiedClient | None = client
        self.peer = peer
        self.connector: Any = None
        self.deferred: Any = None
        self.done = False

    def start(self, sockaddr: tuple[int, Any] | None = None, started: Any = None) -> None:
        """
        Connect; C{sockaddr} is the peer's L{peerSockaddr} if known, and
        C{started} what L{balancer.rawconnect.connectStart} returned for it
        if the connect is under way already.
        """
        f = self.factory
        if sockaddr is None and f.rawConnect:
            sockaddr = peerSockaddr(self.peer)
        if sockaddr is not None:
            self.connector = RawConnect(self, sockaddr[0], sockaddr[1], f.connectTimeout, started)
            return
        target = self.peer.extra.get("tcp")
        if target is not None:
            host, port = target
            self.connector = f.reactor.connectTCP(host, port, self, timeout=f.connectTimeout)
        else:
            endpoint = self.peer.extra["endpoint"]
            factory = protocol.Factory.forProtocol(lambda: BackendSide(self))
            factory.noisy = False
            d = endpoint.connect(factory)
            d.addTimeout(f.connectTimeout, f.reactor)
            self.deferred = d
            d.addErrback(lambda reason: self.clientConnectionFailed(None, reason))

    def buildProtocol(self, addr: Any) -> BackendSide:
        return BackendSide(self)

    def connected(self, backend: BackendSide | RawConnect) -> None:
        """
        Connected: C{backend} is a L{BackendSide}, or for a lean client the
        L{RawConnect} with the connected socket.
        """
        self.connector = self.deferred = None
        if self.done:
            _closeBackend(backend)
            return
        self.done = True
        client, self.client = self.client, None
        self.factory.attemptSucceeded(self.peer)
        assert client is not None
        if client.closed:
            _closeBackend(backend)
            self.factory.release(self.peer)
            return
        client.backendConnected(backend, self.peer)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connector = self.deferred = None
        if self.done:
            return
        self.done = True
        client, self.client = self.client, None
        self.factory.attemptFailed(self.peer, reason)
        if client is not None and not client.closed:
            self.factory.dispatch(client)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        pass

    def cancel(self) -> None:
        """
        The client went away while connecting.
        """
        if self.done:
            return
        self.done = True
        self.client = None
        self.factory.release(self.peer)
        if self.connector is not None:
            self.connector.disconnect()
        elif self.deferred is not None:
            self.deferred.cancel()


def _closeBackend(backend: BackendSide | RawConnect) -> None:
    if isinstance(backend, RawConnect):
        backend.waiting = True  # still registered as the socket's writer
        backend.disconnect()
    else:
        backend.transport.abortConnection()
