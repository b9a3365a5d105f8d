"""Chaos run: kill worker processes with SIGKILL while they use one Semaphore or one TokenBucket.

Semaphore: 4 worker processes run 50 tasks each, and every task loops enter, hold 10-100 ms,
exit on one semaphore (capacity 3, expiry 2 s). Every 1-4 s (random) a random worker is killed
with SIGKILL and a new one starts. An observer that does not use self_limiters counts the
holders in Redis: on entry a task runs MULTI INCR count, INCR held:<worker> EXEC, and on exit the
reverse. When a worker is killed, its tasks run nothing any more, so the parent subtracts that
worker's held:<worker> from the count. The count must never exceed the capacity. After the last
kill, which comes within the last 4 s of --duration, the workers are stopped with SIGTERM, and
full capacity must be back within expiry + 2 s of that kill: 3 fresh entries succeed together
and a 4th waits.

Token bucket: the same kills and restarts and the same stop after the last kill, with 4 workers
x 5 tasks taking tokens in a loop from one bucket (capacity 5, 2 tokens every 0.2 s). In every
window [t, t + T), the grants must not exceed capacity + refill_amount * ceil(T /
refill_frequency). Entry times alone can break that bound while the bucket keeps it. A task
enters after its asyncio.sleep, so late and never early, and a late entry followed by a punctual
one is closer to it than their tokens were. So each task also records the interval in which its
token became usable. The library's debug log record of the reply reports the wait from that
record to the token, counted from the reply's arrival. So the record's time plus the wait is at
or after the token. The request's time plus the same wait is at or before it, because the Redis
script ran after the request. The bound is checked on those intervals, and a
second check requires every entry to come no earlier than its token (see tightest_window).

NOTE: the intervals compare the clock of the Redis server (TIME, in the scripts) with time.time()
of the workers, so the token bucket check holds only for a Redis server on this host.

Usage:
    python scripts/chaos.py                            # 60 s per limiter, private redis-server
    python scripts/chaos.py --duration 20 --limiter semaphore
    python scripts/chaos.py --redis-url redis://127.0.0.1:6380/0

Without --redis-url a private redis-server runs on a free port of 127.0.0.1 and is stopped at the
end. Exit status: 0 when every bound held, 1 when one was broken or the run failed, 2 for invalid
arguments, 130 on Ctrl-C.
tests_py/test_chaos.py runs the same functions for a shorter time.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis

# --- Settings ---------------------------------------------------------------------------------

SEMAPHORE_CAPACITY = 3
SEMAPHORE_EXPIRY = 2.0
SEMAPHORE_WORKERS = 4
SEMAPHORE_TASKS = 50
HOLD_SECONDS = (0.01, 0.1)
# Full capacity must be back this long after the last kill: a killed holder's lease ends at most
# `expiry` after its last renewal, and waiters check in when the earliest lease is due.
RECOVERY_BOUND_SECONDS = SEMAPHORE_EXPIRY + 2.0

BUCKET_CAPACITY = 5
BUCKET_REFILL_AMOUNT = 2
BUCKET_REFILL_FREQUENCY = 0.2
BUCKET_WORKERS = 4
BUCKET_TASKS = 5
# Pause of a task after each grant. 20 tasks that pause 1 s on average ask for about the 10 tokens
# per second of the bucket, so the bucket alternates between drained and partly refilled. The
# 5 tasks of a restarted worker start at once, which gives bursts.
PAUSE_SECONDS = (0.0, 2.0)
# A task may enter at most this long before its token is usable, to allow for the realtime clock
# running at a slightly different rate than the monotonic clock of asyncio.sleep during the wait.
EARLY_ENTRY_TOLERANCE_SECONDS = 0.005

KILL_INTERVAL_SECONDS = (1.0, 4.0)
# A semaphore kill that prefers a worker with a task inside the block waits this long for one.
HOLDER_WAIT_SECONDS = 2.0
MIN_DURATION_SECONDS = 5.0
WORKER_READY_TIMEOUT_SECONDS = 30.0
WORKER_STOP_TIMEOUT_SECONDS = 20.0
# A worker exits by itself this long after its run should have ended, in case its parent died
# without killing it.
WORKER_LIFETIME_MARGIN_SECONDS = 120.0
CONNECTIONS_CLOSED_TIMEOUT_SECONDS = 10.0
REDIS_START_TIMEOUT_SECONDS = 10.0

THIS_SCRIPT = Path(__file__).resolve()


class ChaosError(RuntimeError):
    """Raised when the run cannot go on: a worker failed, or Redis or a process did not respond."""


# --- Observer keys ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ObserverKeys:
    """Redis keys of the observer, all under one prefix of the run."""

    prefix: str

    @property
    def count(self) -> str:
        return self.prefix + "count"

    def held(self, worker: int) -> str:
        return f"{self.prefix}held:{worker}"

    def ready(self, worker: int) -> str:
        return f"{self.prefix}ready:{worker}"

    @property
    def max_count(self) -> str:
        """Sorted set whose member "max" has the highest count seen on entry as its score."""
        return self.prefix + "max"

    @property
    def violations(self) -> str:
        return self.prefix + "violations"

    @property
    def entries(self) -> str:
        return self.prefix + "entries"

    @property
    def warnings(self) -> str:
        return self.prefix + "warnings"

    @property
    def grants(self) -> str:
        return self.prefix + "grants"

    def client_name(self, worker: int) -> str:
        """Return the name (CLIENT SETNAME) of every observer connection of ``worker``."""
        return f"{self.prefix.rstrip(':').replace(':', '-')}-w{worker}"


# --- Worker processes -------------------------------------------------------------------------

_stop_requested_early = False


def _request_stop_early(signum: int, frame: object) -> None:
    global _stop_requested_early
    _stop_requested_early = True


def run_worker(spec: dict) -> None:
    """Run one worker process until SIGTERM, as described by ``spec`` (see WorkerPool.start)."""
    # SIGTERM stops the worker normally. The parent sends it only after the worker reported ready,
    # but a flag also records one that arrives before the event loop takes the signal over.
    signal.signal(signal.SIGTERM, _request_stop_early)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec["kind"] == "semaphore":
        asyncio.run(_semaphore_worker(spec))
    else:
        asyncio.run(_token_bucket_worker(spec))


class _Stopper:
    """Stops the tasks of a worker on SIGTERM: tasks that wait for the limiter are cancelled,
    tasks inside the block finish their round and then end."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.waiting: set[asyncio.Task] = set()

    def install(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.stop)
        if _stop_requested_early:
            self.stop()

    def stop(self) -> None:
        self.event.set()
        for task in list(self.waiting):
            task.cancel()

    @property
    def stopping(self) -> bool:
        return self.event.is_set()


