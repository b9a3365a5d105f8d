"""Redis faults as callers see them: a restart, a paused server, SCRIPT FLUSH, CLIENT KILL, a
stopped holder process, and lost data.

Every test that stops, pauses or flushes Redis, or kills its connections, runs its own private
server (fault_support.PrivateRedis), never the session server of conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
import redis.asyncio

from fault_support import PrivateRedis, start_holder_child
from self_limiters import MaxSleepExceededError, RedisError, Semaphore, TokenBucket
from support import bucket_key, entries_at_once, read_first_line, run, semaphore_key, stop_child, wait_for_event, wait_until_async

# Timeouts set in pybridge/limiters.go, and the retry defaults of go-redis v9.23 (options.go):
# each command is tried once and retried up to 3 times, with a backoff of at most 1 s before each
# retry, and each try dials up to 5 times, 100 ms apart.
DIAL_TIMEOUT = 5.0
READ_TIMEOUT = 3.0
TRIES = 4
MAX_BACKOFF = 1.0

# A refused connection fails each dial at once, so only the pauses between dials and tries count.
# README states about 2 s, and this file measured 1.7 s on a 2-core Linux machine. The dial
# timeout leaves room for load.
REFUSED_BOUND = DIAL_TIMEOUT
# A paused server accepts connections but never replies, so every try ends at the read timeout.
PAUSED_BOUND = TRIES * READ_TIMEOUT + (TRIES - 1) * MAX_BACKOFF
# After as many failed dials as its pool size, a go-redis pool fails at once with the last dial
# error until a probe, made every second, connects again (internal/pool/pool.go of go-redis
# v9.23). Entries may therefore fail for about 1 s after Redis is back.
RECOVERY_BOUND = 5.0
# A queued waiter fails in two steps: its wake-up read (BLPOP) fails after its retries, which
# triggers a check-in, and that check-in fails after its own retries.
WAITER_BOUND = 2 * REFUSED_BOUND


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test alone, stopped at the end."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = PrivateRedis(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _lease_lost_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return the lease-lost warnings of the self_limiters logger (not those of failed releases)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "self_limiters" and r.levelno >= logging.WARNING and "had expired" in r.getMessage()
    ]


async def _enter(limiter: Semaphore | TokenBucket) -> None:
    async with limiter:
        pass


async def _entry_outcome(limiter: Semaphore | TokenBucket) -> tuple[Exception | None, float]:
    """Enter and leave ``limiter`` once, and return the exception raised, if any, and the monotonic end time."""
    try:
        async with limiter:
            pass
    except Exception as exc:
        return exc, time.monotonic()
    return None, time.monotonic()


async def _hold_until(
    semaphore: Semaphore, entered: list[int], release: asyncio.Event
) -> tuple[Exception | None, float]:
    """Hold a slot until ``release`` is set, appending to ``entered`` once inside.

    Returns the exception raised on entry or exit, if any, and the seconds that the exit took
    (0.0 when the entry failed).
    """
    exit_started: float | None = None
    try:
        async with semaphore:
            entered.append(1)
            await release.wait()
            exit_started = time.monotonic()
    except Exception as exc:
        return exc, 0.0 if exit_started is None else time.monotonic() - exit_started
    assert exit_started is not None
    return None, time.monotonic() - exit_started


async def _first_entry_after(
    limiter: Semaphore | TokenBucket, since: float, timeout: float
) -> tuple[float | None, list[Exception]]:
    """Enter ``limiter`` until an entry succeeds, for at most ``timeout`` seconds after ``since``.

    Returns the seconds from ``since`` to the first success, or None, and the errors raised before.
    """
    errors: list[Exception] = []
    while time.monotonic() < since + timeout:
        error, ended = await _entry_outcome(limiter)
        if error is None:
            return ended - since, errors
        errors.append(error)
        await asyncio.sleep(0.05)
    return None, errors


async def _wait_for_queue(url: str, name: str, expected: int) -> None:
    async with redis.asyncio.from_url(url) as client:

        async def queued() -> bool:
            return await client.zcard(semaphore_key(name, "waiters")) == expected

        assert await wait_until_async(queued, 10), f"expected {expected} waiters in the Redis queue within 10 s"


def test_redis_restart_fails_then_recovers(
    private_redis: PrivateRedis, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")
    url = private_redis.url
    capacity = 2

    async def scenario() -> dict[str, object]:
        semaphore = Semaphore(name, capacity, redis_url=url)
        bucket = TokenBucket(name, 3, 10.0, 1, max_sleep=0.5, redis_url=url)
        await _enter(bucket)  # the bucket has state in Redis before the restart

        entered: list[int] = []
        release = asyncio.Event()
        holders = [asyncio.create_task(_hold_until(semaphore, entered, release)) for _ in range(capacity)]

        async def all_entered() -> bool:
            return len(entered) == capacity

        assert await wait_until_async(all_entered, 10), f"expected {capacity} holders within 10 s, got {len(entered)}"
        waiter = asyncio.create_task(_entry_outcome(semaphore))
        await _wait_for_queue(url, name, 1)

        private_redis.stop()
        stopped_at = time.monotonic()
        release.set()
        (semaphore_error, semaphore_end), (bucket_error, bucket_end) = await asyncio.gather(
            _entry_outcome(semaphore), _entry_outcome(bucket)
        )
        waiter_error, waiter_end = await waiter
        holder_exits = await asyncio.gather(*holders)

        # The exits return at once; each failed release is logged once its outcome arrives.
        def failed_releases() -> list[str]:
            return [r.getMessage() for r in caplog.records if "releasing a slot" in r.getMessage()]

        async def all_releases_failed() -> bool:
            return len(failed_releases()) >= capacity

        await wait_until_async(all_releases_failed, REFUSED_BOUND + 5)

        private_redis.start()
        restarted_at = time.monotonic()
        # The same objects, which kept their connection pools to the old server.
        semaphore_back = await _first_entry_after(semaphore, restarted_at, RECOVERY_BOUND)
        bucket_back = await _first_entry_after(bucket, restarted_at, RECOVERY_BOUND)

        entered.clear()
        release = asyncio.Event()
        holders = [asyncio.create_task(_hold_until(semaphore, entered, release)) for _ in range(capacity)]
        both_in = await wait_until_async(all_entered, 10)
        extra_error, _ = await _entry_outcome(Semaphore(name, capacity, max_sleep=0.3, redis_url=url))
        release.set()
        exits_after_restart = await asyncio.gather(*holders)
        bucket_outcomes = [await _entry_outcome(bucket) for _ in range(3)]

        return {
            "semaphore": (semaphore_error, semaphore_end - stopped_at),
            "bucket": (bucket_error, bucket_end - stopped_at),
            "waiter": (waiter_error, waiter_end - stopped_at),
            "holder_exits": holder_exits,
            "failed_releases": failed_releases(),
            "semaphore_back": semaphore_back,
            "bucket_back": bucket_back,
            "both_in": both_in,
            "extra_error": extra_error,
            "exits_after_restart": [error for error, _ in exits_after_restart],
            "bucket_errors": [error for error, _ in bucket_outcomes],
        }

    outcome = run(scenario(), timeout=60)

    for entry in ("semaphore", "bucket"):
        error, seconds = outcome[entry]  # type: ignore[misc]
        assert isinstance(error, RedisError), f"expected RedisError from a {entry} entry while Redis was down, got {error!r}"
        assert seconds < REFUSED_BOUND, f"expected the {entry} entry to fail within {REFUSED_BOUND} s, took {seconds:.2f} s"
    error, seconds = outcome["waiter"]  # type: ignore[misc]
    assert isinstance(error, RedisError), f"expected RedisError for the queued waiter, got {error!r}"
    assert seconds < WAITER_BOUND, f"expected the queued waiter to fail within {WAITER_BOUND} s of the stop, took {seconds:.2f} s"
    for error, _ in outcome["holder_exits"]:  # type: ignore[attr-defined]
        assert error is None, f"expected a holder's exit to return while Redis was down, got {error!r}"
    failed = outcome["failed_releases"]
    assert len(failed) == capacity, f"expected one warning per failed release, got {failed}"  # type: ignore[arg-type]
    assert all("refused" in message for message in failed), f"expected the cause in each warning, got {failed}"  # type: ignore[union-attr]

    for entry in ("semaphore_back", "bucket_back"):
        seconds, errors = outcome[entry]  # type: ignore[misc]
        assert seconds is not None, f"expected a {entry[:-5]} entry to succeed within {RECOVERY_BOUND} s of the restart, got {errors[-3:]}"
    assert outcome["both_in"], f"expected {capacity} holders at once through the same object after the restart, got {outcome['exits_after_restart']}"
    extra_error = outcome["extra_error"]
    assert isinstance(extra_error, MaxSleepExceededError), f"expected an entry over capacity to time out after the restart, got {extra_error!r}"
    assert outcome["exits_after_restart"] == [None] * capacity, f"expected clean exits after the restart, got {outcome['exits_after_restart']}"
    # The restarted server has no state, so the bucket is full again: 3 tokens, one of them taken
    # by the first entry after the restart, then a wait of 10 s, which max_sleep=0.5 rejects.
    bucket_errors = outcome["bucket_errors"]
    assert bucket_errors[:2] == [None] * 2, f"expected 2 more bucket entries after the restart, got {bucket_errors[:2]}"  # type: ignore[index]
    assert isinstance(bucket_errors[2], MaxSleepExceededError), f"expected the 4th bucket entry to exceed max_sleep, got {bucket_errors[2]!r}"  # type: ignore[index]


def test_paused_redis_entries_time_out(private_redis: PrivateRedis, name: str) -> None:
    url = private_redis.url

    async def scenario() -> tuple[list[tuple[Exception | None, float]], list[Exception | None]]:
        # Capacity 2, because a timed-out acquire may still run once the server continues. If the
        # release that gives it back runs first, one slot stays held until expiry.
        semaphore = Semaphore(name, 2, redis_url=url)
        bucket = TokenBucket(name, 100, 1.0, 100, redis_url=url)
        await _enter(semaphore)
        await _enter(bucket)

        private_redis.pause()
        try:
            paused_at = time.monotonic()
            outcomes = await asyncio.gather(_entry_outcome(semaphore), _entry_outcome(bucket))
        finally:
            private_redis.resume()
        after = await asyncio.gather(_entry_outcome(semaphore), _entry_outcome(bucket))
        return [(error, end - paused_at) for error, end in outcomes], [error for error, _ in after]

    while_paused, after_resume = run(scenario(), timeout=60)

    for entry, (error, seconds) in zip(("semaphore", "bucket"), while_paused):
        assert isinstance(error, RedisError), f"expected RedisError from a {entry} entry while Redis was paused, got {error!r}"
        assert "timeout" in str(error), f"expected a timeout as the cause, got {str(error)!r}"
        assert seconds < PAUSED_BOUND, f"expected the {entry} entry to fail within {PAUSED_BOUND} s, took {seconds:.2f} s"
    assert after_resume == [None, None], f"expected both entries to succeed once Redis continued, got {after_resume}"


async def _flush_scripts_until(stop: asyncio.Event, client: redis.asyncio.Redis, interval: float) -> int:
    """Run SCRIPT FLUSH every ``interval`` seconds until ``stop`` is set, and return how many ran.

    The loop stops at a flag rather than by cancellation, because a redis-py 8.2.0 command
    cancelled in flight here sometimes did not end before the test's timeout of 60 s.
    """
    flushes = 0
    while not stop.is_set():
        await client.script_flush()
        flushes += 1
        await asyncio.sleep(interval)
    return flushes


async def _eval_calls(client: redis.asyncio.Redis) -> int:
    """Return how often the server ran EVAL, which the limiters send after a NOSCRIPT reply."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_eval", {}).get("calls", 0))


