"""Child script of test_processes.py: forks in the ways servers do and prints the outcome as JSON.

It runs in a fresh interpreter, so that the Go runtime is loaded only when a mode says so.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import time

from self_limiters import ForkedProcessError, Semaphore, TokenBucket

URL, NAME = sys.argv[2], sys.argv[3]

# Built at import time, before any fork, as a module-level limiter of a preloaded app would be.
SEMAPHORE = Semaphore(NAME, 2, redis_url=URL)
BUCKET = TokenBucket(NAME, 100, 1.0, 100, redis_url=URL)


async def enter_repeatedly(rounds: int, inside: "multiprocessing.sharedctypes.Synchronized[int]",
                           max_inside: "multiprocessing.sharedctypes.Synchronized[int]") -> None:
    async def one() -> None:
        for _ in range(rounds):
            async with BUCKET:
                pass
            async with SEMAPHORE:
                with inside.get_lock():
                    inside.value += 1
                    max_inside.value = max(max_inside.value, inside.value)
                await asyncio.sleep(0.005)
                with inside.get_lock():
                    inside.value -= 1

    await asyncio.gather(*(one() for _ in range(3)))


def worker(inside: "multiprocessing.sharedctypes.Synchronized[int]",
           max_inside: "multiprocessing.sharedctypes.Synchronized[int]") -> None:
    asyncio.run(enter_repeatedly(5, inside, max_inside))


def multiprocessing_fork() -> dict[str, object]:
    """Children of the fork start method use limiters that the parent only built."""
    context = multiprocessing.get_context("fork")
    inside, max_inside = context.Value("i", 0), context.Value("i", 0)
    processes = [context.Process(target=worker, args=(inside, max_inside)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    return {"exit_codes": [process.exitcode for process in processes], "max_inside": max_inside.value}


def preload_then_fork() -> dict[str, object]:
    """A preloading server: import and build in the parent, os.fork() workers, each runs a loop."""
    context = multiprocessing.get_context("fork")  # only for the shared counters
    inside, max_inside = context.Value("i", 0), context.Value("i", 0)
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            try:
                worker(inside, max_inside)
                os._exit(0)
            except BaseException:
                os._exit(1)
        pids.append(pid)
    statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    return {"exit_codes": statuses, "max_inside": max_inside.value}


def fork_after_use() -> dict[str, object]:
    """A child forked after the parent used a limiter gets ForkedProcessError, and how fast."""
    async def enter() -> None:
        async with SEMAPHORE:
            pass

    asyncio.run(enter())
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        started = time.monotonic()
        try:
            asyncio.run(enter())
            outcome = {"error": None}
        except ForkedProcessError as exc:
            outcome = {"error": "ForkedProcessError", "message": str(exc)}
        except BaseException as exc:
            outcome = {"error": type(exc).__name__, "message": str(exc)}
        outcome["seconds"] = time.monotonic() - started
        os.write(write_fd, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


MODES = {"multiprocessing": multiprocessing_fork, "preload": preload_then_fork, "after-use": fork_after_use}

if __name__ == "__main__":
    print(json.dumps(MODES[sys.argv[1]]()), flush=True)
