"""
Repeated log lines rate-limited into a count: warnings (L{RepeatedWarnings})
and the lines every session brings (L{SessionLog}).

The first warning of a kind is logged as it is; the ones that follow within
C{window} seconds are only counted, and when the window ends one line says
how many there were ("37 more like this in the last 10 s: ...").  During an
outage this is one line per kind every 10 s instead of one per message.
"""

from __future__ import annotations

from twisted.logger import Logger


class RepeatedWarnings:
    """
    @param log: the L{Logger} to write to.
    @param clock: an C{IReactorTime}.
    @param window: seconds during which repeats are counted.
    """

    def __init__(self, log: Logger, clock, window: float = 10.0) -> None:
        self.log = log
        self.clock = clock
        self.window = window
        # key -> [repeats counted, the summary's timer]
        self._open: dict[str, list] = {}

    def warn(self, key: str, format: str, **kw) -> None:
        """Log C{format} (a L{Logger} format string) unless a warning of
        kind C{key} was logged less than C{window} seconds ago; then count
        it."""
        entry = self._open.get(key)
        if entry is not None:
            entry[0] += 1
            return
        self.log.warn(format, **kw)
        self._open[key] = [0, self.clock.callLater(self.window, self._summarize, key)]

    def _summarize(self, key: str) -> None:
        count, _ = self._open.pop(key)
        if count:
            self.log.warn(
                "{count} more like this in the last {window:g} s: {key}", count=count, window=self.window, key=key
            )

    def stop(self) -> None:
        """Cancel the pending summaries (at shutdown)."""
        for _, call in self._open.values():
            if call.active():
                call.cancel()
        self._open.clear()


class SessionLog:
    """
    Lines that come with every session (logins, logouts), one by one up to
    C{burst} lines of a kind per C{window} seconds; past that they are
    counted, and one line at the window's end says how many were not
    logged ("1,234 more login lines not logged one by one in the last
    10 s").  A reconnect storm of thousands of logins a second then costs a
    counter, not thousands of formatted and written lines, and the log
    stays readable.

    @param log: the L{Logger} to write to.
    @param clock: an C{IReactorTime}.
    """

    #: lines of a kind logged one by one per window
    burst = 20
    #: seconds
    window = 10.0

    def __init__(self, log: Logger, clock) -> None:
        self.log = log
        self.clock = clock
        # kind -> [window start, lines logged, lines counted, summary timer]
        self._kinds: dict[str, list] = {}

    def info(self, kind: str, format: str, **kw) -> None:
        """Log C{format} (a L{Logger} format string) at level info, or
        count it when C{burst} lines of C{kind} were logged in this
        window."""
        now = self.clock.seconds()
        entry = self._kinds.get(kind)
        if entry is None or now - entry[0] >= self.window:
            if entry is not None:
                self._summarize(kind)
            entry = self._kinds[kind] = [now, 0, 0, None]
        if entry[1] < self.burst:
            entry[1] += 1
            self.log.info(format, **kw)
            return
        entry[2] += 1
        if entry[3] is None:
            entry[3] = self.clock.callLater(entry[0] + self.window - now, self._summarize, kind)

    def _summarize(self, kind: str) -> None:
        entry = self._kinds.pop(kind, None)
        if entry is None:
            return
        call = entry[3]
        if call is not None and call.active():
            call.cancel()
        if entry[2]:
            self.log.info(
                "{count:,} more {kind} lines not logged one by one in the last {window:g} s",
                count=entry[2],
                kind=kind,
                window=self.window,
            )

    def stop(self) -> None:
        """Log the pending counts now (at shutdown)."""
        for kind in list(self._kinds):
            self._summarize(kind)
