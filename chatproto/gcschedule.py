"""
Python's cyclic garbage collection, run from the reactor at a bounded rate
(as Matrix Synapse does it).

With automatic collection, CPython collects generation 2 (every tracked
object) whenever enough objects have survived the younger generations.  A
chat server with 10,000 sessions holds about 314,000 tracked objects; in a
reconnect storm, when thousands of sessions are built at once, full
collections ran three times in a second, 0.19-0.28 s each by the wall
clock on a 2-core VM, every connection of the server stopped meanwhile
(docs/operations.md, "Garbage collection from the reactor").

L{CollectionSchedule} turns automatic collection off and, every
L{CHECK_INTERVAL} seconds, collects the oldest generation whose count is
past Python's own threshold (C{gc.get_threshold()}) if that generation was
last collected at least its minimum interval ago (default 1 s, 10 s and
30 s for generations 0, 1 and 2).  Reference counting still frees every
object that is not in a cycle at once; only cyclic garbage waits, for at
most those intervals.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

#: seconds between two looks at the collector's counts
CHECK_INTERVAL = 0.1

#: minimum seconds between two collections of generations 0, 1 and 2
DEFAULT_INTERVALS = (1.0, 10.0, 30.0)


def parseIntervals(text: str) -> tuple[float, float, float] | None:
    """
    C{"off"}: None (Python's automatic collection); else three numbers of
    seconds separated by commas, each at least 0 and at most 3600, each
    generation's at least the younger one's.  Raises L{ValueError}.
    """
    if text.strip().lower() == "off":
        return None
    try:
        intervals = tuple(float(p) for p in text.split(","))
    except ValueError:
        intervals = ()
    if len(intervals) != 3:
        raise ValueError(f"expected 'off' or three seconds like 1,10,30, not {text!r}")
    if not all(0 <= i <= 3600 for i in intervals):
        raise ValueError(f"each interval must be from 0 to 3600 seconds, not {text!r}")
    if not intervals[0] <= intervals[1] <= intervals[2]:
        raise ValueError(f"older generations need intervals at least as long as younger ones, not {text!r}")
    return intervals  # type: ignore[return-value]


class CollectionSchedule(service.Service):
    """
    While running, the garbage collection described in the module's
    docstring; stopping turns automatic collection back on.

    @param clock: an C{IReactorTime}.
    @param collector: the C{gc} module (a stand-in in tests).
    @param cpuTime: the CPU clock a collection's cost is read from.
    @ivar collections: collections made, by generation.
    @ivar seconds: CPU seconds spent in them, by generation.
    """

    log = Logger()

    def __init__(
        self, clock: Any, intervals: tuple[float, float, float] = DEFAULT_INTERVALS, collector: Any = gc, cpuTime: Any = time.process_time
    ) -> None:
        self.clock = clock
        self.intervals = intervals
        self.collector = collector
        self.cpuTime = cpuTime
        self.last = [float("-inf")] * 3  # when each generation was last collected
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._loop: task.LoopingCall | None = None
        self._wasEnabled = False

    def startService(self) -> None:
        super().startService()
        self._wasEnabled = self.collector.isenabled()
        self.collector.disable()
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(CHECK_INTERVAL, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._wasEnabled:
            self.collector.enable()
        return super().stopService()

    def check(self) -> None:
        """Collect the oldest generation that is due, if any."""
        threshold = self.collector.get_threshold()
        counts = self.collector.get_count()
        now = self.clock.seconds()
        for generation in (2, 1, 0):
            if counts[generation] > threshold[generation] and now - self.last[generation] >= self.intervals[generation]:
                started = self.cpuTime()
                self.collector.collect(generation)
                spent = self.cpuTime() - started
                # a collection of a generation collects the younger ones too
                for younger in range(generation + 1):
                    self.last[younger] = now
                self.collections[generation] += 1
                self.seconds[generation] += spent
                if generation == 2:
                    self.log.debug("full garbage collection: {ms:.0f} ms of CPU", ms=spent * 1000)
                return
