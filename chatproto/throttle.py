"""
Slowing down repeated failed logins, free of I/O.

Failures are counted per key (an account id, a peer address).  After
C{allowed} failures a key is refused until a back-off delay passes; the delay
doubles with each further failure up to C{maxDelay}.  A success clears the
key.  Keys forget their failures after C{maxDelay} of quiet.
"""

from __future__ import annotations


class LoginThrottle:
    def __init__(self, clock, allowed: int = 5, baseDelay: float = 1.0, maxDelay: float = 300.0) -> None:
        self._clock = clock
        self.allowed = allowed
        self.baseDelay = baseDelay
        self.maxDelay = maxDelay
        # key -> (failures, blocked until, last failure time)
        self._state: dict[object, tuple[int, float, float]] = {}

    def retryAfter(self, *keys) -> float:
        """Seconds until any of C{keys} may try again; 0 if allowed now."""
        now = self._clock.seconds()
        wait = 0.0
        for key in keys:
            state = self._state.get(key)
            if state is None:
                continue
            failures, until, last = state
            if now - last > self.maxDelay:
                del self._state[key]
                continue
            wait = max(wait, until - now)
        return wait

    def failed(self, *keys) -> None:
        now = self._clock.seconds()
        for key in keys:
            failures, _, last = self._state.get(key, (0, 0.0, now))
            if now - last > self.maxDelay:
                failures = 0
            failures += 1
            until = now
            if failures >= self.allowed:
                delay = self.baseDelay * 2 ** (failures - self.allowed)
                until = now + min(delay, self.maxDelay)
            self._state[key] = (failures, until, now)
        self._prune(now)

    def succeeded(self, *keys) -> None:
        for key in keys:
            self._state.pop(key, None)

    def _prune(self, now: float) -> None:
        # Bound memory under a spray of distinct keys.
        if len(self._state) > 100_000:
            for key, (_, _, last) in list(self._state.items()):
                if now - last > self.maxDelay:
                    del self._state[key]
