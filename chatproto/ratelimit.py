"""
A token bucket per key (a client address), free of I/O.

Each key may do C{burst} things at once, then one every C{1/rate} seconds:
the bucket holds at most C{burst} tokens and refills at C{rate} tokens a
second.  Registrations are limited this way per address; the default (a
burst of 100, then one a second) does not trouble a balancer that hides
its clients' addresses in normal use.  A bucket that has refilled is
forgotten, and at most C{maxKeys} are remembered (least recently used
dropped first), so memory is bounded.
"""

from __future__ import annotations

from collections import OrderedDict


class TokenBucketLimiter:
    def __init__(self, clock, burst: int = 100, rate: float = 1.0, maxKeys: int = 100_000) -> None:
        if burst < 1 or not rate > 0:
            raise ValueError("burst must be at least 1 and rate above 0")
        self._clock = clock
        self.burst = burst
        self.rate = rate
        self.maxKeys = maxKeys
        # key -> (tokens, time they were counted), least recently used first
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key) -> float:
        """
        Take one token for C{key}.

        @return: 0.0 when there was one (go ahead); otherwise the seconds
            until there is one, and nothing is taken.
        """
        now = self._clock.seconds()
        self._forgetFull(now)
        tokens = self._tokens(key, now)
        if tokens < 1:
            return (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.maxKeys:
            self._buckets.popitem(last=False)
        return 0.0

    def _tokens(self, key, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.burst)
        tokens, then = entry
        return min(self.burst, tokens + (now - then) * self.rate)

    def _forgetFull(self, now: float) -> None:
        # Least recently used first: a bucket used later refills later.
        buckets = self._buckets
        while buckets:
            key = next(iter(buckets))
            if self._tokens(key, now) < self.burst:
                break
            del buckets[key]
