"""Both limiters through a redis+sentinel:// URL: behaviour, a failover during a run, bad URLs.

Every test runs on a private Sentinel deployment of sentinel_support.py: a master, one replica and
three sentinels on loopback. The failover test kills its master, so it has a deployment of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import redis

from fault_support import start_holder_child
from self_limiters import MaxSleepExceededError, RedisError, Semaphore, TokenBucket
from sentinel_support import DOWN_AFTER, FAILOVER_TIMEOUT, MASTER_NAME, SentinelDeployment
from support import LIMITER_COMMANDS, LIMITER_KEYS, admission_order, closed_port, entries_at_once, entry_offsets, read_first_line, run, semaphore_key, stop_child, wait_for_event, wait_until, wait_until_async

# Client timeouts of pybridge/limiters.go. A call to a closed port fails after go-redis's retries,
# which the README measured at 1.7 s on Redis 7.0. The dial timeout bounds it, with room for load.
DIAL_TIMEOUT = 5.0
REFUSED_BOUND = DIAL_TIMEOUT
# A queued semaphore waiter fails in two steps: its wake-up read (BLPOP) fails, which triggers a
# check-in, and that check-in fails after its own retries.
WAITER_BOUND = 2 * REFUSED_BOUND
# After as many failed dials as its pool size, a go-redis pool fails at once until a probe, made
# every second, connects again (go-redis v9.23, internal/pool/pool.go). So once the sentinels name
# the new master, entries may still fail for one more refused call (1.7 s) and that second.
RECOVERY_BOUND = REFUSED_BOUND


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelDeployment]:
    """A Sentinel deployment shared by the tests of this module that leave its master alone."""
    nodes = SentinelDeployment(tmp_path_factory.mktemp("sentinel"))
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def master(deployment: SentinelDeployment) -> Iterator[redis.Redis]:
    """A redis-py client of the master, which watches the limiters' keys from outside."""
    client = deployment.data_client(deployment.master_port)
    try:
        yield client
    finally:
        client.close()


async def _enter(limiter: Semaphore | TokenBucket) -> None:
    async with limiter:
        pass


def test_semaphore_capacity(deployment: SentinelDeployment, master: redis.Redis, name: str) -> None:
    capacity, attempts = 3, 5
    url = deployment.url()

    async def scenario() -> tuple[int, int, int]:
        holders_on_master = 0

        async def count_holders() -> None:
            nonlocal holders_on_master
            holders_on_master = await asyncio.to_thread(master.zcard, semaphore_key(name, "holders"))

        entered, timed_out = await entries_at_once(name, capacity, url, attempts, while_held=count_holders)
        return entered, timed_out, holders_on_master

    entered, timed_out, holders_on_master = run(scenario())

    assert entered == capacity, f"expected {capacity} of {attempts} entries at once, got {entered}"
    assert timed_out == attempts - capacity, f"expected {attempts - capacity} entries to time out, got {timed_out}"
    assert holders_on_master == capacity, f"expected {capacity} leases on the master, it has {holders_on_master}"


def test_semaphore_fifo(deployment: SentinelDeployment, master: redis.Redis, name: str) -> None:
    url = deployment.url()
    waiters_key = semaphore_key(name, "waiters")

    async def queue_length() -> int:
        return await asyncio.to_thread(master.zcard, waiters_key)

    order = run(admission_order([Semaphore(name, 1, redis_url=url)], 6, queue_length, "on the master: "))
    assert order == list(range(6)), f"expected admission in arrival order {list(range(6))}, got {order}"


