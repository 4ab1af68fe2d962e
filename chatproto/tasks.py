"""
What the chat service's parts share: background work that shutdown waits
for, store calls whose outages (and full mailboxes) become error replies,
and the start-up gate.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproto import messages as m
from chatproto.interfaces import NameTaken, NoSuchGroup, NoSuchUser, StoreUnavailable
from chatproto.messages import RequestError
from chatproto.sqloffline import MailboxFull


class BackgroundTasks:
    """Deferreds nobody waits for (notices, offline stores, kicks): kept
    until they fire so that shutdown can wait for them; failures logged."""

    log = Logger()

    def __init__(self, warnings=None) -> None:
        self.pending: set[defer.Deferred] = set()
        #: a L{chatproto.logrepeat.RepeatedWarnings} for the expected
        #: failures that come once per message
        self.warnings = warnings

    def track(self, d: defer.Deferred) -> defer.Deferred:
        self.pending.add(d)

        def done(result):
            self.pending.discard(d)
            if isinstance(result, Failure):
                if result.check(MailboxFull):
                    # Expected: a full mailbox is a fact, not a fault.
                    if self.warnings is not None:
                        self.warnings.warn("mailbox full", "not stored offline: {error}", error=result.value)
                    else:
                        self.log.info("not stored offline: {error}", error=result.value)
                else:
                    self.log.failure("background task failed", result)
            return None

        return d.addBoth(done)

    def wait(self) -> defer.Deferred:
        """Fires once every task tracked so far has ended."""
        return defer.DeferredList(list(self.pending))


async def storeCall(d):
    """Await a store call, turning database outages and full mailboxes into
    an error reply (for a full mailbox the L{RequestError} carries the
    L{MailboxFull} as C{mailboxFull})."""
    try:
        return await d
    except (RequestError, NameTaken, NoSuchUser, NoSuchGroup):
        raise
    except StoreUnavailable as e:
        raise RequestError(m.E_UNAVAILABLE, f"storage unavailable: {e}") from None
    except MailboxFull as e:
        error = RequestError(m.E_MAILBOX_FULL)
        error.mailboxFull = e
        raise error from None


#: Seconds a start-up stage (storage, Redis) may take before the server logs
#: what it waits for; then again every WAIT_LOG_EVERY seconds.
WAIT_LOG_AFTER = 1.0
WAIT_LOG_EVERY = 30.0

_log = Logger()


async def loggedWait(clock, what: str, d):
    """Await C{d}, logging "waiting for C{what}" if it takes long."""

    def waiting():
        nonlocal call
        _log.warn("starting: waiting for {what}", what=what)
        call = clock.callLater(WAIT_LOG_EVERY, waiting)

    call = clock.callLater(WAIT_LOG_AFTER, waiting)
    try:
        return await d
    finally:
        if call.active():
            call.cancel()


class ReadyGate:
    """Whether the service has started.  Until it has, requests other than
    PING are refused at once with errno 30 (L{refuse}), naming what start-up
    waits for; L{whenReady} is for code that needs to wait (tests, tools)."""

    def __init__(self) -> None:
        #: True once start-up has finished.
        self.isReady = False
        #: what start-up waits for now, for the errno 30 replies
        self.waitingFor = "storage"
        self._waiters: list[defer.Deferred] = []

    def whenReady(self) -> defer.Deferred:
        """A new Deferred that fires once ready (or fails if start-up
        fails)."""
        if self.isReady:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def stage(self, clock, what: str, d):
        """Await start-up stage C{d}, which waits for C{what} (a
        coroutine; see L{loggedWait})."""
        self.waitingFor = what
        return loggedWait(clock, what, d)

    def refuse(self) -> None:
        """Refuse a request while not ready: errno 30 at once."""
        raise RequestError(m.E_UNAVAILABLE, f"server is starting (waiting for {self.waitingFor}); retry")

    def open(self) -> None:
        self.isReady = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def fail(self, error: Exception) -> None:
        """Start-up failed: every waiter fails with C{error}."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(error)
