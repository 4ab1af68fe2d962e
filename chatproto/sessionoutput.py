"""
A session's output: replies and pushes written in the session's dialect,
gathered per read (L{chatproto.output.batch}), held while it logs in, and
bounded: the one place that writes to a session's transport.

 - Past the high-water mark of unsent bytes (C{--output-high-water}) the
   session stops reading its client's requests (the transport pauses the
   L{OutputValve}, as with C{portforward}'s producers) until all of it has
   been sent.
 - Past the cap (C{--output-cap}) of unsent bytes, whatever they are, a
   push logs the user out and the connection is closed; pushes are then
   refused (the caller stores chats offline).  Replies (C{force}) are not
   refused: they come only from requests read, and reading stops at the
   high-water mark; nor is the hand-over of offline messages at login
   (bounded by the mailbox caps).
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from chatproto import textdialect
from chatproto.messages import Request, encode
from chatproto.output import batch, pendingBytes, writeThrough

JSON = "json"
TEXT = "text"


@implementer(IPushProducer)
class OutputValve:
    """
    Registered as the producer of a session's transport: the transport
    pauses it when more than its C{bufferSize} (set to the high-water mark)
    waits unsent, and resumes it once everything has been sent.  It pauses
    and resumes the session's reading of requests.
    """

    def __init__(self, session) -> None:
        self.session = session

    def pauseProducing(self) -> None:
        self.session.outputPaused()

    def resumeProducing(self) -> None:
        self.session.outputResumed()

    def stopProducing(self) -> None:
        pass


def bufferingTransport(transport):
    """The transport that holds what is unsent (a C{FileDescriptor}),
    looking through wrappers (TLS, the PROXY header: each has the transport
    it wraps as C{transport}); C{transport} itself when it wraps none."""
    for _ in range(4):
        inner = getattr(transport, "transport", None)
        if inner is None or inner is transport:
            break
        transport = inner
    return transport


class SessionOutput:
    """
    The output half of L{chatproto.protocol.ChatProtocol} (a mixin: it uses
    the protocol's C{transport}, C{connected}, C{dialect}, C{service},
    C{maxPendingOutput}, C{log} and C{_socket}).
    """

    _held: list | None = None
    _out: list | None = None
    #: the client confirms pushed chats with PUSH_ACK (it logged in with
    #: "ack": true); C{unacked}: mid -> L{chatproto.acks.Unacked}
    acking = False
    unacked: dict
    #: the client ends its lines with NUL (the tutorial's C++ client, which
    #: reads 1,024 bytes at a time: the login reply is kept within that)
    nulTerminated = False
    #: bytes gathered in C{_out}
    _outBytes = 0
    #: the cap was passed: the session is being logged out
    _congested = False
    #: the transport that buffers (L{bufferingTransport}), once connected
    _buffering = None

    def reply(self, request: Request, message: dict | None) -> None:
        """Send C{message} as the reply to C{request} (echoing its C{seq})."""
        if message is None:
            return
        if request.seq is not None:
            self.send(dict(message, seq=request.seq), force=True)
        else:
            self.send(message, getattr(message, "line", None), force=True)

    def send(self, message: dict, line: bytes | None = None, force: bool = False) -> bool:
        """
        Write C{message} in this session's dialect.  C{line} is its JSON
        encoding when the caller has it already.  Messages for a session
        that is still logging in are held until its login reply is out
        (replies, with C{force}, are not).

        @return: whether the session took the message; it does not when it
            is gone, or has more than L{maxPendingOutput} bytes unsent (it
            is then logged out and kicked, and the caller stores the
            message offline).
        """
        if not self.connected:
            return False
        if self._held is not None and not force:
            self._held.append((message, line))
            return True
        if force:
            self._write(self._encode(message, line))
            return True
        unsent = None if self._congested else self.unsentBytes()
        if unsent is None or unsent > self.maxPendingOutput:
            self._overCap()
            return False
        data = self._encode(message, line)
        if batch.depth:
            # Gathered, not sent: what is unsent grows by exactly this much.
            self._write(data)
            unsent += len(data)
        else:
            self._write(data)
            unsent = self.unsentBytes()
        if unsent > self.maxPendingOutput:
            self._overCap()
        return True

    def _encode(self, message: dict, line: bytes | None) -> bytes:
        """C{message} as this session's dialect writes it."""
        if self.dialect is JSON:
            return (line if line is not None else encode(message)) + b"\n"
        return "".join(text + "\r\n" for text in textdialect.render(message)).encode("utf-8")

    def unsentBytes(self) -> int:
        """Output not yet taken by the kernel: gathered for this read and
        buffered by the transport."""
        return self._outBytes + pendingBytes(self._buffering or self.transport)

    def _overCap(self) -> None:
        if not self._congested:
            self._congested = True
            self.service.congested(self)

    def _write(self, data: bytes) -> None:
        if batch.depth:
            if self._out is None:
                self._out = [data]
                batch.dirty.append(self)
            else:
                self._out.append(data)
            self._outBytes += len(data)
        else:
            writeThrough(self.transport, self._socket, data)

    def flushOutput(self) -> None:
        """Send what was gathered for this session during the current read."""
        out, self._out = self._out, None
        self._outBytes = 0
        if out:
            writeThrough(self.transport, self._socket, out[0] if len(out) == 1 else b"".join(out))

    def hold(self, uid: int) -> None:
        """Hold messages for C{uid} until L{unhold} (the login reply is out)."""
        if self._held is None:
            self._held = []
            self._heldFor = uid

    def unhold(self) -> None:
        held, self._held = self._held, None
        for message, line in held or ():
            self.send(message, line, force=True)

    def dropHeld(self) -> tuple[int | None, list]:
        """Stop holding; return the uid held for and what was held."""
        held, self._held = self._held or [], None
        return self._heldFor, held

    _heldFor: int | None = None