def test_waiter_woken_across_processes(
    deployment: SentinelDeployment, master: redis.Redis, name: str, tmp_path: Path
) -> None:
    # With expiry=30 the waiter checks in every 10 s, so an entry within wake_bound of the release
    # came from the holder's wake-up through Redis, not from a check-in.
    expiry, wake_bound = 30.0, 2.0
    url = deployment.url()
    holder = start_holder_child(url, name, expiry, cwd=tmp_path)
    waiter = None
    try:
        line = read_first_line(holder, 30)
        assert line.strip() == "holding", f"expected the holder process to report 'holding', got {line!r}"
        waiter = start_holder_child(url, name, expiry, cwd=tmp_path)
        queued = wait_until(lambda: master.zcard(semaphore_key(name, "waiters")) == 1, 30)
        assert queued, "expected the waiter process in the queue on the master within 30 s"

        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        released_at = time.monotonic()
        line = read_first_line(waiter, 10)
        woken_after = time.monotonic() - released_at
        holder_output, holder_errors = holder.communicate(timeout=20)

        assert waiter.stdin is not None
        waiter.stdin.write("\n")
        waiter.stdin.flush()
        waiter_output, waiter_errors = waiter.communicate(timeout=20)
    finally:
        stop_child(holder)
        if waiter is not None:
            stop_child(waiter)

    assert line.strip() == "holding", f"expected the waiter process to enter after the release, got {line!r}"
    assert woken_after < wake_bound, f"expected the waiter in within {wake_bound} s of the release, took {woken_after:.2f} s"
    for role, output, errors in (("holder", holder_output, holder_errors), ("waiter", waiter_output, waiter_errors)):
        report = json.loads(output.strip().splitlines()[-1])
        assert report == {"warnings": [], "error": None}, f"expected a clean exit of the {role} process, got {report}; stderr:\n{errors}"
    assert wait_until(lambda: master.zcard(semaphore_key(name, "holders")) == 0, 5), "expected no lease left on the master"


