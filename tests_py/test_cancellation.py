"""Cancellation of semaphore and token bucket entries at every point, on a real Redis.

Each entry is struck by ``task.cancel()``, ``asyncio.wait_for`` or ``asyncio.timeout``. The strike
lands before the Go call, while the acquire script is in flight, while the entry waits in the
Redis queue, after Redis granted the slot but before the task resumed, or while the release is in
flight. Afterwards no slot may stay held, and no release may free the slot of another holder.

The tests check the tokens in Redis, so a release that frees another holder's slot shows up as a
missing token, and the sweeps and the stress run count the holders inside their blocks. Every
semaphore test also checks that self_limiters logged no warning, which it does for a lease that
expired before its release and for a task that ended inside a block.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter

import pytest
import redis
import redis.asyncio

from cancel_support import (
    CANCELLED,
    COMPLETED,
    METHODS,
    TASK_CANCEL,
    TIMEOUT,
    WAIT_FOR,
    Strike,
    block_until_granted,
    end_tasks,
    entries_at_once,
    expected_outcome,
    pause_redis,
    script_calls,
    semaphore_sets,
    token_sequence,
    wait_for_script_calls,
    wait_for_sets,
    wait_until_queued,
)
from self_limiters import MaxSleepExceededError, Semaphore, TokenBucket
from support import bucket_key, run, semaphore_key, wait_for_event, wait_until_async

# Methods that can strike at a moment the test chooses. asyncio.wait_for is not among them,
# because it strikes only at the deadline given when it started.
STRIKE_NOW_METHODS = tuple(method for method in METHODS if method != WAIT_FOR)


@pytest.fixture
def warnings_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The log of self_limiters at level WARNING and above."""
    caplog.set_level(logging.WARNING, logger="self_limiters")
    return caplog


def logged_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "self_limiters" and r.levelno >= logging.WARNING]


class Holder:
    """A task that holds a slot of ``semaphore`` until ``leave()``."""

    def __init__(self, semaphore: Semaphore) -> None:
        self.entered = asyncio.Event()
        self.may_exit = asyncio.Event()
        self.task = asyncio.create_task(self._hold(semaphore))

    async def _hold(self, semaphore: Semaphore) -> None:
        async with semaphore:
            self.entered.set()
            await self.may_exit.wait()

    async def wait_entered(self) -> None:
        await wait_for_event(self.entered, self.task)

    async def leave(self) -> None:
        self.may_exit.set()
        await self.task


# Points of entry


