"""
SIGTERM and SIGINT handlers that never log.

Twisted's own handlers log ("Received SIGTERM, shutting down.") from inside
the signal handler.  Python runs a signal handler between two bytecodes of
the main thread, possibly while that thread holds a log observer's lock
(C{FileLogObserver} writing a line): logging from the handler then waits
for that lock forever.  These handlers only ask the reactor to stop
(C{callFromThread}, which takes no lock a logger holds); the stop is logged
afterwards, from the reactor, by whoever listens to it.
"""

from __future__ import annotations

import signal


def installStopHandlers(reactor, signals=(signal.SIGTERM, signal.SIGINT), install=signal.signal) -> None:
    """
    Make C{signals} stop C{reactor}, replacing the reactor's own handlers.
    Call it once the reactor runs (C{reactor.callWhenRunning}): the
    reactor installs its handlers as it starts.
    """

    def handler(number, frame) -> None:
        reactor.callFromThread(reactor.stop)

    for number in signals:
        install(number, handler)