async def _watch_parent(parent_pid: int, deadline: float) -> None:
    """End the process when its parent is gone or the run has long ended."""
    while True:
        if os.getppid() != parent_pid or time.time() > deadline:
            os._exit(3)
        await asyncio.sleep(0.5)


async def _semaphore_worker(spec: dict) -> None:
    import redis.asyncio

    from self_limiters import Semaphore

    keys = ObserverKeys(spec["prefix"])
    worker = spec["worker"]
    capacity = spec["capacity"]
    rng = random.Random(spec["seed"])
    stopper = _Stopper()
    stopper.install()
    watchdog = asyncio.create_task(_watch_parent(spec["parent_pid"], spec["deadline"]))

    # Record the warnings of self_limiters, such as a release whose lease had expired, because
    # another holder may then have run at the same time, and the report should explain that.
    warnings_client = redis.Redis.from_url(spec["redis_url"], client_name=keys.client_name(worker))

    class WarningRecorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings_client.rpush(keys.warnings, f"{time.time():.6f} worker {worker}: {record.getMessage()}")

    logging.getLogger("self_limiters").addHandler(WarningRecorder(logging.WARNING))

    semaphore = Semaphore(spec["name"], capacity, expiry=spec["expiry"], redis_url=spec["redis_url"])
    async with redis.asyncio.from_url(spec["redis_url"], client_name=keys.client_name(worker)) as client:

        async def record_entry() -> None:
            # Both counters change in one transaction, so a kill never leaves one of them changed:
            # Redis drops a MULTI whose connection closes before EXEC.
            async with client.pipeline(transaction=True) as pipe:
                pipe.incr(keys.count)
                pipe.incr(keys.held(worker))
                pipe.rpush(keys.entries, f"{time.time():.6f}")
                count, _, _ = await pipe.execute()
            if count > capacity:
                await client.rpush(keys.violations, f"{time.time():.6f} worker {worker} counted {count} holders")
            await client.zadd(keys.max_count, {"max": count}, gt=True)

        async def record_exit() -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.decr(keys.count)
                pipe.decr(keys.held(worker))
                await pipe.execute()

        async def hold_repeatedly() -> None:
            task = asyncio.current_task()
            assert task is not None
            while not stopper.stopping:
                stopper.waiting.add(task)
                try:
                    async with semaphore:
                        # No await lies between the entry and this line, so a task that the
                        # stopper cancels is always still waiting for its slot.
                        stopper.waiting.discard(task)
                        # The observer's count covers a part of the hold, never more, so a count
                        # above capacity means that more than capacity holders ran at once.
                        await record_entry()
                        try:
                            await asyncio.sleep(rng.uniform(*spec["hold"]))
                        finally:
                            await record_exit()
                except asyncio.CancelledError:
                    if stopper.stopping:
                        return
                    raise
                finally:
                    stopper.waiting.discard(task)

        await client.set(keys.ready(worker), 1)
        await asyncio.gather(*(hold_repeatedly() for _ in range(spec["tasks"])))
    watchdog.cancel()
    warnings_client.close()