def test_script_flush_semaphore_unchanged(
    private_redis: PrivateRedis, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")
    url = private_redis.url
    capacity, tasks, rounds = 3, 30, 3

    async def scenario() -> dict[str, object]:
        semaphore = Semaphore(name, capacity, redis_url=url)
        inside = 0
        max_inside = 0

        async def enter_repeatedly() -> None:
            nonlocal inside, max_inside
            for _ in range(rounds):
                async with semaphore:
                    inside += 1
                    max_inside = max(max_inside, inside)
                    await asyncio.sleep(random.uniform(0.005, 0.02))
                    inside -= 1

        async with redis.asyncio.from_url(url) as client:
            stop = asyncio.Event()
            flusher = asyncio.create_task(_flush_scripts_until(stop, client, 0.01))
            try:
                outcomes = await asyncio.gather(*(enter_repeatedly() for _ in range(tasks)), return_exceptions=True)
            finally:
                stop.set()
            flushes = await flusher

            async def released() -> bool:  # the last exits' releases reach Redis in the background
                return await client.zcard(semaphore_key(name, "holders")) == 0

            await wait_until_async(released, 3)
            return {
                "failures": [outcome for outcome in outcomes if outcome is not None],
                "max_inside": max_inside,
                "flushes": flushes,
                "evals": await _eval_calls(client),
                "holders": await client.zcard(semaphore_key(name, "holders")),
                "waiters": await client.zcard(semaphore_key(name, "waiters")),
            }

    outcome = run(scenario(), timeout=60)

    assert outcome["failures"] == [], f"expected no entry to fail, got {outcome['failures']}"
    assert outcome["evals"] >= 2, f"expected the scripts to be loaded again after flushes, EVAL ran {outcome['evals']} times in {outcome['flushes']} flushes"  # type: ignore[operator]
    assert outcome["max_inside"] <= capacity, f"expected at most {capacity} holders at once, saw {outcome['max_inside']}"
    assert outcome["max_inside"] == capacity, f"expected the capacity {capacity} to be reached, max was {outcome['max_inside']}"
    assert outcome["holders"] == 0, f"expected every slot released, Redis has {outcome['holders']} holders"
    assert outcome["waiters"] == 0, f"expected nobody queued, Redis has {outcome['waiters']} waiters"
    assert not _lease_lost_warnings(caplog), f"expected no warning, got {_lease_lost_warnings(caplog)}"


def test_script_flush_token_bucket_unchanged(private_redis: PrivateRedis, name: str) -> None:
    url = private_redis.url
    capacity, period, workers, rounds = 5, 0.05, 5, 5
    entries = workers * rounds

    async def scenario() -> dict[str, object]:
        bucket = TokenBucket(name, capacity, period, 1, redis_url=url)
        entered_at: list[float] = []

        async def enter_repeatedly() -> None:
            for _ in range(rounds):
                async with bucket:
                    entered_at.append(time.monotonic())

        async with redis.asyncio.from_url(url) as client:
            stop = asyncio.Event()
            flusher = asyncio.create_task(_flush_scripts_until(stop, client, 0.005))
            started = time.monotonic()
            try:
                outcomes = await asyncio.gather(*(enter_repeatedly() for _ in range(workers)), return_exceptions=True)
            finally:
                stop.set()
            flushes = await flusher
            return {
                "failures": [outcome for outcome in outcomes if outcome is not None],
                "offsets": sorted(at - started for at in entered_at),
                "flushes": flushes,
                "evals": await _eval_calls(client),
            }

    outcome = run(scenario(), timeout=60)
    offsets: list[float] = outcome["offsets"]  # type: ignore[assignment]

    assert outcome["failures"] == [], f"expected no entry to fail, got {outcome['failures']}"
    assert len(offsets) == entries, f"expected {entries} entries, got {len(offsets)}"
    assert outcome["evals"] >= 2, f"expected the script to be loaded again after flushes, EVAL ran {outcome['evals']} times in {outcome['flushes']} flushes"  # type: ignore[operator]
    # The k-th entry (from 0) needs k + 1 - capacity refills after the bucket's first use, which
    # came after `started`. 5 ms covers rounding to whole µs and the two clocks.
    early = [
        (k, round(offset, 4), round((k + 1 - capacity) * period, 4))
        for k, offset in enumerate(offsets)
        if offset < (k + 1 - capacity) * period - 0.005
    ]
    assert not early, f"expected no entry before its refill, got (entry, seconds, earliest allowed): {early}"
    last_due = (entries - capacity) * period
    assert offsets[-1] < last_due + 3.0, f"expected the last entry within 3 s of its refill at {last_due:.2f} s, it came at {offsets[-1]:.2f} s"


def test_client_kill_waiters_keep_slots(private_redis: PrivateRedis, name: str) -> None:
    # A killed release may log a false lease-lost warning (test_killed_release_no_lease_warning),
    # so warnings are not checked here.
    url = private_redis.url
    capacity, waiter_count = 2, 6

    async def scenario() -> dict[str, object]:
        # Different pool sizes make two participants with their own owner ids and clients in
        # this process, so the holders' releases reach the waiters through the wake-up list and
        # its BLPOP connection, as releases of another process do. The default expiry of 30 s
        # keeps a lost slot lost for the whole test.
        waiting = Semaphore(name, capacity, redis_url=url)
        holding = Semaphore(name, capacity, redis_url=url, connection_pool_size=14)
        inside = 0
        max_inside = 0
        outcomes: list[str | Exception] = []
        releases = [asyncio.Event() for _ in range(capacity)]

        async def hold(release: asyncio.Event) -> None:
            nonlocal inside, max_inside
            async with holding:
                inside += 1
                max_inside = max(max_inside, inside)
                await release.wait()
                inside -= 1

        async def wait_then_hold() -> None:
            nonlocal inside, max_inside
            try:
                async with waiting:
                    inside += 1
                    max_inside = max(max_inside, inside)
                    await asyncio.sleep(0.1)
                    inside -= 1
            except Exception as exc:
                outcomes.append(exc)
                return
            outcomes.append("entered")

        async with redis.asyncio.from_url(url, decode_responses=True) as client:

            async def kill_connections() -> int:
                return int(await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))

            holders = [asyncio.create_task(hold(release)) for release in releases]

            async def all_holding() -> bool:
                return inside == capacity

            assert await wait_until_async(all_holding, 10), f"expected {capacity} holders within 10 s, got {inside}"
            waiters = [asyncio.create_task(wait_then_hold()) for _ in range(waiter_count)]
            await _wait_for_queue(url, name, waiter_count)
            commands_before = sorted(entry["cmd"] for entry in await client.client_list())

            killed = [await kill_connections()]
            for _ in range(4):  # 0.8 s of kills while everybody waits
                await asyncio.sleep(0.2)
                killed.append(await kill_connections())
            for release in releases:
                release.set()
                killed.append(await kill_connections())
            for _ in range(10):  # kills while the waiters take turns
                await asyncio.sleep(0.05)
                killed.append(await kill_connections())
            await asyncio.wait_for(asyncio.gather(*holders, *waiters), 30)

            async def all_released() -> bool:
                return await client.zcard(semaphore_key(name, "holders")) == 0

            released = await wait_until_async(all_released, 5)
            entered, timed_out = await entries_at_once(name, capacity, url, capacity + 1)
        return {
            "commands_before": commands_before,
            "killed": killed,
            "outcomes": outcomes,
            "max_inside": max_inside,
            "released": released,
            "entered": entered,
            "timed_out": timed_out,
        }

    outcome = run(scenario(), timeout=60)
    outcomes: list[str | Exception] = outcome["outcomes"]  # type: ignore[assignment]

    assert "blpop" in outcome["commands_before"], f"expected a waiter's BLPOP connection before the kills, clients ran {outcome['commands_before']}"  # type: ignore[operator]
    assert outcome["killed"][0] >= 2, f"expected the first CLIENT KILL to close the limiters' connections, it closed {outcome['killed'][0]}"  # type: ignore[index]
    unexpected = [o for o in outcomes if o != "entered" and not isinstance(o, RedisError)]
    assert not unexpected, f"expected each waiter to enter or raise RedisError, got {unexpected}"
    assert len(outcomes) == waiter_count, f"expected {waiter_count} waiters to finish, {len(outcomes)} did"
    assert outcome["max_inside"] <= capacity, f"expected at most {capacity} holders at once, saw {outcome['max_inside']}"
    assert outcome["released"], "expected every slot back in Redis within 5 s of the last exit"
    assert outcome["entered"] == capacity, f"expected exactly {capacity} entries at once afterwards, got {outcome['entered']}"
    assert outcome["timed_out"] == 1, f"expected 1 entry over capacity to time out afterwards, got {outcome['timed_out']}"


