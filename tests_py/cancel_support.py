"""Helpers for the cancellation tests: entries cancelled in three ways, and checks of a semaphore's state.

A cancellation strikes a task through ``task.cancel()``, ``asyncio.wait_for`` or ``asyncio.timeout``.
Where it lands depends on the order of one event loop iteration: callbacks queued with
``call_soon`` run first, then the callbacks of file descriptors that became ready (the completion
pipe of self_limiters), then timers that are due. The tests block the loop with ``time.sleep`` to
choose that order.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import redis
import redis.asyncio

from self_limiters import MaxSleepExceededError, Semaphore
from support import semaphore_key

TASK_CANCEL = "task_cancel"
WAIT_FOR = "wait_for"
TIMEOUT = "timeout"
# asyncio.timeout exists from Python 3.11 on.
METHODS = (TASK_CANCEL, WAIT_FOR) + ((TIMEOUT,) if hasattr(asyncio, "timeout") else ())

COMPLETED = "completed"
CANCELLED = "cancelled"


class Strike:
    """One call of ``body()`` in its own task, cancelled at loop time ``deadline`` through ``method``.

    ``deadline`` None never cancels. ``task_cancel`` calls ``task.cancel()`` from a timer,
    ``wait_for`` runs ``asyncio.wait_for(body(), deadline - now)``, and ``timeout`` runs the body
    inside ``asyncio.timeout_at(deadline)``.
    """

    def __init__(self, method: str, body: Callable[[], Awaitable[Any]], deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        self.method = method
        self._timeout: Any = None
        if method == TASK_CANCEL:
            self.task = loop.create_task(body())
            if deadline is not None:
                loop.call_at(deadline, self.task.cancel)
        elif method == WAIT_FOR:
            delay = None if deadline is None else max(0.0, deadline - loop.time())
            self.task = loop.create_task(asyncio.wait_for(body(), delay))
        elif method == TIMEOUT:
            self.task = loop.create_task(self._run_with_timeout(body, deadline))
        else:
            raise ValueError(f"unknown cancellation method {method!r}, expected one of {METHODS}")

    async def _run_with_timeout(self, body: Callable[[], Awaitable[Any]], deadline: float | None) -> None:
        async with asyncio.timeout_at(deadline) as timeout:
            self._timeout = timeout
            await body()

    def strike_now(self) -> None:
        """Cancel now: ``task.cancel()``, or a timeout rescheduled to now, which ``call_soon`` fires
        before any I/O callback of the next iteration. ``wait_for`` can only strike at its deadline."""
        if self.method == TASK_CANCEL:
            self.task.cancel()
        elif self.method == TIMEOUT:
            if self._timeout is None:
                raise RuntimeError("the timeout exists only once the task has run its first step")
            self._timeout.reschedule(asyncio.get_running_loop().time())
        else:
            raise ValueError(f"{self.method} cannot strike before the deadline given when it started")

    def strike_by_timer(self) -> None:
        """Cancel from a timer due at once, which the next iteration runs after the I/O callbacks."""
        loop = asyncio.get_running_loop()
        if self.method == TASK_CANCEL:
            loop.call_at(loop.time(), self.task.cancel)
        elif self.method == TIMEOUT:
            if self._timeout is None:
                raise RuntimeError("the timeout exists only once the task has run its first step")
            self._timeout.reschedule(loop.time() + 0.001)
            time.sleep(0.002)  # the timer is due when the loop looks at its timers next
        else:
            raise ValueError(f"{self.method} cannot strike before the deadline given when it started")

    async def outcome(self) -> str:
        """Wait for the task and return COMPLETED or CANCELLED. Any other exception is raised."""
        await asyncio.wait({self.task})
        if self.task.cancelled():
            if self.method == TASK_CANCEL:
                return CANCELLED
            raise AssertionError(f"expected {self.method} to raise TimeoutError, the task itself was cancelled")
        error = self.task.exception()
        if error is None:
            return COMPLETED
        if self.method != TASK_CANCEL and isinstance(error, asyncio.TimeoutError):
            return CANCELLED
        raise error


async def end_tasks(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel the tasks still running, wait up to 5 s for all, and retrieve their exceptions.

    A task collected with an exception never retrieved makes asyncio log it from ``__del__``,
    which can run inside pytest's own parsing of a failure and crash it with SystemError on
    Python 3.11.
    """
    for task in tasks:
        if not task.done():
            task.cancel()
    await asyncio.wait(tasks, timeout=5)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()


def expected_outcome(method: str) -> str:
    """Return the description of the exception that ``method`` raises when it strikes."""
    return "CancelledError" if method == TASK_CANCEL else "TimeoutError"


