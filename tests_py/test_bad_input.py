"""Unusual names, numbers and URLs: each either works or raises an error that names the culprit."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import redis
from redis.crc import key_slot

from self_limiters import MaxSleepExceededError, RedisError, Semaphore, TokenBucket
from support import closed_port, run

UNUSUAL_NAMES = {
    "empty": "",
    "long": "n" * 10_000,
    "unicode": "débit-限流-🚦",
    "spaces": "a name with spaces",
    "newlines": "line one\nline two\r\n",
    "open brace": "{",
    "close brace": "}",
    "braces": "a}b{c",
    "hash tag": "{user1000}.following",
}


@pytest.mark.parametrize("label", UNUSUAL_NAMES)
def test_semaphore_unusual_name(label: str, redis_url: str, observer: redis.Redis) -> None:
    # A suffix keeps runs apart; it goes at the start so that braces in the name keep their place.
    name = f"{time.monotonic_ns()}-{UNUSUAL_NAMES[label]}"
    semaphore = Semaphore(name, 1, max_sleep=0.2, redis_url=redis_url)
    seen_keys: list[bytes] = []

    async def main() -> None:
        async with semaphore:
            with pytest.raises(MaxSleepExceededError):
                async with semaphore:
                    pass
            # Holders, the ticket counter and the waiting owner's alive key exist now.
            seen_keys.extend(observer.keys(b"__self-limiters:{sem:" + name.encode()[:40] + b"*"))

    run(main())

    assert semaphore.name == "__self-limiters:" + name, f"expected the prefixed name, got {semaphore.name!r}"
    assert len(seen_keys) >= 3, f"expected at least 3 keys of the semaphore in Redis, got {seen_keys}"
    slots = {key_slot(key.encode() if isinstance(key, str) else key) for key in seen_keys}
    assert len(slots) == 1, f"expected every key of the semaphore in one cluster slot, got slots {slots} for {seen_keys}"


@pytest.mark.parametrize("label", UNUSUAL_NAMES)
def test_token_bucket_unusual_name(label: str, redis_url: str) -> None:
    name = f"{time.monotonic_ns()}-{UNUSUAL_NAMES[label]}"
    bucket = TokenBucket(name, 1, 60.0, 1, redis_url=redis_url, max_sleep=1)

    async def main() -> None:
        async with bucket:
            pass
        with pytest.raises(MaxSleepExceededError):
            async with bucket:
                pass

    run(main())


def test_semaphore_capacity_two_pow_31(name: str, redis_url: str) -> None:
    semaphore = Semaphore(name, 2**31, redis_url=redis_url)

    async def main() -> None:
        async def enter() -> None:
            async with semaphore:
                await asyncio.sleep(0.01)

        await asyncio.gather(*(enter() for _ in range(50)))

    run(main())
    assert semaphore.capacity == 2**31, f"expected capacity 2**31, got {semaphore.capacity}"


@pytest.mark.parametrize(
    "arguments, error, words",
    [
        ({"capacity": 0}, ValueError, ("capacity", "0")),
        ({"capacity": -1}, ValueError, ("capacity", "-1")),
        ({"capacity": 2**53 + 1}, ValueError, ("capacity", str(2**53 + 1))),
        ({"capacity": True}, TypeError, ("capacity", "bool")),
        ({"capacity": 1.5}, TypeError, ("capacity", "float")),
        ({"max_sleep": math.nan}, ValueError, ("max_sleep", "nan")),
        ({"max_sleep": -1e-9}, ValueError, ("max_sleep", "-1e-09")),
        ({"expiry": math.nan}, ValueError, ("expiry", "nan")),
        ({"expiry": math.inf}, ValueError, ("expiry", "inf")),
        ({"expiry": -0.0}, ValueError, ("expiry", "-0.0")),
        ({"expiry": 1e-9}, ValueError, ("expiry", "1e-09")),
        ({"expiry": 1e300}, ValueError, ("expiry", "1e+300")),
    ],
)
def test_semaphore_bad_number(arguments: dict[str, object], error: type[Exception], words: tuple[str, str]) -> None:
    with pytest.raises(error) as caught:
        Semaphore("bad-number", **{"capacity": 1, **arguments})
    for word in words:
        assert word in str(caught.value), f"expected {word!r} in the message, got {str(caught.value)!r}"


@pytest.mark.parametrize(
    "arguments, error, words",
    [
        ({"refill_frequency": math.nan}, ValueError, ("refill_frequency", "nan")),
        ({"refill_frequency": math.inf}, ValueError, ("refill_frequency", "inf")),
        ({"refill_frequency": -0.0}, ValueError, ("refill_frequency", "-0.0")),
        ({"refill_frequency": 1e-9}, ValueError, ("refill_frequency", "1e-09")),
        ({"refill_frequency": 1e300}, ValueError, ("refill_frequency", "1e+300")),
        ({"refill_amount": 0}, ValueError, ("refill_amount", "0")),
        ({"refill_amount": True}, TypeError, ("refill_amount", "bool")),
        ({"refill_amount": 1.5}, TypeError, ("refill_amount", "float")),
    ],
)
def test_token_bucket_bad_number(arguments: dict[str, object], error: type[Exception], words: tuple[str, str]) -> None:
    with pytest.raises(error) as caught:
        TokenBucket("bad-number", **{"capacity": 1, "refill_frequency": 1.0, "refill_amount": 1, **arguments})
    for word in words:
        assert word in str(caught.value), f"expected {word!r} in the message, got {str(caught.value)!r}"


@pytest.mark.parametrize("max_sleep", [math.inf, -0.0, 1e300])
def test_max_sleep_without_limit_waits(max_sleep: float, name: str, redis_url: str) -> None:
    semaphore = Semaphore(name, 1, max_sleep=max_sleep, redis_url=redis_url)
    assert semaphore.max_sleep >= 0, f"expected a non-negative max_sleep, got {semaphore.max_sleep}"

    async def main() -> None:
        async def hold() -> None:
            async with semaphore:
                await asyncio.sleep(0.3)

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0.05)
        async with semaphore:  # waits for the holder instead of failing
            pass
        await holder

    run(main())


def test_tiny_max_sleep_semaphore_busy(name: str, redis_url: str) -> None:
    semaphore = Semaphore(name, 1, max_sleep=1e-9, redis_url=redis_url)

    async def main() -> None:
        async with semaphore:  # a free slot is granted whatever max_sleep is
            with pytest.raises(MaxSleepExceededError):
                async with semaphore:
                    pass

    run(main())


def test_tiny_max_sleep_token_bucket(name: str, redis_url: str) -> None:
    bucket = TokenBucket(name, 1, 60.0, 1, redis_url=redis_url, max_sleep=1e-9)

    async def main() -> None:
        async with bucket:  # the full bucket's token needs no wait
            pass
        with pytest.raises(MaxSleepExceededError):
            async with bucket:
                pass

    run(main())


@pytest.mark.parametrize(
    "url, part",
    [
        ("mongodb://user:hunter2secret@127.0.0.1:6379", "scheme"),
        ("redis://user:hunter2secret@127.0.0.1:65536", "port"),
        ("redis://user:hunter2secret@127.0.0.1:http", "port"),
        ("redis://user:hunter2secret@:6379/0", "host"),
        ("rediss://user:hunter2secret@/0", "host"),
        ("redis://127.0.0.1:6379/0?password=hunter2secret", "password"),
        ("redis://user:hunter2secret@127.0.0.1:6379/x", "database"),
        ("redis://user:hunter2secret@127.0.0.1:6379/0/1", "path"),
        ("redis://user:hunter2secret@127.0.0.1:6379/0?bogus=1", "bogus"),
        ("redis://user:hunter2secret@127.0.0.1:6379/0?dial_timeout=abc", "dial_timeout"),
        ("redis://user:hunter2secret%zz@127.0.0.1:6379/0", "'%'"),
        ("redis://user:hunter2secret@127.0.0.1:6379/0?pool_size=3", "connection_pool_size"),
        ("redis://user:hunter2secret@127.0.0.1:0", "port"),
        ("redis://user:hunter2secret@[::1:6379", "brackets"),
        ("redis+cluster://user:hunter2secret@127.0.0.1:7000?addr=127.0.0.1:70000", "addr"),
        ("redis+cluster://user:hunter2secret@127.0.0.1:7000?addr=127.0.0.1:0", "addr"),
        ("redis+cluster://user:hunter2secret@127.0.0.1:7000?addr=u2:hunter2secret@127.0.0.1:7001", "addr"),
        ("redis+cluster://127.0.0.1:7000?addr=u2:hunter2secret@127.0.0.1:7001", "addr"),
    ],
)
def test_bad_url_names_part(url: str, part: str) -> None:
    with pytest.raises(RedisError) as caught:
        Semaphore("bad-url", 1, redis_url=url)
    message = str(caught.value)
    assert part in message, f"expected the message to name the {part}, got {message!r}"
    assert "hunter2secret" not in message, f"expected the password masked, got {message!r}"


def test_bad_addr_message_shows_seed_node() -> None:
    """Hiding the password in an addr= option leaves the first seed node and the query readable."""
    url = "redis+cluster://user:hunter2secret@127.0.0.1:7000?addr=u2:hunter2secret@127.0.0.1:7001"
    with pytest.raises(RedisError) as caught:
        Semaphore("bad-url", 1, redis_url=url)
    message = str(caught.value)
    assert "redis+cluster://user:xxxxx@127.0.0.1:7000?addr=u2:xxxxx@127.0.0.1:7001" in message, (
        f"expected the URL with both passwords masked and its nodes intact, got {message!r}"
    )


def test_url_options_accepted(name: str, redis_url: str) -> None:
    url = f"{redis_url.rstrip('/')}?dial_timeout=2s&read_timeout=1.5s&write_timeout=2&max_retries=1&client_name=tests"
    semaphore = Semaphore(name, 1, redis_url=url)

    async def main() -> None:
        async with semaphore:
            pass

    run(main())


def test_missing_unix_socket_raises(tmp_path, name: str) -> None:
    socket_path = tmp_path / "missing.sock"
    semaphore = Semaphore(name, 1, redis_url=f"unix://user:hunter2secret@{socket_path}?db=0")

    async def main() -> None:
        async with semaphore:
            pass

    with pytest.raises(RedisError) as caught:
        run(main())
    message = str(caught.value)
    assert str(socket_path) in message, f"expected the message to name the socket path, got {message!r}"
    assert "hunter2secret" not in message, f"expected the password masked, got {message!r}"


def test_closed_port_with_password_masked(name: str) -> None:
    bucket = TokenBucket(name, 1, 1.0, 1, redis_url=f"redis://user:hunter2secret@127.0.0.1:{closed_port()}/0")

    async def main() -> None:
        async with bucket:
            pass

    with pytest.raises(RedisError) as caught:
        run(main())
    assert "hunter2secret" not in str(caught.value), f"expected the password masked, got {str(caught.value)!r}"
    assert "hunter2secret" not in repr(bucket), f"expected no password in repr, got {repr(bucket)!r}"