def test_lease_renewed_past_expiry(
    deployment: SentinelDeployment, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")
    expiry, hold = 0.3, 1.5
    url = deployment.url()

    async def scenario() -> Exception | None:
        impatient = Semaphore(name, 1, expiry=expiry, max_sleep=0.2, redis_url=url)
        async with Semaphore(name, 1, expiry=expiry, redis_url=url):
            # The acquire script drops expired leases, so this entry would get the slot if the
            # lease had not been renewed during the 4 expiries that passed.
            await asyncio.sleep(hold - 0.3)
            try:
                await _enter(impatient)
            except MaxSleepExceededError as exc:
                late_entry: Exception | None = exc
            else:
                late_entry = None
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.2)  # the release's outcome, and any warning, arrives after the exit
        return late_entry

    late_entry = run(scenario())
    assert isinstance(late_entry, MaxSleepExceededError), (
        f"expected a second entry to time out while the renewed lease was held, got {late_entry!r}"
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [], f"expected no warning after holding {hold / expiry:.0f} x expiry, got {warnings}"


def test_token_bucket_schedule(deployment: SentinelDeployment, name: str) -> None:
    capacity, period, entries = 2, 0.1, 7
    bucket = TokenBucket(name, capacity, period, 1, redis_url=deployment.url())

    offsets = run(entry_offsets(bucket, entries))
    rounded = [round(offset, 3) for offset in offsets]
    assert offsets[capacity - 1] < 0.08, f"expected the {capacity} tokens of the full bucket at once, offsets {rounded}"
    # The k-th entry (from 0) waits for k + 1 - capacity refills; 20 ms covers rounding and clocks.
    early = [(k, rounded[k]) for k in range(capacity, entries) if offsets[k] < (k + 1 - capacity) * period - 0.02]
    assert not early, f"expected no entry before its refill, got (entry, seconds): {early}"
    last_due = (entries - capacity) * period
    assert offsets[-1] < last_due + 1.0, f"expected the last entry soon after {last_due:.1f} s, offsets {rounded}"


def test_dead_sentinel_skipped(deployment: SentinelDeployment, name: str) -> None:
    # The first sentinel of the URL is a closed port, so go-redis must query the others.
    others = "&".join(f"addr=127.0.0.1:{port}" for port in deployment.sentinel_ports)
    url = f"redis+sentinel://127.0.0.1:{closed_port()}?{others}&master_name={MASTER_NAME}"

    run(_enter(Semaphore(name, 1, redis_url=url)), timeout=30)
    run(_enter(TokenBucket(name, 1, 1.0, 1, redis_url=url)), timeout=30)


def test_db_option_selects_database(deployment: SentinelDeployment, name: str) -> None:
    url = deployment.url(db="3")
    database_3 = deployment.data_client(deployment.master_port, db=3)
    database_0 = deployment.data_client(deployment.master_port)

    async def scenario() -> tuple[int, int]:
        async with Semaphore(name, 1, redis_url=url):
            in_3 = await asyncio.to_thread(database_3.zcard, semaphore_key(name, "holders"))
            in_0 = await asyncio.to_thread(database_0.zcard, semaphore_key(name, "holders"))
        return in_3, in_0

    try:
        in_3, in_0 = run(scenario())
    finally:
        database_3.close()
        database_0.close()
    assert in_3 == 1, f"expected the lease in database 3 of the master, found {in_3}"
    assert in_0 == 0, f"expected nothing in database 0, found {in_0}"


@pytest.mark.parametrize("kind", ["semaphore", "token bucket"])
def test_wrong_master_name_raises(deployment: SentinelDeployment, name: str, kind: str) -> None:
    url = deployment.url(master_name="no-such-master")
    limiter = Semaphore(name, 1, redis_url=url) if kind == "semaphore" else TokenBucket(name, 1, 1.0, 1, redis_url=url)

    started = time.monotonic()
    with pytest.raises(RedisError) as caught:
        run(_enter(limiter), timeout=30)
    elapsed = time.monotonic() - started

    message = str(caught.value)
    assert elapsed < REFUSED_BOUND, f"expected RedisError within {REFUSED_BOUND} s, got it after {elapsed:.2f} s"
    assert "no-such-master" in message, f"expected the message to name the unknown master set, got {message!r}"
    assert "unreachable" not in message, f"expected no claim that the running sentinels are unreachable, got {message!r}"


def test_missing_master_name_rejected() -> None:
    url = f"redis+sentinel://127.0.0.1:{closed_port()}"

    with pytest.raises(RedisError) as caught:
        Semaphore("missing-master-name", 1, redis_url=url)
    assert "master_name" in str(caught.value), f"expected the message to name master_name, got {str(caught.value)!r}"
    with pytest.raises(RedisError) as caught:
        TokenBucket("missing-master-name", 1, 1.0, 1, redis_url=url)
    assert "master_name" in str(caught.value), f"expected the message to name master_name, got {str(caught.value)!r}"


# The failover test. One failover attempt takes DOWN_AFTER, then up to about a second each for the
# sentinels to agree that the master is down, for the leader's random start delay and for the
# promoted replica's INFO. Hello messages then take up to 2 s to reach every sentinel, and the
# whole switch took 2.3 s in this file's runs. A split vote makes the sentinels try again
# 2 x FAILOVER_TIMEOUT after the first attempt started, so the bound allows one such retry.
SWITCH_BOUND = DOWN_AFTER + 2 * FAILOVER_TIMEOUT + 4.0
FAILOVER_CAPACITY = 3
# Shorter than the switch, so the lease of a holder that runs through it expires on the way.
FAILOVER_EXPIRY = 2.0
FAILOVER_HOLD = 0.02
BUCKET_CAPACITY, BUCKET_PERIOD = 5, 0.05
# Entries are timed when the task wakes up, which on a loaded machine can be this late, so two
# entries may bunch together. The rate check allows that much more time per window.
WAKE_JITTER = 0.1
# A caller fails within WAITER_BOUND, and a successful entry may also wait up to the expiry for a
# slot whose release reached only the lost master.
ENTRY_BOUND = WAITER_BOUND + FAILOVER_EXPIRY
LEASE_LOST = "had expired before its release"


@dataclass
class _Attempt:
    limiter: str  # "semaphore" or "token bucket"
    started: float
    ended: float
    error: BaseException | None


@dataclass
class _FailoverRun:
    attempts: list[_Attempt] = field(default_factory=list)
    holder_counts: list[tuple[float, int]] = field(default_factory=list)  # (time, holders inside)
    killed_at: float = 0.0
    first_switch_at: float | None = None  # one sentinel names the replica
    switched_at: float | None = None  # every sentinel names the replica
    recovered_at: dict[str, float] = field(default_factory=dict)
    long_holder_left_at: float = math.inf
    long_holder_error: BaseException | None = None
    leases_gone: bool = False  # no live lease was left once the loops had stopped
    capacity_entered: int = 0
    capacity_extra: BaseException | None = None
    capacity_holders_on_master: int = 0

    def successes(self, limiter: str, since: float, until: float = math.inf) -> list[_Attempt]:
        return [
            a for a in self.attempts
            if a.limiter == limiter and a.error is None and since <= a.started and a.ended < until
        ]

    def max_holders(self, since: float, until: float = math.inf) -> int:
        return max((count for at, count in self.holder_counts if since <= at < until), default=0)


def _rate_violations(times: list[float], capacity: int, period: float, jitter: float) -> list[tuple[int, float, int]]:
    """Return the windows [times[i], times[j]] that contain more entries than a token bucket allows.

    With a refill of one token every ``period``, a window of length T contains at most
    ``capacity + floor((T + jitter) / period) + 1`` entries. Each violation is (entries, T, bound).
    """
    times = sorted(times)
    violations = []
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            span = times[j] - times[i]
            bound = capacity + math.floor((span + jitter) / period) + 1
            if j - i + 1 > bound:
                violations.append((j - i + 1, round(span, 3), bound))
    return violations


def _live_leases(client: redis.Redis, holders_key: str) -> int:
    """Return the leases of a semaphore whose deadline, in ms of the server's clock, has not passed.

    Expired leases stay in the sorted set until the next acquire script drops them.
    """
    seconds, microseconds = client.time()
    now_ms = seconds * 1000 + microseconds // 1000
    return client.zcount(holders_key, f"({now_ms}", "+inf")


async def _wait_for_switch(nodes: SentinelDeployment, outcome: _FailoverRun) -> None:
    """Poll the sentinels until all of them name the replica as master, for at most SWITCH_BOUND."""
    while time.monotonic() < outcome.killed_at + SWITCH_BOUND:
        ports = await asyncio.to_thread(nodes.master_ports)
        now = time.monotonic()
        if outcome.first_switch_at is None and nodes.replica_port in ports:
            outcome.first_switch_at = now
        if all(port == nodes.replica_port for port in ports):
            outcome.switched_at = now
            return
        await asyncio.sleep(0.05)


async def _check_capacity(nodes: SentinelDeployment, semaphore: Semaphore, name: str, outcome: _FailoverRun) -> None:
    """Hold the capacity through ``semaphore`` and try one more entry, once every lease of the run
    has been released or has expired. A release that failed during the switch leaves its lease
    until it expires.
    """
    new_master = nodes.data_client(nodes.replica_port)
    holders_key = semaphore_key(name, "holders")
    try:

        async def released() -> bool:
            return await asyncio.to_thread(_live_leases, new_master, holders_key) == 0

        outcome.leases_gone = await wait_until_async(released, FAILOVER_EXPIRY + 1, 0.02)
        release = asyncio.Event()

        async def hold() -> None:
            async with semaphore:
                outcome.capacity_entered += 1
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(FAILOVER_CAPACITY)]
        await wait_until_async(lambda: _true_when(outcome.capacity_entered == FAILOVER_CAPACITY), 5, 0.01)
        outcome.capacity_holders_on_master = await asyncio.to_thread(_live_leases, new_master, holders_key)
        extra = Semaphore(name, FAILOVER_CAPACITY, expiry=FAILOVER_EXPIRY, max_sleep=0.5, redis_url=nodes.url())
        try:
            await _enter(extra)
        except Exception as exc:  # the test expects MaxSleepExceededError
            outcome.capacity_extra = exc
        release.set()
        await asyncio.gather(*holders)
    finally:
        new_master.close()


