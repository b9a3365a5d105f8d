"""Semaphore behaviour on a real Redis: capacity, order, waiting limits, crashes, cancellation."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import redis
import redis.asyncio

from self_limiters import MaxSleepExceededError, Semaphore, TokenBucket
from support import (
    admission_order,
    entries_at_once,
    read_first_line,
    run,
    semaphore_key,
    start_child,
    stop_child,
    wait_for_event,
    wait_for_warning,
    wait_until,
    wait_until_async,
)


def _lease_lost_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "self_limiters" and r.levelno >= logging.WARNING]


def test_semaphore_capacity_across_processes(tmp_path: Path, name: str, redis_url: str, observer: redis.Redis) -> None:
    processes, tasks, rounds, capacity = 3, 2, 6, 3
    prefix = f"observer:{name}"
    children = [
        start_child("count", redis_url, name, capacity, tasks, rounds, 0.03, processes, prefix, cwd=tmp_path)
        for _ in range(processes)
    ]
    try:
        for child in children:
            stdout, stderr = child.communicate(timeout=90)
            assert child.returncode == 0, f"expected exit code 0, got {child.returncode}; stderr:\n{stderr}"
    finally:
        for child in children:
            stop_child(child)

    max_holders = int(observer.get(f"{prefix}:max") or 0)
    assert max_holders <= capacity, f"expected at most {capacity} holders at once, saw {max_holders}"
    assert max_holders == capacity, f"expected the capacity {capacity} to be reached, max was {max_holders}"
    entries = int(observer.get(f"{prefix}:entries") or 0)
    assert entries == processes * tasks * rounds, f"expected {processes * tasks * rounds} entries, got {entries}"
    assert int(observer.get(f"{prefix}:count") or 0) == 0, "expected no holder left in the count"


def test_semaphore_fifo_order(name: str, redis_url: str) -> None:
    waiters_key = semaphore_key(name, "waiters")

    async def scenario() -> list[int]:
        async with redis.asyncio.from_url(redis_url) as client:
            return await admission_order([Semaphore(name, 1, redis_url=redis_url)], 8, lambda: client.zcard(waiters_key))

    order = run(scenario())
    assert order == list(range(8)), f"expected admission in arrival order {list(range(8))}, got {order}"


def test_semaphore_fifo_across_processes(tmp_path: Path, name: str, redis_url: str, observer: redis.Redis) -> None:
    waiters_key = semaphore_key(name, "waiters")
    order_key = f"observer:{name}:order"
    children = []

    async def scenario() -> None:
        semaphore = Semaphore(name, 1, redis_url=redis_url)
        release = asyncio.Event()
        entered = asyncio.Event()

        async def hold() -> None:
            async with semaphore:
                entered.set()
                await release.wait()

        async def wait_in_line(label: str, client: redis.asyncio.Redis) -> None:
            async with semaphore:
                await client.rpush(order_key, label)

        holder = asyncio.create_task(hold())
        await wait_for_event(entered, holder)
        local_waiters = []
        async with redis.asyncio.from_url(redis_url) as client:
            for position in range(5):
                label = f"{'child' if position % 2 == 0 else 'local'}-{position}"
                if position % 2 == 0:
                    children.append(start_child("enter", redis_url, name, 30, order_key, label, cwd=tmp_path))
                else:
                    local_waiters.append(asyncio.create_task(wait_in_line(label, client)))

                async def queued(expected: int = position + 1) -> bool:
                    return await client.zcard(waiters_key) == expected

                assert await wait_until_async(queued, 20), f"expected waiter {label} in the Redis queue"
            release.set()
            await asyncio.gather(holder, *local_waiters)

            async def all_entered() -> bool:
                return await client.llen(order_key) == 5

            assert await wait_until_async(all_entered, 20), "expected all 5 waiters to enter"

    try:
        run(scenario())
        for child in children:
            _, stderr = child.communicate(timeout=20)
            assert child.returncode == 0, f"expected exit code 0, got {child.returncode}; stderr:\n{stderr}"
    finally:
        for child in children:
            stop_child(child)

    expected = ["child-0", "local-1", "child-2", "local-3", "child-4"]
    seen = observer.lrange(order_key, 0, -1)
    assert seen == expected, f"expected admission order {expected}, got {seen}"


def test_semaphore_fractional_max_sleep(name: str, redis_url: str, observer: redis.Redis) -> None:
    async def scenario() -> tuple[float, float]:
        impatient = Semaphore(name, 1, max_sleep=0.3, redis_url=redis_url)
        async with Semaphore(name, 1, redis_url=redis_url):
            started = time.monotonic()
            with pytest.raises(MaxSleepExceededError):
                async with impatient:
                    pass
            waited = time.monotonic() - started
            assert wait_until(lambda: observer.zcard(semaphore_key(name, "waiters")) == 0, 3), (
                "expected the queue place of the timed-out waiter to be given back"
            )

        started = time.monotonic()
        async with impatient:
            pass
        return waited, time.monotonic() - started

    waited, second_entry = run(scenario())
    assert waited >= 0.28, f"expected MaxSleepExceededError after about 0.3 s, got it after {waited:.3f} s"
    assert waited < 0.9, f"expected MaxSleepExceededError well before 1 s, got it after {waited:.3f} s"
    assert second_entry < 0.3, f"expected the freed slot to be granted at once, took {second_entry:.3f} s"
    assert wait_until(lambda: observer.zcard(semaphore_key(name, "holders")) == 0, 3), "expected no slot held after both exits"


def test_semaphore_tiny_max_sleep_free_slot(name: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with Semaphore(name, 1, max_sleep=0.000001, redis_url=redis_url):
            pass

    run(scenario())


def test_semaphore_killed_holder_slot_returns(tmp_path: Path, name: str, redis_url: str, observer: redis.Redis) -> None:
    expiry = 2.0
    child = start_child("hold", redis_url, name, expiry, cwd=tmp_path)
    try:
        line = read_first_line(child, 30)
        assert line.strip() == "holding", f"expected the child to report 'holding', got {line!r}"

        async def scenario() -> tuple[bool, float]:
            async def enter() -> float:
                async with Semaphore(name, 1, expiry=expiry, redis_url=redis_url):
                    return time.monotonic()

            waiter = asyncio.create_task(enter())
            await asyncio.sleep(0.5)
            entered_early = waiter.done()
            os.kill(child.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            entered_at = await asyncio.wait_for(waiter, expiry + 10)
            return entered_early, entered_at - killed_at

        entered_early, delay = run(scenario())
    finally:
        stop_child(child)

    assert not entered_early, "expected the waiter to wait while the child held the only slot"
    assert delay <= expiry + 2, f"expected the slot back within {expiry + 2} s of the kill, took {delay:.2f} s"


def test_semaphore_killed_waiter_skipped(tmp_path: Path, name: str, redis_url: str, observer: redis.Redis) -> None:
    expiry = 2.0
    waiters_key = semaphore_key(name, "waiters")
    order_key = f"observer:{name}:order"
    child = start_child("enter", redis_url, name, expiry, order_key, "killed-child", cwd=tmp_path)
    try:

        async def scenario() -> float:
            semaphore = Semaphore(name, 1, expiry=expiry, redis_url=redis_url)
            release = asyncio.Event()
            entered = asyncio.Event()

            async def hold() -> None:
                async with semaphore:
                    entered.set()
                    await release.wait()

            async def enter_after_child() -> float:
                async with semaphore:
                    return time.monotonic()

            holder = asyncio.create_task(hold())
            await wait_for_event(entered, holder)
            async with redis.asyncio.from_url(redis_url) as client:

                async def queued(expected: int) -> bool:
                    return await client.zcard(waiters_key) == expected

                assert await wait_until_async(lambda: queued(1), 20), "expected the child in the Redis queue"
                waiter = asyncio.create_task(enter_after_child())
                assert await wait_until_async(lambda: queued(2), 5), "expected the local waiter in the queue"

            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
            release.set()
            released_at = time.monotonic()
            await holder
            entered_at = await asyncio.wait_for(waiter, expiry + 10)
            return entered_at - released_at

        delay = run(scenario())
    finally:
        stop_child(child)

    assert delay <= expiry + 2, f"expected the next waiter in within {expiry + 2} s of the release, took {delay:.2f} s"
    assert observer.llen(order_key) == 0, "expected the killed child never to enter"


def test_semaphore_waiters_keep_loop_ticking(name: str, redis_url: str) -> None:
    async def scenario() -> tuple[list[float], float]:
        semaphore = Semaphore(name, 1, redis_url=redis_url)
        gaps: list[float] = []
        stop = asyncio.Event()
        entered = asyncio.Event()

        async def tick() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        async def hold() -> None:
            async with semaphore:
                entered.set()
                await asyncio.sleep(0.5)

        async def pass_through() -> None:
            async with semaphore:
                pass

        async with semaphore:  # loads the Go extension, which is not what this test measures
            pass

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        holder = asyncio.create_task(hold())
        await wait_for_event(entered, holder)
        await asyncio.gather(holder, *(pass_through() for _ in range(100)))
        elapsed = time.monotonic() - started
        stop.set()
        await ticker
        return gaps, elapsed

    gaps, elapsed = run(scenario())
    assert elapsed >= 0.45, f"expected the 100 tasks to wait for the 0.5 s holder, all done in {elapsed:.3f} s"
    assert len(gaps) >= 30, f"expected the ticker to run throughout, it ticked {len(gaps)} times"
    assert max(gaps) < 0.1, f"expected no gap of 100 ms or more between ticks, max gap {max(gaps) * 1000:.1f} ms"


def test_semaphore_thousand_tasks_default_pool(name: str, redis_url: str, observer: redis.Redis) -> None:
    async def scenario() -> tuple[int, int]:
        semaphore = Semaphore(name, 1, redis_url=redis_url)
        inside = 0
        max_inside = 0
        finished = 0

        async def one() -> None:
            nonlocal inside, max_inside, finished
            async with semaphore:
                inside += 1
                max_inside = max(max_inside, inside)
                await asyncio.sleep(0)
                inside -= 1
            finished += 1

        outcomes = await asyncio.gather(*(one() for _ in range(1000)), return_exceptions=True)
        failures = [outcome for outcome in outcomes if outcome is not None]
        assert not failures, f"expected no task to fail, {len(failures)} did, the first with {failures[0]!r}"
        return finished, max_inside

    finished, max_inside = run(scenario(), timeout=120)
    assert finished == 1000, f"expected 1000 tasks to finish, {finished} did"
    assert max_inside == 1, f"expected 1 holder at a time, saw {max_inside}"
    assert wait_until(lambda: observer.zcard(semaphore_key(name, "holders")) == 0, 3), "expected no slot held at the end"
    assert wait_until(lambda: observer.zcard(semaphore_key(name, "waiters")) == 0, 3), "expected nobody queued at the end"


def test_semaphore_shared_object_many_tasks(
    name: str, redis_url: str, observer: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")

    async def scenario() -> int:
        semaphore = Semaphore(name, 3, redis_url=redis_url)
        inside = 0
        max_inside = 0

        async def one() -> None:
            nonlocal inside, max_inside
            async with semaphore:
                inside += 1
                max_inside = max(max_inside, inside)
                await asyncio.sleep(random.uniform(0.005, 0.03))
                inside -= 1

        await asyncio.gather(*(one() for _ in range(30)))
        return max_inside

    max_inside = run(scenario())
    assert max_inside <= 3, f"expected at most 3 holders at once, saw {max_inside}"
    assert max_inside == 3, f"expected the capacity 3 to be reached, max was {max_inside}"
    assert wait_until(lambda: observer.zcard(semaphore_key(name, "holders")) == 0, 3), "expected every slot released"
    assert not _lease_lost_records(caplog), f"expected no warning, got {[r.getMessage() for r in caplog.records]}"


async def zcard_when(client: redis.asyncio.Redis, key: str, expected: int, timeout: float = 3) -> int:
    """Return the size of sorted set ``key`` once it is ``expected``, or after ``timeout`` seconds."""

    async def reached() -> bool:
        return await client.zcard(key) == expected

    await wait_until_async(reached, timeout)
    return await client.zcard(key)


def test_semaphore_nested_entries(name: str, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")
    holders_key = semaphore_key(name, "holders")

    async def scenario() -> list[int]:
        semaphore = Semaphore(name, 4, redis_url=redis_url)
        inner_ready = [asyncio.Event(), asyncio.Event()]
        outer_ready = [asyncio.Event(), asyncio.Event()]
        leave_inner = asyncio.Event()
        leave_outer = asyncio.Event()
        counts: list[int] = []

        async def nest(index: int) -> None:
            async with semaphore:
                async with semaphore:
                    inner_ready[index].set()
                    await leave_inner.wait()
                outer_ready[index].set()
                await leave_outer.wait()

        async with redis.asyncio.from_url(redis_url) as client:
            tasks = [asyncio.create_task(nest(index)) for index in range(2)]
            for event, task in zip(inner_ready, tasks):
                await wait_for_event(event, task)
            counts.append(await client.zcard(holders_key))
            leave_inner.set()
            for event, task in zip(outer_ready, tasks):
                await wait_for_event(event, task)
            # An exit returns before its release reaches Redis, so the counts are polled.
            counts.append(await zcard_when(client, holders_key, 2))
            leave_outer.set()
            await asyncio.gather(*tasks)
            counts.append(await zcard_when(client, holders_key, 0))
        return counts

    counts = run(scenario())
    assert counts[0] == 4, f"expected 4 slots held with 2 tasks 2 deep, Redis had {counts[0]}"
    assert counts[1] == 2, f"expected 2 slots held after the inner exits, Redis had {counts[1]}"
    assert counts[2] == 0, f"expected 0 slots held after all exits, Redis had {counts[2]}"
    assert not _lease_lost_records(caplog), f"expected no warning, got {[r.getMessage() for r in caplog.records]}"


def test_semaphore_exit_releases_own_slot(name: str, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")
    holders_key = semaphore_key(name, "holders")

    def sequence_number(token: str) -> int:
        return int(token.rsplit(":", 1)[1])

    async def scenario() -> tuple[list[str], list[str], int]:
        semaphore = Semaphore(name, 2, redis_url=redis_url)
        first_in, second_in = asyncio.Event(), asyncio.Event()
        first_may_exit, second_may_exit = asyncio.Event(), asyncio.Event()

        async def hold(entered: asyncio.Event, may_exit: asyncio.Event) -> None:
            async with semaphore:
                entered.set()
                await may_exit.wait()

        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            first = asyncio.create_task(hold(first_in, first_may_exit))
            await wait_for_event(first_in, first)
            second = asyncio.create_task(hold(second_in, second_may_exit))
            await wait_for_event(second_in, second)
            both = await client.zrange(holders_key, 0, -1)

            first_may_exit.set()  # the task that entered first leaves first
            await first
            await zcard_when(client, holders_key, 1)  # the exit's release reaches Redis
            remaining = await client.zrange(holders_key, 0, -1)

            second_may_exit.set()
            await second
            left = await zcard_when(client, holders_key, 0)
        return both, remaining, left

    both, remaining, left = run(scenario())
    assert len(both) == 2, f"expected 2 slots held, Redis had {both}"
    second_token = max(both, key=sequence_number)
    assert remaining == [second_token], f"expected only the second task's slot {second_token} left, Redis had {remaining}"
    assert left == 0, f"expected no slot held at the end, Redis had {left}"
    assert not _lease_lost_records(caplog), f"expected no warning, got {[r.getMessage() for r in caplog.records]}"


def test_semaphore_exit_without_entry(name: str, redis_url: str) -> None:
    async def scenario() -> None:
        semaphore = Semaphore(name, 1, redis_url=redis_url)
        with pytest.raises(RuntimeError):
            await semaphore.__aexit__(None, None, None)

        entered = asyncio.Event()
        release = asyncio.Event()

        async def hold() -> None:
            async with semaphore:
                entered.set()
                await release.wait()

        holder = asyncio.create_task(hold())
        await wait_for_event(entered, holder)
        with pytest.raises(RuntimeError):  # the slot belongs to the holder task, not to this one
            await semaphore.__aexit__(None, None, None)
        release.set()
        await holder

    run(scenario())


def test_semaphore_task_ending_inside_block_releases(
    name: str, redis_url: str, observer: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    semaphore = Semaphore(name, 1, redis_url=redis_url, max_sleep=5)

    async def main() -> None:
        async def enter_and_leave_open() -> None:
            await semaphore.__aenter__()  # never exited, as in a coroutine that forgot the block

        await asyncio.create_task(enter_and_leave_open())
        async with semaphore:  # the done task's slot comes back, so this entry gets it
            pass

    with caplog.at_level(logging.WARNING, logger="self_limiters"):
        run(main())
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("without leaving" in message for message in warnings), f"expected a warning about the task, got {warnings}"
    assert wait_until(lambda: observer.zcard(semaphore_key(name, "holders")) == 0, timeout=5), "expected no holder left"


_EXIT_AFTER_BLOCK_CHILD = """
import asyncio, logging, sys
import redis
from self_limiters import Semaphore