async def semaphore_sets(client: redis.asyncio.Redis, name: str) -> tuple[list[str], list[str]]:
    """Return the tokens in the holders and in the waiters sorted set of semaphore ``name``."""
    holders = await client.zrange(semaphore_key(name, "holders"), 0, -1)
    waiters = await client.zrange(semaphore_key(name, "waiters"), 0, -1)
    return holders, waiters


async def wait_for_sets(
    client: redis.asyncio.Redis, name: str, holders: list[str], timeout: float = 5.0
) -> tuple[list[str], list[str]]:
    """Poll until the holders set of ``name`` is exactly ``holders`` and the waiters set is empty,
    or ``timeout`` seconds have passed. Returns the last (holders, waiters) seen.

    Slots given back for cancelled tasks are released by goroutines in the background, so the
    sets reach their final state a little after the task has ended.
    """
    deadline = time.monotonic() + timeout
    while True:
        seen_holders, seen_waiters = await semaphore_sets(client, name)
        if sorted(seen_holders) == sorted(holders) and not seen_waiters:
            return seen_holders, seen_waiters
        if time.monotonic() >= deadline:
            return seen_holders, seen_waiters
        await asyncio.sleep(0.005)


async def wait_until_queued(client: redis.asyncio.Redis, name: str, count: int, timeout: float = 5.0) -> bool:
    """Poll until ``count`` tokens wait in the Redis queue of ``name``, and return whether they did."""
    deadline = time.monotonic() + timeout
    while await client.zcard(semaphore_key(name, "waiters")) != count:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.002)
    return True


def block_until_granted(observer: redis.Redis, name: str, holders_before: list[str], timeout: float = 5.0) -> list[str]:
    """Block the event loop until Redis shows the holders set of ``name`` changed from
    ``holders_before`` to one new token with an empty waiters set, then 0.1 s more. By then the Go
    side has written the grant to the completion pipe, which the blocked loop has not read.

    Returns the holders seen; the caller checks them.
    """
    deadline = time.monotonic() + timeout
    holders_key = semaphore_key(name, "holders")
    waiters_key = semaphore_key(name, "waiters")
    while True:
        holders = observer.zrange(holders_key, 0, -1)
        granted = len(holders) == len(holders_before) and set(holders) != set(holders_before)
        if granted and observer.zcard(waiters_key) == 0:
            time.sleep(0.1)
            return holders
        if time.monotonic() >= deadline:
            return holders
        time.sleep(0.001)


async def entries_at_once(name: str, capacity: int, url: str, expiry: float | None = None) -> tuple[int, str]:
    """Enter semaphore ``name`` ``capacity`` times at once and hold the slots, then try one more
    entry with max_sleep=0.2.

    Returns the number of entries that got a slot within 5 s, and the outcome of the extra entry:
    "waited" for MaxSleepExceededError, "entered", or the repr of another exception.
    """
    semaphore = Semaphore(name, capacity, expiry=expiry, redis_url=url)
    impatient = Semaphore(name, capacity, max_sleep=0.2, expiry=expiry, redis_url=url)
    release = asyncio.Event()
    entered = [False] * capacity

    async def hold(index: int) -> None:
        async with semaphore:
            entered[index] = True
            await release.wait()

    holders = [asyncio.create_task(hold(index)) for index in range(capacity)]
    deadline = time.monotonic() + 5
    while not all(entered) and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    entered_in_time = sum(entered)

    try:
        async with impatient:
            extra = "entered"
    except MaxSleepExceededError:
        extra = "waited"
    except Exception as error:  # returned to the caller, which asserts on it
        extra = repr(error)

    release.set()
    for index, holder in enumerate(holders):
        if not entered[index]:
            holder.cancel()  # still waiting for a slot that some earlier step kept
    await asyncio.gather(*holders, return_exceptions=True)
    return entered_in_time, extra


def script_calls(observer: redis.Redis) -> int:
    """Return how many EVAL and EVALSHA calls the Redis server has run since it started."""
    stats = observer.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)) for command in ("eval", "evalsha"))


def pause_redis(url: str, milliseconds: int) -> None:
    """Make the Redis server hold every command of every client for ``milliseconds``.

    Commands sent meanwhile run when the pause ends, so a script sent during it is in flight for
    that long. This client is paused too, so nothing should read Redis until the pause ends.
    """
    with redis.Redis.from_url(url) as client:
        client.execute_command("CLIENT", "PAUSE", milliseconds, "ALL")


def wait_for_script_calls(observer: redis.Redis, at_least: int, timeout: float = 5.0) -> int:
    """Poll until the server has run ``at_least`` EVAL and EVALSHA calls, and return the last count."""
    deadline = time.monotonic() + timeout
    while True:
        calls = script_calls(observer)
        if calls >= at_least or time.monotonic() >= deadline:
            return calls
        time.sleep(0.005)


def token_sequence(token: str) -> int:
    """Return the sequence number of a semaphore token "<owner>:<sequence>"."""
    return int(token.rsplit(":", 1)[1])
