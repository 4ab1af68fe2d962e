"""
Requests carried out and answered: the reply, or the error reply.

Every failure gets an answer.  Expected ones (L{RequestError}, a store or
presence outage) are answered without a traceback; any other failure,
whether raised by the handler or while replying, is logged once with its
traceback and answered with errno 31.
"""

from __future__ import annotations

from chatproto import messages as m
from chatproto.interfaces import PresenceUnavailable, StoreUnavailable
from chatproto.messages import Request, RequestError
from chatproto.pipeline import Pipelined


class Replies:
    """
    A mixin of L{chatproto.protocol.ChatProtocol}: it uses the protocol's
    C{service}, C{reply}, C{send}, C{connected}, C{log}, C{peerHost} and
    C{startPipelined} (L{chatproto.pipeline}).
    """

    def _execute(self, request: Request):
        try:
            result = self.service.handle(self, request)
        except RequestError as e:
            self._replyError(request, e)
            return None
        # (isinstance on dict is cheap; on Deferred, an ABC, it is not.)
        if result is None or isinstance(result, dict):
            self.reply(request, result)
            return None
        if type(result) is Pipelined:
            return self.startPipelined(request, result)
        return result.addCallbacks(
            lambda reply: self.reply(request, reply),
            lambda failure: self._failed(request, failure),
        )

    def _failed(self, request: Request, failure) -> None:
        self.reply(request, self._failureReply(request, failure))

    def _failureReply(self, request: Request, failure) -> dict:
        """The error reply for a failed request (an unexpected failure is
        logged with its traceback)."""
        if failure.check(RequestError):
            return _errorReply(request, failure.value)
        if failure.check(StoreUnavailable, PresenceUnavailable):
            # Expected: an outage, answered without a traceback.
            return _errorReply(request, RequestError(m.E_UNAVAILABLE, f"temporarily unavailable: {failure.value}"))
        self.log.failure("request {name} from {peer}", failure, name=request.spec.name, peer=self.peerHost)
        return _errorReply(request, RequestError(m.E_INTERNAL))

    def _replyError(self, request: Request, error: RequestError) -> None:
        self.reply(request, _errorReply(request, error))

    def _unexpected(self, failure) -> None:
        """A failure that escaped the request's own error handling (e.g.
        raised while writing its reply)."""
        self.log.failure("replying to {peer}", failure, peer=self.peerHost)
        if self.connected:
            self.send(m.error(m.E_INTERNAL), force=True)



def _errorReply(request: Request, error: RequestError) -> dict:
    return {"msgid": request.spec.ack, "errno": error.errno, "errmsg": error.errmsg}