@pytest.mark.parametrize("method", METHODS)
def test_semaphore_cancel_before_start(method: str, name: str, redis_url: str, warnings_log: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[str, bool, str | None, str | None, list[str], list[str], list[str], tuple[int, str]]:
        semaphore = Semaphore(name, 1, redis_url=redis_url)
        reached_entry = False

        async def body() -> None:
            nonlocal reached_entry
            await asyncio.sleep(0)  # the strike lands here, before the entry calls Go
            reached_entry = True
            async with semaphore:
                raise AssertionError("a cancelled entry got a slot")

        holder = Holder(semaphore)
        await holder.wait_entered()
        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            holders_before, _ = await semaphore_sets(client, name)
            tickets_before = await client.get(semaphore_key(name, "tickets"))
            loop = asyncio.get_running_loop()
            outcome = await Strike(method, body, loop.time()).outcome()
            await asyncio.sleep(0.05)  # an acquire that had started would have queued by now
            tickets_after = await client.get(semaphore_key(name, "tickets"))
            holders, waiters = await semaphore_sets(client, name)
        await holder.leave()
        return outcome, reached_entry, tickets_before, tickets_after, holders_before, holders, waiters, await entries_at_once(
            name, 1, redis_url
        )

    outcome, reached_entry, tickets_before, tickets_after, holders_before, holders, waiters, at_once = run(scenario())
    assert outcome == CANCELLED, f"expected the strike to raise {expected_outcome(method)}, but the entry {outcome}"
    assert not reached_entry, "expected the strike to land before the entry started"
    assert tickets_after == tickets_before, f"expected no queue ticket taken, the counter went from {tickets_before} to {tickets_after}"
    assert holders == holders_before, f"expected only the holder {holders_before}, Redis had {holders}"
    assert waiters == [], f"expected nobody queued, Redis had {waiters}"
    assert at_once == (1, "waited"), f"expected 1 entry at once and the next to wait, got {at_once}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


@pytest.mark.parametrize("method", METHODS)
def test_semaphore_cancel_during_acquire_call(
    method: str, name: str, redis_url: str, observer: redis.Redis, warnings_log: pytest.LogCaptureFixture
) -> None:
    # The acquire script of the victim is held 400 ms by CLIENT PAUSE and the strike lands 100 ms
    # into it. When the pause ends, the script grants the free slot to a request that was
    # cancelled, so the Go side must give that slot back.
    async def scenario() -> tuple[str, bool, int, int, list[str], list[str], list[str], tuple[int, str]]:
        semaphore = Semaphore(name, 2, redis_url=redis_url)
        entered = False

        async def body() -> None:
            nonlocal entered
            async with semaphore:
                entered = True

        async with semaphore:  # leaves an idle connection in the pool, so no dial waits for the pause
            pass
        holder = Holder(semaphore)
        await holder.wait_entered()
        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            holders_before, _ = await semaphore_sets(client, name)
            calls_before = script_calls(observer)
            pause_redis(redis_url, 400)
            loop = asyncio.get_running_loop()
            outcome = await Strike(method, body, loop.time() + 0.1).outcome()
            # Blocks until the pause ends and the acquire script and the release of its slot have run.
            calls_after = wait_for_script_calls(observer, calls_before + 2)
            holders, waiters = await wait_for_sets(client, name, holders_before)
        await holder.leave()
        return outcome, entered, calls_before, calls_after, holders_before, holders, waiters, await entries_at_once(
            name, 2, redis_url
        )

    outcome, entered, calls_before, calls_after, holders_before, holders, waiters, at_once = run(scenario())
    assert outcome == CANCELLED, f"expected the strike to raise {expected_outcome(method)}, but the entry {outcome}"
    assert not entered, "expected the cancelled entry not to run its block"
    assert calls_after >= calls_before + 1, f"expected the paused acquire script to run, script calls went from {calls_before} to {calls_after}"
    assert holders == holders_before, f"expected only the holder {holders_before} left, Redis had {holders}"
    assert waiters == [], f"expected nobody queued, Redis had {waiters}"
    assert at_once == (2, "waited"), f"expected 2 entries at once and the next to wait, got {at_once}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


@pytest.mark.parametrize("method", METHODS)
def test_semaphore_cancel_while_queued(method: str, name: str, redis_url: str, warnings_log: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[bool, str, list[str], list[str], list[str], tuple[int, str]]:
        semaphore = Semaphore(name, 1, redis_url=redis_url)

        async def body() -> None:
            async with semaphore:
                raise AssertionError("a cancelled entry got the slot of a holder that never left")

        holder = Holder(semaphore)
        await holder.wait_entered()
        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            holders_before, _ = await semaphore_sets(client, name)
            loop = asyncio.get_running_loop()
            strike = Strike(method, body, loop.time() + 1.0 if method == WAIT_FOR else None)
            queued = await wait_until_queued(client, name, 1) and not strike.task.done()
            if method != WAIT_FOR:
                strike.strike_now()
            outcome = await strike.outcome()
            holders, waiters = await wait_for_sets(client, name, holders_before)
        await holder.leave()
        return queued, outcome, holders_before, holders, waiters, await entries_at_once(name, 1, redis_url)

    queued, outcome, holders_before, holders, waiters, at_once = run(scenario())
    assert queued, "expected the entry in the Redis queue before the strike"
    assert outcome == CANCELLED, f"expected the strike to raise {expected_outcome(method)}, but the entry {outcome}"
    assert waiters == [], f"expected the queue place given back, Redis had waiters {waiters}"
    assert holders == holders_before, f"expected the holder {holders_before} to keep its slot, Redis had {holders}"
    assert at_once == (1, "waited"), f"expected 1 entry at once and the next to wait, got {at_once}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


async def _cancel_after_grant(
    method: str, name: str, redis_url: str, observer: redis.Redis, record_read: bool
) -> tuple[bool, list[str], list[str], str, bool, list[str], list[str], tuple[int, str]]:
    """Queue an entry behind a holder, let the holder leave and block the event loop until Redis
    granted the slot to the entry, then strike before the entry's task resumes.

    With ``record_read`` false, the strike comes before the loop reads the grant from the
    completion pipe. With it true, the strike comes in the same loop iteration, just after.
    asyncio.wait_for strikes at its deadline, which the blocked loop lets pass.
    Returns (queued, holders before, holders seen while blocked, outcome, block ran, holders,
    waiters, entries at once).
    """
    semaphore = Semaphore(name, 1, redis_url=redis_url)
    entered = False

    async def body() -> None:
        nonlocal entered
        async with semaphore:
            entered = True
            # One step more in the block: on Python 3.11 wait_for strikes in the loop pass after
            # the grant, which would find a block without awaits finished already.
            await asyncio.sleep(0)

    holder = Holder(semaphore)
    await holder.wait_entered()
    async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
        holders_before, _ = await semaphore_sets(client, name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0 if method == WAIT_FOR else None
        strike = Strike(method, body, deadline)
        queued = await wait_until_queued(client, name, 1) and not strike.task.done()

        holder.may_exit.set()
        await asyncio.sleep(0)  # the holder runs first: its exit starts the release
        granted_holders = block_until_granted(observer, name, holders_before)
        if deadline is not None:
            time.sleep(max(0.0, deadline - loop.time()) + 0.005)  # wait_for's timer is due next
        elif record_read:
            strike.strike_by_timer()
        else:
            strike.strike_now()
        outcome = await strike.outcome()
        await holder.task
        holders, waiters = await wait_for_sets(client, name, [])
    at_once = await entries_at_once(name, 1, redis_url)
    return queued, holders_before, granted_holders, outcome, entered, holders, waiters, at_once


@pytest.mark.parametrize("method", STRIKE_NOW_METHODS)
def test_semaphore_cancel_after_grant_unread(
    method: str, name: str, redis_url: str, observer: redis.Redis, warnings_log: pytest.LogCaptureFixture
) -> None:
    queued, holders_before, granted_holders, outcome, entered, holders, waiters, at_once = run(
        _cancel_after_grant(method, name, redis_url, observer, record_read=False)
    )
    assert queued, "expected the entry in the Redis queue before the holder left"
    assert len(granted_holders) == 1, f"expected one slot held while the loop was blocked, Redis had {granted_holders}"
    assert granted_holders != holders_before, f"expected the slot granted to the entry while the loop was blocked, the holder {holders_before} kept it"
    assert outcome == CANCELLED, f"expected the strike to raise {expected_outcome(method)}, but the entry {outcome}"
    assert not entered, "expected the strike to land before the entry's block ran"
    assert holders == [], f"expected the granted slot given back, Redis had holders {holders}"
    assert waiters == [], f"expected nobody queued, Redis had {waiters}"
    assert at_once == (1, "waited"), f"expected 1 entry at once and the next to wait, got {at_once}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


@pytest.mark.parametrize("method", METHODS)
def test_semaphore_cancel_after_grant_read(
    method: str, name: str, redis_url: str, observer: redis.Redis, warnings_log: pytest.LogCaptureFixture
) -> None:
    queued, holders_before, granted_holders, outcome, entered, holders, waiters, at_once = run(
        _cancel_after_grant(method, name, redis_url, observer, record_read=True)
    )
    assert queued, "expected the entry in the Redis queue before the holder left"
    assert len(granted_holders) == 1, f"expected one slot held while the loop was blocked, Redis had {granted_holders}"
    assert granted_holders != holders_before, f"expected the slot granted to the entry while the loop was blocked, the holder {holders_before} kept it"
    assert outcome == CANCELLED, f"expected the strike to raise {expected_outcome(method)}, but the entry {outcome}"
    if method != WAIT_FOR:
        # On Python 3.11, asyncio.wait_for cancels its inner task one iteration later, once that
        # task has entered the block, so only the other methods strike before it resumes.
        assert not entered, "expected the strike to land before the entry's block ran"
    assert holders == [], f"expected the granted slot given back, Redis had holders {holders}"
    assert waiters == [], f"expected nobody queued, Redis had {waiters}"
    assert at_once == (1, "waited"), f"expected 1 entry at once and the next to wait, got {at_once}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


@pytest.mark.parametrize("method", METHODS)
def test_semaphore_strike_at_exit_releases(method: str, name: str, redis_url: str, warnings_log: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[bool, str, str, list[str], list[str], list[str], tuple[int, str]]:
        semaphore = Semaphore(name, 2, redis_url=redis_url)
        entered = asyncio.Event()
        may_exit = asyncio.Event()

        async def body() -> None:
            async with semaphore:
                entered.set()
                await may_exit.wait()

        holder = Holder(semaphore)
        await holder.wait_entered()
        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            holders_before, _ = await semaphore_sets(client, name)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 1.0 if method == WAIT_FOR else None
            strike = Strike(method, body, deadline)
            await wait_for_event(entered, strike.task)
            in_block_before_deadline = not strike.task.done()
            both, _ = await semaphore_sets(client, name)
            victim_tokens = [token for token in both if token not in holders_before]

            may_exit.set()
            if deadline is not None:
                # The entry leaves its block in the next iteration, when wait_for's timer is due.
                time.sleep(max(0.0, deadline - loop.time()) + 0.005)
            else:
                await asyncio.sleep(0)  # the entry runs first: its exit starts the release
                if not strike.task.done():
                    strike.strike_now()
            outcome = await strike.outcome()
            holders, waiters = await wait_for_sets(client, name, holders_before)
        await holder.leave()
        victim_token = victim_tokens[0] if len(victim_tokens) == 1 else repr(victim_tokens)
        return in_block_before_deadline, victim_token, outcome, holders_before, holders, waiters, await entries_at_once(
            name, 2, redis_url
        )

    in_block, victim_token, outcome, holders_before, holders, waiters, at_once = run(scenario())
    assert in_block, "expected the entry in its block before the deadline"
    # The exit awaits nothing, since its release goes on in the background, so a strike that
    # comes as the block ends finds the task finished.
    assert outcome == COMPLETED, f"expected the exit to finish before the strike, but the entry was {outcome}"
    assert victim_token not in holders, f"expected the release of {victim_token} to reach Redis, Redis had {holders}"
    assert holders == holders_before, f"expected the other holder {holders_before} to keep its slot, Redis had {holders}"
    assert waiters == [], f"expected nobody queued, Redis had {waiters}"
    assert at_once == (2, "waited"), f"expected 2 entries at once and the next to wait, got {at_once}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


# Sweeps and stress


@pytest.mark.parametrize("capacity", [1, 2, 10])
def test_semaphore_cancel_sweep(capacity: int, name: str, redis_url: str, warnings_log: pytest.LogCaptureFixture) -> None:
    # Each step runs capacity + 2 tasks that hold for 0-20 ms, so some hold and some wait. It also
    # runs one entry per cancellation method, struck at the step's delay after it started. The
    # delays go from 0 to 50 ms in 0.5 ms steps, then 20 random delays up to 100 ms follow.
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    delays = [step * 0.0005 for step in range(101)] + [rng.uniform(0, 0.1) for _ in range(20)]

    async def scenario() -> tuple[int, Counter[tuple[str, str]], tuple[int, str]]:
        semaphore = Semaphore(name, capacity, redis_url=redis_url)
        inside = 0
        max_inside = 0
        outcomes: Counter[tuple[str, str]] = Counter()

        async def occupy(hold: float) -> None:
            nonlocal inside, max_inside
            async with semaphore:
                inside += 1
                max_inside = max(max_inside, inside)
                try:
                    await asyncio.sleep(hold)
                finally:
                    inside -= 1

        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            loop = asyncio.get_running_loop()
            for step, delay in enumerate(delays):
                others = [asyncio.create_task(occupy(rng.uniform(0, 0.02))) for _ in range(capacity + 2)]
                start = loop.time()
                victims = [Strike(method, lambda: occupy(0.005), start + delay) for method in METHODS]
                where = f"step {step} (strike after {delay * 1000:.1f} ms, seed {seed})"
                tasks = others + [victim.task for victim in victims]
                _, stalled = await asyncio.wait(tasks, timeout=10)
                if stalled:
                    holders, waiters = await semaphore_sets(client, name)
                    await end_tasks(tasks)
                    raise AssertionError(
                        f"{where}: expected every task to end within 10 s, {len(stalled)} did not. "
                        f"Redis had holders {holders} and waiters {waiters}"
                    )
                try:
                    for victim in victims:
                        outcomes[victim.method, await victim.outcome()] += 1
                finally:
                    await end_tasks(tasks)

                holders, waiters = await wait_for_sets(client, name, [], timeout=3)
                assert holders == [], f"{where}: expected no slot held after every task ended, Redis had {holders}"
                assert waiters == [], f"{where}: expected nobody queued after every task ended, Redis had {waiters}"
        return max_inside, outcomes, await entries_at_once(name, capacity, redis_url)

    max_inside, outcomes, at_once = run(scenario(), timeout=120)
    assert max_inside <= capacity, f"expected at most {capacity} holders at once, saw {max_inside} (seed {seed})"
    for method in METHODS:
        assert outcomes[method, CANCELLED] >= 1, f"expected some {method} strikes to land, outcomes {dict(outcomes)}"
    assert at_once == (capacity, "waited"), f"expected {capacity} entries at once and the next to wait, got {at_once} (seed {seed})"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)} (seed {seed})"


def test_semaphore_cancel_stress(name: str, redis_url: str, observer: redis.Redis, warnings_log: pytest.LogCaptureFixture) -> None:
    # 10,000 entries through one shared Semaphore object, at most 300 at a time, 30 % of them
    # struck after a random 0-100 ms by a random method.
    entries, concurrency, capacity, expiry = 10_000, 300, 5, 1.5
    seed = random.randrange(2**32)
    rng = random.Random(seed)

    async def scenario() -> tuple[str, Counter[str], list[str], int, list[str], list[str], tuple[int, str]]:
        semaphore = Semaphore(name, capacity, expiry=expiry, redis_url=redis_url)
        inside = 0
        max_inside = 0
        running = asyncio.Semaphore(concurrency)
        strikes: list[Strike] = []

        async def body() -> None:
            nonlocal inside, max_inside
            async with semaphore:
                inside += 1
                max_inside = max(max_inside, inside)
                try:
                    await asyncio.sleep(rng.uniform(0, 0.002))
                finally:
                    inside -= 1

        async def stall_report(started: int) -> str:
            finished = sum(strike.task.done() for strike in strikes)
            async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
                holders, waiters = await semaphore_sets(client, name)
            return (
                f"no entry ended for 10 s: {started} started, {finished} ended, and "
                f"Redis had {len(holders)} holders and {len(waiters)} waiters"
            )

        # A leaked slot stops every entry, so each wait ends after 10 s without progress.
        stall = ""
        loop = asyncio.get_running_loop()
        for index in range(entries):
            try:
                await asyncio.wait_for(running.acquire(), 10)
            except asyncio.TimeoutError:
                stall = await stall_report(index)
                break
            deadline = loop.time() + rng.uniform(0, 0.1) if rng.random() < 0.3 else None
            strike = Strike(rng.choice(METHODS), body, deadline)
            strike.task.add_done_callback(lambda _: running.release())
            strikes.append(strike)
        pending = {strike.task for strike in strikes}
        while pending and not stall:
            done, pending = await asyncio.wait(pending, timeout=10)
            if not done:
                stall = await stall_report(len(strikes))
        for task in pending:
            task.cancel()

        outcomes: Counter[str] = Counter()
        errors: list[str] = []
        for strike in strikes:
            try:
                outcomes[await strike.outcome()] += 1
            except Exception as error:  # collected, then reported by the assert below
                errors.append(repr(error))
        if stall:
            return stall, outcomes, errors, max_inside, [], [], (0, "")

        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            holders, waiters = await wait_for_sets(client, name, [], timeout=10)
        return stall, outcomes, errors, max_inside, holders, waiters, await entries_at_once(name, capacity, redis_url, expiry)

    stall, outcomes, errors, max_inside, holders, waiters, at_once = run(scenario(), timeout=150)
    assert not stall, f"expected the entries to keep going, {stall} (seed {seed})"
    assert not errors, f"expected every entry to complete or be cancelled, {len(errors)} failed, first {errors[0]} (seed {seed})"
    assert outcomes[CANCELLED] > 0, f"expected some strikes to land, outcomes {dict(outcomes)}"
    assert max_inside <= capacity, f"expected at most {capacity} holders at once, saw {max_inside} (seed {seed})"
    assert holders == [], f"expected no slot held at the end, Redis had {len(holders)}: {holders[:5]} (seed {seed})"
    assert waiters == [], f"expected nobody queued at the end, Redis had {len(waiters)}: {waiters[:5]} (seed {seed})"
    assert at_once == (capacity, "waited"), f"expected {capacity} entries at once and the next to wait, got {at_once} (seed {seed})"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)[:3]} (seed {seed})"

    pattern = f"__self-limiters:{{sem:{name}}}:*"
    deadline = time.monotonic() + expiry + 5
    while observer.keys(pattern) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = observer.keys(pattern)
    assert left == [], f"expected no key left {expiry + 5} s after the last exit with expiry {expiry} s, found {left}"


