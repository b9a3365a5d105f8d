"""Distributed limiters on Redis, with a Go core.

``Semaphore`` caps how many holders run at once and ``TokenBucket`` caps how many entries happen
per interval, for every process and host that shares one Redis::

    async with Semaphore(name="api", capacity=5):
        ...

Importing this package and building limiters neither connects to Redis nor starts the Go
runtime; the first entry does.
"""

from ._errors import ForkedProcessError, MaxSleepExceededError, RedisError
from ._semaphore import Semaphore
from ._token_bucket import TokenBucket

__all__ = ["ForkedProcessError", "MaxSleepExceededError", "RedisError", "Semaphore", "TokenBucket"]
__version__ = "0.5.0.dev0"
