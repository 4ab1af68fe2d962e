"""
The forwarding core of both data paths: one state machine per socket of a
proxied pair (L{Half}), and one "send now" (L{sendSome}).

A L{Half} is one socket; C{other} is the pair's other socket.  Bytes read
from a half go to C{other.send()}; when C{other} cannot take them all,
this half is not read until C{other} has sent what it keeps
(backpressure); an EOF read from a half becomes C{other.shutWrite()} once
C{other} has nothing pending (half-close); and when both directions are
done, or on an error, the pair is closed.  Without half-close (C{halfClose}
false, nginx's C{proxy_half_close off}) an EOF read from a half closes the
pair as soon as C{other} has sent what was read before it.  A client's half
whose backend
is not connected yet (C{other is None}) holds what it reads
(L{balancer.clientcore.ClientCore.hold}).

Each path supplies the I/O under it:

 - L{balancer.lean}: a raw socket; C{send()} keeps what the kernel did not
   take (one chunk at most) and watches the socket for writability;
 - L{balancer.sides}: a Twisted transport; C{send()} queues what the kernel
   did not take in the transport, whose producer registration does the
   backpressure, so it never refuses bytes and never has any pending.
"""

from __future__ import annotations

import socket
from typing import Any

_EAGAIN = (BlockingIOError, InterruptedError)


def sendSome(sock: socket.socket, data: bytes) -> int:
    """
    C{send()} C{data} on non-blocking C{sock} now: the number of bytes the
    kernel took (0 when it took none), or -1 on an error.
    """
    try:
        return sock.send(data)
    except _EAGAIN:
        return 0
    except OSError:
        return -1


class Half:
    """
    The per-direction state machine (mixed in; no instance layout of its
    own, so the lean path keeps its slots).

    State the path keeps: C{other}; C{eof} (this socket's peer has finished
    sending); C{shut} (nothing more will be sent to this socket);
    C{halfClose} (pass an EOF on; false: close the pair at an EOF);
    C{pending} (bytes this socket has not taken yet: truthy while any);
    C{rx} (reads, the proxy timeout's activity count).

    Primitives the path provides: C{send(data) -> bool} (C{False}: not all
    taken; L{drained} is called once they are), C{pauseReading()},
    C{resumeReading()}, C{readingDone()} (this socket will not be read
    again), C{shutdownWrite()} (pass the EOF on) and C{closePair()}.
    """

    __slots__ = ()

    other: Any
    eof: bool
    shut: bool
    halfClose: bool
    pending: Any
    rx: int

    def forward(self, data: bytes) -> None:
        """
        C{data} was read from this socket.
        """
        self.rx += 1
        other = self.other
        if other is None:
            self.hold(data)  # type: ignore[attr-defined]
        elif not other.send(data):
            self.pauseReading()  # type: ignore[attr-defined]

    def readEnded(self) -> None:
        """
        This socket's peer has finished sending.
        """
        self.eof = True
        if not self.halfClose:
            # Nothing more goes to this socket: the pair is closed once
            # other has sent what was read from it (below, or in drained()
            # -> shutWrite()); bytes still on their way to this socket are
            # not waited for (nginx's proxy_half_close off).
            self.shut = True
        other = self.other
        if other is None or other.pending:
            # passed on once connected (ClientCore), or once other's
            # pending bytes are out (drained)
            self.readingDone()  # type: ignore[attr-defined]
        elif self.shut:
            # the other direction is done too
            self.closePair()  # type: ignore[attr-defined]
        else:
            self.readingDone()  # type: ignore[attr-defined]
            other.shutWrite()

    def drained(self) -> None:
        """
        This socket took every pending byte: read its source again, or pass
        on the source's EOF.
        """
        source = self.other
        if source.eof:
            self.shutWrite()
        else:
            source.resumeReading()

    def shutWrite(self) -> None:
        """
        Nothing more is sent to this socket: pass the EOF on, or close the
        pair when this was the last open direction (a close sends the same
        FIN).
        """
        self.shut = True
        if self.other.shut:
            self.closePair()  # type: ignore[attr-defined]
        else:
            self.shutdownWrite()  # type: ignore[attr-defined]
