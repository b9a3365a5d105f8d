"""Helpers shared by the tests: Redis key names, polling, and child processes."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

T = TypeVar("T")

KEY_PREFIX = "__self-limiters:"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CHILD_SCRIPT = Path(__file__).with_name("child.py")


# Commands that an ACL user needs for both limiters, with the keys ~__self-limiters:* and no
# channels. EVALSHA runs the scripts and EVAL loads them again after NOSCRIPT. BLPOP reads the
# wake-ups of waiters. go-redis sends SELECT on each new connection when the URL's database is
# not 0. Redis 7 checks each command that a script calls against the caller's ACL, so the rest
# are the commands of core/lua/*.lua. HELLO and AUTH need no grant, because Redis lets every
# connection run them.
LIMITER_COMMANDS = (
    "evalsha", "eval", "blpop", "select",
    "time", "zadd", "zcard", "zpopmin", "zrange", "zrangebyscore", "zremrangebyscore", "zrem", "zscore",
    "pttl", "pexpire", "rpush", "incr", "set", "hmget", "hset",
)
LIMITER_KEYS = "~__self-limiters:*"


def semaphore_key(name: str, suffix: str) -> str:
    """Return the Redis key of a semaphore: suffix is holders, waiters, tickets, lost, or "" for
    the start that every key of the semaphore shares."""
    return f"{KEY_PREFIX}{{sem:{name}}}:{suffix}"


def bucket_key(name: str) -> str:
    return f"{KEY_PREFIX}{{tb:{name}}}:state"


def closed_port() -> int:
    """Return a loopback TCP port on which nothing listens (it was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """Run ``coroutine`` in a new event loop, failing with TimeoutError after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed, and return whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.005
) -> bool:
    """Poll the coroutine function ``predicate`` as wait_until polls a plain function."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


async def wait_for_event(event: asyncio.Event, task: asyncio.Task[Any], timeout: float = 10) -> None:
    """Wait until ``event`` is set, raising at once the exception of ``task`` if it ends first."""
    waiter = asyncio.ensure_future(event.wait())
    done, _ = await asyncio.wait({waiter, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:
        return
    waiter.cancel()
    if task in done:
        task.result()  # raises the task's exception, if any
        raise AssertionError("the task ended without setting the event")
    raise TimeoutError(f"the event was not set within {timeout} s")


def start_redis_server(folder: Path, *options: str) -> subprocess.Popen[bytes]:
    """Start redis-server with ``options`` (such as --port and --bind) and without persistence.

    Its files and its log, redis.log, go to ``folder``.
    """
    return subprocess.Popen(
        [REDIS_SERVER, *options, "--save", "", "--appendonly", "no", "--dir", str(folder), "--logfile", str(folder / "redis.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_python(*args: object, cwd: Path) -> subprocess.Popen[str]:
    """Start this interpreter with ``args`` in ``cwd``, with text pipes for stdin, stdout and stderr.

    PYTHONPATH is dropped, so that the child imports the installed package.
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.Popen(
        [sys.executable, *(str(arg) for arg in args)],
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_child(*args: object, cwd: Path) -> subprocess.Popen[str]:
    """Start child.py with ``args`` in ``cwd``, as start_python does."""
    return start_python(CHILD_SCRIPT, *args, cwd=cwd)


def read_first_line(child: subprocess.Popen[str], timeout: float) -> str:
    """Return the first line that ``child`` prints, or "" when none comes within ``timeout`` seconds."""
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    return child.stdout.readline() if ready else ""


def stop_child(child: subprocess.Popen[str]) -> None:
    """Kill ``child`` if it still runs, and reap it."""
    if child.poll() is None:
        child.kill()
    child.communicate(timeout=10)


async def wait_for_warning(caplog: Any, text: str, timeout: float = 5) -> list[str]:
    """Let the event loop run until a warning containing ``text`` was logged, or ``timeout`` seconds
    passed, and return the messages of all warnings logged so far.

    A semaphore's exit does not wait for its release, so the release's warnings come once its
    outcome has arrived.
    """

    def warnings() -> list[str]:
        return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]

    await wait_until_async(lambda: _true_when(any(text in message for message in warnings())), timeout, 0.01)
    return warnings()


async def _true_when(value: bool) -> bool:
    return value


async def entries_at_once(
    name: str, capacity: int, url: str, attempts: int, while_held: Callable[[], Awaitable[object]] | None = None
) -> tuple[int, int]:
    """Try ``attempts`` entries of semaphore ``name`` at the same time with max_sleep=0.5, each
    holding its slot for 1 s, and return (entries that succeeded, entries that raised
    MaxSleepExceededError). Any other outcome fails the test.

    ``while_held`` runs once every attempt has entered or given up, before the slots are released.
    """
    from self_limiters import MaxSleepExceededError, Semaphore

    release = asyncio.Event()
    entered = 0

    async def attempt() -> None:
        nonlocal entered
        async with Semaphore(name, capacity, max_sleep=0.5, redis_url=url):
            entered += 1
            await release.wait()

    tasks = [asyncio.create_task(attempt()) for _ in range(attempts)]
    try:
        await asyncio.sleep(1.0)  # every attempt has entered or given up after 0.5 s by now
        if while_held is not None:
            await while_held()
    finally:
        release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    unexpected = [outcome for outcome in outcomes if outcome is not None and not isinstance(outcome, MaxSleepExceededError)]
    assert not unexpected, f"expected only entries or MaxSleepExceededError, got {unexpected}"
    return entered, sum(isinstance(outcome, MaxSleepExceededError) for outcome in outcomes)


async def entry_offsets(bucket: Any, entries: int) -> list[float]:
    """Enter token bucket ``bucket`` from ``entries`` tasks at once and return the entry times, in
    seconds after the start, sorted."""
    started = time.monotonic()
    offsets: list[float] = []

    async def enter() -> None:
        async with bucket:
            offsets.append(time.monotonic() - started)

    await asyncio.gather(*(enter() for _ in range(entries)))
    return sorted(offsets)


async def admission_order(
    semaphores: list[Any], waiters: int, queue_length: Callable[[], Awaitable[int]], label: str = ""
) -> list[int]:
    """Queue ``waiters`` tasks one after the other behind a holder, and return the order of their entries.

    All ``semaphores`` share one name and capacity 1. The first one holds the slot, and waiter k
    enters through semaphores[k % len(semaphores)] once ``queue_length`` (the size of the Redis
    queue) shows the waiter before it queued. ``label`` starts the failure messages.
    """
    order: list[int] = []
    release = asyncio.Event()
    entered = asyncio.Event()

    async def hold() -> None:
        async with semaphores[0]:
            entered.set()
            await release.wait()

    async def wait_in_line(position: int) -> None:
        async with semaphores[position % len(semaphores)]:
            order.append(position)
            await asyncio.sleep(0.002)

    holder = asyncio.create_task(hold())
    await wait_for_event(entered, holder)
    tasks = []
    for position in range(waiters):
        tasks.append(asyncio.create_task(wait_in_line(position)))

        async def queued(expected: int = position + 1) -> bool:
            return await queue_length() == expected

        assert await wait_until_async(queued, 10), f"{label}expected waiter {position} in the Redis queue"
        await asyncio.sleep(0.003)
    release.set()
    await asyncio.gather(holder, *tasks)
    return order
