"""The base class of both limiters: their common arguments, read-only attributes and Go handle."""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

from . import _bridge, _url, _validate

KEY_PREFIX = "__self-limiters:"


class Limiter:
    """Base of Semaphore and TokenBucket; see those for the arguments."""

    __slots__ = ("_name", "_capacity", "_max_sleep", "_redis_url", "_pool_size", "_handle", "__weakref__")

    # The start of repr(), as self-limiters 0.4.0 printed it.
    _KIND: ClassVar[str]

    def __init__(
        self,
        name: object,
        capacity: object,
        max_sleep: object,
        redis_url: object,
        pool_size: object,
        default_pool_size: int,
    ) -> None:
        self._name = _validate.check_name(name)
        self._capacity = _validate.check_count("capacity", capacity)
        self._max_sleep = _validate.check_max_sleep(max_sleep)
        self._redis_url = _url.check_redis_url(redis_url)
        self._pool_size = _validate.check_count("connection_pool_size", pool_size, default=default_pool_size)
        self._handle = 0

    @property
    def name(self) -> str:
        """The name with the ``__self-limiters:`` prefix."""
        return KEY_PREFIX + self._name

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_sleep(self) -> float:
        """Maximum wait in seconds; 0.0 means no limit."""
        return self._max_sleep

    def __repr__(self) -> str:
        return f"{self._KIND} instance for queue {self.name}"

    def _open(self) -> int:
        """Return the Go handle of this limiter's settings, loading the Go library on first use."""
        if not self._handle:
            self._handle = _bridge.check(self._open_in_go(_bridge.library()))
        return self._handle

    def _open_in_go(self, library: ModuleType) -> int:
        raise NotImplementedError

    def __del__(self) -> None:
        # The Go side keeps a limiter per distinct settings while an object holds its handle.
        handle = getattr(self, "_handle", 0)
        if handle:
            _bridge.close_handle(handle)
