"""Limiters across fork(), threads and event loop implementations."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import uvloop

from self_limiters import MaxSleepExceededError, Semaphore, TokenBucket

FORK_CHILD = Path(__file__).with_name("fork_child.py")


def run_fork_child(mode: str, redis_url: str, name: str, tmp_path: Path) -> dict[str, object]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the child must import the installed package
    done = subprocess.run(
        [sys.executable, str(FORK_CHILD), mode, redis_url, name],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, f"expected exit code 0 from {mode}, got {done.returncode}; stderr:\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.mark.parametrize("mode", ["multiprocessing", "preload"])
def test_fork_before_load_children_work(mode: str, redis_url: str, name: str, tmp_path: Path) -> None:
    outcome = run_fork_child(mode, redis_url, name, tmp_path)

    assert outcome["exit_codes"] == [0, 0, 0], f"expected every forked worker to exit with 0, got {outcome['exit_codes']}"
    assert outcome["max_inside"] == 2, f"expected the 3 workers to reach and respect capacity 2, saw {outcome['max_inside']} at once"


def test_fork_after_use_raises_fast(redis_url: str, name: str, tmp_path: Path) -> None:
    outcome = run_fork_child("after-use", redis_url, name, tmp_path)

    assert outcome["error"] == "ForkedProcessError", f"expected ForkedProcessError in the child, got {outcome}"
    assert "fork" in outcome["message"] and "spawn" in outcome["message"], (
        f"expected the message to say what went wrong and what to do, got {outcome['message']!r}"
    )
    assert outcome["seconds"] < 1.0, f"expected the error within 1 s, took {outcome['seconds']:.3f} s"


def run_in_threads(loop_factories: list, coroutine_function) -> list[BaseException]:
    """Run coroutine_function() in one thread per loop factory, each thread in a loop of its own."""
    errors: list[BaseException] = []

    def thread_main(new_loop) -> None:
        loop = new_loop()
        try:
            loop.run_until_complete(asyncio.wait_for(coroutine_function(), 60))
        except BaseException as exc:  # reported by the caller's assert
            errors.append(exc)
        finally:
            loop.close()

    threads = [threading.Thread(target=thread_main, args=(factory,)) for factory in loop_factories]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return errors


def test_one_semaphore_four_threads_loops(name: str, redis_url: str) -> None:
    semaphore = Semaphore(name, 2, redis_url=redis_url)
    lock = threading.Lock()
    inside = max_inside = entries = 0

    async def cycle() -> None:
        async def one() -> None:
            nonlocal inside, max_inside, entries
            for _ in range(10):
                async with semaphore:
                    with lock:
                        inside += 1
                        max_inside = max(max_inside, inside)
                        entries += 1
                    await asyncio.sleep(0.002)
                    with lock:
                        inside -= 1

        await asyncio.gather(one(), one())

    factories = [asyncio.new_event_loop, asyncio.new_event_loop, uvloop.new_event_loop, uvloop.new_event_loop]
    errors = run_in_threads(factories, cycle)

    assert not errors, f"expected no error in the threads, got {errors!r}"
    assert entries == 80, f"expected 80 entries from 4 threads, got {entries}"
    assert max_inside == 2, f"expected the shared object to reach and respect capacity 2 across threads, saw {max_inside}"


def test_one_token_bucket_four_threads_loops(name: str, redis_url: str) -> None:
    bucket = TokenBucket(name, 8, 60.0, 1, redis_url=redis_url, max_sleep=1)
    lock = threading.Lock()
    granted = refused = 0

    async def take() -> None:
        nonlocal granted, refused
        for _ in range(4):
            try:
                async with bucket:
                    with lock:
                        granted += 1
            except MaxSleepExceededError:
                with lock:
                    refused += 1

    factories = [asyncio.new_event_loop, asyncio.new_event_loop, uvloop.new_event_loop, uvloop.new_event_loop]
    errors = run_in_threads(factories, take)

    assert not errors, f"expected no error in the threads, got {errors!r}"
    assert granted == 8, f"expected exactly the 8 tokens of the full bucket granted, got {granted}"
    assert refused == 8, f"expected the other 8 entries refused (the next token is 60 s away), got {refused}"


def test_semaphore_under_uvloop(name: str, redis_url: str) -> None:
    semaphore = Semaphore(name, 1, redis_url=redis_url, max_sleep=0.2)
    order: list[int] = []

    async def main() -> None:
        async with semaphore:
            with pytest.raises(MaxSleepExceededError):
                async with semaphore:
                    pass

        async def enter(number: int) -> None:
            async with semaphore:
                order.append(number)
                await asyncio.sleep(0.001)

        tasks = []
        for number in range(20):
            tasks.append(asyncio.create_task(enter(number)))
            await asyncio.sleep(0.003)
        await asyncio.gather(*tasks)

    uvloop.run(asyncio.wait_for(main(), 60))

    assert order == list(range(20)), f"expected first-come first-served order under uvloop, got {order}"


def test_token_bucket_under_uvloop(name: str, redis_url: str) -> None:
    bucket = TokenBucket(name, 2, 0.1, 1, redis_url=redis_url)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(6):
            async with bucket:
                pass
        return loop.time() - started

    elapsed = uvloop.run(asyncio.wait_for(main(), 60))

    # 2 tokens at once, then one every 0.1 s: the sixth entry comes 0.4 s after the first.
    assert elapsed >= 0.35, f"expected 6 entries of a 2-token bucket refilled every 0.1 s to take about 0.4 s, took {elapsed:.3f} s"
