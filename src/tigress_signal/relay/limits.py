"""Request rate limits of the relay: token buckets per client address, in memory only.

The buckets live in this process and are never written to the database: the relay must not
keep a record of who called it. Two limits apply: all requests of an address, and requests
that named a mailbox that does not exist (which is what guessing mailbox ids looks like).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

#: Buckets remembered at most; the least recently used are forgotten first (a forgotten
#: address starts again with a full bucket, which only errs on the lenient side).
MAX_TRACKED_ADDRESSES = 10_000


class RateLimiter:
    """A token bucket per key: ``capacity`` at once, refilled at ``per_minute`` a minute.

    Args:
        per_minute: the sustained rate; 0 disables the limit.
        capacity: how many may be taken at once from a full bucket.
        clock: seconds on a monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        per_minute: int,
        capacity: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = per_minute / 60.0
        self._capacity = float(max(capacity, 1))
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """Whether this limiter limits anything."""
        return self._rate > 0

    def take(self, key: str) -> float:
        """Take one token for ``key``.

        Returns:
            0 when the request may go ahead, otherwise the seconds until a token is free.
        """
        if not self.enabled:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - last) * self._rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > MAX_TRACKED_ADDRESSES:
            self._buckets.popitem(last=False)
        return wait

    def peek(self, key: str) -> float:
        """The seconds until ``key`` may take a token, without taking one."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.get(key, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - last) * self._rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate
