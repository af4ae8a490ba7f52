"""Rate limits: token buckets per key, answered with 429 and ``Retry-After``.

Each named limit (``message``, ``bundle_fetch``, ``address``, ``account_creation``,
``device_link``) is a :class:`~tigress_signal.intermediary.config.RateLimit` from the
configuration: ``burst`` requests at once, refilled at ``per_second``. A bucket is kept per key
(a client address, or a pair of account ids) in this process's memory, at most
``rate_limiter_keys`` of them per limit; the least recently used is forgotten first, which can
only make a limit more lenient for the key forgotten.

A request refused by a limit changes nothing else: the limit is checked before the database is
touched, so a refused bundle fetch takes no prekey and a refused send stores nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from tigress_signal.intermediary.api import ApiError
from tigress_signal.intermediary.config import IntermediaryConfig, RateLimit

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


class TokenBuckets:
    """One rate limit's buckets, one per key.

    Args:
        limit: the bucket size and refill rate.
        max_keys: how many keys to remember.
        clock: seconds from a monotonic clock (replaced in tests).
    """

    def __init__(self, limit: RateLimit, max_keys: int, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Take one permit for ``key``.

        Returns:
            0 when the request may go ahead; otherwise the seconds until a permit is free
            (nothing was taken).
        """
        if not self.limit.enabled:
            return 0.0
        now = self._clock()
        tokens, updated = self._buckets.get(key, (float(self.limit.burst), now))
        tokens = min(float(self.limit.burst), tokens + (now - updated) * self.limit.per_second)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            return 0.0
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        return (1.0 - tokens) / self.limit.per_second


class RateLimiter:
    """Every rate limit of a server process.

    Args:
        config: the server's settings.
        on_limited: called with the limit's name for each refused request (metrics).
        clock: seconds from a monotonic clock (replaced in tests).
    """

    def __init__(
        self,
        config: IntermediaryConfig,
        *,
        on_limited: Callable[[str], None] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        keys = config.rate_limiter_keys
        self._limits = {
            "message": TokenBuckets(config.message_rate, keys, clock),
            "bundle_fetch": TokenBuckets(config.bundle_fetch_rate, keys, clock),
            "address": TokenBuckets(config.address_rate, keys, clock),
            "account_creation": TokenBuckets(config.account_creation_rate, keys, clock),
            "device_link": TokenBuckets(config.device_link_rate, keys, clock),
        }
        self._on_limited = on_limited

    def check(self, name: str, key: str) -> None:
        """Take a permit of limit ``name`` for ``key``.

        Raises:
            ApiError: 429 ``rate_limited`` with ``Retry-After`` (whole seconds, rounded up)
                and ``retryAfter`` in the body, when the bucket is empty.
        """
        wait = self._limits[name].take(key)
        if wait <= 0:
            return
        if self._on_limited is not None:
            self._on_limited(name)
        seconds = max(1, math.ceil(wait))
        logger.debug("rate limit %s refused a request; retry after %d s", name, seconds)
        raise too_many_requests(f"too many requests ({name} limit); retry later", seconds)


def too_many_requests(message: str, retry_after: int, error: str = "rate_limited") -> ApiError:
    """A 429 answer telling the client when to retry."""
    return ApiError(
        429, error, message, headers={"Retry-After": str(retry_after)}, retryAfter=retry_after
    )