async def _true_when(value: bool) -> bool:
    return value


async def _run_through_failover(nodes: SentinelDeployment, name: str) -> _FailoverRun:
    """Enter a semaphore and a token bucket in loops while the master is killed and replaced.

    One more holder enters before the kill and leaves only after the recovery, so its lease has to
    outlive the switch.
    """
    url = nodes.url()
    semaphore = Semaphore(name, FAILOVER_CAPACITY, expiry=FAILOVER_EXPIRY, redis_url=url)
    bucket = TokenBucket(name, BUCKET_CAPACITY, BUCKET_PERIOD, 1, redis_url=url)
    outcome = _FailoverRun()
    stop = asyncio.Event()
    inside = 0

    async def hold_through_switch(entered: asyncio.Event, leave: asyncio.Event) -> None:
        nonlocal inside
        try:
            async with semaphore:
                inside += 1
                outcome.holder_counts.append((time.monotonic(), inside))
                entered.set()
                await leave.wait()
                inside -= 1
        except Exception as exc:  # the test expects none, since an exit never raises
            outcome.long_holder_error = exc
        outcome.long_holder_left_at = time.monotonic()

    async def use_semaphore() -> None:
        nonlocal inside
        while not stop.is_set():
            started = time.monotonic()
            try:
                async with semaphore:
                    outcome.attempts.append(_Attempt("semaphore", started, time.monotonic(), None))
                    inside += 1
                    outcome.holder_counts.append((time.monotonic(), inside))
                    await asyncio.sleep(FAILOVER_HOLD)
                    inside -= 1
            except Exception as exc:  # the test checks the class of every error
                outcome.attempts.append(_Attempt("semaphore", started, time.monotonic(), exc))
                await asyncio.sleep(0.05)

    async def use_bucket() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                async with bucket:
                    outcome.attempts.append(_Attempt("token bucket", started, time.monotonic(), None))
            except Exception as exc:  # the test checks the class of every error
                outcome.attempts.append(_Attempt("token bucket", started, time.monotonic(), exc))
                await asyncio.sleep(0.05)

    async def recovered() -> bool:
        for limiter in ("semaphore", "token bucket"):
            successes = outcome.successes(limiter, outcome.killed_at)
            if limiter not in outcome.recovered_at and successes:
                outcome.recovered_at[limiter] = min(a.ended for a in successes)
        return len(outcome.recovered_at) == 2

    entered, leave = asyncio.Event(), asyncio.Event()
    long_holder = asyncio.create_task(hold_through_switch(entered, leave))
    await wait_for_event(entered, long_holder)
    workers = [asyncio.create_task(use_semaphore()) for _ in range(2 * FAILOVER_CAPACITY)]
    workers += [asyncio.create_task(use_bucket()) for _ in range(3)]
    try:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(nodes.kill_master)
        outcome.killed_at = time.monotonic()
        await _wait_for_switch(nodes, outcome)
        if outcome.switched_at is None:
            return outcome

        # Only the new master can grant an entry that started after the kill.
        await wait_until_async(recovered, outcome.switched_at + RECOVERY_BOUND - time.monotonic(), 0.01)
        # A check-in of the long holder runs every expiry/3 and finds out whether its lease survived.
        await asyncio.sleep(FAILOVER_EXPIRY / 3 + 1.0)
        leave.set()
        await long_holder
        await asyncio.sleep(1.5)  # entries after the recovery, for the capacity and rate checks
    finally:
        leave.set()
        stop.set()
        await asyncio.gather(long_holder, *workers, return_exceptions=True)

    await _check_capacity(nodes, semaphore, name, outcome)
    return outcome


