"""
The wire: one connection, two dialects.

A line starting with C{{} is the JSON dialect; any other line is a text
command.  Requests of one connection are carried out one at a time, in
order, so a client may pipeline (log in and chat without waiting); a chat
waiting for the recipient's server lets the next request start once it is
routed, and its reply still leaves in order (L{chatproto.pipeline}).  While
a request waits on storage, later lines queue and, past a limit, reading
from that client pauses, as it does while too much output waits for the client
(L{chatproto.backpressure}).  An exception in one line's handler is logged
and answered with an error, never fatal to the connection
(L{chatproto.replies}).  A connection that has not logged in within
C{loginTimeout} seconds is closed; only complete lines reset the idle timer.
"""

from __future__ import annotations

import inspect

from collections import deque

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from chatproto import messages as m
from chatproto import textdialect
from chatproto.backpressure import Backpressure
from chatproto.framing import TOO_LONG, LineFramer
from chatproto.interfaces import IChatSession
from chatproto.messages import RequestError
from chatproto.output import batch, rawSocket
from chatproto.pipeline import PIPELINE_DEPTH, PIPELINED, Pipeline
from chatproto.replies import Replies
from chatproto.sessionoutput import JSON, TEXT, SessionOutput


#: Unsent output past which a session that does not read is logged out; what
#: would have been written to it is stored offline instead (C{--output-cap}).
MAX_PENDING_OUTPUT = 4 * 1024 * 1024

#: Unsent output past which a connection's requests are not read
#: (C{--output-high-water}); reading resumes once it has all been sent.
OUTPUT_HIGH_WATER = 256 * 1024

#: Seconds a kicked session that does not read gets before it is aborted.
ABORT_AFTER = 30


