"""
Listening on a C{--port} endpoint, failing cleanly.

Twisted's L{StreamServerEndpointService} stops twistd on a port it cannot
listen on only through a private flag of the service, with a
traceback; otherwise it logs the failure and the server runs on without
the port.  L{CheckedEndpoint} wraps the endpoint it listens on instead: a
failure known at once (a port in use, no permission, a bad interface)
raises L{SystemExit} with one line, so twistd exits with status 1 before
it daemonizes; a later failure goes to C{onFailure} with that line (twistd:
log it, stop, exit non-zero) and is not logged again as a traceback.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer


def describeFailure(failure: Failure) -> str:
    """One line for C{failure}: its message, or its type when it has none."""
    value = failure.value
    text = str(getattr(value, "strerror", None) or value).strip()
    return text.splitlines()[0] if text else failure.type.__name__


@implementer(IStreamServerEndpoint)
class CheckedEndpoint:
    """
    @param description: the endpoint string, for messages.
    @param onFailure: called with one line when listening fails later.
    """

    def __init__(self, wrapped, description: str, onFailure) -> None:
        self.wrapped = wrapped
        self.description = description
        self.onFailure = onFailure

    def _line(self, failure: Failure) -> str:
        return f"cannot listen on {self.description}: {describeFailure(failure)}"

    def listen(self, factory) -> defer.Deferred:
        outcome: list = []
        d = self.wrapped.listen(factory)
        d.addBoth(outcome.append)
        if outcome:
            result = outcome[0]
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                raise SystemExit(self._line(result))
            return defer.succeed(result) if not isinstance(result, Failure) else defer.fail(result)
        late = defer.Deferred(lambda _: d.cancel())

        def settled(_):
            result = outcome[0]
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                self.onFailure(self._line(result))
                # Handled: the listening service need not log it again.
                late.errback(defer.CancelledError(self._line(result)))
            elif not late.called:
                late.callback(result) if not isinstance(result, Failure) else late.errback(result)

        d.addCallback(settled)
        return late
