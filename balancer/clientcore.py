"""
The client side of a proxied connection, one state machine for both data
paths: bytes that arrive before the backend connection is up are held
(and the client is no longer read past L{balancer.earlydata.HOLD_LIMIT}),
an EOF that arrives meanwhile is remembered, and once connected the
PROXY header and the held bytes go first, then either reading waits until
they are out, or the remembered EOF is passed on, or forwarding starts.

Forwarding itself is L{balancer.forward.Half}'s; each path supplies the
primitives over its own I/O: L{balancer.sides} over Twisted transports,
L{balancer.lean} over raw sockets.
"""

from __future__ import annotations

from typing import Any

from balancer.earlydata import EarlyData, firstBytes


class ClientCore:
    """
    Mixed into L{balancer.sides.ServerSide} and L{balancer.lean.LeanClient},
    next to L{balancer.forward.Half} (no instance layout of its own, so the
    lean client keeps its slots).

    The path provides: C{held}, C{factory}, C{attempt}, C{tried}, C{peer};
    C{pauseReading()}, C{resumeReading()}, C{linkBackend(backend)} (after
    which C{other} is the backend's L{balancer.forward.Half}),
    C{localAddress()} and C{clientAddress()}.
    """

    __slots__ = ()

    def hold(self, data: bytes) -> None:
        """
        Keep bytes that arrive before the backend connection is up.
        """
        held = self.held
        if held is None:
            self.held = held = EarlyData()
        if held.add(data):
            self.pauseReading()

    def backendConnected(self, backend: Any, peer: Any) -> None:
        """
        The attempt to C{peer} succeeded (C{backend}: the path's connected
        backend): send the PROXY header and the held bytes, then forward
        both ways.
        """
        self.attempt = None
        self.tried = None
        self.peer = peer
        self.linkBackend(backend)
        held, self.held = self.held, None
        f = self.factory
        if f.proxyProtocol is not None:
            data = firstBytes(f, self.clientAddress(), self.localAddress(), held)
        elif held is not None:
            data = held.take()
        else:
            data = b""
        if data and not self.other.send(data):
            # reading resumes, or the EOF is passed on, once they are out
            self.pauseReading()
        elif self.eof:
            self.other.shutWrite()
        else:
            self.resumeReading()

    def endAccounting(self) -> None:
        """
        The connection is over: cancel a connection attempt under way and
        release the backend.
        """
        attempt = self.attempt
        self.attempt = None
        if attempt is not None:
            attempt.cancel()
        peer = self.peer
        self.peer = None
        if peer is not None:
            self.factory.release(peer)
