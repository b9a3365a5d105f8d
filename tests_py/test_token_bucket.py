"""Token bucket behaviour on a real Redis: rate, refills, waiting limits, idle keys."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio
import pytest

from self_limiters import MaxSleepExceededError, TokenBucket
from support import bucket_key, entry_offsets, run, wait_until


def test_token_bucket_max_sleep_raises_at_once(name: str, redis_url: str) -> None:
    async def scenario() -> tuple[float, str | None, float]:
        impatient = TokenBucket(name, 1, 0.6, 1, redis_url=redis_url, max_sleep=0.3)
        patient = TokenBucket(name, 1, 0.6, 1, redis_url=redis_url)
        async with impatient:  # takes the only token
            pass

        started = time.monotonic()
        with pytest.raises(MaxSleepExceededError):
            async with impatient:
                pass
        raised_after = time.monotonic() - started

        async with redis.asyncio.from_url(redis_url, decode_responses=True) as client:
            tokens = await client.hget(bucket_key(name), "tokens")

        started = time.monotonic()
        async with patient:
            pass
        return raised_after, tokens, time.monotonic() - started

    raised_after, tokens, patient_wait = run(scenario())
    assert raised_after < 0.2, f"expected MaxSleepExceededError at once, got it after {raised_after:.3f} s"
    assert tokens == "0", f"expected the refused entry to take no token (tokens 0), Redis had {tokens!r}"
    assert patient_wait < 0.9, (
        f"expected the next entry to wait for the first refill (at most 0.6 s), it waited {patient_wait:.3f} s"
    )


def test_token_bucket_fractional_max_sleep_admits(name: str, redis_url: str) -> None:
    async def scenario() -> float:
        bucket = TokenBucket(name, 1, 0.2, 1, redis_url=redis_url, max_sleep=0.5)
        async with bucket:
            pass
        started = time.monotonic()
        async with bucket:
            pass
        return time.monotonic() - started

    waited = run(scenario())
    assert waited >= 0.15, f"expected a wait of about 0.2 s for the refill, waited {waited:.3f} s"
    assert waited < 0.5, f"expected a wait of about 0.2 s for the refill, waited {waited:.3f} s"


def test_token_bucket_limits_rate(name: str, redis_url: str) -> None:
    offsets = run(entry_offsets(TokenBucket(name, 2, 0.1, 1, redis_url=redis_url), 7))

    assert offsets[1] < 0.08, f"expected the 2 tokens of the full bucket at once, offsets {offsets}"
    assert offsets[2] >= 0.07, f"expected the 3rd entry to wait for a refill of 0.1 s, offsets {offsets}"
    assert offsets[6] >= 0.45, f"expected the 7th entry after 5 refills (0.5 s), offsets {offsets}"
    assert offsets[6] < 1.5, f"expected the 7th entry soon after 0.5 s, offsets {offsets}"


def test_token_bucket_refill_amount(name: str, redis_url: str) -> None:
    offsets = run(entry_offsets(TokenBucket(name, 4, 0.3, 2, redis_url=redis_url), 8))

    assert offsets[3] < 0.15, f"expected 4 entries at once from the full bucket, offsets {offsets}"
    assert offsets[4] >= 0.25, f"expected the 5th entry at the first refill (0.3 s), offsets {offsets}"
    assert offsets[5] < 0.5, f"expected the 6th entry at the first refill (0.3 s), offsets {offsets}"
    assert offsets[6] >= 0.55, f"expected the 7th entry at the second refill (0.6 s), offsets {offsets}"


def test_token_bucket_wait_ignores_busy_loop(name: str, redis_url: str) -> None:
    """The wait ends at the moment Redis scheduled, however long the loop was busy meanwhile.

    The second entry's token exists 0.5 s after the first entry. The loop is blocked for 0.4 s
    while that entry's outcome comes back, and the entry must then sleep only what is left.
    """

    async def scenario() -> float:
        bucket = TokenBucket(name, 1, 0.5, 1, redis_url=redis_url)
        async with bucket:
            first_entry = time.monotonic()

        async def enter() -> float:
            async with bucket:
                return time.monotonic()

        second = asyncio.create_task(enter())
        await asyncio.sleep(0)  # the second entry sends its request
        time.sleep(0.4)  # the loop is busy; the outcome arrives meanwhile
        return await second - first_entry

    entered_after = run(scenario())
    assert entered_after >= 0.45, f"expected the second entry about 0.5 s after the first, it came after {entered_after:.3f} s"
    assert entered_after < 0.75, (
        f"expected the second entry about 0.5 s after the first, not after the 0.4 s that the loop was busy "
        f"plus a full wait; it came after {entered_after:.3f} s"
    )


def test_token_bucket_cancelled_sleep_keeps_token(name: str, redis_url: str) -> None:
    async def scenario() -> float:
        bucket = TokenBucket(name, 1, 0.4, 1, redis_url=redis_url)
        async with bucket:
            pass

        async def enter() -> None:
            async with bucket:
                pass

        sleeper = asyncio.create_task(enter())
        await asyncio.sleep(0.1)
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper

        started = time.monotonic()
        async with bucket:
            pass
        return time.monotonic() - started

    waited = run(scenario())
    # The cancelled entry keeps the token of the first refill (0.4 s), so this one gets the second
    # (0.8 s), about 0.7 s after the cancellation.
    assert waited >= 0.55, f"expected the cancelled entry's token to stay taken, next entry waited {waited:.3f} s"


def test_token_bucket_idle_key_expires(name: str, redis_url: str, observer: redis.Redis) -> None:
    async def scenario() -> bool:
        bucket = TokenBucket(name, 2, 0.2, 1, redis_url=redis_url)
        async with bucket:
            pass
        return bool(observer.exists(bucket_key(name)))

    assert run(scenario()), "expected the bucket's key to exist right after a token was taken"
    assert wait_until(lambda: not observer.exists(bucket_key(name)), 3), (
        "expected the key of a bucket that refilled to full to vanish within 3 s"
    )


def test_token_bucket_reused_across_event_loops(name: str, redis_url: str) -> None:
    bucket = TokenBucket(name, 5, 1.0, 5, redis_url=redis_url)

    async def enter() -> bool:
        async with bucket:
            return True

    entries = [run(enter()) for _ in range(3)]
    assert entries == [True, True, True], f"expected an entry in each of 3 event loops, got {entries}"