url, name, expire = sys.argv[1], sys.argv[2], sys.argv[3] == "expire"
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

async def main():
    async with Semaphore(name, 1, redis_url=url):
        if expire:  # a deadline in the past, as for a holder stopped longer than its expiry
            client = redis.Redis.from_url(url)
            key = "__self-limiters:{sem:" + name + "}:holders"
            client.zadd(key, {member: 1 for member in client.zrange(key, 0, -1)})

asyncio.run(main())
"""


@pytest.mark.parametrize("expire", [False, True])
def test_semaphore_release_finished_at_exit(expire: bool, tmp_path: Path, name: str, redis_url: str, observer: redis.Redis) -> None:
    # The process exits right after its block: the exit hook waits for the release in flight, and
    # logs the outcome that the closed event loop can no longer read.
    script = tmp_path / "exit_after_block.py"
    script.write_text(_EXIT_AFTER_BLOCK_CHILD)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the child must import the installed package
    done = subprocess.run(
        [sys.executable, str(script), redis_url, name, "expire" if expire else "keep"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )

    assert done.returncode == 0, f"expected exit code 0, got {done.returncode}; stderr:\n{done.stderr}"
    holders = observer.zcard(semaphore_key(name, "holders"))
    assert holders == 0, f"expected the slot released by the time the process ended, Redis had {holders} holders"
    if expire:
        assert "had expired" in done.stderr, f"expected the lease-lost warning at exit, stderr:\n{done.stderr}"
    else:
        assert "WARNING" not in done.stderr, f"expected no warning, stderr:\n{done.stderr}"


def test_limiters_for_fresh_names_freed(name: str, redis_url: str) -> None:
    # An application may build limiters for ever-new names (one per user or key) in one
    # long-running task; nothing of them may stay behind once they are dropped.
    from self_limiters import _bridge

    async def scenario() -> tuple[int, int, int]:
        async with Semaphore(f"{name}-warm-up", 1, redis_url=redis_url):
            pass
        gc.collect()
        before = _bridge.library().pybridge_OpenLimiters()
        references = []
        for index in range(300):
            semaphore = Semaphore(f"{name}-{index}", 1, redis_url=redis_url)
            bucket = TokenBucket(f"{name}-{index}", 1, 60.0, 1, redis_url=redis_url)
            async with semaphore, bucket:
                pass
            references += [weakref.ref(semaphore), weakref.ref(bucket)]
        del semaphore, bucket
        gc.collect()
        alive = sum(reference() is not None for reference in references)
        return before, alive, _bridge.library().pybridge_OpenLimiters()

    before, alive, after = run(scenario())
    assert alive == 0, f"expected all 600 limiter objects collected once dropped, {alive} are alive"
    assert after <= before, f"expected the Go limiters of dropped objects closed, {before} open before and {after} after"


def test_semaphore_exception_releases_slot(name: str, redis_url: str, observer: redis.Redis) -> None:
    async def scenario() -> None:
        semaphore = Semaphore(name, 1, max_sleep=0.5, redis_url=redis_url)
        with pytest.raises(KeyError):
            async with semaphore:
                raise KeyError("raised inside the block")
        async with semaphore:
            pass

    run(scenario())
    assert wait_until(lambda: observer.zcard(semaphore_key(name, "holders")) == 0, 3), "expected no slot held at the end"


def test_semaphore_cancelled_waiters_leak_nothing(name: str, redis_url: str, observer: redis.Redis) -> None:
    capacity = 2
    waiters_key = semaphore_key(name, "waiters")

    async def scenario() -> tuple[list[object], bool, tuple[int, int]]:
        semaphore = Semaphore(name, capacity, redis_url=redis_url)
        release = asyncio.Event()

        async def hold() -> None:
            async with semaphore:
                await release.wait()

        async def never_enters() -> None:
            async with semaphore:
                raise AssertionError("a cancelled waiter entered")

        holders = [asyncio.create_task(hold()) for _ in range(capacity)]
        async with redis.asyncio.from_url(redis_url) as client:

            async def holders_in() -> bool:
                return await client.zcard(semaphore_key(name, "holders")) == capacity

            assert await wait_until_async(holders_in, 5), f"expected {capacity} holders"
            waiters = [asyncio.create_task(never_enters()) for _ in range(5)]

            async def all_queued() -> bool:
                return await client.zcard(waiters_key) == 5

            assert await wait_until_async(all_queued, 5), "expected 5 waiters in the Redis queue"
            for waiter in waiters:
                waiter.cancel()
            outcomes = await asyncio.gather(*waiters, return_exceptions=True)

            async def queue_empty() -> bool:
                return await client.zcard(waiters_key) == 0

            emptied = await wait_until_async(queue_empty, 3)

        release.set()
        await asyncio.gather(*holders)
        return outcomes, emptied, await entries_at_once(name, capacity, redis_url, capacity + 1)

    outcomes, emptied, (entered, timed_out) = run(scenario())
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), f"expected 5 CancelledError, got {outcomes}"
    assert emptied, "expected the cancelled waiters removed from the Redis queue"
    assert entered == capacity, f"expected exactly {capacity} entries at once afterwards, got {entered}"
    assert timed_out == 1, f"expected 1 entry over capacity to time out, got {timed_out}"


def test_semaphore_cancel_storm_leaks_nothing(
    name: str, redis_url: str, observer: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")
    capacity = 2

    async def scenario() -> tuple[int, int, tuple[int, int]]:
        semaphore = Semaphore(name, capacity, redis_url=redis_url)
        inside = 0
        max_inside = 0

        async def cycle() -> None:
            nonlocal inside, max_inside
            for _ in range(5):
                async with semaphore:
                    inside += 1
                    max_inside = max(max_inside, inside)
                    try:
                        await asyncio.sleep(random.uniform(0.001, 0.006))
                    finally:  # a task cancelled in the block leaves it too
                        inside -= 1

        tasks = [asyncio.create_task(cycle()) for _ in range(40)]
        random.shuffle(tasks)
        # Cancel half of the tasks at random moments, so that some are waiting, some were granted a
        # slot whose record is still in the pipe, and some hold a slot.
        for task in tasks[:20]:
            await asyncio.sleep(random.uniform(0, 0.02))
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [o for o in outcomes if o is not None and not isinstance(o, asyncio.CancelledError)]
        assert not failures, f"expected tasks to finish or be cancelled, got {failures}"

        async with redis.asyncio.from_url(redis_url) as client:

            async def nothing_held() -> bool:
                held = await client.zcard(semaphore_key(name, "holders"))
                queued = await client.zcard(semaphore_key(name, "waiters"))
                return held == 0 and queued == 0

            assert await wait_until_async(nothing_held, 5), "expected every slot and queue place given back"
        return max_inside, sum(isinstance(o, asyncio.CancelledError) for o in outcomes), await entries_at_once(
            name, capacity, redis_url, capacity + 1
        )

    max_inside, cancelled, (entered, timed_out) = run(scenario(), timeout=30)
    assert max_inside <= capacity, f"expected at most {capacity} holders at once, saw {max_inside}"
    assert cancelled >= 1, "expected some tasks to be cancelled before they finished"
    assert entered == capacity, f"expected exactly {capacity} entries at once afterwards, got {entered}"
    assert timed_out == 1, f"expected 1 entry over capacity to time out, got {timed_out}"
    assert not _lease_lost_records(caplog), f"expected no warning, got {[r.getMessage() for r in caplog.records]}"


def test_semaphore_lease_lost_warns(name: str, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")

    async def scenario() -> None:
        semaphore = Semaphore(name, 1, redis_url=redis_url)
        async with redis.asyncio.from_url(redis_url) as client:
            async with semaphore:
                # A deadline in the past, as for a holder stopped longer than its expiry.
                key = semaphore_key(name, "holders")
                members = await client.zrange(key, 0, -1)
                assert len(members) == 1, f"expected one lease in the holders set, got {members}"
                await client.zadd(key, {members[0]: 1})
        await wait_for_warning(caplog, "expired")

    run(scenario())
    warnings = _lease_lost_records(caplog)
    assert len(warnings) == 1, f"expected 1 warning, got {[r.getMessage() for r in warnings]}"
    assert warnings[0].levelno == logging.WARNING, f"expected level WARNING, got {warnings[0].levelname}"
    message = warnings[0].getMessage()
    assert f"__self-limiters:{name}" in message, f"expected the semaphore's name in the warning, got {message!r}"
    assert "expired" in message, f"expected the warning to say the lease expired, got {message!r}"


def test_semaphore_blocked_loop_keeps_lease(
    name: str, redis_url: str, observer: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")

    async def scenario() -> int:
        async with Semaphore(name, 1, expiry=0.3, redis_url=redis_url):
            time.sleep(1.0)  # blocks the event loop for more than three leases
            return observer.zcard(semaphore_key(name, "holders"))

    holder_count = run(scenario())
    assert holder_count == 1, f"expected the lease renewed while the event loop was blocked, Redis had {holder_count} holders"
    assert not _lease_lost_records(caplog), f"expected no warning, got {[r.getMessage() for r in caplog.records]}"


def test_semaphore_idle_keys_expire(name: str, redis_url: str, observer: redis.Redis) -> None:
    async def scenario() -> None:
        async with Semaphore(name, 1, expiry=0.5, redis_url=redis_url):
            pass

    run(scenario())
    pattern = f"__self-limiters:{{sem:{name}}}:*"
    assert wait_until(lambda: not observer.keys(pattern), 5), (
        f"expected no key left 5 s after the last exit with expiry 0.5 s, found {observer.keys(pattern)}"
    )


def test_semaphore_reused_across_event_loops(name: str, redis_url: str) -> None:
    semaphore = Semaphore(name, 1, max_sleep=1.0, redis_url=redis_url)

    async def enter() -> bool:
        async with semaphore:
            return True

    entries = [run(enter()) for _ in range(3)]
    assert entries == [True, True, True], f"expected an entry in each of 3 event loops, got {entries}"


def test_semaphore_threads_share_capacity(name: str, redis_url: str) -> None:
    lock = threading.Lock()
    inside = 0
    max_inside = 0
    entries = 0
    errors: list[BaseException] = []

    async def cycle() -> None:
        nonlocal inside, max_inside, entries
        semaphore = Semaphore(name, 1, redis_url=redis_url)
        for _ in range(10):
            async with semaphore:
                with lock:
                    inside += 1
                    max_inside = max(max_inside, inside)
                    entries += 1
                await asyncio.sleep(0.002)
                with lock:
                    inside -= 1

    def thread_main() -> None:
        try:
            run(cycle())
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=thread_main) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors, f"expected no error in the threads, got {errors}"
    assert entries == 30, f"expected 30 entries, got {entries}"
    assert max_inside == 1, f"expected 1 holder at a time across event loops, saw {max_inside}"