async def _token_bucket_worker(spec: dict) -> None:
    import redis.asyncio

    from self_limiters import TokenBucket

    keys = ObserverKeys(spec["prefix"])
    worker = spec["worker"]
    rng = random.Random(spec["seed"])
    stopper = _Stopper()
    stopper.install()
    watchdog = asyncio.create_task(_watch_parent(spec["parent_pid"], spec["deadline"]))

    # An entry logs the wait for its token at debug level right after the Redis reply, before it
    # sleeps. That wait dates the token, which the entry time alone cannot (see the module docstring).
    replies: dict[asyncio.Task, tuple[float, float]] = {}

    class ReplyRecorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            task = asyncio.current_task()
            if task is not None and str(record.msg).startswith("took a token"):
                replies[task] = (time.time(), float(record.args[-1]))

    library_logger = logging.getLogger("self_limiters")
    library_logger.setLevel(logging.DEBUG)
    library_logger.propagate = False
    library_logger.addHandler(ReplyRecorder(logging.DEBUG))

    bucket = TokenBucket(
        spec["name"], spec["capacity"], spec["refill_frequency"], spec["refill_amount"], redis_url=spec["redis_url"]
    )
    async with redis.asyncio.from_url(spec["redis_url"], client_name=keys.client_name(worker)) as client:

        async def take_repeatedly() -> None:
            task = asyncio.current_task()
            assert task is not None
            while not stopper.stopping:
                stopper.waiting.add(task)
                requested_at = time.time()
                try:
                    async with bucket:
                        entered_at = time.time()
                        stopper.waiting.discard(task)
                        try:
                            reply_at, wait = replies.pop(task)
                        except KeyError:
                            raise RuntimeError(
                                "self_limiters logged no 'took a token ...' debug record for this entry, "
                                "so the time of its token is unknown; update ReplyRecorder in scripts/chaos.py"
                            ) from None
                        # The token became usable in [requested_at + wait, reply_at + wait]
                        # (see the module docstring).
                        grant = f"{requested_at + wait:.6f} {reply_at + wait:.6f} {entered_at:.6f}"
                        await client.rpush(keys.grants, grant)
                except asyncio.CancelledError:
                    if stopper.stopping:
                        return
                    raise
                finally:
                    stopper.waiting.discard(task)
                    replies.pop(task, None)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopper.event.wait(), rng.uniform(*spec["pause"]))

        await client.set(keys.ready(worker), 1)
        await asyncio.gather(*(take_repeatedly() for _ in range(spec["tasks"])))
    watchdog.cancel()


# --- Worker pool of the parent ----------------------------------------------------------------