def test_failover_recovers(tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="self_limiters")
    nodes = SentinelDeployment(tmp_path / "sentinel")
    nodes.start()
    try:
        outcome = run(_run_through_failover(nodes, name), timeout=80)
    finally:
        nodes.stop()

    killed_at = outcome.killed_at
    assert outcome.switched_at is not None, (
        f"expected every sentinel to name the replica as master within {SWITCH_BOUND} s of the kill. Logs:\n{nodes.logs()}"
    )
    errors = [a for a in outcome.attempts if a.error is not None]
    lease_lost = [r.getMessage() for r in caplog.records if LEASE_LOST in r.getMessage()]
    _report_failover(outcome, errors, lease_lost, caplog)

    unexpected = [repr(a.error) for a in errors if not isinstance(a.error, RedisError)]
    assert not unexpected, f"expected only RedisError during the failover, got {unexpected}"
    longest = max(outcome.attempts, key=lambda a: a.ended - a.started)
    seconds = longest.ended - longest.started
    assert seconds < ENTRY_BOUND, (
        f"expected every {longest.limiter} entry to end within {ENTRY_BOUND} s, one took {seconds:.2f} s "
        f"(started {longest.started - killed_at:+.2f} s after the kill, error {longest.error!r})"
    )
    for limiter in ("semaphore", "token bucket"):
        recovered_at = outcome.recovered_at.get(limiter)
        assert recovered_at is not None, (
            f"expected a {limiter} entry to succeed within {RECOVERY_BOUND} s of the switch, "
            f"last errors {[str(a.error) for a in errors if a.limiter == limiter][-3:]}"
        )
        late_errors = [str(a.error) for a in errors if a.limiter == limiter and a.started > recovered_at + 1.0]
        assert not late_errors, f"expected no {limiter} error from 1 s after its recovery on, got {late_errors[:3]}"
    assert outcome.long_holder_error is None, f"expected the holder across the switch to leave cleanly, got {outcome.long_holder_error!r}"

    # The long holder's lease expires during the switch unless a check-in renews it in time. The
    # new master then admits others while it still runs, so the capacity may be exceeded, but
    # only by holders whose exit warns of a lost lease.
    before = outcome.max_holders(0.0, killed_at)
    assert before <= FAILOVER_CAPACITY, f"expected at most {FAILOVER_CAPACITY} holders before the kill, saw {before}"
    settled_at = max(outcome.recovered_at.values()) + FAILOVER_HOLD + 0.1
    during = outcome.max_holders(settled_at, outcome.long_holder_left_at)
    assert during <= FAILOVER_CAPACITY + len(lease_lost), (
        f"expected at most {FAILOVER_CAPACITY} holders, plus one per lost lease ({len(lease_lost)}), "
        f"while the holder across the switch ran, saw {during}"
    )
    after = outcome.max_holders(outcome.long_holder_left_at)
    assert after <= FAILOVER_CAPACITY, f"expected at most {FAILOVER_CAPACITY} holders once it left, saw {after}"
    assert outcome.leases_gone, f"expected every lease of the run released or expired within {FAILOVER_EXPIRY + 1} s of the end"
    assert outcome.capacity_entered == FAILOVER_CAPACITY, (
        f"expected {FAILOVER_CAPACITY} holders at once through the same object, got {outcome.capacity_entered}"
    )
    assert outcome.capacity_holders_on_master == FAILOVER_CAPACITY, (
        f"expected {FAILOVER_CAPACITY} leases on the new master, it has {outcome.capacity_holders_on_master}"
    )
    assert isinstance(outcome.capacity_extra, MaxSleepExceededError), (
        f"expected an entry beyond the capacity to time out after the failover, got {outcome.capacity_extra!r}"
    )

    # A failover may lose the bucket's latest writes, and a bucket that lost its state is full
    # again, so the rate is checked before the kill and after the recovery, not across them.
    for phase, since, until in (("before the kill", 0.0, killed_at), ("after the recovery", settled_at, math.inf)):
        times = [a.ended for a in outcome.successes("token bucket", since, until)]
        violations = _rate_violations(times, BUCKET_CAPACITY, BUCKET_PERIOD, WAKE_JITTER)
        assert not violations, f"expected the bucket's rate {phase}, got (entries, seconds, bound): {violations[:5]}"


