"""
Repeated log lines rate-limited into a count: warnings (L{RepeatedWarnings})
and the lines every session brings (L{SessionLog}).

The first lines of a kind (one warning; twenty login lines) are logged as
they are; the ones that follow within C{window} seconds are only counted,
and when the window ends one line says how many there were ("37 more like
this in the last 10 s: ...").  During an outage this is one line per kind
every 10 s instead of one per message; in a reconnect storm a counter, not
thousands of formatted and written lines.
"""

from __future__ import annotations

from twisted.logger import Logger, LogLevel


class CountedLines:
    """
    Lines of a kind: the first L{burst} of each window of C{window} seconds
    logged at L{level}, the rest counted and told by one line at the
    window's end.

    @param log: the L{Logger} to write to.
    @param clock: an C{IReactorTime}.
    @param window: seconds during which lines are counted.
    """

    #: lines of a kind logged one by one per window
    burst = 1
    level = LogLevel.warn
    #: L{stop} logs the counts not told yet (else it drops them)
    summarizeAtStop = False

    def __init__(self, log: Logger, clock, window: float = 10.0) -> None:
        self.log = log
        self.clock = clock
        self.window = window
        # kind -> [window start, lines logged, lines counted, summary timer]
        self._kinds: dict[str, list] = {}

    def emit(self, kind: str, format: str, **kw) -> None:
        """Log C{format} (a L{Logger} format string), or count it when
        L{burst} lines of C{kind} were logged in this window."""
        now = self.clock.seconds()
        entry = self._kinds.get(kind)
        if entry is None or now - entry[0] >= self.window:
            if entry is not None:
                self._summarize(kind)
            entry = self._kinds[kind] = [now, 0, 0, None]
        if entry[1] < self.burst:
            entry[1] += 1
            self.log.emit(self.level, format, **kw)
            return
        entry[2] += 1
        if entry[3] is None:
            entry[3] = self.clock.callLater(entry[0] + self.window - now, self._summarize, kind)

    def summary(self, kind: str) -> str:
        """The format of the line that tells C{{count}} lines of C{kind}
        (also given: C{{window}} and C{{kind}})."""
        return "{count} more like this in the last {window:g} s: {kind}"

    def _summarize(self, kind: str, tell: bool = True) -> None:
        entry = self._kinds.pop(kind, None)
        if entry is None:
            return
        call = entry[3]
        if call is not None and call.active():
            call.cancel()
        if entry[2] and tell:
            self.log.emit(self.level, self.summary(kind), count=entry[2], kind=kind, window=self.window)

    def stop(self) -> None:
        """At shutdown: no timer left; the counts not told yet are logged
        (L{summarizeAtStop}) or dropped."""
        for kind in list(self._kinds):
            self._summarize(kind, self.summarizeAtStop)


class RepeatedWarnings(CountedLines):
    """Warnings: the first of a kind, then a count per window."""

    def warn(self, key: str, format: str, **kw) -> None:
        """Log C{format} unless a warning of kind C{key} was logged less than
        C{window} seconds ago; then count it."""
        self.emit(key, format, **kw)


class SessionLog(CountedLines):
    """
    Lines that come with every session (logins, logouts), one by one up to
    C{burst} lines of a kind per C{window} seconds; past that they are
    counted ("1,234 more login lines not logged one by one in the last
    10 s"), and the log stays readable.
    """

    burst = 20
    level = LogLevel.info
    summarizeAtStop = True

    def info(self, kind: str, format: str, **kw) -> None:
        """Log C{format} at level info, or count it."""
        self.emit(kind, format, **kw)

    def summary(self, kind: str) -> str:
        return "{count:,} more {kind} lines not logged one by one in the last {window:g} s"
