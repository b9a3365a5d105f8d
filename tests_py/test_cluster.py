"""Limiters on a private Redis Cluster of 3 masters: slots, wake-ups across processes, slot
migration and a least-privilege ACL user.

The limiters reach the cluster through redis+cluster:// URLs that list every node. Limiter
objects built from URLs that start with different seed nodes are separate participants with
owner ids of their own, so one process can play several processes' parts. The checks read the
cluster with redis-py's Cluster client, or with a client of one node where it matters where a key
lives.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster_support import (  # noqa: F401 (redis_cluster is a fixture)
    RedisClusterServers,
    key_slot,
    redis_cluster,
)
from self_limiters import RedisError, Semaphore, TokenBucket
from support import (
    admission_order,
    KEY_PREFIX,
    LIMITER_COMMANDS,
    LIMITER_KEYS,
    bucket_key,
    entries_at_once,
    read_first_line,
    run,
    semaphore_key,
    start_python,
    stop_child,
    wait_for_event,
    wait_until,
    wait_until_async,
)

# Names that test the hash tag: the empty name and names with braces, which end the tag early.
SPECIAL_NAMES = ["", "{", "}", "a}b{c", "{x}"]
NAME_COUNT = 20

# A holder in its own process: it enters, prints "holding", leaves the block when a line arrives
# on stdin, and prints "released" with the monotonic time at which the exit returned.
HOLDER_CODE = """
import asyncio, sys, time
from self_limiters import Semaphore

