"""
Health state machines, pure logic with no I/O.

L{PassiveHealth} is nginx's C{max_fails}/C{fail_timeout} bookkeeping
(C{ngx_stream_upstream_round_robin.c}): connect failures counted by the
proxy itself.  L{ActiveHealth} is HAProxy's C{rise}/C{fall} counter
(C{src/check.c}): results of the periodic health checks.

Times are plain floats given by the caller (C{clock.seconds()}), so both
classes are tested step by step without a reactor.
"""

from __future__ import annotations


class PassiveHealth:
    """
    nginx's passive failure accounting for one backend.

    A failed connect increments C{fails} and stamps C{checked}/C{accessed}.
    Once C{fails >= maxFails}, the backend is unavailable while
    C{now - checked <= failTimeout}.  After that a single probe is let
    through (L{picked} moves C{checked} forward, closing the window again);
    a success after that probe (C{accessed < checked}) resets C{fails}.
    C{maxFails = 0} disables the accounting, as in nginx.
    """

    __slots__ = ("maxFails", "failTimeout", "fails", "checked", "accessed")

    def __init__(self, maxFails: int = 1, failTimeout: float = 10.0) -> None:
        self.maxFails = maxFails
        self.failTimeout = failTimeout
        self.fails = 0
        self.checked = 0.0
        self.accessed = 0.0

    def available(self, now: float) -> bool:
        return not (
            self.maxFails
            and self.fails >= self.maxFails
            and now - self.checked <= self.failTimeout
        )

    def picked(self, now: float) -> None:
        """
        The backend was chosen for a connection attempt (nginx's
        C{get_peer} tail).
        """
        if now - self.checked > self.failTimeout:
            self.checked = now

    def failed(self, now: float) -> bool:
        """
        Record a failure; return C{True} when this failure disabled the
        backend (reached C{maxFails}).
        """
        self.fails += 1
        self.accessed = now
        self.checked = now
        return bool(self.maxFails) and self.fails == self.maxFails

    def succeeded(self) -> None:
        """
        Record a success (nginx's C{free_peer} without C{NGX_PEER_FAILED}).
        """
        if self.accessed < self.checked:
            self.fails = 0

    def reset(self) -> None:
        """
        Forget failures, e.g. because an active check saw the backend healthy
        after it was down.
        """
        self.fails = 0


class ActiveHealth:
    """
    HAProxy's rise/fall health counter.

    C{health} runs from 0 to C{rise + fall - 1}; the server is up while
    C{health >= rise}.  A new server starts at C{health = rise}: up, but the
    first failed check takes it down (HAProxy's "up, but will fall down at
    first failure").  Once fully up, C{fall} consecutive failures take it
    down; once down, C{rise} consecutive successes bring it up.
    """

    __slots__ = ("rise", "fall", "health", "lastResult", "lastCheck", "lastError")

    def __init__(self, rise: int = 2, fall: int = 3) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.health = rise
        self.lastResult: bool | None = None
        self.lastCheck: float | None = None
        self.lastError = ""

    @property
    def up(self) -> bool:
        return self.health >= self.rise

    def record(self, ok: bool, now: float | None = None, error: str = "") -> bool:
        """
        Record one check result; return C{True} if the up/down state changed.
        """
        wasUp = self.up
        self.lastResult = ok
        self.lastCheck = now
        self.lastError = "" if ok else error
        if ok:
            if self.health < self.rise + self.fall - 1:
                self.health += 1
                if self.health >= self.rise:
                    self.health = self.rise + self.fall - 1
        elif self.health > 0:
            self.health -= 1
            if self.health < self.rise:
                self.health = 0
        return self.up != wasUp
