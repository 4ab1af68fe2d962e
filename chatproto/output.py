"""
Writing to many connections cheaply.

Twisted's C{transport.write} buffers and sends on the next reactor turn,
re-arming epoll for the socket each time: two C{epoll_ctl} calls and a
reactor pass per message.  Here:

 - while a read is being handled, everything written to a session is
   gathered, and sent as one piece per session when the read is done
   (L{WriteBatch}); one read carrying forty requests costs one send to the
   sender, not forty;
 - a piece is sent at once on the socket when Twisted holds nothing unsent
   for it (L{writeThrough}), and falls back to C{transport.write} otherwise,
   so order and Twisted's buffering of slow readers are kept.
"""

from __future__ import annotations

from twisted.internet import tcp


class WriteBatch:
    """Gathers writes between L{begin} and the matching L{end}."""

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list = []

    def begin(self) -> None:
        self.depth += 1

    def end(self) -> None:
        self.depth -= 1
        if not self.depth and self.dirty:
            self.flush()

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for session in dirty:
            session.flushOutput()


#: The reactor is single-threaded: one batch for the process.
batch = WriteBatch()


def rawSocket(transport):
    """The socket to write through for a plain TCP transport, else None
    (TLS, wrappers such as C{haproxy:}, test transports)."""
    if type(transport) is tcp.Server:
        return transport.socket
    return None


def writeThrough(transport, sock, data: bytes) -> None:
    """
    Send C{data} on C{sock} now if C{transport} has nothing buffered; hand
    what the kernel did not take to C{transport.write}.
    """
    if (
        sock is not None
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
    ):
        try:
            sent = sock.send(data)
        except OSError:
            # Would block, or the connection broke: Twisted's write path
            # buffers it or reports the loss as usual.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def pendingBytes(transport) -> int:
    """Bytes Twisted holds unsent for C{transport} (0 if it cannot tell)."""
    try:
        return transport._tempDataLen + len(transport.dataBuffer) - transport.offset
    except AttributeError:
        return 0