class WorkerPool:
    """Worker subprocesses of one run: started, killed with SIGKILL, stopped with SIGTERM.

    Workers are subprocesses of this script, never forks, because a Go runtime does not survive
    fork(). Each worker writes its stderr to a file in ``log_dir``.
    """

    def __init__(self, spec: dict, observer: redis.Redis, keys: ObserverKeys, log_dir: Path, seed: int) -> None:
        self.spec = spec
        self.observer = observer
        self.keys = keys
        self.log_dir = log_dir
        self.seed = seed
        self.processes: dict[int, subprocess.Popen] = {}
        self.started = 0

    def start(self) -> int:
        worker = self.started
        self.started += 1
        spec = dict(self.spec, worker=worker, seed=self.seed * 1000 + worker)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # workers import the installed self_limiters
        with open(self.log_path(worker), "wb") as log:
            # A session of its own keeps Ctrl-C in the terminal away from the workers; the parent
            # kills them on its way out.
            self.processes[worker] = subprocess.Popen(
                [sys.executable, str(THIS_SCRIPT), "--worker", json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        return worker

    def log_path(self, worker: int) -> Path:
        return self.log_dir / f"worker-{worker}.log"

    def log_tail(self, worker: int, lines: int = 30) -> str:
        path = self.log_path(worker)
        if not path.exists():
            return "(no log)"
        text = path.read_text(errors="replace").strip()
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def check_running(self) -> None:
        """Raise ChaosError when a worker exited although the parent did not stop or kill it."""
        for worker, process in self.processes.items():
            code = process.poll()
            if code is not None:
                raise ChaosError(
                    f"worker {worker} exited by itself with code {code}. End of its stderr:\n{self.log_tail(worker)}"
                )

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_SECONDS) -> None:
        """Wait until every running worker has installed its SIGTERM handler and connected to Redis."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            pending = [worker for worker in self.processes if not self.observer.exists(self.keys.ready(worker))]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ChaosError(f"workers {pending} did not report ready within {timeout:g} s")
            time.sleep(0.02)

    def kill(self, worker: int) -> None:
        """SIGKILL ``worker`` and wait until Redis has closed its observer connections.

        After that, Redis has run or dropped every command that the worker sent.
        """
        process = self.processes.pop(worker)
        process.kill()
        process.wait()
        name = self.keys.client_name(worker)
        deadline = time.monotonic() + CONNECTIONS_CLOSED_TIMEOUT_SECONDS
        while any(client.get("name") == name for client in self.observer.client_list()):
            if time.monotonic() > deadline:
                raise ChaosError(
                    f"Redis still lists connections of worker {worker} {CONNECTIONS_CLOSED_TIMEOUT_SECONDS:g} s after its kill"
                )
            time.sleep(0.005)

    def stop_all(self) -> None:
        """Stop every worker with SIGTERM and raise ChaosError unless all exit with 0 in time."""
        self.wait_ready()
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        failures = []
        for worker, process in list(self.processes.items()):
            try:
                code = process.wait(timeout=WORKER_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                failures.append(f"worker {worker} did not stop within {WORKER_STOP_TIMEOUT_SECONDS:g} s of SIGTERM")
                continue
            if code != 0:
                failures.append(f"worker {worker} exited with code {code} after SIGTERM:\n{self.log_tail(worker)}")
        self.processes.clear()
        if failures:
            raise ChaosError("\n".join(failures))

    def close(self) -> None:
        """Kill every worker that still runs; safe to call after stop_all and after errors."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            process.wait()
        self.processes.clear()


def _sleep_until(moment: float, pool: WorkerPool) -> None:
    while True:
        pool.check_running()
        left = moment - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


@dataclasses.dataclass
class KillRecord:
    worker: int
    at: float  # time.monotonic() of the kill
    held: int = 0  # tasks of the worker inside the block at the kill (semaphore only)
    bookkeeping_seconds: float = 0.0  # from the kill until its held count was subtracted


def _run_kills(pool: WorkerPool, duration: float, rng: random.Random, choose_victim, after_kill) -> list[KillRecord]:
    """Kill a worker every 1-4 s (random) for ``duration`` seconds, starting a new one after each
    kill except the last. Returns the kills in order."""
    kills: list[KillRecord] = []
    end = time.monotonic() + duration
    next_kill = time.monotonic() + rng.uniform(*KILL_INTERVAL_SECONDS)
    while next_kill <= end:
        _sleep_until(next_kill, pool)
        victim = choose_victim(len(kills))
        record = KillRecord(worker=victim, at=time.monotonic())
        pool.kill(victim)
        after_kill(record)
        kills.append(record)
        next_kill = time.monotonic() + rng.uniform(*KILL_INTERVAL_SECONDS)
        if next_kill <= end:
            pool.start()
    return kills


def _delete_keys(observer: redis.Redis, prefix: str) -> None:
    for key in observer.scan_iter(match=prefix + "*", count=1000):
        observer.delete(key)


# --- Semaphore chaos --------------------------------------------------------------------------


@dataclasses.dataclass
class SemaphoreResult:
    """Figures of a semaphore chaos run."""

    duration: float
    seed: int
    workers_started: int
    kills: list[KillRecord]
    entries: int
    longest_pause: float  # seconds between two consecutive entries, anywhere in the run
    max_holders: int
    violations: list[str]
    warnings: list[str]  # logged by self_limiters in the workers
    count_after_stop: int  # observer count once every worker had stopped: 0 unless bookkeeping failed
    stop_seconds: float  # from the last kill until every other worker had stopped
    recovery_seconds: float  # from the last kill until `capacity` fresh entries held together
    fourth_waited: bool

    @property
    def kills_of_holders(self) -> int:
        return sum(1 for kill in self.kills if kill.held > 0)

    @property
    def max_bookkeeping_seconds(self) -> float:
        return max((kill.bookkeeping_seconds for kill in self.kills), default=0.0)

    def failures(self) -> list[str]:
        """Return one message per broken bound or failed check, or an empty list."""
        failures = []
        if self.violations or self.max_holders > SEMAPHORE_CAPACITY:
            message = (
                f"the observer counted {self.max_holders} holders at once, more than the capacity "
                f"{SEMAPHORE_CAPACITY}: {self.violations[:5]}"
            )
            if self.max_bookkeeping_seconds > SEMAPHORE_EXPIRY * 2 / 3:
                message += (
                    f" (but a killed worker's holders were subtracted only {self.max_bookkeeping_seconds:.2f} s "
                    "after its kill, when its slots may have been free already, so the count may have been too high)"
                )
            failures.append(message)
        if self.count_after_stop != 0:
            failures.append(f"the observer count was {self.count_after_stop} after every worker had stopped, not 0")
        if self.recovery_seconds > RECOVERY_BOUND_SECONDS:
            failures.append(
                f"full capacity came back {self.recovery_seconds:.2f} s after the last kill, later than "
                f"{RECOVERY_BOUND_SECONDS:g} s"
            )
        if not self.fourth_waited:
            failures.append(f"a {SEMAPHORE_CAPACITY + 1}th entry did not wait while {SEMAPHORE_CAPACITY} fresh entries held")
        return failures

    def report(self) -> str:
        lines = [
            f"Semaphore: capacity {SEMAPHORE_CAPACITY}, expiry {SEMAPHORE_EXPIRY:g} s, {SEMAPHORE_WORKERS} workers x "
            f"{SEMAPHORE_TASKS} tasks, holds of {HOLD_SECONDS[0]:g}-{HOLD_SECONDS[1]:g} s, {self.duration:g} s of kills, "
            f"seed {self.seed}",
            f"  kills survived: {len(self.kills)} ({self.kills_of_holders} while tasks of the worker were inside the "
            f"block, {len(self.kills) - self.kills_of_holders} while none was); workers started: {self.workers_started}",
            f"  entries: {self.entries}; longest pause between two entries: {self.longest_pause:.2f} s",
            f"  maximum concurrent holders observed: {self.max_holders} (bound {SEMAPHORE_CAPACITY}); "
            f"violations: {len(self.violations)}; warnings logged by self_limiters: {len(self.warnings)}",
            f"  slowest subtraction of a killed worker's holders: {self.max_bookkeeping_seconds * 1000:.0f} ms after the kill",
            f"  after the last kill: other workers stopped in {self.stop_seconds:.2f} s; {SEMAPHORE_CAPACITY} fresh "
            f"entries held together after {self.recovery_seconds:.2f} s (bound {RECOVERY_BOUND_SECONDS:g} s); "
            f"a {SEMAPHORE_CAPACITY + 1}th entry waited: {'yes' if self.fourth_waited else 'no'}",
        ]
        lines += [f"  violation: {violation}" for violation in self.violations[:10]]
        lines += [f"  warning: {warning}" for warning in self.warnings[:10]]
        return "\n".join(lines)


def run_semaphore_chaos(redis_url: str, duration: float, name: str | None = None, seed: int | None = None) -> SemaphoreResult:
    """Run the semaphore chaos for ``duration`` seconds of kills and return its figures.

    Raises ChaosError when a worker fails or a process or Redis does not respond; broken bounds
    are returned in the result (see SemaphoreResult.failures).
    """
    seed = random.randrange(2**31) if seed is None else seed
    rng = random.Random(seed)
    run_id = uuid.uuid4().hex[:12]
    name = name or f"chaos-semaphore-{run_id}"
    keys = ObserverKeys(f"chaos:{run_id}:")
    spec = {
        "kind": "semaphore",
        "redis_url": redis_url,
        "name": name,
        "prefix": keys.prefix,
        "capacity": SEMAPHORE_CAPACITY,
        "expiry": SEMAPHORE_EXPIRY,
        "tasks": SEMAPHORE_TASKS,
        "hold": HOLD_SECONDS,
        "parent_pid": os.getpid(),
        "deadline": time.time() + duration + WORKER_LIFETIME_MARGIN_SECONDS,
    }
    observer = redis.Redis.from_url(redis_url, decode_responses=True)

    def choose_victim(index: int) -> int:
        # Kills alternate between preferring a worker with a task inside the block and one
        # without, so that both cases occur even in a short run. The choice among them is random.
        # After a kill, no task may hold a slot for seconds, so a kill that prefers a holder waits.
        wait_until = time.monotonic() + HOLDER_WAIT_SECONDS
        while True:
            workers = sorted(pool.processes)
            held = observer.mget([keys.held(worker) for worker in workers])
            holding = [worker for worker, count in zip(workers, held) if int(count or 0) > 0]
            idle = [worker for worker in workers if worker not in holding]
            preferred = holding if index % 2 == 0 else idle
            if preferred or time.monotonic() > wait_until:
                return rng.choice(preferred or workers)
            time.sleep(0.005)

    def subtract_held(kill: KillRecord) -> None:
        # The dead worker renewed its leases every expiry/3, so they stay in Redis for at least
        # 2/3 of expiry after the kill. No other worker can take those slots before this
        # subtraction unless it is slower than that (see SemaphoreResult.failures).
        kill.held = int(observer.getdel(keys.held(kill.worker)) or 0)
        if kill.held:
            observer.decrby(keys.count, kill.held)
        kill.bookkeeping_seconds = time.monotonic() - kill.at

    try:
        with tempfile.TemporaryDirectory(prefix="self-limiters-chaos-") as log_dir:
            pool = WorkerPool(spec, observer, keys, Path(log_dir), seed)
            try:
                for _ in range(SEMAPHORE_WORKERS):
                    pool.start()
                pool.wait_ready()
                kills = _run_kills(pool, duration, rng, choose_victim, subtract_held)
                if not kills:
                    raise ChaosError(f"no kill fell within {duration:g} s")
                pool.stop_all()
                stopped_at = time.monotonic()
            finally:
                pool.close()

        recovery_seconds, fourth_waited = asyncio.run(_probe_recovery(redis_url, name, kills[-1].at))
        entry_times = sorted(float(entry) for entry in observer.lrange(keys.entries, 0, -1))
        pauses = [later - earlier for earlier, later in zip(entry_times, entry_times[1:])]
        return SemaphoreResult(
            duration=duration,
            seed=seed,
            workers_started=pool.started,
            kills=kills,
            entries=len(entry_times),
            longest_pause=max(pauses, default=0.0),
            max_holders=int(observer.zscore(keys.max_count, "max") or 0),
            violations=observer.lrange(keys.violations, 0, -1),
            warnings=observer.lrange(keys.warnings, 0, -1),
            count_after_stop=int(observer.get(keys.count) or 0),
            stop_seconds=stopped_at - kills[-1].at,
            recovery_seconds=recovery_seconds,
            fourth_waited=fourth_waited,
        )
    finally:
        _delete_keys(observer, keys.prefix)
        observer.close()


async def _probe_recovery(redis_url: str, name: str, last_kill_at: float) -> tuple[float, bool]:
    """Enter the semaphore from `capacity` fresh tasks at once, then try one more.

    Returns the seconds from ``last_kill_at`` until all `capacity` tasks held together, and
    whether the extra entry was still waiting 0.5 s after that.
    """
    from self_limiters import Semaphore

    semaphore = Semaphore(name, SEMAPHORE_CAPACITY, expiry=SEMAPHORE_EXPIRY, redis_url=redis_url)
    release = asyncio.Event()
    all_in = asyncio.Event()
    inside = 0

    async def hold() -> None:
        nonlocal inside
        async with semaphore:
            inside += 1
            if inside == SEMAPHORE_CAPACITY:
                all_in.set()
            await release.wait()

    async def enter_once() -> None:
        async with semaphore:
            pass

    holders = [asyncio.create_task(hold()) for _ in range(SEMAPHORE_CAPACITY)]
    extra: asyncio.Task | None = None
    try:
        # Waits past the bound, so that a late recovery is measured rather than cut off.
        all_in_waiter = asyncio.ensure_future(all_in.wait())
        done, _ = await asyncio.wait(
            {all_in_waiter, *holders}, timeout=RECOVERY_BOUND_SECONDS + 30, return_when=asyncio.FIRST_COMPLETED
        )
        if all_in_waiter not in done:
            all_in_waiter.cancel()
            for task in done:
                task.result()  # raises the error of a holder that failed
            raise ChaosError(
                f"{SEMAPHORE_CAPACITY} fresh entries did not all get a slot within {RECOVERY_BOUND_SECONDS + 30:g} s "
                "after the workers stopped"
            )
        recovery_seconds = time.monotonic() - last_kill_at

        extra = asyncio.create_task(enter_once())
        await asyncio.sleep(0.5)
        fourth_waited = not extra.done()
        release.set()
        try:
            await asyncio.wait_for(asyncio.gather(*holders, extra), 30)
        except asyncio.TimeoutError:
            raise ChaosError(
                f"the {SEMAPHORE_CAPACITY + 1}th entry did not get a slot within 30 s of the release of the others"
            ) from None
    finally:
        for task in [*holders, extra]:
            if task is not None:
                task.cancel()
    return recovery_seconds, fourth_waited


# --- Token bucket chaos -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
    """The fullest window [t, t + length) relative to its bound."""

    grants: int
    length: float
    bound: int

    @property
    def held(self) -> bool:
        return self.grants <= self.bound


def bucket_bound(length_periods: int) -> int:
    """Return the maximum number of grants that the bucket allows in a window of ``length_periods`` refill periods."""
    return BUCKET_CAPACITY + BUCKET_REFILL_AMOUNT * length_periods


def tightest_window(earliest: list[float], latest: list[float]) -> Window:
    """Find the window [t, t + T) with the least bound minus grants, over all t and T.

    Grant i happened at an unknown time within [earliest[i], latest[i]], and counts for a window
    only when that whole interval lies inside it: a window above its bound then proves that the
    bucket broke it. Pass the same list twice for exact times.

    The bound is the same for all T in ((k - 1) * f, k * f], f being the refill frequency, and a
    longer window contains at least as many grants, so T = k * f covers every length. A fullest
    window can be moved right until it starts at an earliest time, so t ranges over those.
    """
    if not earliest:
        return Window(grants=0, length=BUCKET_REFILL_FREQUENCY, bound=bucket_bound(1))
    pairs = sorted(zip(earliest, latest))
    starts = [start for start, _ in pairs]
    ends = [end for _, end in pairs]
    widest = max(end - start for start, end in pairs)
    longest_k = math.floor((starts[-1] - starts[0]) / BUCKET_REFILL_FREQUENCY) + 1

    tightest: Window | None = None
    for k in range(1, longest_k + 1):
        length = k * BUCKET_REFILL_FREQUENCY
        bound = bucket_bound(k)
        fullest = 0
        for first in range(len(starts)):
            if first and starts[first] == starts[first - 1]:
                continue
            window_end = starts[first] + length
            after = bisect.bisect_left(starts, window_end, first)
            grants = after - first
            # Grants that start inside but may end past the window do not count.
            index = after - 1
            while index >= first and starts[index] >= window_end - widest:
                if ends[index] >= window_end:
                    grants -= 1
                index -= 1
            fullest = max(fullest, grants)
        if tightest is None or bound - fullest < tightest.bound - tightest.grants:
            tightest = Window(grants=fullest, length=length, bound=bound)
    assert tightest is not None
    return tightest


@dataclasses.dataclass
class TokenBucketResult:
    """Figures of a token bucket chaos run.

    Each grant is (earliest, latest, entered): the token became usable between earliest and
    latest, and the task entered the block at entered.
    """

    duration: float
    seed: int
    workers_started: int
    kills: list[KillRecord]
    grants: list[tuple[float, float, float]]
    token_window: Window  # on the times at which tokens became usable
    entry_window: Window  # on the entry times alone; informational

    @property
    def span(self) -> float:
        return max(g[2] for g in self.grants) - min(g[2] for g in self.grants) if self.grants else 0.0

    @property
    def lags(self) -> list[float]:
        """Seconds from the latest moment at which each token became usable to the entry."""
        return [entered - latest for _, latest, entered in self.grants]

    @property
    def early_entries(self) -> list[tuple[float, float, float]]:
        return [g for g in self.grants if g[2] < g[1] - EARLY_ENTRY_TOLERANCE_SECONDS]

    @property
    def widest_uncertainty(self) -> float:
        return max((latest - earliest for earliest, latest, _ in self.grants), default=0.0)

    def failures(self) -> list[str]:
        """Return one message per broken bound or failed check, or an empty list."""
        failures = []
        if not self.grants:
            failures.append("no grant was recorded")
        if not self.token_window.held:
            window = self.token_window
            failures.append(
                f"{window.grants} tokens became usable within {window.length:.1f} s, more than the bound {window.bound}"
            )
        if self.early_entries:
            failures.append(
                f"{len(self.early_entries)} tasks entered more than {EARLY_ENTRY_TOLERANCE_SECONDS * 1000:g} ms before "
                f"their token was usable, for example (earliest, latest, entered) {self.early_entries[0]}"
            )
        return failures

    def report(self) -> str:
        lags = self.lags
        token, entry = self.token_window, self.entry_window
        rate = BUCKET_REFILL_AMOUNT / BUCKET_REFILL_FREQUENCY
        return "\n".join(
            [
                f"TokenBucket: capacity {BUCKET_CAPACITY}, {BUCKET_REFILL_AMOUNT} tokens every {BUCKET_REFILL_FREQUENCY:g} s, "
                f"{BUCKET_WORKERS} workers x {BUCKET_TASKS} tasks, pauses of {PAUSE_SECONDS[0]:g}-{PAUSE_SECONDS[1]:g} s, "
                f"{self.duration:g} s of kills, seed {self.seed}",
                f"  kills survived: {len(self.kills)}; workers started: {self.workers_started}",
                f"  grants: {len(self.grants)} in {self.span:.1f} s ({len(self.grants) / max(self.span, 1e-9):.1f} per s; "
                f"the bucket allows {rate:g} per s after a full bucket)",
                f"  bound: grants in any window [t, t + T) <= {BUCKET_CAPACITY} + {BUCKET_REFILL_AMOUNT} * ceil(T / "
                f"{BUCKET_REFILL_FREQUENCY:g})",
                f"  tightest window of token times: {token.grants} grants in {token.length:.1f} s, bound {token.bound}. "
                f"{'Held.' if token.held else 'BROKEN.'} (token times known to within "
                f"{self.widest_uncertainty * 1000:.1f} ms)",
                f"  entries after their token: median {statistics.median(lags) * 1000 if lags else 0:.1f} ms, "
                f"max {max(lags, default=0) * 1000:.1f} ms, min {min(lags, default=0) * 1000:.2f} ms; "
                f"entries earlier than their token: {len(self.early_entries)}",
                f"  tightest window of entry times (not checked, late entries can bunch): {entry.grants} grants in "
                f"{entry.length:.1f} s, bound {entry.bound}",
            ]
        )


def run_token_bucket_chaos(redis_url: str, duration: float, name: str | None = None, seed: int | None = None) -> TokenBucketResult:
    """Run the token bucket chaos for ``duration`` seconds of kills and return its figures.

    Raises ChaosError when a worker fails or a process or Redis does not respond; broken bounds
    are returned in the result (see TokenBucketResult.failures).
    """
    seed = random.randrange(2**31) if seed is None else seed
    rng = random.Random(seed)
    run_id = uuid.uuid4().hex[:12]
    name = name or f"chaos-bucket-{run_id}"
    keys = ObserverKeys(f"chaos:{run_id}:")
    spec = {
        "kind": "token-bucket",
        "redis_url": redis_url,
        "name": name,
        "prefix": keys.prefix,
        "capacity": BUCKET_CAPACITY,
        "refill_frequency": BUCKET_REFILL_FREQUENCY,
        "refill_amount": BUCKET_REFILL_AMOUNT,
        "tasks": BUCKET_TASKS,
        "pause": PAUSE_SECONDS,
        "parent_pid": os.getpid(),
        "deadline": time.time() + duration + WORKER_LIFETIME_MARGIN_SECONDS,
    }
    observer = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with tempfile.TemporaryDirectory(prefix="self-limiters-chaos-") as log_dir:
            pool = WorkerPool(spec, observer, keys, Path(log_dir), seed)
            try:
                for _ in range(BUCKET_WORKERS):
                    pool.start()
                pool.wait_ready()
                kills = _run_kills(pool, duration, rng, lambda index: rng.choice(sorted(pool.processes)), lambda kill: None)
                pool.stop_all()
            finally:
                pool.close()

        grants = [tuple(float(part) for part in grant.split()) for grant in observer.lrange(keys.grants, 0, -1)]
        return TokenBucketResult(
            duration=duration,
            seed=seed,
            workers_started=pool.started,
            kills=kills,
            grants=grants,
            token_window=tightest_window([g[0] for g in grants], [g[1] for g in grants]),
            entry_window=tightest_window([g[2] for g in grants], [g[2] for g in grants]),
        )
    finally:
        _delete_keys(observer, keys.prefix)
        observer.close()


# --- Private Redis server ---------------------------------------------------------------------


def _free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port != 6379:  # the default port may belong to another server
            return port


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """Run a redis-server without persistence on a free port of 127.0.0.1 and yield its URL.

    The server is stopped on leaving, also after an error or Ctrl-C.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise ChaosError(
            "redis-server not found on PATH. Install Redis (on Debian: apt-get install redis-server) "
            "or pass --redis-url with the URL of a running Redis."
        )
    with tempfile.TemporaryDirectory(prefix="self-limiters-chaos-redis-") as directory:
        log_path = Path(directory) / "redis.log"
        port = _free_port()
        command = [
            executable,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", directory,
            "--logfile", str(log_path),
        ]
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"redis://127.0.0.1:{port}"
        try:
            with redis.Redis.from_url(url) as client:
                deadline = time.monotonic() + REDIS_START_TIMEOUT_SECONDS
                while True:
                    try:
                        client.ping()
                        break
                    except redis.ConnectionError:
                        if server.poll() is not None or time.monotonic() > deadline:
                            log = log_path.read_text(errors="replace") if log_path.exists() else "(no log)"
                            raise ChaosError(
                                f"redis-server did not start on 127.0.0.1:{port} within "
                                f"{REDIS_START_TIMEOUT_SECONDS:g} s. Its log:\n{log.strip()}"
                            ) from None
                        time.sleep(0.05)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


# --- Command line -----------------------------------------------------------------------------


def _duration(text: str) -> float:
    value = float(text)
    if not value >= MIN_DURATION_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_DURATION_SECONDS:g} seconds, got {text}")
    return value


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        run_worker(json.loads(sys.argv[2]))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=_duration, default=60.0,
        help="seconds of kills and restarts for each limiter (default 60); starting, stopping and checking add a few "
        "seconds per limiter",
    )
    parser.add_argument(
        "--redis-url",
        help="URL of a running Redis, such as redis://127.0.0.1:6380/0 (default: start a private "
        "redis-server on a free port of 127.0.0.1 and stop it at the end)",
    )
    parser.add_argument(
        "--limiter", choices=["both", "semaphore", "token-bucket"], default="both", help="limiters to run (default both)"
    )
    parser.add_argument("--seed", type=int, help="seed of the kill schedule and the workers' random times (default random)")
    args = parser.parse_args()

    began_at = time.monotonic()
    failures: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            redis_url = args.redis_url or stack.enter_context(private_redis())
            print(f"Redis: {redis_url} ({'given with --redis-url' if args.redis_url else 'private redis-server'})", flush=True)
            if args.limiter in ("both", "semaphore"):
                print(f"Semaphore chaos: {args.duration:g} s of kills ...", flush=True)
                semaphore = run_semaphore_chaos(redis_url, args.duration, seed=args.seed)
                print(semaphore.report(), flush=True)
                failures += semaphore.failures()
            if args.limiter in ("both", "token-bucket"):
                print(f"TokenBucket chaos: {args.duration:g} s of kills ...", flush=True)
                bucket = run_token_bucket_chaos(redis_url, args.duration, seed=args.seed)
                print(bucket.report(), flush=True)
                failures += bucket.failures()
    except KeyboardInterrupt:
        print("\nInterrupted. The workers and any private redis-server were stopped.", file=sys.stderr)
        return 130
    except (ChaosError, redis.RedisError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    print(f"Run time {time.monotonic() - began_at:.1f} s.")
    if failures:
        for failure in failures:
            print(f"BROKEN: {failure}")
        return 1
    print("Every bound held.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
