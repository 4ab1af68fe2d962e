"""
A leaner event dispatch for the epoll reactor.

C{EPollReactor.doPoll} wraps every ready descriptor's handler in
C{log.callWithLogger}, which pushes a logging context (a dict copy and three
Python calls) per event; on a proxy that is a large share of the time per
forwarded message.  L{install} replaces the reactor instance's C{doPoll}
with the same loop minus that wrapper.  Errors are still caught and logged
by C{_doReadOrWrite}; they only lose the "system" log prefix.
"""

from __future__ import annotations

import errno
import select
import sys
from typing import Any

from twisted.logger import Logger

log = Logger()


def install(reactor: Any) -> bool:
    """
    Speed up C{reactor} if it is an epoll reactor; return whether it was.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - not Linux
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    poller = reactor._poller
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    EPOLLIN = select.EPOLLIN

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
            if event == EPOLLIN:
                # The common case, readable and nothing else: what
                # _doReadOrWrite does for it, minus its other checks.
                try:
                    why = selectable.doRead()
                except BaseException:
                    why = sys.exc_info()[1]
                    log.failure("in doRead of {s}", s=selectable)
                if why:
                    disconnect(selectable, why, True)
            else:
                dispatch(selectable, fd, event)

    reactor.doPoll = reactor.doIteration = doPoll
    log.info("using the lean epoll dispatch")
    return True
