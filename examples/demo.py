"""Show a Semaphore and a TokenBucket of self_limiters holding their limits across processes.

Three worker processes run 20 tasks each. Every task passes one shared TokenBucket, then holds
one shared Semaphore for a fixed time. Each task records when it passed the bucket, and when it
entered and left the semaphore block. From these timestamps alone, without asking the limiters
or Redis, the parent counts the entries through the bucket and the concurrent holders of the
semaphore, and checks both against their bounds.

Usage:
    python examples/demo.py                      # starts a private redis-server on 127.0.0.1
    python examples/demo.py --redis-url URL      # uses a running Redis instead

Exit status: 0 when both limits held, 1 when one did not or the demo failed, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import math
import multiprocessing
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

try:
    from self_limiters import Semaphore, TokenBucket
except ImportError:
    sys.exit("error: self_limiters is not installed. Install it with: pip install <path to this repository>")

WORKERS = 3
TASKS_PER_WORKER = 20

SEMAPHORE_CAPACITY = 5
HOLD_SECONDS = 0.5

# One token every 0.1 s is 10 entries per second, spread evenly. The bucket starts full, so the
# first 10 entries pass at once. At 10 entries per second and 0.5 s per hold, the tasks need
# 5 slots in steady state, so the semaphore stays full for the whole run.
BUCKET_CAPACITY = 10
REFILL_FREQUENCY = 0.1
REFILL_AMOUNT = 1

WORKER_TIMEOUT_SECONDS = 60.0
REDIS_START_TIMEOUT_SECONDS = 5.0
REDIS_STOP_TIMEOUT_SECONDS = 5.0

# Kinds of the events that tasks record. Times come from time.monotonic(), which on Linux is
# CLOCK_MONOTONIC and therefore comparable between processes of one host.
BUCKET_ENTRY = "bucket"
HOLD_START = "enter"
HOLD_END = "exit"


# --- Private redis-server ---------------------------------------------------------------------


def find_free_port() -> int:
    """Return a TCP port of 127.0.0.1 that was free a moment ago, never Redis's default 6379."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port != 6379:
            return port


def ping_redis(port: int) -> bool:
    """Send an inline PING to 127.0.0.1:port and return whether Redis replied PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=REDIS_STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """Run a redis-server without persistence on a free port of 127.0.0.1 and yield its URL.

    The server is stopped on leaving, also after an error or Ctrl-C.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError(
            "redis-server not found on PATH. Install Redis (on Debian or Ubuntu: apt-get install "
            "redis-server) or pass --redis-url with the URL of a running Redis."
        )

    with tempfile.TemporaryDirectory(prefix="self-limiters-demo-") as directory:
        log_path = Path(directory) / "redis.log"
        port = find_free_port()
        command = [
            executable,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", directory,
            "--logfile", str(log_path),
        ]
        # A session of its own keeps Ctrl-C in the terminal from reaching the server, so it
        # outlives the workers and is stopped here, after them.
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + REDIS_START_TIMEOUT_SECONDS
            while not ping_redis(port):
                if server.poll() is not None or time.monotonic() > deadline:
                    log = log_path.read_text(errors="replace") if log_path.exists() else "(no log)"
                    raise RuntimeError(
                        f"redis-server did not start on 127.0.0.1:{port} within "
                        f"{REDIS_START_TIMEOUT_SECONDS:g} s. Its log:\n{log.strip()}"
                    )
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}"
        finally:
            stop_server(server)


# --- Worker processes -------------------------------------------------------------------------


async def run_task(bucket: TokenBucket, semaphore: Semaphore, events: list[tuple[str, float]]) -> None:
    # Each time is taken inside the block, so a recorded hold lies within the real one. An overlap
    # of recorded holds is therefore a real overlap.
    async with bucket:
        events.append((BUCKET_ENTRY, time.monotonic()))
    async with semaphore:
        events.append((HOLD_START, time.monotonic()))
        await asyncio.sleep(HOLD_SECONDS)
        events.append((HOLD_END, time.monotonic()))