@implementer(IHalfCloseableProtocol, IChatSession)
class ChatProtocol(Pipeline, Replies, Backpressure, SessionOutput, LineReceiver, TimeoutMixin):
    """
    A session: a connection and, once logged in, a user.

    @ivar uid: the logged-in user's id, or None.
    @ivar dialect: L{JSON} or L{TEXT}: the dialect of the last line
        received, in which everything sent to this session is written.
    """

    log = Logger()
    delimiter = b"\n"
    MAX_LENGTH = 65536

    uid: int | None = None
    name: str | None = None
    loggingIn: int | None = None
    connected = False

    _abortCall = None
    _loginCall = None
    _inputEnded = False

    def __init__(
        self,
        service,
        clock,
        maxLength: int = 65536,
        idleTimeout: float | None = 300,
        loginTimeout: float | None = None,
        outputHighWater: int = OUTPUT_HIGH_WATER,
        outputCap: int = MAX_PENDING_OUTPUT,
        pipelineDepth: int = PIPELINE_DEPTH,
    ) -> None:
        self.service = service
        self.callLater = clock.callLater  # TimeoutMixin's timer
        self.MAX_LENGTH = maxLength
        self.idleTimeout = idleTimeout
        self.loginTimeout = loginTimeout
        self.outputHighWater = outputHighWater
        self.maxPendingOutput = outputCap
        self.pipelineDepth = pipelineDepth
        self.dialect = JSON
        self.sid = service.newSessionId()
        self._framer = LineFramer(maxLength)
        self._busy: defer.Deferred | None = None
        self._backlog: deque = deque()
        self._readPauses: set[str] = set()
        self._held: list | None = None
        self._out: list | None = None
        self._socket = None
        self.unacked = {}

    # --- connection --------------------------------------------------------

    @property
    def peerHost(self) -> str:
        """The client's address.  Behind a balancer sending the PROXY header
        (C{haproxy:} endpoint) this is the real client, known only once the
        header has been read, so it is asked for when needed."""
        peer = self.transport.getPeer()
        return getattr(peer, "host", str(peer))

    def connectionMade(self) -> None:
        self.connected = True
        self._socket = rawSocket(self.transport)
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self.watchOutput()
        self.setTimeout(self.idleTimeout)
        if self.loginTimeout:
            self._loginCall = self.callLater(self.loginTimeout, self._loginTimedOut)
        self.service.connected(self)

    def connectionLost(self, reason) -> None:
        self.connected = False
        self.setTimeout(None)
        for call in (self._abortCall, self._loginCall, self._drainCall):
            if call is not None and call.active():
                call.cancel()
        self._backlog.clear()
        # Requests waiting for earlier chats' answers are dropped with the
        # lines behind them; the chats themselves go on.
        self._answeredWaiters = None
        self.service.disconnected(self)

    def _loginTimedOut(self) -> None:
        self._loginCall = None
        if self.uid is None and self.connected:
            self.kick(f"not logged in within {self.loginTimeout:g} s")

    def readConnectionLost(self) -> None:
        """
        The client has finished sending (a half-close, e.g. C{nc -N} or the
        balancer passing one on): an unterminated last line counts as a
        line, everything it sent is carried out and answered, then the
        connection is closed.
        """
        self._inputEnded = True
        tail = self._framer.finish()
        if tail is not None and self.connected:
            self.lineReceived(tail)
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        self._loseConnection()

    def _closeIfDone(self) -> None:
        if self._inputEnded and self._busy is None and not self._backlog and not self._slots and self.connected:
            self.flushOutput()
            self._loseConnection()

    def timeoutConnection(self) -> None:
        self.kick(f"idle for {self.idleTimeout:g} s")

    def kick(self, reason: str) -> None:
        """Tell the client why, then close the connection."""
        if self.connected:
            self.send({"msgid": m.KICK_NOTICE, "reason": reason}, force=True)
            self.flushOutput()
            self._loseConnection()
            self.connected = False
            # A client that does not read would keep the socket forever.
            self._abortCall = self.callLater(ABORT_AFTER, self.transport.abortConnection)

    # --- input -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # LineReceiver's own splitting knows one delimiter and drops the
        # lines after an overlong one; LineFramer keeps them.
        if b"\0" in data:
            self.nulTerminated = True
        batch.begin()
        try:
            lines = self._framer.feed(data)
            if lines:
                # Only complete lines are activity: a client trickling bytes
                # of a line that never ends is idle.
                self.resetTimeout()
            for line in lines:
                if not self.connected:
                    return
                self.lineReceived(line)
        finally:
            batch.end()

    def lineLengthExceeded(self, line) -> None:
        self.send(m.error(m.E_LINE_TOO_LONG, f"line longer than {self.MAX_LENGTH} bytes; it was discarded"))

    def _process(self, line) -> None:
        try:
            result = self._dispatch(line)
        except Exception:
            self.log.failure("handling a line from {peer}", peer=self.peerHost)
            self.send(m.error(m.E_INTERNAL))
            return
        if result is not None:
            # A Deferred: later lines wait for it.  A failure that reaches
            # here (raised while replying) is logged and answered, never
            # dropped.
            self._busy = result
            result.addErrback(self._unexpected)
            result.addBoth(self._finished)

    def _finished(self, _) -> None:
        self._busy = None
        self._drain()

    def _dispatch(self, line):
        """Carry out C{line}: a chat at once, anything else once the chats
        before it are answered (L{chatproto.pipeline})."""
        if line is TOO_LONG:
            return self.inTurn(self.lineLengthExceeded, line)
        if line.lstrip()[:1] == b"{":
            self.dialect = JSON
            try:
                request = m.parseJSON(line)
            except RequestError as e:
                return self.inTurn(self.send, m.error(e.errno, e.errmsg, e.reqmsgid, e.seq))
            return self._carryOut(request)
        self.dialect = TEXT
        text = line.decode("utf-8", "replace")
        try:
            request = textdialect.parseText(text)
        except RequestError as e:
            return self.inTurn(self.send, m.error(e.errno, e.errmsg))
        if request == textdialect.HELP_COMMAND:
            return self.inTurn(self._write, textdialect.HELP.replace("\n", "\r\n").encode() + b"\r\n")
        if request == textdialect.QUIT_COMMAND:
            return self.inTurn(self._quit)
        return self._carryOut(request)

    def _carryOut(self, request):
        if request.spec.name in PIPELINED:
            return self._execute(request)
        return self.inTurn(self._execute, request)

    def _quit(self):
        def close(_=None):
            self._loseConnection()

        if self.uid is None:
            close()
            return None
        d = defer.Deferred.fromCoroutine(self.service.logout(self))
        return d.addBoth(close)


class ChatFactory(Factory):
    """
    Builds a L{ChatProtocol} per connection.

    @param settings: L{ChatProtocol}'s keyword settings (C{maxLength},
        C{idleTimeout}, C{loginTimeout}, C{outputHighWater}, C{outputCap}),
        checked here so that a wrong one fails at start-up.
    """

    def __init__(self, service, clock, **settings) -> None:
        inspect.signature(ChatProtocol).bind(service, clock, **settings)
        self.service = service
        self.clock = clock
        self.settings = settings

    def buildProtocol(self, addr):
        p = ChatProtocol(self.service, self.clock, **self.settings)
        p.factory = self
        return p
