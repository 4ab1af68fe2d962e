"""
A leaner event dispatch for the epoll reactor.

C{EPollReactor.doPoll} wraps every ready descriptor's handler in
C{log.callWithLogger}, which pushes a logging context (a dict copy and three
Python calls) per event; on a proxy that is a large share of the time per
forwarded message.  L{install} replaces the reactor instance's C{doPoll}
with the same loop minus that wrapper, and L{uninstall} puts the stock one
back.  Errors are contained as C{callWithLogger} contains them: an
exception in a selectable's C{doRead}, C{doWrite} or C{connectionLost} is
logged (without the "system" log prefix) and disconnects that selectable
only; the other ready events of the same poll are still dispatched.

The reactor's internals come from L{balancer._twisted.epollInternals};
without them (another reactor, another Twisted) L{install} returns
C{False} and the stock loop runs.
"""

from __future__ import annotations

import errno
import select
import sys
from typing import Any

from twisted.logger import Logger

from balancer import _twisted

log = Logger()


def _makeDoPoll(internals: tuple[Any, dict[int, Any], Any, Any]) -> Any:
    poller, selectables, dispatch, disconnect = internals
    EPOLLIN = select.EPOLLIN
    EPOLLOUT = select.EPOLLOUT
    INOUT = EPOLLIN | EPOLLOUT

    def doPoll(timeout: float | None) -> None:
        if timeout is None:
            timeout = -1
        try:
            events = poller.poll(timeout, len(selectables) or 1)
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        get = selectables.get
        for fd, event in events:
            selectable = get(fd)
            if selectable is None:
                continue
            if event & INOUT == EPOLLIN:
                # Readable, maybe with a hang-up or error, not writable:
                # what _doReadOrWrite does for it (read; a hang-up is then
                # seen by the read), minus its other checks.
                handler, isRead = selectable.doRead, True
            elif event == EPOLLOUT:
                # writable and nothing else (a connect completing)
                handler, isRead = selectable.doWrite, False
            else:
                # hang-up or error without input, both directions: Twisted's
                # own handling
                handler = None
            try:
                if handler is None:
                    dispatch(selectable, fd, event)
                    continue
                try:
                    why = handler()
                except BaseException:
                    why = sys.exc_info()[1]
                    log.failure(
                        "in {handler} of {s}", handler="doRead" if isRead else "doWrite",
                        s=selectable,
                    )
                if why:
                    disconnect(selectable, why, isRead)
            except BaseException:
                # connectionLost (or a broken selectable) raised: what
                # callWithLogger does, log it and go on with the others
                log.failure("while handling events of {s}", s=selectable)

    return doPoll


def install(reactor: Any) -> bool:
    """
    Speed up C{reactor} if it is an epoll reactor; return whether it was.
    """
    if "doPoll" in vars(reactor):
        return True  # installed already
    internals = _twisted.epollInternals(reactor)
    if internals is None:
        return False
    doPoll = _makeDoPoll(internals)
    reactor.doPoll = reactor.doIteration = doPoll
    log.info("using the lean epoll dispatch")
    return True


def uninstall(reactor: Any) -> None:
    """
    Put the reactor's stock event dispatch back (no-op if not installed).
    """
    state = vars(reactor)
    if state.pop("doPoll", None) is not None:
        state.pop("doIteration", None)
        log.info("using the stock epoll dispatch")
