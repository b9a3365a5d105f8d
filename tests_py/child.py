"""Child process for the tests that need more than one process or a fresh interpreter.

Usage: child.py MODE ARGS... where each mode runs one function below. A child prints one line per
milestone on stdout, which the test reads, and exits with 0 when its mode succeeded.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

# Increments the holder count, records the maximum, and returns the new count, in one step.
_ENTER_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
local max = tonumber(redis.call('GET', KEYS[2]) or '0')
if count > max then
  redis.call('SET', KEYS[2], count)
end
redis.call('INCR', KEYS[3])
return count
"""


async def count_holders(url: str, name: str, capacity: str, tasks: str, rounds: str, hold: str, processes: str, prefix: str) -> None:
    """Enter a semaphore ``rounds`` times in each of ``tasks`` tasks, counting holders in Redis.

    The keys PREFIX:count, PREFIX:max and PREFIX:entries hold the current number of holders of
    all processes, its maximum and the number of entries. The tasks start once ``processes``
    children have incremented PREFIX:ready.
    """
    import redis.asyncio

    from self_limiters import Semaphore

    keys = [f"{prefix}:count", f"{prefix}:max", f"{prefix}:entries"]
    async with redis.asyncio.from_url(url) as observer:
        enter = observer.register_script(_ENTER_SCRIPT)
        await observer.incr(f"{prefix}:ready")
        deadline = time.monotonic() + 30
        while int(await observer.get(f"{prefix}:ready") or 0) < int(processes):
            if time.monotonic() > deadline:
                raise TimeoutError("the other children did not start within 30 s")
            await asyncio.sleep(0.005)

        semaphore = Semaphore(name, int(capacity), redis_url=url)

        async def hold_repeatedly() -> None:
            for _ in range(int(rounds)):
                async with semaphore:
                    await enter(keys=keys)
                    await asyncio.sleep(float(hold))
                    await observer.decr(keys[0])

        await asyncio.gather(*(hold_repeatedly() for _ in range(int(tasks))))
    print("done", flush=True)


async def hold_forever(url: str, name: str, expiry: str) -> None:
    """Hold the only slot of a semaphore until killed."""
    from self_limiters import Semaphore

    async with Semaphore(name, 1, expiry=float(expiry), redis_url=url):
        print("holding", flush=True)
        await asyncio.sleep(3600)


async def enter_once(url: str, name: str, expiry: str, order_key: str, label: str) -> None:
    """Enter a semaphore of capacity 1 once and append ``label`` to the list ``order_key`` inside."""
    import redis.asyncio

    from self_limiters import Semaphore

    async with redis.asyncio.from_url(url) as observer:
        print("started", flush=True)
        async with Semaphore(name, 1, expiry=float(expiry), redis_url=url):
            await observer.rpush(order_key, label)
    print("done", flush=True)


def report_loading(url: str, name: str) -> None:
    """Print, as JSON, whether the Go extension is loaded after each step and the working folder."""
    folder = os.getcwd()
    steps: dict[str, object] = {}

    import self_limiters

    steps["file"] = self_limiters.__file__
    steps["after_import"] = "self_limiters._slbridge" in sys.modules

    semaphore = self_limiters.Semaphore(name, 1, redis_url=url)
    bucket = self_limiters.TokenBucket(name, 1, 1.0, 1, redis_url=url)
    closed = self_limiters.Semaphore(name, 1, redis_url="redis://127.0.0.1:1")
    repr(semaphore), repr(bucket), repr(closed)
    steps["after_construction"] = "self_limiters._slbridge" in sys.modules

    async def enter() -> None:
        async with semaphore:
            pass

    asyncio.run(enter())
    steps["after_entry"] = "self_limiters._slbridge" in sys.modules
    steps["folder_kept"] = os.getcwd() == folder
    print(json.dumps(steps), flush=True)


def report_fork(url: str, name: str) -> None:
    """Print, as JSON, what a forked child gets from a semaphore before and after the parent loaded Go."""
    from self_limiters import ForkedProcessError, Semaphore

    async def enter() -> None:
        async with Semaphore(name, 1, redis_url=url):
            pass

    def outcome_in_forked_child() -> str:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            try:
                asyncio.run(enter())
                outcome = "entered"
            except ForkedProcessError as exc:
                outcome = "ForkedProcessError: " + str(exc)
            except BaseException as exc:  # the parent reports whatever else happened
                outcome = f"{type(exc).__name__}: {exc}"
            os.write(write_fd, outcome.encode())
            os._exit(0)
        os.close(write_fd)
        chunks = []
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
        os.close(read_fd)
        os.waitpid(pid, 0)
        return b"".join(chunks).decode()

    steps = {"before_load": outcome_in_forked_child()}
    asyncio.run(enter())
    steps["after_load"] = outcome_in_forked_child()
    print(json.dumps(steps), flush=True)


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "count":
        asyncio.run(count_holders(*args))
    elif mode == "hold":
        asyncio.run(hold_forever(*args))
    elif mode == "enter":
        asyncio.run(enter_once(*args))
    elif mode == "loading":
        report_loading(*args)
    elif mode == "fork":
        report_fork(*args)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
