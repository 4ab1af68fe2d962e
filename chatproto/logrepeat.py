"""
Repeated warnings rate-limited into a count.

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