async def run_tasks(redis_url: str, bucket_name: str, semaphore_name: str) -> list[tuple[str, float]]:
    bucket = TokenBucket(
        name=bucket_name,
        capacity=BUCKET_CAPACITY,
        refill_frequency=REFILL_FREQUENCY,
        refill_amount=REFILL_AMOUNT,
        redis_url=redis_url,
    )
    semaphore = Semaphore(name=semaphore_name, capacity=SEMAPHORE_CAPACITY, redis_url=redis_url)
    events: list[tuple[str, float]] = []
    # Every task runs to its end, so a failing task leaves no other task cancelled mid-wait.
    outcomes = await asyncio.gather(
        *(run_task(bucket, semaphore, events) for _ in range(TASKS_PER_WORKER)), return_exceptions=True
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return events


def run_worker(worker_id: int, redis_url: str, bucket_name: str, semaphore_name: str, messages, start) -> None:
    """Run the tasks of one worker process once ``start`` is set, and send back their events."""
    # Ctrl-C in the terminal reaches the whole process group. The parent handles it and
    # terminates the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        messages.put(("ready", worker_id, None))
        start.wait()
        events = asyncio.run(run_tasks(redis_url, bucket_name, semaphore_name))
        messages.put(("done", worker_id, events))
    except Exception as error:
        messages.put(("failed", worker_id, f"{type(error).__name__}: {error}"))


def collect_events(redis_url: str) -> tuple[float, list[tuple[str, float]]]:
    """Run all workers and return the start time of the run and the events of all tasks."""
    # A Go runtime does not survive fork(), so workers start from a fresh interpreter.
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    start = context.Event()
    # Fresh names give a full bucket and an empty semaphore, also on a Redis used before.
    run_id = uuid.uuid4().hex[:12]
    workers = [
        context.Process(
            target=run_worker,
            args=(worker_id, redis_url, f"demo-bucket-{run_id}", f"demo-semaphore-{run_id}", messages, start),
            name=f"demo-worker-{worker_id}",
            daemon=True,
        )
        for worker_id in range(WORKERS)
    ]

    try:
        for worker in workers:
            worker.start()
        wait_for_messages(messages, workers, "ready", deadline=time.monotonic() + WORKER_TIMEOUT_SECONDS)
        started_at = time.monotonic()
        start.set()
        results = wait_for_messages(messages, workers, "done", deadline=time.monotonic() + WORKER_TIMEOUT_SECONDS)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()

    events = [event for worker_events in results for event in worker_events]
    return started_at, events


def wait_for_messages(messages, workers, expected_kind: str, deadline: float) -> list:
    """Wait for the message ``expected_kind`` of every worker and return their payloads."""
    payloads = {}
    while len(payloads) < len(workers):
        try:
            kind, worker_id, payload = messages.get(timeout=0.2)
        except queue.Empty:
            for worker_id, worker in enumerate(workers):
                if worker_id not in payloads and worker.exitcode is not None:
                    raise RuntimeError(f"worker {worker_id} exited with code {worker.exitcode} before it reported {expected_kind!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {WORKER_TIMEOUT_SECONDS:g} s waiting for the workers to report {expected_kind!r}")
            continue
        if kind == "failed":
            raise RuntimeError(f"worker {worker_id} failed: {payload}")
        payloads[worker_id] = payload
    return list(payloads.values())


# --- Checks of the limits ---------------------------------------------------------------------


def check_bucket(entry_times: list[float]) -> tuple[int, float, int]:
    """Find the window of entries closest to the bucket's bound, or furthest above it.

    The bound for a window of length T is capacity + refill_amount * ceil(T / refill_frequency).
    It is the same for every T in ((k - 1) * f, k * f], where f is refill_frequency, and a longer
    window contains at least as many entries, so windows of length k * f cover every length. The
    fullest window of a length can start at an entry. Windows are half-open, [t, t + T), because
    a closed window of length k * f can contain k + 1 refills.

    Returns (entries, window length in seconds, bound) of the window with the least bound minus
    entries, which is negative when the bound was broken.

    NOTE: the bound is about when tokens become usable on the Redis clock, but the check uses when
    tasks resumed, shortly after. Each worker requests 20 tokens at once, so the bucket is never
    full after its first entry and the real count in a window stays at least 1 below the bound.
    Delays that differ by less than refill_frequency add at most one refill (1 token here) to a
    window, so only larger differences could show a broken bound that the bucket kept.
    """
    times = sorted(entry_times)
    longest_k = math.floor((times[-1] - times[0]) / REFILL_FREQUENCY) + 1
    tightest: tuple[int, float, int] | None = None
    for k in range(1, longest_k + 1):
        length = k * REFILL_FREQUENCY
        entries = max(bisect.bisect_left(times, start + length) - index for index, start in enumerate(times))
        bound = BUCKET_CAPACITY + REFILL_AMOUNT * k
        if tightest is None or bound - entries < tightest[2] - tightest[0]:
            tightest = (entries, length, bound)
    assert tightest is not None
    return tightest


def count_holders_per_second(hold_events: list[tuple[float, int]], started_at: float, seconds: int) -> list[int]:
    """Return the maximum number of concurrent holders in each second of the run.

    ``hold_events`` are (time, +1) for a start and (time, -1) for an end of a hold.
    """
    # At equal times an end sorts before a start, so touching holds do not count as an overlap.
    ordered = sorted(hold_events)
    maximums = []
    holders = 0
    index = 0
    for second in range(seconds):
        second_end = started_at + second + 1
        maximum = holders  # holders that carried over from the previous second
        while index < len(ordered) and ordered[index][0] < second_end:
            holders += ordered[index][1]
            maximum = max(maximum, holders)
            index += 1
        maximums.append(maximum)
    return maximums


# --- Report -----------------------------------------------------------------------------------


def report(started_at: float, events: list[tuple[str, float]]) -> bool:
    """Print the table per second and the summary, and return whether both limits held."""
    entry_times = [at for kind, at in events if kind == BUCKET_ENTRY]
    hold_events = [(at, 1 if kind == HOLD_START else -1) for kind, at in events if kind != BUCKET_ENTRY]
    tasks = WORKERS * TASKS_PER_WORKER
    if len(entry_times) != tasks or len(hold_events) != 2 * tasks:
        raise RuntimeError(
            f"expected {tasks} bucket entries and {tasks} holds, got {len(entry_times)} entries and "
            f"{len(hold_events) // 2} holds"
        )

    seconds = max(1, math.ceil(max(at for _, at in events) - started_at))
    entries_per_second = Counter(math.floor(at - started_at) for at in entry_times)
    holders_per_second = count_holders_per_second(hold_events, started_at, seconds)

    print()
    print(f"{'second':>8}  {'bucket entries':>14}  {'max holders':>11}")
    for second in range(seconds):
        label = f"{second}-{second + 1}"
        print(f"{label:>8}  {entries_per_second[second]:>14}  {holders_per_second[second]:>11}")

    entries, length, bound = check_bucket(entry_times)
    bucket_held = entries <= bound
    max_holders = max(holders_per_second)
    semaphore_held = max_holders <= SEMAPHORE_CAPACITY

    print()
    print(
        f"TokenBucket: in any window of T seconds, entries <= {BUCKET_CAPACITY} + "
        f"{REFILL_AMOUNT} * ceil(T / {REFILL_FREQUENCY:g})."
    )
    print(
        f"  Tightest of all windows [t, t + T): {entries} entries in {length:.1f} s, bound {bound}. "
        f"{'Held.' if bucket_held else 'BROKEN.'}"
    )
    print(f"Semaphore: concurrent holders <= {SEMAPHORE_CAPACITY}.")
    print(f"  Maximum observed: {max_holders}. {'Held.' if semaphore_held else 'BROKEN.'}")
    return bucket_held and semaphore_held


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis-url",
        help="URL of a running Redis, such as redis://127.0.0.1:6379/0 (default: start a private "
        "redis-server on a free port of 127.0.0.1 and stop it at the end)",
    )
    args = parser.parse_args()

    began_at = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            redis_url = args.redis_url or stack.enter_context(private_redis())
            where = "given with --redis-url" if args.redis_url else "private redis-server"
            print(f"Redis: {redis_url} ({where})")
            print(
                f"{WORKERS} worker processes x {TASKS_PER_WORKER} tasks. Each task passes the "
                f"TokenBucket, then holds the Semaphore for {HOLD_SECONDS:g} s."
            )
            print(
                f"TokenBucket: capacity={BUCKET_CAPACITY}, refill_amount={REFILL_AMOUNT} every "
                f"refill_frequency={REFILL_FREQUENCY:g} s ({REFILL_AMOUNT / REFILL_FREQUENCY:g} entries/s), starts full."
            )
            print(f"Semaphore: capacity={SEMAPHORE_CAPACITY}.")
            started_at, events = collect_events(redis_url)
        both_held = report(started_at, events)
    except KeyboardInterrupt:
        print("\nInterrupted. The workers and any private redis-server were stopped.", file=sys.stderr)
        return 130
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    print(f"Run time {time.monotonic() - began_at:.1f} s. {'Both limits held.' if both_held else 'A limit was broken.'}")
    return 0 if both_held else 1


if __name__ == "__main__":
    sys.exit(main())
