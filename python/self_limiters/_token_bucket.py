"""The distributed token bucket."""

from __future__ import annotations

import asyncio
import logging
import time
from types import ModuleType, TracebackType

from . import _bridge, _validate
from ._limiter import Limiter
from ._bridge import logger


class TokenBucket(Limiter):
    """An async context manager that lets at most ``capacity`` entries through at once and then
    ``refill_amount`` more every ``refill_frequency`` seconds, across every process and host that
    uses the same ``name`` on the same Redis.

    The bucket starts full. Each entry takes one token; when none is left, the entry is given the
    time at which its token will exist, in first-come first-served order, and sleeps until then
    with ``asyncio.sleep``. The schedule is computed on the Redis server's clock. Leaving the block
    does nothing.

    Args:
        name: the bucket's name; its key in Redis starts with ``__self-limiters:``.
        capacity: tokens in a full bucket, at least 1.
        refill_frequency: seconds between two refills, at least 1e-6.
        refill_amount: tokens added per refill, at least 1; the bucket never exceeds capacity.
        redis_url: ``redis://``, ``rediss://`` or ``unix://`` URL (default
            ``redis://127.0.0.1:6379``).
        max_sleep: when the wait for a token would exceed this many seconds, raise
            MaxSleepExceededError at once and take no token; None or 0 waits without limit.
        connection_pool_size: connections to Redis (default 30), shared by all limiters of the
            process with the same URL and pool size.

    Raises:
        TypeError: an argument has the wrong type (bool is not an int here).
        ValueError: an argument has an impossible value.
        RedisError: ``redis_url`` is malformed. Connection failures are raised on entry.
    """

    __slots__ = ("_refill_frequency", "_refill_amount")
    _KIND = "Token bucket"

    def __init__(
        self,
        name: str,
        capacity: int,
        refill_frequency: float,
        refill_amount: int,
        redis_url: str | None = None,
        max_sleep: float | None = None,
        connection_pool_size: int | None = None,
    ) -> None:
        super().__init__(name, capacity, max_sleep, redis_url, connection_pool_size, default_pool_size=30)
        self._refill_frequency = _validate.check_duration(
            "refill_frequency", refill_frequency, _validate.MIN_REFILL_FREQUENCY
        )
        self._refill_amount = _validate.check_count("refill_amount", refill_amount)

    @property
    def refill_frequency(self) -> float:
        """Seconds between two refills."""
        return self._refill_frequency

    @property
    def refill_amount(self) -> int:
        return self._refill_amount

    def _open_in_go(self, library: ModuleType) -> int:
        return library.pybridge_OpenTokenBucket(
            self._redis_url, self._name, self._capacity, self._refill_frequency, self._refill_amount, self._pool_size
        )

    async def __aenter__(self) -> None:
        port = _bridge.port()
        request_id = _bridge.check(
            _bridge.library().pybridge_TokenBucketAcquire(self._open(), port.queue, self._max_sleep)
        )
        # The moment the token exists, on the clock of time.monotonic(), or 0 when it exists now.
        usable_at_micros = await _bridge.wait_for_outcome(port, request_id)
        wait = max(usable_at_micros / 1e6 - time.monotonic(), 0.0) if usable_at_micros > 0 else 0.0
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("took a token of %s, usable in %.6fs", self.name, wait)
        if wait > 0:
            # The token stays taken if this sleep is cancelled: it cannot be handed back.
            await asyncio.sleep(wait)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None