# Releases that must free only their own slot


def test_semaphore_exit_twice_keeps_other_slot(name: str, redis_url: str, warnings_log: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[list[str], list[str], list[str], list[str], tuple[int, str]]:
        semaphore = Semaphore(name, 2, redis_url=redis_url)
        entered = asyncio.Event()
        may_exit = asyncio.Event()

        async def enter_and_exit_twice() -> None:
            async with semaphore:
                pass
            with pytest.raises(RuntimeError):
                await semaphore.__aexit__(None, None, None)

            try:
                async with semaphore:
                    entered.set()
                    await may_exit.wait()
            except asyncio.CancelledError:  # struck while the release was in flight
                task = asyncio.current_task()
                if task is not None and hasattr(task, "uncancel"):
                    task.uncancel()
            with pytest.raises(RuntimeError):
                await semaphore.__aexit__(None, None, None)

        holder = Holder(semaphore)
        await holder.wait_entered()
        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            holders_before, _ = await semaphore_sets(client, name)
            task = asyncio.create_task(enter_and_exit_twice())
            await wait_for_event(entered, task)
            both, _ = await semaphore_sets(client, name)
            may_exit.set()
            await asyncio.sleep(0)  # the task starts its release and waits for it
            task.cancel()
            await task
            holders, waiters = await wait_for_sets(client, name, holders_before)
            await asyncio.sleep(0.1)  # a second release would have run by now
            holders_later, _ = await semaphore_sets(client, name)
        await holder.leave()
        return holders_before, both, holders, holders_later, await entries_at_once(name, 2, redis_url)

    holders_before, both, holders, holders_later, at_once = run(scenario())
    assert len(both) == 2, f"expected 2 slots held while the task held, Redis had {both}"
    assert holders == holders_before, f"expected the other holder {holders_before} to keep its slot, Redis had {holders}"
    assert holders_later == holders_before, f"expected the other holder to keep its slot 0.1 s later, Redis had {holders_later}"
    assert at_once == (2, "waited"), f"expected 2 entries at once and the next to wait, got {at_once}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


def test_semaphore_nested_strike_after_inner_exit(name: str, redis_url: str, warnings_log: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[list[str], bool, list[str], list[str], tuple[int, str]]:
        semaphore = Semaphore(name, 2, redis_url=redis_url)
        inner_entered = asyncio.Event()
        inner_may_exit = asyncio.Event()
        inner_left = asyncio.Event()
        outer_may_exit = asyncio.Event()

        async def nested() -> None:
            async with semaphore:
                async with semaphore:
                    inner_entered.set()
                    await inner_may_exit.wait()
                inner_left.set()
                await outer_may_exit.wait()

        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            task = asyncio.create_task(nested())
            await wait_for_event(inner_entered, task)
            both, _ = await semaphore_sets(client, name)
            inner_may_exit.set()
            await asyncio.sleep(0)  # the task leaves the inner block and waits in the outer one
            left_inner = inner_left.is_set()
            outer_token = min(both, key=token_sequence) if both else ""
            holders_after_inner, _ = await wait_for_sets(client, name, [outer_token])
            task.cancel()  # lands in the outer block, whose exit gives back the outer slot
            await asyncio.wait({task})
            holders, waiters = await wait_for_sets(client, name, [])
        return both, left_inner and task.cancelled(), holders_after_inner, holders + waiters, await entries_at_once(name, 2, redis_url)

    both, struck_in_outer, holders_after_inner, left, at_once = run(scenario())
    assert len(both) == 2, f"expected 2 slots held by the nested entries, Redis had {both}"
    assert struck_in_outer, "expected the inner exit to finish at once and the strike to land in the outer block"
    outer_token = min(both, key=token_sequence)
    assert holders_after_inner == [outer_token], f"expected only the outer slot {outer_token} after the inner exit, Redis had {holders_after_inner}"
    assert left == [], f"expected nothing held or queued after the outer exit, Redis had {left}"
    assert at_once == (2, "waited"), f"expected 2 entries at once and the next to wait, got {at_once}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


@pytest.mark.parametrize("method", [method for method in METHODS if method != TASK_CANCEL])
def test_semaphore_nested_inner_times_out(method: str, name: str, redis_url: str, warnings_log: pytest.LogCaptureFixture) -> None:
    # With capacity 1, an entry nested in the block of the same task waits for its own slot.
    async def scenario() -> tuple[list[str], bool, list[str], list[str], list[str], tuple[int, str]]:
        semaphore = Semaphore(name, 1, redis_url=redis_url)

        async def inner() -> None:
            async with semaphore:
                raise AssertionError("the nested entry got the only slot, which its own task holds")

        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            async with semaphore:
                outer, _ = await semaphore_sets(client, name)
                timed_out = False
                try:
                    if method == TIMEOUT:
                        async with asyncio.timeout(0.3):
                            await inner()
                    else:
                        await asyncio.wait_for(inner(), 0.3)
                except asyncio.TimeoutError:
                    timed_out = True
                holders_inside, waiters_inside = await wait_for_sets(client, name, outer)
            holders, _ = await wait_for_sets(client, name, [])
        return outer, timed_out, holders_inside, waiters_inside, holders, await entries_at_once(name, 1, redis_url)

    outer, timed_out, holders_inside, waiters_inside, holders, at_once = run(scenario())
    assert timed_out, "expected the nested entry to time out"
    assert holders_inside == outer, f"expected the outer slot {outer} kept after the nested entry timed out, Redis had {holders_inside}"
    assert waiters_inside == [], f"expected the nested entry's queue place given back, Redis had {waiters_inside}"
    assert holders == [], f"expected no slot held after the outer exit, Redis had {holders}"
    assert at_once == (1, "waited"), f"expected 1 entry at once and the next to wait, got {at_once}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


def test_semaphore_raising_block_strike_at_exit(name: str, redis_url: str, warnings_log: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[bool, list[str], list[str], list[str], tuple[int, str]]:
        semaphore = Semaphore(name, 2, redis_url=redis_url)
        entered = asyncio.Event()
        may_raise = asyncio.Event()

        async def raise_in_block() -> None:
            async with semaphore:
                entered.set()
                await may_raise.wait()
                raise ValueError("raised in the block")

        holder = Holder(semaphore)
        await holder.wait_entered()
        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            holders_before, _ = await semaphore_sets(client, name)
            task = asyncio.create_task(raise_in_block())
            await wait_for_event(entered, task)
            may_raise.set()
            await asyncio.sleep(0)  # the block raises and the exit starts the release
            task.cancel()  # too late: the exit awaits nothing, so the task has ended
            await asyncio.wait({task})
            holders, waiters = await wait_for_sets(client, name, holders_before)
        await holder.leave()
        raised = not task.cancelled() and isinstance(task.exception(), ValueError)
        return raised, holders_before, holders, waiters, await entries_at_once(name, 2, redis_url)

    raised, holders_before, holders, waiters, at_once = run(scenario())
    assert raised, "expected the block's ValueError to end the task, since the exit cannot be interrupted"
    assert holders == holders_before, f"expected the other holder {holders_before} to keep its slot, Redis had {holders}"
    assert waiters == [], f"expected nobody queued, Redis had {waiters}"
    assert at_once == (2, "waited"), f"expected 2 entries at once and the next to wait, got {at_once}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


def test_semaphore_reentry_after_cancelled_entry(name: str, redis_url: str, warnings_log: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[bool, list[str], list[str], list[str], tuple[int, str]]:
        semaphore = Semaphore(name, 1, redis_url=redis_url)
        entered = asyncio.Event()
        may_exit = asyncio.Event()
        cancelled_once = False

        async def enter_after_cancel() -> None:
            nonlocal cancelled_once
            try:
                async with semaphore:
                    raise AssertionError("the first entry got the slot of a holder that never left")
            except asyncio.CancelledError:
                cancelled_once = True
                task = asyncio.current_task()
                if task is not None and hasattr(task, "uncancel"):
                    task.uncancel()
            async with semaphore:
                entered.set()
                await may_exit.wait()

        holder = Holder(semaphore)
        await holder.wait_entered()
        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            holders_before, _ = await semaphore_sets(client, name)
            task = asyncio.create_task(enter_after_cancel())
            assert await wait_until_queued(client, name, 1), "expected the first entry in the Redis queue"
            task.cancel()

            async def queued_again() -> bool:
                _, waiters = await semaphore_sets(client, name)
                return cancelled_once and len(waiters) == 1

            assert await wait_until_async(queued_again, 5), "expected the second entry in the Redis queue"
            await holder.leave()
            await wait_for_event(entered, task)
            holders_second, _ = await semaphore_sets(client, name)
            may_exit.set()
            await task
            holders, waiters = await wait_for_sets(client, name, [])
        return cancelled_once, holders_before, holders_second, holders + waiters, await entries_at_once(name, 1, redis_url)

    cancelled_once, holders_before, holders_second, left, at_once = run(scenario())
    assert cancelled_once, "expected the first entry to be cancelled"
    assert len(holders_second) == 1, f"expected the second entry to hold the only slot, Redis had {holders_second}"
    assert holders_second != holders_before, f"expected a new token for the second entry, Redis had {holders_second}"
    assert left == [], f"expected nothing held or queued after the second exit, Redis had {left}"
    assert at_once == (1, "waited"), f"expected 1 entry at once and the next to wait, got {at_once}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


# Go bridge bookkeeping


def test_semaphore_cancel_stores_no_error(name: str, redis_url: str) -> None:
    # Every failed Go call stores an error that Python takes with pybridge_TakeError. An acquire
    # cancelled while waiting ends with context.Canceled, which Python never takes when the
    # request was abandoned, so each cancellation would keep one string in the Go heap for good.
    from self_limiters import _bridge

    def newest_error_id() -> int:
        library = _bridge.library()
        error_id = -library.pybridge_SemaphoreAcquire(0, 0, 0.0)  # handle 0 is never valid
        library.pybridge_TakeError(error_id)
        return error_id

    def errors_stored_between(first: int, last: int) -> list[str]:
        library = _bridge.library()
        texts = [library.pybridge_TakeError(error_id) for error_id in range(first + 1, last)]
        return [text for text in texts if "no error is stored under this id" not in text]

    async def scenario() -> tuple[int, list[str]]:
        semaphore = Semaphore(name, 1, redis_url=redis_url)
        holder = Holder(semaphore)
        await holder.wait_entered()
        first = newest_error_id()
        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            waiters = [asyncio.create_task(semaphore.__aenter__()) for _ in range(20)]
            assert await wait_until_queued(client, name, 20), "expected 20 entries in the Redis queue"
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            await wait_for_sets(client, name, (await semaphore_sets(client, name))[0])
        await asyncio.sleep(0.1)  # the goroutines of the cancelled requests have ended by now
        last = newest_error_id()
        await holder.leave()
        return last - first - 1, errors_stored_between(first, last)

    created, stored = run(scenario())
    assert stored == [], f"expected no error left in the Go bridge after 20 cancellations, {len(stored)} of {created} are, first {stored[:1]}"


def test_semaphore_wait_for_aenter_then_aexit(name: str, redis_url: str, warnings_log: pytest.LogCaptureFixture) -> None:
    # asyncio.wait_for(semaphore.__aenter__(), timeout) puts a timeout on the entry alone. Before
    # Python 3.12, wait_for runs the coroutine in a task of its own, which ends once entered. The
    # slot then belongs to a task that has ended while the caller runs its block.
    async def scenario() -> tuple[list[str], str | None, list[str]]:
        semaphore = Semaphore(name, 1, redis_url=redis_url)
        await asyncio.wait_for(semaphore.__aenter__(), 5)
        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            await asyncio.sleep(0.1)  # the caller's block runs
            holders_in_block, _ = await semaphore_sets(client, name)
            try:
                await semaphore.__aexit__(None, None, None)
                exit_error = None
            except RuntimeError as error:
                exit_error = str(error)
            holders_after_exit, _ = await wait_for_sets(client, name, [])
        return holders_in_block, exit_error, holders_after_exit

    holders_in_block, exit_error, holders_after_exit = run(scenario())
    assert len(holders_in_block) == 1, f"expected the slot held while the caller's block runs, Redis had {holders_in_block}"
    assert exit_error is None, f"expected the caller's exit to release the slot, it raised {exit_error!r}"
    assert holders_after_exit == [], f"expected the slot free after the exit, Redis had {holders_after_exit}"
    assert not logged_warnings(warnings_log), f"expected no warning, got {logged_warnings(warnings_log)}"


# Token bucket


def _tokens_left(observer: redis.Redis, name: str) -> str | None:
    return observer.hget(bucket_key(name), "tokens")


async def _entries_without_wait(name: str, capacity: int, refill_frequency: float, url: str) -> int:
    """Count the entries of bucket ``name`` that pass without waiting, up to capacity + 1."""
    bucket = TokenBucket(name, capacity, refill_frequency, 1, redis_url=url, max_sleep=0.05)
    entries = 0
    for _ in range(capacity + 1):
        try:
            async with bucket:
                entries += 1
        except MaxSleepExceededError:
            break
    return entries


@pytest.mark.parametrize("method", METHODS)
def test_token_bucket_cancel_during_call(method: str, name: str, redis_url: str, observer: redis.Redis) -> None:
    # The acquire script is held 400 ms by CLIENT PAUSE and the strike lands 100 ms into it. The
    # script still runs when the pause ends, so the entry may have taken its token, but no more.
    capacity, refill_frequency = 3, 60.0

    async def scenario() -> tuple[str, bool, int, int, str | None, int]:
        bucket = TokenBucket(name, capacity, refill_frequency, 1, redis_url=redis_url)
        entered = False

        async def body() -> None:
            nonlocal entered
            async with bucket:
                entered = True

        # An entry of another bucket on the same connection pool leaves an idle connection, so
        # no dial waits for the pause.
        async with TokenBucket(f"{name}-warm-up", 1, 1.0, 1, redis_url=redis_url):
            pass
        calls_before = script_calls(observer)
        pause_redis(redis_url, 400)
        loop = asyncio.get_running_loop()
        outcome = await Strike(method, body, loop.time() + 0.1).outcome()
        calls_after = wait_for_script_calls(observer, calls_before + 1)  # blocks until the pause ends
        tokens = _tokens_left(observer, name)
        return outcome, entered, calls_before, calls_after, tokens, await _entries_without_wait(
            name, capacity, refill_frequency, redis_url
        )

    outcome, entered, calls_before, calls_after, tokens, entries = run(scenario())
    assert outcome == CANCELLED, f"expected the strike to raise {expected_outcome(method)}, but the entry {outcome}"
    assert not entered, "expected the cancelled entry not to run its block"
    assert calls_after >= calls_before + 1, f"expected the paused script to run, script calls went from {calls_before} to {calls_after}"
    assert tokens in (None, str(capacity - 1)), f"expected the cancelled entry to take at most 1 of {capacity} tokens, {tokens} are left"
    left = capacity if tokens is None else int(tokens)
    assert entries == left, f"expected the {left} tokens left to pass at once, {entries} entries did"


@pytest.mark.parametrize("method", METHODS)
def test_token_bucket_cancel_during_sleep(method: str, name: str, redis_url: str) -> None:
    async def scenario() -> tuple[bool, str, bool, str | None]:
        bucket = TokenBucket(name, 1, 2.0, 1, redis_url=redis_url)  # the next token comes in 2 s
        entered = False

        async def body() -> None:
            nonlocal entered
            async with bucket:
                entered = True

        async with bucket:  # takes the only token
            pass
        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            loop = asyncio.get_running_loop()
            strike = Strike(method, body, loop.time() + 0.5)

            async def reserved() -> bool:
                return await client.hget(bucket_key(name), "tokens") == "-1"

            sleeping = await wait_until_async(reserved, 5) and not strike.task.done()
            outcome = await strike.outcome()
            tokens = await client.hget(bucket_key(name), "tokens")
        return sleeping, outcome, entered, tokens

    sleeping, outcome, entered, tokens = run(scenario())
    assert sleeping, "expected the entry to reserve the next token before the strike"
    assert outcome == CANCELLED, f"expected the strike to raise {expected_outcome(method)}, but the entry {outcome}"
    assert not entered, "expected the cancelled entry not to run its block"
    assert tokens == "-1", f"expected the cancelled entry to keep its reserved token (tokens -1), Redis had {tokens}"


@pytest.mark.parametrize("method", METHODS)
def test_token_bucket_over_max_sleep_takes_nothing(method: str, name: str, redis_url: str, observer: redis.Redis) -> None:
    # The only token is taken and the next comes in 60 s, beyond max_sleep=0.1. A cancelled entry
    # whose script runs during a CLIENT PAUSE must not reserve that token.
    async def scenario() -> tuple[str | None, str, int, int, str | None, str | None]:
        bucket = TokenBucket(name, 1, 60.0, 1, redis_url=redis_url, max_sleep=0.1)

        async def body() -> None:
            async with bucket:
                raise AssertionError("an entry passed although its wait exceeds max_sleep")

        async with bucket:
            pass
        tokens_before = _tokens_left(observer, name)
        calls_before = script_calls(observer)
        pause_redis(redis_url, 400)
        loop = asyncio.get_running_loop()
        outcome = await Strike(method, body, loop.time() + 0.1).outcome()
        calls_after = wait_for_script_calls(observer, calls_before + 1)  # blocks until the pause ends
        tokens_after_cancel = _tokens_left(observer, name)

        try:
            async with bucket:
                raise AssertionError("an entry passed although its wait exceeds max_sleep")
        except MaxSleepExceededError:
            pass
        return tokens_before, outcome, calls_before, calls_after, tokens_after_cancel, _tokens_left(observer, name)

    tokens_before, outcome, calls_before, calls_after, tokens_after_cancel, tokens_at_end = run(scenario())
    assert tokens_before == "0", f"expected the first entry to take the only token, Redis had tokens {tokens_before}"
    assert outcome == CANCELLED, f"expected the strike to raise {expected_outcome(method)}, but the entry {outcome}"
    assert calls_after >= calls_before + 1, f"expected the paused script to run, script calls went from {calls_before} to {calls_after}"
    assert tokens_after_cancel == "0", f"expected the cancelled entry to take nothing, Redis had tokens {tokens_after_cancel}"
    assert tokens_at_end == "0", f"expected the entry refused for max_sleep to take nothing, Redis had tokens {tokens_at_end}"
