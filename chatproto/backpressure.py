"""
Backpressure for a session: when its client's requests are read.

Reading from the client pauses while requests queue behind a slow one
(L{BACKLOG_PAUSE} lines; behind L{chatproto.pipeline.PIPELINE_DEPTH}
unanswered chats too), and while more than the high-water mark of output
waits unsent: the transport pauses the session's L{OutputValve} past it
(its C{bufferSize} is the mark) and resumes it once everything is sent, and
within one read the output gathered counts too.  Lines that arrive
meanwhile wait in the backlog, in order.
"""

from __future__ import annotations

from chatproto.output import batch
from chatproto.sessionoutput import OutputValve, bufferingTransport

#: Lines queued behind a slow request before reading from the client pauses.
BACKLOG_PAUSE = 64


class Backpressure:
    """
    A mixin of L{chatproto.protocol.ChatProtocol}: it uses the protocol's
    C{transport}, C{connected}, C{_busy}, C{_backlog}, C{pipelineFull}, C{_readPauses},
    C{_outputPaused}, C{_outBytes}, C{outputHighWater}, C{callLater},
    C{_process} and C{_closeIfDone}.
    """

    _drainCall = None
    #: the transport paused the valve: too much output unsent
    _outputPaused = False

    def watchOutput(self) -> None:
        """At connection: the transport tells the valve when more than the
        high-water mark waits unsent (reading pauses) and when it has all
        gone (reading resumes), as portforward's producers do."""
        self._buffering = bufferingTransport(self.transport)
        if hasattr(self._buffering, "bufferSize"):
            self._buffering.bufferSize = self.outputHighWater
        try:
            self.transport.registerProducer(OutputValve(self), True)
        except (AttributeError, RuntimeError):
            pass

    def _loseConnection(self) -> None:
        """Close once the output is sent; the valve is unregistered first
        (a transport with a producer never closes)."""
        try:
            self.transport.unregisterProducer()
        except (AttributeError, RuntimeError):
            pass
        self.transport.loseConnection()

    def lineReceived(self, line) -> None:
        if self._busy is not None or self._backlog or self._outputBlocked() or self.pipelineFull():
            self._backlog.append(line)
            if len(self._backlog) >= BACKLOG_PAUSE:
                self._pauseReading("backlog")
            return
        self._process(line)

    def _outputBlocked(self) -> bool:
        """Too much output waits for this client: do not carry out more of
        its requests until it has read some."""
        return self._outputPaused or self._outBytes > self.outputHighWater

    def _pauseReading(self, reason: str) -> None:
        if not self._readPauses and self.connected:
            self.transport.pauseProducing()
        self._readPauses.add(reason)

    def _resumeReading(self, reason: str) -> None:
        if reason in self._readPauses:
            self._readPauses.discard(reason)
            if not self._readPauses and self.connected:
                self.transport.resumeProducing()

    def outputPaused(self) -> None:
        """The transport holds more than the high-water mark unsent."""
        self._outputPaused = True
        self._pauseReading("output")

    def outputResumed(self) -> None:
        """The transport has sent everything it held."""
        self._outputPaused = False
        self._resumeReading("output")
        batch.begin()
        try:
            self._drain()
        finally:
            batch.end()

    def flushOutput(self) -> None:
        super().flushOutput()
        if self._backlog and self._busy is None and not self._outputPaused and self.connected:
            # Lines were held back while this read's output was gathered;
            # it is on its way now.
            if self._drainCall is None or not self._drainCall.active():
                self._drainCall = self.callLater(0, self.outputResumed)

    #: inside L{_drain}'s loop: a request answered at once (its Deferred
    #: fired already) continues the loop instead of recursing into it
    _draining = False

    def _drain(self) -> None:
        """Carry out queued lines while nothing holds them back."""
        if self._draining:
            return
        self._draining = True
        try:
            while (
                self._backlog
                and self._busy is None
                and self.connected
                and not self._outputBlocked()
                and not self.pipelineFull()
            ):
                self._process(self._backlog.popleft())
        finally:
            self._draining = False
        if len(self._backlog) < BACKLOG_PAUSE:
            self._resumeReading("backlog")
        if self._busy is None and not self._backlog:
            self._closeIfDone()

