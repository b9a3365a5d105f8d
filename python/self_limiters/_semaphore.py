"""The distributed semaphore."""

from __future__ import annotations

import asyncio
import logging
import sys
from types import ModuleType, TracebackType

from . import _bridge, _validate
from ._limiter import Limiter

logger = _bridge.logger

def _is_whole_task(task: asyncio.Task[object]) -> bool:
    """Return whether the caller's frame is the task's own coroutine, so that the task ends when
    the caller returns (a coroutine awaited inside the task runs in a frame of its own)."""
    return getattr(task.get_coro(), "cr_frame", None) is sys._getframe(1)


class Semaphore(Limiter):
    """An async context manager that lets at most ``capacity`` holders run at once, across every
    process and host that uses the same ``name`` on the same Redis.

    Waiters are admitted first come, first served. A slot is a lease that the process renews in
    the background while the block runs, however long that is; if the process dies, its slot
    returns to the others about ``expiry`` seconds after its last renewal.

    Args:
        name: the semaphore's name; keys in Redis start with ``__self-limiters:``.
        capacity: holders allowed at once, at least 1.
        max_sleep: seconds to wait for a slot before MaxSleepExceededError; None or 0 waits
            without limit.
        expiry: lease length in seconds (default 30, at least 0.01). Leases are renewed every
            ``expiry / 3`` seconds, and keys of an idle semaphore vanish after ``expiry``.
        redis_url: ``redis://``, ``rediss://`` or ``unix://`` URL (default
            ``redis://127.0.0.1:6379``).
        connection_pool_size: connections to Redis for commands (default 15), shared by all
            limiters of the process with the same URL and pool size.

    Raises:
        TypeError: an argument has the wrong type (bool is not an int here).
        ValueError: an argument has an impossible value.
        RedisError: ``redis_url`` is malformed. Connection failures are raised on entry.
    """

    __slots__ = ("_expiry", "_held", "_handed_over")
    _KIND = "Semaphore"

    def __init__(
        self,
        name: str,
        capacity: int,
        max_sleep: float | None = None,
        expiry: float | None = None,
        redis_url: str | None = None,
        connection_pool_size: int | None = None,
    ) -> None:
        super().__init__(name, capacity, max_sleep, redis_url, connection_pool_size, default_pool_size=15)
        self._expiry = 30.0 if expiry is None else _validate.check_duration("expiry", expiry, _validate.MIN_EXPIRY)
        # Slots held, per task that entered: each exit releases the slot of its own task's
        # innermost entry, however many tasks share this object. A task is listed, with a done
        # callback, only while it holds a slot, so a long-running task that enters many
        # semaphores keeps none of them alive.
        self._held: dict[asyncio.Task[object], list[int]] = {}
        # Slots entered by a task that ran nothing but __aenter__, as asyncio.wait_for(
        # semaphore.__aenter__(), timeout) does before Python 3.12: the next exit of a task that
        # holds nothing of its own releases them, as self-limiters 0.4.0 allowed.
        self._handed_over: list[int] = []

    @property
    def expiry(self) -> float:
        """Lease length in seconds."""
        return self._expiry

    def _open_in_go(self, library: ModuleType) -> int:
        return library.pybridge_OpenSemaphore(self._redis_url, self._name, self._capacity, self._expiry, self._pool_size)

    async def __aenter__(self) -> None:
        port = _bridge.port()
        request_id = _bridge.check(
            _bridge.library().pybridge_SemaphoreAcquire(self._open(), port.queue, self._max_sleep)
        )
        await _bridge.wait_for_outcome(port, request_id)

        task = asyncio.current_task()
        assert task is not None  # an async with block always runs in a task
        if _is_whole_task(task):
            self._handed_over.append(request_id)
            return
        held = self._held.get(task)
        if held is None:
            held = self._held[task] = []
            task.add_done_callback(self._release_abandoned)
        held.append(request_id)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("acquired a slot of %s", self.name)

    def _release_abandoned(self, task: asyncio.Task[object]) -> None:
        """Give back the slots of a task that ended without leaving its blocks (done callback)."""
        held = self._held.pop(task, [])
        if not held:
            return
        logger.warning(
            "a task ended inside %d block(s) of %s without leaving them; their slots are given back",
            len(held),
            self.name,
        )
        for request_id in held:
            _bridge.library().pybridge_Cancel(request_id, False)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        task = asyncio.current_task()
        held = self._held.get(task) if task is not None else None
        if held:
            request_id = held.pop()
            if not held:
                del self._held[task]  # type: ignore[arg-type]  # held is only found for a task
                task.remove_done_callback(self._release_abandoned)  # type: ignore[union-attr]
        elif self._handed_over:
            request_id = self._handed_over.pop()
        else:
            raise RuntimeError(f"{self!r} was exited in a task that does not hold it")

        # The release reaches Redis in the background, so leaving the block costs no round trip;
        # its outcome is logged when it arrives.
        _bridge.port().release(request_id, self.name, self._expiry)
