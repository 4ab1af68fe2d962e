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

from chatproto import _twisted


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


# The private-attribute paths live in chatproto._twisted (with their
# start-up check and public fallback).
rawSocket = _twisted.rawSocket
writeThrough = _twisted.writeThrough
pendingBytes = _twisted.pendingBytes
