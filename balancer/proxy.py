"""
The data path's front: L{BalancerFactory} accepts clients (from a Twisted
port as L{balancer.sides.ServerSide}s, or from a L{balancer.lean.LeanPort}
as L{balancer.lean.LeanClient}s: both L{IProxiedClient}s), picks a backend
for each, starts an L{balancer.attempt.Attempt} (retrying the next backend
on failure), counts, and closes connections silent for longer than the
proxy timeout (L{balancer.idletimeout}).

The modules of the data path, one job each:

 - L{balancer.proxyheader}: the PROXY protocol header;
 - L{balancer.forward}: the forwarding state machine of both paths;
 - L{balancer.clientcore}: a client's start (early data, EOF, header) and end;
 - L{balancer.earlydata}: client bytes held until the backend is up;
 - L{balancer.sides}: the Twisted path (protocols on Twisted transports);
 - L{balancer.lean}: the raw-socket path for plain C{tcp:} listeners;
 - L{balancer.rawconnect}: C{connect()} by hand to IP-literal backends;
 - L{balancer.attempt}: one connection attempt and its outcome;
 - L{balancer.idletimeout}: the proxy timeout;
 - L{balancer._twisted}: the only module touching Twisted's internals.
"""

from __future__ import annotations

from socket import IPPROTO_TCP, TCP_NODELAY
from typing import Any

from twisted.internet import error, protocol
from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger
from twisted.python.failure import Failure

from balancer import _twisted
from balancer.attempt import Attempt
from balancer.idletimeout import IdleSweep
from balancer.interfaces import IProxiedClient
from balancer.proxyheader import proxyHeader
from balancer.rawconnect import (
    ConnectDeadlines,
    connectStart,
    isLoopback,
    peerSockaddr,
)
from balancer.selection import Peer, Selector
from balancer.sides import ServerSide

__all__ = ["BalancerFactory", "DEFAULT_PROXY_TIMEOUT"]

# nginx's proxy_timeout default (seconds); 0 turns it off
DEFAULT_PROXY_TIMEOUT = 600.0


class BalancerFactory(protocol.Factory):
    """
    Accepts clients and hands each to a backend chosen by C{selector}.

    @ivar accepted: clients accepted.
    @ivar rejected: clients closed because no backend could be reached.
    @ivar clients: the L{IProxiedClient}s open now.
    """

    log = Logger()
    protocol = ServerSide
    noisy = False

    def __init__(
        self,
        reactor: Any,
        selector: Selector,
        connectTimeout: float = 1.0,
        tries: int | None = None,
        proxyProtocol: str | None = None,
        proxyTimeout: float = DEFAULT_PROXY_TIMEOUT,
        halfClose: bool = True,
    ) -> None:
        _twisted.ensureChecked(reactor)
        self.reactor = reactor
        # connect to IP literals with RawConnect (needs a real reactor)
        self.rawConnect = IReactorFDSet.providedBy(reactor)
        self.selector = selector
        self.connectTimeout = connectTimeout
        self.tries = tries
        self.proxyProtocol = proxyProtocol
        # pass an EOF on (False: close both connections at an EOF, as
        # nginx's proxy_half_close off)
        self.halfClose = halfClose
        self.accepted = 0
        self.rejected = 0
        self.connectFailures = 0
        self.clients: set[Any] = set()
        self.onFinished: list[Any] = []
        self.deadlines = ConnectDeadlines(reactor)
        # descriptor bookkeeping of the lean path and RawConnect
        self.fds = _twisted.fdOps(reactor) if self.rawConnect else None
        self.idleSweep = IdleSweep(reactor, self.clients, proxyTimeout)

    @property
    def proxyTimeout(self) -> float:
        return self.idleSweep.timeout

    @proxyTimeout.setter
    def proxyTimeout(self, timeout: float) -> None:
        self.idleSweep.setTimeout(timeout)

    def buildProtocol(self, addr: Any) -> ServerSide:
        p = ServerSide()
        p.factory = self
        self.clients.add(p)
        if self.idleSweep.call is None:
            self.idleSweep.ensureRunning()
        return p

    def accept(self, client: Any) -> None:
        """
        A client accepted by a L{balancer.lean.LeanPort}.
        """
        self.accepted += 1
        self.clients.add(client)
        if self.idleSweep.call is None:
            self.idleSweep.ensureRunning()
        client.startReading()
        self.dispatch(client)

    def headerFor(self, client: Any, local: Any) -> bytes:
        """
        The PROXY header for a client at address C{client} connected to our
        address C{local}, or C{b""}.
        """
        if self.proxyProtocol is None:
            return b""
        return proxyHeader(self.proxyProtocol, client, local)

    def dispatch(self, client: IProxiedClient) -> None:
        """
        Pick the next backend for C{client} and connect, or give up.
        """
        tried = client.tried
        assert tried is not None
        limit = self.tries or len(self.selector.peers)
        peer = None
        if len(tried) < limit:
            peer = self.selector.pick(tried)
        if peer is None:
            if tried:
                self.log.warn(
                    "no backend reachable for {client} after {n} tries",
                    client=client.clientAddress(), n=len(tried),
                )
            else:
                self.log.warn("no live backend for {client}", client=client.clientAddress())
            client.attempt = None
            client.tried = None
            self.rejected += 1
            client.abort()
            self.clients.discard(client)
            return
        sockaddr = peerSockaddr(peer) if self.rawConnect else None
        if client.lean and sockaddr is None:
            # a host name or an endpoint string: Twisted's transports
            client = client.toTwisted()
        tried.add(peer)
        peer.connectionStarted()
        started = None
        if client.lean:
            # On loopback the kernel completes the handshake inside the
            # non-blocking connect() (unless the backend's accept queue is
            # full): the backend socket is then linked at once, without an
            # Attempt, a RawConnect or a writability event.
            family, addr = sockaddr
            started = sock, _, connected = connectStart(family, addr, isLoopback(addr[0]))
            if connected:
                sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
                self.attemptSucceeded(peer)
                client.backendConnected(sock, peer)
                return
        attempt = Attempt(self, client, peer)
        client.attempt = attempt
        attempt.start(sockaddr, started)

    def attemptSucceeded(self, peer: Peer) -> None:
        peer.total += 1
        self.selector.succeeded(peer)

    def attemptFailed(self, peer: Peer, reason: Failure) -> None:
        self.connectFailures += 1
        self.release(peer)
        self.selector.failed(peer)
        if reason.check(error.TimeoutError, error.ConnectingCancelledError):
            why = "timed out"
        else:
            why = reason.getErrorMessage()
        peer.active.lastError = f"connect: {why}"
        self.log.warn("connect to backend {peer} failed: {why}", peer=peer.key, why=why)

    def release(self, peer: Peer) -> None:
        """
        A connection (or attempt) of C{peer} is over.
        """
        peer.connectionEnded()
        for callback in self.onFinished:
            callback(peer)

    def closeAll(self) -> None:
        self.idleSweep.stop()
        self.deadlines.stop()
        for client in list(self.clients):
            client.abort()
