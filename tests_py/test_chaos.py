"""Chaos tests: worker processes killed with SIGKILL while they use one limiter.

The two chaos tests run the code of scripts/chaos.py (described there) for a shorter time. The
last test isolates one case of those kills: a killed process that had a waiter in the queue.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import redis

from self_limiters import Semaphore
from support import read_first_line, run, semaphore_key, stop_child, wait_until

CHAOS_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "chaos.py"

# Seconds of kills per limiter, for about 6 kills each. The three tests took 38-40 s together on
# the 2-core development machine.
SEMAPHORE_CHAOS_SECONDS = 16.0
TOKEN_BUCKET_CHAOS_SECONDS = 15.0


def _load_chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("self_limiters_chaos", CHAOS_SCRIPT)
    assert spec is not None and spec.loader is not None, f"cannot load {CHAOS_SCRIPT}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up the module of their class here
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


def test_semaphore_chaos_capacity_and_recovery(redis_url: str, name: str) -> None:
    result = chaos.run_semaphore_chaos(redis_url, SEMAPHORE_CHAOS_SECONDS, name=name)
    print(result.report())  # pytest shows it when an assertion fails
    capacity = chaos.SEMAPHORE_CAPACITY

    assert result.violations == [], f"expected at most {capacity} holders at once, seed {result.seed}"
    assert result.max_holders <= capacity, f"expected at most {capacity} holders at once, seed {result.seed}"
    assert result.max_holders == capacity, f"expected the capacity {capacity} to be reached, max was {result.max_holders}"
    assert len(result.kills) >= 3, f"expected at least 3 kills in {SEMAPHORE_CHAOS_SECONDS:g} s, got {len(result.kills)}"
    assert result.kills_of_holders >= 1, "expected at least one kill of a worker with a task inside the block"
    assert result.count_after_stop == 0, f"expected the observer count back at 0, got {result.count_after_stop}"
    assert result.recovery_seconds <= chaos.RECOVERY_BOUND_SECONDS, (
        f"expected full capacity within {chaos.RECOVERY_BOUND_SECONDS:g} s of the last kill, "
        f"took {result.recovery_seconds:.2f} s (seed {result.seed})"
    )
    assert result.fourth_waited, f"expected entry {capacity + 1} to wait while {capacity} fresh entries held"


def test_token_bucket_chaos_rate_bound(redis_url: str, name: str) -> None:
    result = chaos.run_token_bucket_chaos(redis_url, TOKEN_BUCKET_CHAOS_SECONDS, name=name)
    print(result.report())  # pytest shows it when an assertion fails
    window = result.token_window
    # At least 2 grants per second, a fifth of the bucket's rate, so that the bound was tested.
    least_grants = int(2 * TOKEN_BUCKET_CHAOS_SECONDS)

    assert len(result.kills) >= 3, f"expected at least 3 kills in {TOKEN_BUCKET_CHAOS_SECONDS:g} s, got {len(result.kills)}"
    assert len(result.grants) >= least_grants, f"expected at least {least_grants} grants, got {len(result.grants)}"
    assert window.held, (
        f"expected at most {window.bound} tokens in {window.length:.1f} s, got {window.grants} (seed {result.seed})"
    )
    assert result.early_entries == [], "expected no entry before its token was usable: (earliest, latest, entered)"


# Holds the only slot of a semaphore with one task, then queues a second task of the same process
# 0.1 s later: after the grant, but before the first renewal at expiry/3.
_HOLD_AND_QUEUE_CHILD = """
import asyncio
import sys

from self_limiters import Semaphore


async def main(url, name, expiry):
    semaphore = Semaphore(name, 1, expiry=float(expiry), redis_url=url)
    entered = asyncio.Event()

    async def hold():
        async with semaphore:
            entered.set()
            await asyncio.sleep(3600)

    holder = asyncio.create_task(hold())
    await entered.wait()
    await asyncio.sleep(0.1)
    print("holding", flush=True)
    async with semaphore:
        print("second entry", flush=True)


asyncio.run(main(*sys.argv[1:]))
"""


def test_semaphore_killed_process_waiter_gets_no_slot(
    tmp_path: Path, name: str, redis_url: str, observer: redis.Redis
) -> None:
    expiry = 3.0
    holders_key = semaphore_key(name, "holders")
    waiters_key = semaphore_key(name, "waiters")
    script = tmp_path / "hold_and_queue.py"
    script.write_text(_HOLD_AND_QUEUE_CHILD)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the child must import the installed package
    child = subprocess.Popen(
        [sys.executable, str(script), redis_url, name, str(expiry)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_first_line(child, 30)
        assert line.strip() == "holding", f"expected the child to report 'holding', got {line!r}"
        assert wait_until(lambda: observer.zcard(waiters_key) == 1, 10), "expected the child's second entry in the queue"
        child_waiter = observer.zrange(waiters_key, 0, 0)[0]

        async def scenario() -> tuple[float, float | None]:
            async def enter() -> float:
                async with Semaphore(name, 1, expiry=expiry, redis_url=redis_url):
                    return time.monotonic()

            waiter = asyncio.create_task(enter())
            while observer.zcard(waiters_key) < 2:
                await asyncio.sleep(0.005)
            os.kill(child.pid, signal.SIGKILL)
            killed_at = time.monotonic()

            child_admitted_after = None
            deadline = killed_at + 2 * expiry + 10
            while not waiter.done() and time.monotonic() < deadline:
                if child_admitted_after is None and observer.zscore(holders_key, child_waiter) is not None:
                    child_admitted_after = time.monotonic() - killed_at
                await asyncio.sleep(0.02)
            entered_at = await asyncio.wait_for(waiter, 1)
            return entered_at - killed_at, child_admitted_after

        delay, child_admitted_after = run(scenario())
    finally:
        stop_child(child)

    assert child_admitted_after is None, (
        f"expected the killed process's queued waiter never to get a slot, but Redis gave it one "
        f"{child_admitted_after:.2f} s after the kill"
    )
    assert delay <= expiry + 2, (
        f"expected the slot back about expiry={expiry:g} s after the holder's last renewal, "
        f"within {expiry + 2:g} s of the kill; took {delay:.2f} s"
    )
