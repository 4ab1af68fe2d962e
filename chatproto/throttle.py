"""
Slowing down repeated failed logins, free of I/O.

Failures are counted per key (an account id, a peer address).  After
C{allowed} failures a key is refused until a back-off delay passes; the delay
doubles with each further failure up to C{maxDelay}.  A success clears the
key.  Keys forget their failures after C{maxDelay} of quiet.

Attempts in flight count: L{LoginThrottle.admit} is asked before the
password is checked and marks the attempt as in flight, L{LoginThrottle.finish}
reports its outcome (L{LoginThrottle.abandon}: none, the check did not
run).  A key with C{failures + in flight >= allowed} admits
one attempt at a time, after the delay, so parallel guesses are throttled
exactly like sequential ones.  At most C{maxKeys} keys are remembered (the
least recently used are forgotten first), so memory is bounded whatever the
spray of keys.
"""

from __future__ import annotations

from collections import OrderedDict

#: Past this many failures over the allowance the delay no longer grows
#: (2**40 s is far above any maxDelay): no float overflow, ever.
_MAX_DOUBLINGS = 40


class _Key:
    __slots__ = ("failures", "until", "last", "inFlight")

    def __init__(self, now: float) -> None:
        self.failures = 0
        self.until = 0.0
        self.last = now
        self.inFlight = 0


class LoginThrottle:
    def __init__(
        self, clock, allowed: int = 5, baseDelay: float = 1.0, maxDelay: float = 300.0, maxKeys: int = 100_000
    ) -> None:
        self._clock = clock
        self.allowed = allowed
        self.baseDelay = baseDelay
        self.maxDelay = maxDelay
        self.maxKeys = maxKeys
        # key -> state, least recently touched first
        self._state: OrderedDict[object, _Key] = OrderedDict()

    def __len__(self) -> int:
        return len(self._state)

    # --- attempts in flight ----------------------------------------------

    def admit(self, *keys) -> float:
        """
        Ask to check one login attempt for C{keys}.

        @return: 0.0 when it may go ahead (it now counts as in flight on
            every key until L{finish}); otherwise the seconds to wait, and
            nothing is counted.
        """
        now = self._clock.seconds()
        self._expire(now)
        wait = 0.0
        for key in keys:
            state = self._state.get(key)
            if state is not None:
                wait = max(wait, self._wait(state, now))
        if wait > 0:
            return wait
        for key in keys:
            state = self._touch(key, now)
            state.inFlight += 1
        self._bound()
        return 0.0

    def finish(self, *keys, ok: bool) -> None:
        """The attempt L{admit} let through for C{keys} has ended."""
        now = self._clock.seconds()
        self._expire(now)
        for key in keys:
            state = self._touch(key, now)
            if state.inFlight:
                state.inFlight -= 1
            if ok:
                state.failures, state.until = 0, 0.0
            else:
                self._fail(state, now)
            if not state.inFlight and not state.failures:
                del self._state[key]
        self._bound()

    def abandon(self, *keys) -> None:
        """
        The attempt L{admit} let through for C{keys} ended without an
        outcome (the check could not run: storage unavailable, the KDF pool
        busy, or a second throttle refused it): it no longer counts.
        """
        for key in keys:
            state = self._state.get(key)
            if state is None:
                continue
            if state.inFlight:
                state.inFlight -= 1
            if not state.inFlight and not state.failures:
                del self._state[key]

    def _wait(self, state: _Key, now: float) -> float:
        wait = state.until - now
        if wait > 0:
            return wait
        if state.failures + state.inFlight < self.allowed or not state.inFlight:
            return 0.0
        # Over the allowance one attempt at a time: its outcome is not
        # known yet, so the least this one waits is the base delay.
        return self.baseDelay

    def _fail(self, state: _Key, now: float) -> None:
        state.failures += 1
        if state.failures >= self.allowed:
            doublings = min(state.failures - self.allowed, _MAX_DOUBLINGS)
            state.until = now + min(self.baseDelay * 2.0**doublings, self.maxDelay)

    # --- finished attempts only (the per-address throttle: a balancer's shared
    # --- address must not cap honest login bursts by the checks in flight) ----

    def retryAfter(self, *keys) -> float:
        """Seconds until any of C{keys} may try again; 0 if allowed now."""
        now = self._clock.seconds()
        self._expire(now)
        wait = 0.0
        for key in keys:
            state = self._state.get(key)
            if state is not None:
                wait = max(wait, state.until - now)
        return wait

    def failed(self, *keys) -> None:
        now = self._clock.seconds()
        self._expire(now)
        for key in keys:
            self._fail(self._touch(key, now), now)
        self._bound()

    def succeeded(self, *keys) -> None:
        for key in keys:
            state = self._state.get(key)
            if state is None:
                continue
            if state.inFlight:
                state.failures, state.until = 0, 0.0
            else:
                del self._state[key]

    # --- memory ------------------------------------------------------------

    def _touch(self, key, now: float) -> _Key:
        """The state of C{key}, moved to the most recent end."""
        state = self._state.get(key)
        if state is None:
            state = self._state[key] = _Key(now)
        else:
            self._state.move_to_end(key)
        state.last = now
        return state

    def _expire(self, now: float) -> None:
        # Oldest first: stop at the first key touched recently.
        # (An attempt still in flight after maxDelay is taken as lost.)
        state = self._state
        while state:
            key = next(iter(state))
            if now - state[key].last <= self.maxDelay:
                break
            del state[key]

    def _bound(self) -> None:
        while len(self._state) > self.maxKeys:
            self._state.popitem(last=False)