async def _kill_clients_until(stop: asyncio.Event, client: redis.asyncio.Redis) -> int:
    """Run CLIENT KILL on every other normal client each millisecond until ``stop`` is set.

    Returns how many connections were killed.
    """
    killed = 0
    while not stop.is_set():
        killed += int(await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
        await asyncio.sleep(0.001)
    return killed


async def _enter_under_kills(url: str, limiter: Semaphore | TokenBucket, seconds: float) -> tuple[int, list[Exception], int]:
    """Enter and leave ``limiter`` one entry after another for ``seconds`` while connections are killed.

    Returns (entries that succeeded, RedisErrors raised, connections killed).
    """
    entries = 0
    errors: list[Exception] = []
    stop = asyncio.Event()
    async with redis.asyncio.from_url(url) as client:
        killer = asyncio.create_task(_kill_clients_until(stop, client))
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                try:
                    async with limiter:
                        entries += 1
                except RedisError as exc:
                    errors.append(exc)
        finally:
            stop.set()
        killed = await killer
    return entries, errors, killed


# NOTE: this test fails on the current core. go-redis retries a script after a connection drop
# even when Redis has run it, so the release script runs twice, and the second run, finding no
# lease, reports it lost.
def test_killed_release_no_lease_warning(
    private_redis: PrivateRedis, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")
    seconds = 3.0
    # The default expiry of 30 s cannot pass during the run, so no lease can really be lost. A
    # release whose every try is killed is logged as failed and leaves its slot held until expiry,
    # so the capacity leaves room for such slots.
    semaphore = Semaphore(name, 100, redis_url=private_redis.url)

    entries, errors, killed = run(_enter_under_kills(private_redis.url, semaphore, seconds))
    warnings = _lease_lost_warnings(caplog)

    assert killed > 0, "expected CLIENT KILL to close the limiter's connections"
    assert entries >= 20, f"expected at least 20 entries in {seconds} s, got {entries} and {len(errors)} RedisErrors"
    assert not warnings, f"expected no lease-lost warning with expiry=30s, got {len(warnings)} in {entries} entries: {warnings[0]!r}"


def test_killed_reserve_token_per_entry(private_redis: PrivateRedis, name: str) -> None:
    capacity = 100_000
    # One token every 1000 s: no refill during the run, so the tokens taken are capacity - tokens.
    bucket = TokenBucket(name, capacity, 1000.0, 1, redis_url=private_redis.url)

    entries, errors, killed = run(_enter_under_kills(private_redis.url, bucket, 3.0))
    client = private_redis.client()
    try:
        tokens_taken = capacity - int(client.hget(bucket_key(name), "tokens") or capacity)
    finally:
        client.close()

    assert killed > 0, "expected CLIENT KILL to close the limiter's connections"
    # go-redis sends a script again after a dropped connection even when Redis ran it, so an
    # entry may take two tokens: the rate can dip, but no entry ever goes through without one.
    assert tokens_taken >= entries, f"expected at least 1 token per entry ({entries} entries), {tokens_taken} tokens were taken"


def test_stopped_holder_loses_lease(
    tmp_path: Path, name: str, redis_url: str, observer: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")
    expiry = 1.0
    child = start_holder_child(redis_url, name, expiry, cwd=tmp_path)
    try:
        line = read_first_line(child, 30)
        assert line.strip() == "holding", f"expected the child to report 'holding', got {line!r}"

        async def scenario() -> dict[str, object]:
            semaphore = Semaphore(name, 1, expiry=expiry, redis_url=redis_url)
            entered = asyncio.Event()
            release = asyncio.Event()

            async def hold() -> None:
                async with semaphore:
                    entered.set()
                    await release.wait()

            holder = asyncio.create_task(hold())
            await asyncio.sleep(2 * expiry)  # several renewals of the child's lease
            entered_while_child_ran = entered.is_set()

            os.kill(child.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            await wait_for_event(entered, holder, timeout=expiry + 10)
            took_over_after = time.monotonic() - stopped_at

            os.kill(child.pid, signal.SIGCONT)
            assert child.stdin is not None
            child.stdin.write("release\n")
            child.stdin.flush()
            report = await asyncio.to_thread(read_first_line, child, 30)
            child_status = await asyncio.to_thread(child.wait, 10)

            holders_after_child = observer.zcard(semaphore_key(name, "holders"))
            extra_error, _ = await _entry_outcome(Semaphore(name, 1, expiry=expiry, max_sleep=0.3, redis_url=redis_url))
            release.set()
            await holder
            return {
                "entered_while_child_ran": entered_while_child_ran,
                "took_over_after": took_over_after,
                "report": report,
                "child_status": child_status,
                "holders_after_child": holders_after_child,
                "extra_error": extra_error,
            }

        outcome = run(scenario(), timeout=60)
    finally:
        stop_child(child)  # SIGKILL ends a stopped child too

    assert not outcome["entered_while_child_ran"], "expected the waiter to wait while the child held and renewed the only slot"
    assert outcome["took_over_after"] < expiry + 3, f"expected the waiter in within {expiry + 3} s of SIGSTOP, took {outcome['took_over_after']:.2f} s"
    assert outcome["report"], "expected the child's report on stdout within 30 s of SIGCONT"
    report = json.loads(outcome["report"])  # type: ignore[arg-type]
    assert report["error"] is None, f"expected the child's block to leave without error, got {report['error']!r}"
    assert len(report["warnings"]) == 1, f"expected 1 warning in the child, got {report['warnings']}"
    assert "expired" in report["warnings"][0], f"expected the child's warning to say the lease expired, got {report['warnings'][0]!r}"
    assert f"__self-limiters:{name}" in report["warnings"][0], f"expected the semaphore's name in the warning, got {report['warnings'][0]!r}"
    assert outcome["child_status"] == 0, f"expected the child to exit with 0, got {outcome['child_status']}"
    assert outcome["holders_after_child"] == 1, f"expected the new holder's slot kept after the child's exit, Redis has {outcome['holders_after_child']} holders"
    extra_error = outcome["extra_error"]
    assert isinstance(extra_error, MaxSleepExceededError), f"expected a second entry to wait while the new holder holds, got {extra_error!r}"
    assert not _lease_lost_warnings(caplog), f"expected no warning for the new holder, got {_lease_lost_warnings(caplog)}"


@pytest.mark.parametrize("loss", ["flushall", "restart"])
def test_data_loss_holders_warn(
    loss: str, private_redis: PrivateRedis, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")
    url = private_redis.url
    capacity, expiry = 2, 1.5

    async def scenario() -> dict[str, object]:
        semaphore = Semaphore(name, capacity, expiry=expiry, redis_url=url)
        entered: list[int] = []
        release = asyncio.Event()
        holders = [asyncio.create_task(_hold_until(semaphore, entered, release)) for _ in range(capacity)]

        async def all_entered() -> bool:
            return len(entered) == capacity

        assert await wait_until_async(all_entered, 10), f"expected {capacity} holders within 10 s, got {len(entered)}"
        waiter = asyncio.create_task(_entry_outcome(semaphore))
        await _wait_for_queue(url, name, 1)

        if loss == "flushall":
            client = private_redis.client()
            try:
                client.flushall()
            finally:
                client.close()
        else:
            private_redis.stop()
            private_redis.start()
        lost_at = time.monotonic()
        waiter_error, waiter_end = await asyncio.wait_for(waiter, expiry + 10)

        release.set()
        holder_exits = await asyncio.gather(*holders)
        entered_at_once, timed_out = await entries_at_once(name, capacity, url, capacity + 1)
        return {
            "waiter_error": waiter_error,
            "waiter_after": waiter_end - lost_at,
            "exit_errors": [error for error, _ in holder_exits],
            "entered": entered_at_once,
            "timed_out": timed_out,
        }

    outcome = run(scenario(), timeout=60)
    warnings = _lease_lost_warnings(caplog)

    waiter_error = outcome["waiter_error"]
    if loss == "flushall":
        assert waiter_error is None, f"expected the queued waiter to enter after FLUSHALL, got {waiter_error!r}"
    else:
        # A check-in during the restart fails the waiter with RedisError. Otherwise the waiter
        # finds its place in the queue lost and queues again.
        assert waiter_error is None or isinstance(waiter_error, RedisError), f"expected the queued waiter to enter or raise RedisError, got {waiter_error!r}"
    assert outcome["waiter_after"] < expiry + 3, f"expected the waiter done within {expiry + 3} s of the loss, took {outcome['waiter_after']:.2f} s"
    assert outcome["exit_errors"] == [None] * capacity, f"expected the holders to leave without error, got {outcome['exit_errors']}"
    assert len(warnings) == capacity, f"expected 1 lease-lost warning per holder ({capacity}), got {warnings}"
    for message in warnings:
        assert "expired" in message, f"expected the warning to say the lease expired, got {message!r}"
    assert outcome["entered"] == capacity, f"expected exactly {capacity} entries at once afterwards, got {outcome['entered']}"
    assert outcome["timed_out"] == 1, f"expected 1 entry over capacity to time out afterwards, got {outcome['timed_out']}"
