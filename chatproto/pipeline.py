"""
Pipelined chats: a connection's next request starts before its chat is
answered.

A one-to-one chat that leaves this server waits for the recipient's server
to confirm it (L{chatproto.acks}), one Redis round trip and more.  Carried
out one at a time, a connection would send one chat per round trip.  So a
chat's handler returns a L{Pipelined}: C{routed} fires once the chat has
its place in line (handed to the local session or to the relay, or stored
offline), and the connection goes on with its next request then; C{done}
fires with the ack.

What stays as it was:
 - replies leave in the order of the requests, whatever order their
   confirmations come back in (L{Pipeline.reply} queues behind the
   unanswered chats);
 - chats from one connection reach each recipient in the order sent (the
   next one is routed only after this one);
 - any request other than a chat (and any error reply) waits until every
   earlier chat is answered, so a logout, a friend list or a ping sees
   them done.

At most L{PIPELINE_DEPTH} chats of a connection wait unanswered; past that,
its lines queue (and reading pauses, L{chatproto.backpressure}).
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer

from chatproto.sessionoutput import SessionOutput

#: Chats of one connection routed and not yet answered, at most
#: (C{--pipeline-depth}).
PIPELINE_DEPTH = 64

#: The requests that may start while earlier chats wait for their answers.
PIPELINED = frozenset(("chat",))


class Pipelined:
    """
    What a pipelined request's handler returns.

    @ivar routed: fires (with anything) once the request has its place in
        line; the connection's next request may start then.  It must fire
        even when the request fails.
    @ivar done: fires with the reply (a dict or None), or fails.
    """

    __slots__ = ("routed", "done")

    def __init__(self, routed: defer.Deferred, done: defer.Deferred) -> None:
        self.routed = routed
        self.done = done


class _Slot:
    __slots__ = ("request", "message", "answered")

    def __init__(self, request, message=None, answered: bool = False) -> None:
        self.request = request
        self.message = message
        self.answered = answered


class Pipeline:
    """
    A mixin of L{chatproto.protocol.ChatProtocol}, a
    L{chatproto.sessionoutput.SessionOutput} whose C{reply} it orders: it
    uses the protocol's C{_failureReply}, C{_unexpected}, C{_drain} and
    C{_closeIfDone}.

    @ivar pipelineDepth: L{PIPELINE_DEPTH}, or the server's setting.
    """

    pipelineDepth = PIPELINE_DEPTH
    _slots: deque | None = None
    _answeredWaiters: list | None = None

    def pipelineFull(self) -> bool:
        slots = self._slots
        return slots is not None and len(slots) >= self.pipelineDepth

    def unanswered(self) -> int:
        """Chats started and not yet answered."""
        return len(self._slots) if self._slots else 0

    def startPipelined(self, request, result: Pipelined) -> defer.Deferred:
        """C{request}'s handler returned C{result}: its reply takes the next
        place in line.  Returns what the connection waits for before its
        next request (C{routed})."""
        if self._slots is None:
            self._slots = deque()
        slot = _Slot(request)
        self._slots.append(slot)
        d = result.done.addCallbacks(
            lambda message: self._answer(slot, message),
            lambda failure: self._answer(slot, self._failureReply(request, failure)),
        )
        d.addErrback(self._unexpected)
        return result.routed

    def inTurn(self, call, *args):
        """C{call(*args)} now, or once every chat started before is answered.
        Returns what the connection waits for before its next request: a
        Deferred (C{call}'s own, or one that fires once it has run), or
        None."""
        if not self._slots:
            result = call(*args)
            return result if isinstance(result, defer.Deferred) else None
        d = defer.Deferred()
        if self._answeredWaiters is None:
            self._answeredWaiters = []
        self._answeredWaiters.append(d)
        return d.addCallback(lambda _: call(*args))

    def reply(self, request, message) -> None:
        if self._slots:
            # Behind the chats still unanswered.
            if message is not None:
                self._slots.append(_Slot(request, message, True))
            return
        SessionOutput.reply(self, request, message)

    def _answer(self, slot: _Slot, message) -> None:
        slot.message = message
        slot.answered = True
        slots = self._slots
        if not slots[0].answered:
            return
        write = SessionOutput.reply
        while slots and slots[0].answered:
            done = slots.popleft()
            write(self, done.request, done.message)
        if slots:
            if len(slots) < self.pipelineDepth:
                self._drain()
            return
        waiters, self._answeredWaiters = self._answeredWaiters, None
        for w in waiters or ():
            w.callback(None)
        self._drain()
        self._closeIfDone()
