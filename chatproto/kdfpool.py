"""
A dedicated, bounded thread pool for password hashing.

scrypt is slow on purpose and needs C{128 * n * r} bytes per hash (16 MiB
at n=2**14, r=8).  Run in the reactor's shared thread pool (which also
resolves host names) with an unbounded queue, a burst of registrations
delays every other login and each thread that ever hashed keeps its 16 MiB:
glibc serves the allocation from that thread's malloc arena once its
dynamic mmap threshold has risen past 16 MiB, and does not give it back.

Here hashes run in their own pool of C{threads} (default: the cores), at
most C{queue} more wait, and beyond that a request fails at once with
L{E_UNAVAILABLE} "busy, retry".  The process asks glibc to serve large
blocks with mmap always (C{M_MMAP_THRESHOLD} fixed at 1 MiB, which also
stops the threshold from moving), so a hash's memory goes back to the
system when it is done, and calls C{malloc_trim} once a burst is over.
Memory for hashing is then bounded by C{threads * 128 * n * r} while it
runs and returns to the baseline after.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from chatproto import messages as m

log = Logger()

#: glibc's mallopt parameter number for M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def useMmapForLargeBlocks(threshold: int = 1 << 20) -> bool:
    """
    Have glibc serve blocks of C{threshold} bytes or more with mmap, and
    keep the threshold there (glibc otherwise raises it after each large
    free, and then keeps large blocks in the arenas).  Returns whether the
    setting was made (False on other C libraries).
    """
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, threshold))


def trimMemory() -> bool:
    """Give free heap memory back to the system (glibc C{malloc_trim})."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


def defaultThreads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class KDFPool(service.Service):
    """
    @param threads: hashes run at once (default: the cores).
    @param queue: hashes that may wait for a thread; one more fails with
        L{m.E_UNAVAILABLE}.
    @param pool: a L{ThreadPool}-like object (tests pass a fake).
    """

    name = "kdf-pool"
    log = log

    def __init__(self, reactor, threads: int | None = None, queue: int = 64, pool=None) -> None:
        self._reactor = reactor
        self.threads = threads or defaultThreads()
        self.queue = queue
        self._threadPool = pool if pool is not None else ThreadPool(minthreads=0, maxthreads=self.threads, name="kdf")
        #: hashes running or waiting
        self.pending = 0
        self._started = False
        self._shutdownTrigger = None

    def startService(self) -> None:
        super().startService()
        self._start()

    def _start(self) -> None:
        if not self._started:
            self._started = True
            useMmapForLargeBlocks()
            self._threadPool.start()
            # Also stopped with the reactor when used outside a service.
            self._shutdownTrigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._stop)

    def _stop(self) -> None:
        if self._started:
            self._started = False
            self._threadPool.stop()

    def stopService(self):
        super().stopService()
        if self._shutdownTrigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdownTrigger)
            self._shutdownTrigger = None
        self._stop()

    def run(self, f, *args) -> defer.Deferred:
        """
        Run C{f(*args)} in the pool.

        @return: a Deferred with its result, failed at once with a
            L{m.RequestError} (L{m.E_UNAVAILABLE}) when the queue is full.
        """
        if self.pending >= self.threads + self.queue:
            return defer.fail(m.RequestError(m.E_UNAVAILABLE, "busy, retry"))
        # Used outside twistd (a script, a test): start on first use.
        self._start()
        self.pending += 1
        self._peak = max(self._peak, self.pending)
        d = threads.deferToThreadPool(self._reactor, self._threadPool, f, *args)
        return d.addBoth(self._done)

    _peak = 0

    def _done(self, result):
        self.pending -= 1
        if self.pending == 0 and self._peak > self.threads:
            # A burst (work had to queue) is over.
            self._peak = 0
            trimMemory()
        return result