async def main(url, name):
    async with Semaphore(name, 1, expiry=30, redis_url=url):
        print("holding", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print("released", time.monotonic(), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

# A waiter in its own process: it prints "waiting", then "entered" with the monotonic time of
# its entry.
WAITER_CODE = """
import asyncio, sys, time
from self_limiters import Semaphore

async def main(url, name):
    print("waiting", flush=True)
    async with Semaphore(name, 1, expiry=30, redis_url=url):
        print("entered", time.monotonic(), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.fixture(scope="module")
def names(redis_cluster: RedisClusterServers) -> list[str]:
    """20 semaphore names, the special ones first, spread evenly over the 3 masters."""
    chosen = list(SPECIAL_NAMES)
    per_master = Counter({port: 0 for port in redis_cluster.ports})
    for name in chosen:
        per_master[redis_cluster.owner_of_slot(key_slot(semaphore_key(name, "")))] += 1

    candidate = 0
    while len(chosen) < NAME_COUNT:
        name = f"spread-{candidate}"
        candidate += 1
        port = redis_cluster.owner_of_slot(key_slot(semaphore_key(name, "")))
        if per_master[port] == min(per_master.values()):
            chosen.append(name)
            per_master[port] += 1
    return chosen


def test_names_span_masters(redis_cluster: RedisClusterServers, names: list[str]) -> None:
    masters = {redis_cluster.owner_of_slot(key_slot(semaphore_key(name, ""))) for name in names}

    assert len(set(names)) == NAME_COUNT, f"expected {NAME_COUNT} distinct names, got {names}"
    assert set(SPECIAL_NAMES) <= set(names), f"expected the names to include {SPECIAL_NAMES}, got {names}"
    assert masters == set(redis_cluster.ports), f"expected semaphores on all masters {redis_cluster.ports}, got {masters}"


def test_semaphore_capacity_every_slot(redis_cluster: RedisClusterServers, names: list[str]) -> None:
    capacity, tasks, rounds = 2, 6, 3

    async def exercise(name: str) -> tuple[int, int]:
        # Two participants per name, so admissions also go through the other one's wake-up list.
        semaphores = [Semaphore(name, capacity, redis_url=redis_cluster.url(seed)) for seed in (0, 1)]
        inside = peak = entries = 0

        async def worker(index: int) -> None:
            nonlocal inside, peak, entries
            for _ in range(rounds):
                async with semaphores[index % 2]:
                    inside += 1
                    entries += 1
                    peak = max(peak, inside)
                    await asyncio.sleep(0.01)
                    inside -= 1

        await asyncio.gather(*(worker(index) for index in range(tasks)))
        return peak, entries

    async def scenario() -> list[tuple[int, int]]:
        return await asyncio.gather(*(exercise(name) for name in names))

    results = run(scenario(), timeout=60)
    for name, (peak, entries) in zip(names, results):
        assert peak <= capacity, f"name {name!r}: expected at most {capacity} holders at once, saw {peak}"
        assert peak == capacity, f"name {name!r}: expected the capacity {capacity} to be reached, max was {peak}"
        assert entries == tasks * rounds, f"name {name!r}: expected {tasks * rounds} entries, got {entries}"


def test_semaphore_fifo_every_slot(redis_cluster: RedisClusterServers, names: list[str]) -> None:
    waiter_count = 5

    async def name_order(name: str, observer) -> list[int]:
        # Two participants, so that admissions also go through the other one's wake-up list.
        semaphores = [Semaphore(name, 1, redis_url=redis_cluster.url(seed)) for seed in (0, 1)]
        waiters_key = semaphore_key(name, "waiters")
        return await admission_order(semaphores, waiter_count, lambda: observer.zcard(waiters_key), f"name {name!r}: ")

    async def scenario() -> list[list[int]]:
        observer = redis_cluster.async_client()
        try:
            return await asyncio.gather(*(name_order(name, observer) for name in names))
        finally:
            await observer.aclose()

    orders = run(scenario(), timeout=60)
    expected = list(range(waiter_count))
    for name, order in zip(names, orders):
        assert order == expected, f"name {name!r}: expected admission in arrival order {expected}, got {order}"


def test_token_bucket_every_slot(redis_cluster: RedisClusterServers, names: list[str]) -> None:
    capacity, period = 3, 1.0

    async def entry_times(name: str, seed: int) -> tuple[list[float], float]:
        bucket = TokenBucket(name, capacity, period, 1, redis_url=redis_cluster.url(seed))
        started = time.monotonic()

        async def enter() -> float:
            async with bucket:
                return time.monotonic() - started

        at_once = await asyncio.gather(*(enter() for _ in range(capacity)))
        return list(at_once), await enter()

    async def scenario() -> tuple[list[tuple[list[float], float]], dict[int, set[str]]]:
        results = await asyncio.gather(*(entry_times(name, index % 3) for index, name in enumerate(names)))
        # Each bucket key lives until the bucket is full again, 3 periods after its last entry.
        return results, await asyncio.to_thread(redis_cluster.keys_by_node, f"{KEY_PREFIX}{{tb:*")

    results, keys_by_node = run(scenario(), timeout=60)
    nodes_used = set()
    for name, (at_once, next_entry) in zip(names, results):
        key = bucket_key(name)
        owner = redis_cluster.owner_of_slot(key_slot(key))
        ports = {port for port, keys in keys_by_node.items() if key in keys}

        assert max(at_once) < period / 2, f"name {name!r}: expected {capacity} entries at once, the last took {max(at_once):.3f} s"
        assert next_entry >= period * 0.9, f"name {name!r}: expected entry {capacity + 1} after about {period} s, got {next_entry:.3f} s"
        assert next_entry < period + 1.0, f"name {name!r}: expected entry {capacity + 1} after about {period} s, got {next_entry:.3f} s"
        assert ports == {owner}, f"name {name!r}: expected {key!r} on the master {owner} of its slot, found it on {ports}"
        nodes_used.add(owner)
    assert len(nodes_used) > 1, f"expected the bucket keys on several masters, found them all on {nodes_used}"


def test_limiter_keys_one_slot(redis_cluster: RedisClusterServers, names: list[str]) -> None:
    """All keys of each limiter, the per-owner ones included, live in the slot of its hash tag."""

    async def build_state(name: str, observer, ready: asyncio.Event, snapshot_taken: asyncio.Event) -> None:
        # Three participants: the first one enters and the second one waits. Then the first lease
        # is made to look expired, and the third enters. Its acquire script moves that lease to the
        # lost set, admits the second through its wake-up list and queues the third.
        first, second, third = (Semaphore(name, 1, redis_url=redis_cluster.url(seed)) for seed in (0, 1, 2))
        base = semaphore_key(name, "")
        first_entered = asyncio.Event()
        second_entered = asyncio.Event()

        async def hold(semaphore: Semaphore, entered: asyncio.Event) -> None:
            async with semaphore:
                entered.set()
                await snapshot_taken.wait()

        async def second_waits() -> bool:
            return await observer.zcard(base + "waiters") == 1

        holder = asyncio.create_task(hold(first, first_entered))
        await wait_for_event(first_entered, holder)
        waiter = asyncio.create_task(hold(second, second_entered))
        assert await wait_until_async(second_waits, 10), f"name {name!r}: expected the second participant to wait"

        tokens = await observer.zrange(base + "holders", 0, -1)
        await observer.zadd(base + "holders", {tokens[0]: 1}, xx=True)  # a deadline long past
        late = asyncio.create_task(hold(third, asyncio.Event()))
        # Only the third participant's acquire script can admit the second one now, and it
        # queues the third one in the same call.
        await wait_for_event(second_entered, waiter)
        ready.set()
        await asyncio.gather(holder, waiter, late)

    async def scenario() -> dict[int, set[str]]:
        observer = redis_cluster.async_client()
        snapshot_taken = asyncio.Event()
        ready = [asyncio.Event() for _ in names]
        try:
            tasks = [
                asyncio.create_task(build_state(name, observer, event, snapshot_taken))
                for name, event in zip(names, ready)
            ]
            for event, task in zip(ready, tasks):
                await wait_for_event(event, task, timeout=20)
            keys = await asyncio.to_thread(redis_cluster.keys_by_node)
            snapshot_taken.set()
            await asyncio.gather(*tasks)
            return keys
        finally:
            snapshot_taken.set()
            await observer.aclose()

    keys_by_node = run(scenario(), timeout=60)
    nodes_used = set()
    for name in names:
        base = semaphore_key(name, "")
        slot = key_slot(base)
        owner = redis_cluster.owner_of_slot(slot)
        found = {port: {key for key in keys if key.startswith(base)} for port, keys in keys_by_node.items()}
        ports = {port for port, keys in found.items() if keys}
        kinds = {key[len(base):].split(":")[0] for key in found[owner]}

        assert ports == {owner}, f"name {name!r}: expected every semaphore key on the master {owner} of slot {slot}, found keys on {ports}"
        assert {key_slot(key) for key in found[owner]} == {slot}, f"name {name!r}: expected every semaphore key in slot {slot}, got {found[owner]}"
        assert kinds >= {"holders", "waiters", "tickets", "lost", "alive"}, (
            f"name {name!r}: expected holders, waiters, tickets, lost and alive keys, got {sorted(kinds)}"
        )
        nodes_used.add(owner)
    assert nodes_used == set(redis_cluster.ports), f"expected semaphore keys on all masters {redis_cluster.ports}, found them on {nodes_used}"


def test_wake_across_processes(redis_cluster: RedisClusterServers, name: str, tmp_path: Path) -> None:
    """A release in one process wakes the waiter of another at once, not at its next check-in."""
    expiry = 30  # waiters check in every expiry/3 = 10 s
    waiters_key = semaphore_key(name, "") + "waiters"
    holder = start_python("-c", HOLDER_CODE, redis_cluster.url(0), name, cwd=tmp_path)
    waiter = None
    try:
        line = read_first_line(holder, 30)
        assert line.strip() == "holding", f"expected the holder to print 'holding', got {line!r}"
        waiter = start_python("-c", WAITER_CODE, redis_cluster.url(1), name, cwd=tmp_path)
        line = read_first_line(waiter, 30)
        assert line.strip() == "waiting", f"expected the waiter to print 'waiting', got {line!r}"
        with redis_cluster.client() as observer:
            queued = wait_until(lambda: observer.zcard(waiters_key) == 1, 20)
        assert queued, "expected the waiter process in the Redis queue within 20 s"

        assert holder.stdin is not None
        holder.stdin.write("release\n")
        holder.stdin.flush()
        released = read_first_line(holder, 10).split()
        entered = read_first_line(waiter, 10).split()
        assert released[:1] == ["released"], f"expected the holder to print 'released', got {released}"
        assert entered[:1] == ["entered"], f"expected the waiter to print 'entered', got {entered}"
        delay = float(entered[1]) - float(released[1])
        assert delay < 2.0, f"expected the waiter to enter within 2 s of the release (check-ins come every {expiry / 3:.0f} s), took {delay:.3f} s"

        for child, role in ((holder, "holder"), (waiter, "waiter")):
            _, stderr = child.communicate(timeout=20)
            assert child.returncode == 0, f"expected the {role} to exit with 0, got {child.returncode}; stderr:\n{stderr}"
    finally:
        stop_child(holder)
        if waiter is not None:
            stop_child(waiter)


@dataclass
class MigrationRun:
    """What a semaphore's workers saw while its slot moved to another master."""

    source: int
    target: int
    keys_moved: int = 0
    migration_seconds: float = 0.0
    entries_after: int = 0  # in the second after the move
    peak: int = 0
    errors: list[str] = field(default_factory=list)
    unfinished: int = 0
    entered_at_once: int = 0
    timed_out_at_once: int = 0


def fill_slot(redis_cluster: RedisClusterServers, slot: int, count: int) -> None:
    """Write ``count`` small keys of another application into ``slot``, under a hash tag of their own."""
    tag = next(f"app-{index}" for index in range(1_000_000) if key_slot(f"{{app-{index}}}") == slot)
    with redis_cluster.node(redis_cluster.owner_of_slot(slot)) as node:
        for start in range(0, count, 500):
            node.mset({f"{{{tag}}}:{index}": "x" * 100 for index in range(start, min(start + 500, count))})


def migrate_busy_semaphore(redis_cluster: RedisClusterServers, name: str, other_keys: int, user_info: str = "") -> MigrationRun:
    """Move the slot of semaphore ``name`` to another master while 12 workers enter and leave it.

    Capacity is 3 and the workers use three participants, one per seed node. A child process
    moves the slot, which also contains ``other_keys`` keys of another application, once Redis
    shows 3 holders and at least one waiter. The workers stop 1 s after the move, and must all
    finish within 5 s, before the first check-in (10 s after the first entry) could rescue a
    waiter whose wake-up was lost. Afterwards 5 entries with max_sleep=0.5 try to enter at once.
    """
    capacity, workers = 3, 12
    base = semaphore_key(name, "")
    slot = key_slot(base)
    source = redis_cluster.owner_of_slot(slot)
    outcome = MigrationRun(source=source, target=next(port for port in redis_cluster.ports if port != source))
    if other_keys:
        fill_slot(redis_cluster, slot, other_keys)

    async def scenario() -> None:
        semaphores = [Semaphore(name, capacity, redis_url=redis_cluster.url(seed, user_info)) for seed in range(3)]
        inside = entries = 0
        stop = False

        async def worker(index: int) -> None:
            nonlocal inside, entries
            while not stop:
                try:
                    async with semaphores[index % 3]:
                        inside += 1
                        entries += 1
                        outcome.peak = max(outcome.peak, inside)
                        await asyncio.sleep(0.01 + 0.005 * (index % 4))
                        inside -= 1
                except Exception as exc:  # collected for the test's assert
                    outcome.errors.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.01)

        async def busy() -> bool:
            return await observer.zcard(base + "holders") == capacity and await observer.zcard(base + "waiters") > 0

        observer = redis_cluster.async_client()
        tasks = [asyncio.create_task(worker(index)) for index in range(workers)]
        try:
            assert await wait_until_async(busy, 10), "expected 3 holders and a waiter before the migration"
            assert mover.stdin is not None
            mover.stdin.write("go\n")
            mover.stdin.flush()
            reply = (await asyncio.to_thread(read_first_line, mover, 30)).split()
            assert reply[:1] == ["moved"], f"expected the slot mover to print 'moved', got {reply}"
            outcome.keys_moved, outcome.migration_seconds = int(reply[1]), float(reply[2])
            entries_when_moved = entries
            await asyncio.sleep(1.0)
            outcome.entries_after = entries - entries_when_moved
        finally:
            stop = True
            _, pending = await asyncio.wait(tasks, timeout=5)
            outcome.unfinished = len(pending)
            for task in pending:
                task.cancel()
            await observer.aclose()

        outcome.entered_at_once, outcome.timed_out_at_once = await entries_at_once(name, capacity, redis_cluster.url(2, user_info), 5)

    mover = redis_cluster.start_slot_mover(slot, outcome.target)
    try:
        ready = read_first_line(mover, 30)
        assert ready.strip() == "ready", f"expected the slot mover to print 'ready', got {ready!r}"
        run(scenario(), timeout=60)
    finally:
        stop_child(mover)
    return outcome


def check_migration(outcome: MigrationRun, redis_cluster: RedisClusterServers, name: str, capacity: int = 3) -> None:
    slot = key_slot(semaphore_key(name, ""))
    owner = redis_cluster.owner_of_slot(slot)
    keys = redis_cluster.keys_by_node(semaphore_key(name, "") + "*")

    assert owner == outcome.target, f"expected slot {slot} on master {outcome.target} after the migration, it is on {owner}"
    assert outcome.keys_moved > 0, "expected the migration to move the semaphore's keys, it moved none"
    assert not keys[outcome.source], f"expected no semaphore key left on the former master, found {sorted(keys[outcome.source])}"
    assert outcome.peak <= capacity, f"expected at most {capacity} holders at once, saw {outcome.peak}"
    assert not outcome.errors, (
        f"expected no error while the slot moved in {outcome.migration_seconds:.3f} s, "
        f"got {len(outcome.errors)}, first ones: {outcome.errors[:3]}"
    )
    assert outcome.unfinished == 0, f"expected every worker to finish within 5 s of the stop, {outcome.unfinished} did not"
    assert outcome.entries_after > 0, "expected entries during the second after the migration, saw none"
    assert outcome.entered_at_once == capacity, (
        f"expected exactly {capacity} of 5 entries at once after the migration, got {outcome.entered_at_once} "
        f"({outcome.timed_out_at_once} timed out)"
    )


def test_migration_busy_semaphore(redis_cluster: RedisClusterServers, name: str) -> None:
    outcome = migrate_busy_semaphore(redis_cluster, name, other_keys=0)
    check_migration(outcome, redis_cluster, name)


def test_migration_crowded_slot(redis_cluster: RedisClusterServers, name: str) -> None:
    """The slot also contains 10,000 keys of another application, so the move takes longer.

    With 10 keys per MIGRATE, as redis-cli --cluster reshard sends them, the move took 0.3 s to
    0.7 s on 2 cores.
    """
    outcome = migrate_busy_semaphore(redis_cluster, name, other_keys=10_000)
    check_migration(outcome, redis_cluster, name)


def test_release_in_migrating_slot(redis_cluster: RedisClusterServers, name: str) -> None:
    """A release while the slot is MIGRATING, with every declared key still on the old master.

    The release script then runs on the old master, which rejects any command of the script on a
    key missing from the MIGRATING slot ("non local key"). The script's own ZREM empties the
    holders set, so the ZCARD that follows fails after the release was written. Once the slot has
    moved, the waiter must still get the freed slot promptly.
    """
    base = semaphore_key(name, "")
    slot = key_slot(base)
    source = redis_cluster.owner_of_slot(slot)
    target = next(port for port in redis_cluster.ports if port != source)
    check_in_period = 10.0  # expiry/3 for the default expiry of 30 s

    async def scenario() -> float | None:
        holding, waiting = (Semaphore(name, 1, redis_url=redis_cluster.url(seed)) for seed in (0, 1))
        release = asyncio.Event()
        holding_started = asyncio.Event()
        entered = asyncio.Event()

        async def hold() -> None:
            async with holding:
                holding_started.set()
                await release.wait()

        async def wait_in_line() -> None:
            async with waiting:
                entered.set()

        observer = redis_cluster.async_client()
        holder = asyncio.create_task(hold())
        waiter = None
        try:
            await wait_for_event(holding_started, holder)
            waiter = asyncio.create_task(wait_in_line())

            async def queued() -> bool:
                return await observer.zcard(base + "waiters") == 1

            assert await wait_until_async(queued, 10), "expected the second participant in the Redis queue"
            # A lease lost within the last expiry, as after a crash, keeps the lost set alive: now
            # all 4 declared keys exist, so the old master runs the scripts instead of TRYAGAIN.
            await observer.zadd(base + "lost", {"crashed-owner:1": int(time.time() * 1000)})
            await asyncio.to_thread(redis_cluster.begin_slot_migration, slot, target)
            release.set()
            await holder
            await asyncio.sleep(0.2)  # the release reaches the old master while the slot migrates
            await asyncio.to_thread(redis_cluster.finish_slot_migration, slot, source, target)
            moved_at = time.monotonic()
            try:
                await asyncio.wait_for(entered.wait(), 3)
            except asyncio.TimeoutError:
                return None
            return time.monotonic() - moved_at
        finally:
            release.set()
            if waiter is not None:
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
            await observer.aclose()

    delay = run(scenario(), timeout=60)
    assert delay is not None, (
        f"expected the waiter to enter within 3 s after the slot moved, it did not "
        f"(its next check-in comes {check_in_period:.0f} s after it queued)"
    )



# The least-privilege user of the README on a Cluster: CLUSTER SLOTS reads the slot map, and ASKING
# precedes a command that follows an ASK redirection while a slot moves.
CLUSTER_LIMITER_COMMANDS = (*LIMITER_COMMANDS, "cluster|slots", "asking")


def create_acl_user(redis_cluster: RedisClusterServers, commands: tuple[str, ...]) -> tuple[str, str]:
    """Create the same ACL user on every master, with ``commands`` on the limiters' keys only.

    Returns the user name and the user info "user:password" for RedisClusterServers.url.
    """
    user, password = f"limiter-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    for port in redis_cluster.ports:
        with redis_cluster.node(port) as node:
            node.execute_command(
                "ACL", "SETUSER", user, "on", f">{password}", "resetkeys", LIMITER_KEYS, "resetchannels", "-@all",
                *(f"+{command}" for command in commands),
            )
    return user, f"{user}:{password}"


def acl_denials(redis_cluster: RedisClusterServers, user: str) -> list[str]:
    """Return what ACL LOG recorded as denied to ``user`` on any master, as 'port reason object'."""
    denied = []
    for port in redis_cluster.ports:
        with redis_cluster.node(port) as node:
            for entry in node.execute_command("ACL", "LOG", "128"):
                if entry["username"] == user:
                    denied.append(f"{port} {entry['reason']} {entry['object']}")
    return denied


def delete_acl_user(redis_cluster: RedisClusterServers, user: str) -> None:
    for port in redis_cluster.ports:
        with redis_cluster.node(port) as node:
            node.execute_command("ACL", "DELUSER", user)


def test_acl_user_on_cluster(redis_cluster: RedisClusterServers, name: str) -> None:
    """The least-privilege user of the README, with the Cluster commands, runs both limiters.

    go-redis reads the slot map with CLUSTER SLOTS. Redis must deny the user nothing: no refused
    COMMAND either, which go-redis would send before every call to look up routing policies.
    """
    user, user_info = create_acl_user(redis_cluster, CLUSTER_LIMITER_COMMANDS)
    url = redis_cluster.url(0, user_info)

    async def scenario() -> float:
        holder = Semaphore(name, 1, expiry=30, redis_url=url)
        other_owner = Semaphore(name, 1, expiry=29, redis_url=url)  # another owner id, woken through BLPOP
        async with holder:
            waiter = asyncio.create_task(other_owner.__aenter__())
            with redis_cluster.client() as observer:
                queued = await asyncio.to_thread(wait_until, lambda: observer.zcard(semaphore_key(name, "waiters")) == 1, 10)
            assert queued, "expected the second owner in the Redis queue"
            released_at = time.monotonic()
        await asyncio.wait_for(waiter, 10)
        woken_after = time.monotonic() - released_at
        await other_owner.__aexit__(None, None, None)
        async with TokenBucket(name, 1, 1, 1, redis_url=url):
            pass
        return woken_after

    try:
        woken_after = run(scenario())
        denied = acl_denials(redis_cluster, user)
    finally:
        delete_acl_user(redis_cluster, user)

    assert woken_after < 5, f"expected the waiter to enter within 5 s of the release, it took {woken_after:.2f} s"
    assert denied == [], f"expected nothing denied to the limiter user on any master, ACL LOG has {denied}"


def test_acl_user_without_cluster_slots(redis_cluster: RedisClusterServers, name: str) -> None:
    user, user_info = create_acl_user(redis_cluster, LIMITER_COMMANDS)
    url = redis_cluster.url(0, user_info)

    async def enter() -> None:
        async with Semaphore(name, 1, redis_url=url):
            pass

    try:
        with pytest.raises(RedisError) as raised:
            run(enter())
    finally:
        delete_acl_user(redis_cluster, user)

    message = str(raised.value)
    assert "NOPERM" in message, f"expected Redis's NOPERM reply in the RedisError, got {message!r}"
    assert "cluster|slots" in message, f"expected the RedisError to name the denied command cluster|slots, got {message!r}"


def test_acl_user_during_migration(redis_cluster: RedisClusterServers, name: str) -> None:
    """The least-privilege user keeps working while the slot of its busy semaphore moves.

    go-redis follows an ASK redirection with ASKING, which the user must be allowed to run.
    """
    user, user_info = create_acl_user(redis_cluster, CLUSTER_LIMITER_COMMANDS)
    try:
        outcome = migrate_busy_semaphore(redis_cluster, name, other_keys=10_000, user_info=user_info)
        denied = acl_denials(redis_cluster, user)
    finally:
        delete_acl_user(redis_cluster, user)

    check_migration(outcome, redis_cluster, name)
    assert denied == [], f"expected nothing denied to the limiter user during the migration, ACL LOG has {denied}"