def _report_failover(
    outcome: _FailoverRun, errors: list[_Attempt], lease_lost: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Print the figures of the failover run; pytest shows them with -s or when the test fails."""
    killed_at = outcome.killed_at
    assert outcome.switched_at is not None and outcome.first_switch_at is not None
    print(
        f"\nfailover: one sentinel named the replica {outcome.first_switch_at - killed_at:.2f} s after the kill, "
        f"all {outcome.switched_at - killed_at:.2f} s"
    )
    for limiter in ("semaphore", "token bucket"):
        attempts = [a for a in outcome.attempts if a.limiter == limiter]
        failed = [a for a in errors if a.limiter == limiter]
        recovered_at = outcome.recovered_at.get(limiter)
        recovered = f"{recovered_at - killed_at:.2f} s" if recovered_at is not None else "never"
        longest = max((a.ended - a.started for a in attempts), default=0.0)
        print(
            f"  {limiter}: {len(attempts)} entries, {len(failed)} failed, first success after the kill at "
            f"{recovered}, longest entry {longest:.2f} s"
        )
        if failed:
            print(f"    errors from {failed[0].ended - killed_at:.2f} s to {failed[-1].ended - killed_at:.2f} s after the kill")
        for message in sorted({str(a.error) for a in failed}):
            print(f"    error: {message}")
    print(
        f"  max semaphore holders: before the kill {outcome.max_holders(0.0, killed_at)}, from the kill until the "
        f"long holder left {outcome.max_holders(killed_at, outcome.long_holder_left_at)}, "
        f"afterwards {outcome.max_holders(outcome.long_holder_left_at)}"
    )
    print(f"  lease-lost warnings: {len(lease_lost)}")
    for message in sorted({r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING}):
        print(f"  warning: {message}")


def test_acl_user_on_master(deployment: SentinelDeployment, master: redis.Redis, name: str) -> None:
    """The least-privilege user of the README, given as username= and password= for the master,
    runs both limiters behind Sentinel, and the master denies it nothing.

    ACL users are not replicated, so the user is created on the replica too, as an operator would.
    """
    user, password = f"limiter-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    nodes = [deployment.data_client(port) for port in (deployment.master_port, deployment.replica_port)]
    for node in nodes:
        node.execute_command(
            "ACL", "SETUSER", user, "on", f">{password}", "resetkeys", LIMITER_KEYS, "resetchannels", "-@all",
            *(f"+{command}" for command in LIMITER_COMMANDS),
        )
    url = deployment.url(username=user, password=password)

    async def scenario() -> int:
        holder = Semaphore(name, 1, expiry=30, redis_url=url)
        other_owner = Semaphore(name, 1, expiry=29, redis_url=url)  # another owner id, woken through BLPOP
        async with holder:
            waiter = asyncio.create_task(_enter(other_owner))
            queued = await asyncio.to_thread(wait_until, lambda: master.zcard(semaphore_key(name, "waiters")) == 1, 10)
            assert queued, "expected the second owner in the Redis queue"
            connections = sum(client["user"] == user for client in master.client_list())
        await asyncio.wait_for(waiter, 10)
        await _enter(TokenBucket(name, 1, 1, 1, redis_url=url))
        return connections

    try:
        connections = run(scenario())
        denied = [f"{entry['reason']} {entry['object']}" for entry in master.execute_command("ACL", "LOG", "128") if entry["username"] == user]
    finally:
        for node in nodes:
            node.execute_command("ACL", "DELUSER", user)
            node.close()

    assert connections > 0, f"expected the limiters connected to the master as {user}, CLIENT LIST shows none"
    assert denied == [], f"expected nothing denied to the limiter user on the master, ACL LOG has {denied}"
