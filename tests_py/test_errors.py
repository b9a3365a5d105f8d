"""Failures of Redis as the limiters report them: refused connections, error replies, passwords."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Iterator
from urllib.parse import urlsplit

import pytest
import redis

from self_limiters import MaxSleepExceededError, RedisError, Semaphore, TokenBucket
from support import bucket_key, closed_port, run, semaphore_key, wait_for_warning


async def _enter(limiter: Semaphore | TokenBucket) -> None:
    async with limiter:
        pass


@pytest.mark.parametrize("kind", ["semaphore", "token bucket"])
def test_closed_port_raises_redis_error(kind: str, name: str) -> None:
    port = closed_port()
    url = f"redis://127.0.0.1:{port}"
    limiter = Semaphore(name, 1, redis_url=url) if kind == "semaphore" else TokenBucket(name, 1, 1, 1, redis_url=url)

    started = time.monotonic()
    with pytest.raises(RedisError) as caught:
        run(_enter(limiter), timeout=30)
    elapsed = time.monotonic() - started

    assert elapsed < 5, f"expected RedisError within 5 s, got it after {elapsed:.2f} s"
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message, f"expected the address in the message, got {message!r}"
    assert "refused" in message, f"expected the cause 'connection refused' in the message, got {message!r}"


def test_semaphore_wrongtype_raises(name: str, redis_url: str, observer: redis.Redis) -> None:
    observer.set(semaphore_key(name, "holders"), "not a sorted set")

    with pytest.raises(RedisError) as caught:
        run(_enter(Semaphore(name, 1, redis_url=redis_url)))
    assert "WRONGTYPE" in str(caught.value), f"expected the WRONGTYPE reply in the message, got {str(caught.value)!r}"


def test_token_bucket_wrongtype_raises(name: str, redis_url: str, observer: redis.Redis) -> None:
    observer.set(bucket_key(name), "not a hash")

    with pytest.raises(RedisError) as caught:
        run(_enter(TokenBucket(name, 1, 1, 1, redis_url=redis_url)))
    assert "WRONGTYPE" in str(caught.value), f"expected the WRONGTYPE reply in the message, got {str(caught.value)!r}"


def test_semaphore_exit_wrongtype_warns(
    name: str, redis_url: str, observer: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # The exit does not wait for its release, so a failed release is logged, not raised.
    caplog.set_level(logging.WARNING, logger="self_limiters")

    async def scenario() -> list[str]:
        async with Semaphore(name, 1, redis_url=redis_url):
            observer.delete(semaphore_key(name, "holders"))
            observer.set(semaphore_key(name, "holders"), "not a sorted set")
        return await wait_for_warning(caplog, "WRONGTYPE")

    warnings = run(scenario())
    assert any("WRONGTYPE" in message for message in warnings), f"expected a warning with the WRONGTYPE reply, got {warnings}"
    assert any("failed" in message for message in warnings), f"expected the warning to say the release failed, got {warnings}"


@pytest.fixture
def password_user(redis_url: str, observer: redis.Redis) -> Iterator[tuple[str, str]]:
    """An ACL user with a password of its own, deleted at the end: (user, password)."""
    user = f"sl-test-{uuid.uuid4().hex[:8]}"
    password = f"pw{uuid.uuid4().hex}"
    observer.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], categories=["+@all"])
    try:
        yield user, password
    finally:
        observer.acl_deluser(user)


def _expire_leases(observer: redis.Redis, name: str) -> None:
    """Move every lease deadline of the semaphore into the past, as for a holder stopped too long."""
    key = semaphore_key(name, "holders")
    observer.zadd(key, {member: 1 for member in observer.zrange(key, 0, -1)})


def test_password_never_shown(
    name: str,
    redis_url: str,
    observer: redis.Redis,
    password_user: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="self_limiters")
    user, password = password_user
    address = urlsplit(redis_url).netloc.rsplit("@", 1)[-1]
    good_url = f"redis://{user}:{password}@{address}"
    wrong_password = f"wrong{uuid.uuid4().hex}"
    messages: list[str] = []

    semaphore = Semaphore(name, 1, redis_url=good_url)
    bucket = TokenBucket(name, 1, 10.0, 1, redis_url=good_url, max_sleep=0.5)
    messages += [repr(semaphore), repr(bucket)]

    async def scenario() -> None:
        async with semaphore:
            with pytest.raises(MaxSleepExceededError) as timed_out:
                await _enter(Semaphore(name, 1, max_sleep=0.1, redis_url=good_url))
            messages.append(str(timed_out.value))
            _expire_leases(observer, name)  # the exit then warns of a lost lease

        await _enter(bucket)
        with pytest.raises(MaxSleepExceededError) as no_token:
            await _enter(bucket)
        messages.append(str(no_token.value))

        observer.set(semaphore_key(f"{name}-wrongtype", "holders"), "not a sorted set")
        failing = [
            Semaphore(f"{name}-wrongtype", 1, redis_url=good_url),
            Semaphore(name, 1, redis_url=f"redis://{user}:{wrong_password}@{address}"),
            TokenBucket(name, 1, 1, 1, redis_url=f"redis://{user}:{wrong_password}@{address}"),
            Semaphore(name, 1, redis_url=f"redis://{user}:{password}@127.0.0.1:{closed_port()}"),
        ]
        for limiter in failing:
            with pytest.raises(RedisError) as caught:
                await _enter(limiter)
            messages.append(str(caught.value))

    with pytest.raises(RedisError) as malformed:
        Semaphore(name, 1, redis_url=f"redis://{user}:{password}@{address}/not-a-database")
    messages.append(str(malformed.value))

    run(scenario())
    captured = capfd.readouterr()
    records = [f"{record.getMessage()} {record.args!r}" for record in caplog.records]

    assert any("expired" in record for record in records), f"expected the lease-lost warning, got {records}"
    assert any("WRONGPASS" in text for text in messages), f"expected a WRONGPASS error, got {messages}"
    for text in messages + records + [captured.out, captured.err]:
        assert password not in text, f"password shown in {text!r}"
        assert wrong_password not in text, f"wrong password shown in {text!r}"
