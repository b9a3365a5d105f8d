"""Fixture: a private Redis Cluster of 3 masters on loopback, for the whole test session.

Each node is a ``redis-server`` without persistence in its own temporary folder, on a free port
whose cluster bus port (port + 10000) is free too. ``redis-cli --cluster create`` joins them
with no replicas, and the fixture waits until every node reports ``cluster_state:ok``. All
nodes are stopped at the end, also when the start fails half way.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import redis
import redis.asyncio.cluster
import redis.crc
from redis.cluster import ClusterNode, RedisCluster

from support import KEY_PREFIX, start_redis_server

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
HOST = "127.0.0.1"
MASTERS = 3
# Ports that another server on this machine may own: the default port and its cluster bus port.
RESERVED_PORTS = {6379, 16379}

# A child process that moves one slot when a line arrives on stdin, and prints "moved", the
# number of keys moved and the seconds the move took. Arguments: the folder of this module, the
# node ports and node ids as JSON, the slot and the target port.
SLOT_MOVER_CODE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from cluster_support import RedisClusterServers

node_ids = {int(port): node_id for port, node_id in json.loads(sys.argv[3]).items()}
servers = RedisClusterServers(ports=json.loads(sys.argv[2]), processes=[], folders=[], node_ids=node_ids)
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
moved = servers.migrate_slot(int(sys.argv[4]), int(sys.argv[5]))
print("moved", moved, time.monotonic() - started, flush=True)
"""


def key_slot(key: str) -> int:
    """Return the Cluster slot of ``key``, honouring its hash tag."""
    return redis.crc.key_slot(key.encode())


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_node_port(in_use: set[int]) -> int:
    """Return a free loopback port whose cluster bus port (port + 10000) is free too."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        bus_port = port + 10000
        if bus_port > 65535 or {port, bus_port} & (RESERVED_PORTS | in_use):
            continue
        if _port_is_free(bus_port):
            return port
    raise RuntimeError("found no free loopback port whose port + 10000 is free too")


@dataclass
class RedisClusterServers:
    """A running private cluster: node ports, node ids and the URL that the limiters take."""

    ports: list[int]
    processes: list[subprocess.Popen[bytes]]
    folders: list[Path]
    node_ids: dict[int, str] = field(default_factory=dict)  # port -> node id

    def url(self, seed: int = 0, user_info: str = "") -> str:
        """Return a redis+cluster URL that lists every node, starting with node ``seed``.

        ``user_info`` is "user:password" for an ACL user, or empty for the default user.
        """
        ordered = self.ports[seed:] + self.ports[:seed]
        extra = "&".join(f"addr={HOST}:{port}" for port in ordered[1:])
        at = f"{user_info}@" if user_info else ""
        return f"redis+cluster://{at}{HOST}:{ordered[0]}?{extra}"

    def client(self) -> RedisCluster:
        """Return a new redis-py Cluster client with decoded replies; the caller closes it."""
        return RedisCluster(startup_nodes=[ClusterNode(HOST, port) for port in self.ports], decode_responses=True)

    def async_client(self) -> redis.asyncio.cluster.RedisCluster:
        """Return a new asyncio redis-py Cluster client with decoded replies; the caller closes it."""
        nodes = [redis.asyncio.cluster.ClusterNode(HOST, port) for port in self.ports]
        return redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, decode_responses=True)

    def node(self, port: int) -> redis.Redis:
        """Return a new redis-py client of the one node on ``port``; the caller closes it."""
        return redis.Redis(host=HOST, port=port, decode_responses=True)

    def owner_of_slot(self, slot: int) -> int:
        """Return the port of the master that serves ``slot``, from CLUSTER SLOTS on the first node."""
        with self.node(self.ports[0]) as node:
            for start, end, master, *_ in node.cluster("slots"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"no master serves slot {slot}")

    def keys_by_node(self, pattern: str = f"{KEY_PREFIX}*") -> dict[int, set[str]]:
        """Return the keys matching ``pattern`` on each master, read from that master itself."""
        found = {}
        for port in self.ports:
            with self.node(port) as node:
                found[port] = set(node.scan_iter(match=pattern, count=1000))
        return found

    def migrate_slot(self, slot: int, target: int, batch: int = 10) -> int:
        """Move ``slot`` to the master on port ``target`` as ``redis-cli --cluster reshard`` does,
        and return the number of keys moved.

        The target imports the slot and its owner migrates it, MIGRATE moves ``batch`` keys at a
        time until the slot is empty on the owner, then CLUSTER SETSLOT NODE sets the new owner on
        every node, the target first. Meanwhile the owner replies ASK for keys it no longer has,
        and both nodes reply TRYAGAIN to a multi-key command that finds only some of its keys.
        The connections are opened first, so that the slot stays MIGRATING no longer than needed.
        """
        nodes = {port: self.node(port) for port in self.ports}
        try:
            for node in nodes.values():
                node.ping()
            source = self.begin_slot_migration(slot, target, nodes)
            return self.finish_slot_migration(slot, source, target, batch, nodes)
        finally:
            for node in nodes.values():
                node.close()

    def start_slot_mover(self, slot: int, target: int) -> subprocess.Popen[str]:
        """Start a child process that runs migrate_slot(slot, target) once a line arrives on its stdin.

        In a process of its own, the move does not wait for the GIL of the test's event loop, so
        the slot stays MIGRATING only as long as the Redis commands take.
        """
        return subprocess.Popen(
            [sys.executable, "-c", SLOT_MOVER_CODE, str(Path(__file__).parent), json.dumps(self.ports),
             json.dumps(self.node_ids), str(slot), str(target)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def begin_slot_migration(self, slot: int, target: int, nodes: dict[int, redis.Redis] | None = None) -> int:
        """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on its owner, and return the owner's port.

        ``nodes`` are open clients by port; without them, each step opens its own.
        """
        source = self.owner_of_slot(slot)
        self._run_on(target, nodes, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_ids[source])
        self._run_on(source, nodes, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_ids[target])
        return source

    def finish_slot_migration(
        self, slot: int, source: int, target: int, batch: int = 10, nodes: dict[int, redis.Redis] | None = None
    ) -> int:
        """Move the keys of a migrating ``slot``, then give the slot to ``target`` on every node."""
        moved = 0
        while True:
            keys = self._run_on(source, nodes, "CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            self._run_on(source, nodes, "MIGRATE", HOST, target, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        others = [port for port in self.ports if port not in (source, target)]
        for port in [target, source, *others]:
            self._run_on(port, nodes, "CLUSTER", "SETSLOT", slot, "NODE", self.node_ids[target])
        return moved

    def _run_on(self, port: int, nodes: dict[int, redis.Redis] | None, *command: object) -> object:
        if nodes is not None:
            return nodes[port].execute_command(*command)
        with self.node(port) as node:
            return node.execute_command(*command)

    def log(self, index: int) -> str:
        path = self.folders[index] / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _start_node(folder: Path, port: int) -> subprocess.Popen[bytes]:
    return start_redis_server(
        folder, "--port", str(port), "--bind", HOST, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"
    )


def _wait_for_ping(servers: RedisClusterServers, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for index, port in enumerate(servers.ports):
        with servers.node(port) as node:
            while True:
                try:
                    node.ping()
                    break
                except redis.ConnectionError:
                    if servers.processes[index].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server on port {port} failed to start. Its log:\n{servers.log(index)}"
                        ) from None
                    time.sleep(0.02)


def _create_cluster(servers: RedisClusterServers) -> None:
    command = [REDIS_CLI, "--cluster", "create", *(f"{HOST}:{port}" for port in servers.ports),
               "--cluster-replicas", "0", "--cluster-yes"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create failed with exit code {done.returncode}:\n{done.stdout}{done.stderr}")


def _wait_for_cluster_ok(servers: RedisClusterServers, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for port in servers.ports:
        with servers.node(port) as node:
            while True:
                info = node.cluster("info")
                if info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == MASTERS:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"node on port {port} still reports cluster_state:{info['cluster_state']} "
                        f"and knows {info['cluster_known_nodes']} nodes after {timeout} s"
                    )
                time.sleep(0.05)
            servers.node_ids[port] = node.cluster("myid")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A private Redis Cluster of 3 masters without replicas, stopped at the end of the session."""
    servers = RedisClusterServers(ports=[], processes=[], folders=[])
    try:
        for index in range(MASTERS):
            folder = tmp_path_factory.mktemp(f"cluster-node{index}")
            port = free_node_port(set(servers.ports))
            servers.folders.append(folder)
            servers.ports.append(port)
            servers.processes.append(_start_node(folder, port))
        _wait_for_ping(servers, timeout=10)
        _create_cluster(servers)
        _wait_for_cluster_ok(servers, timeout=30)
        yield servers
    finally:
        _stop(servers.processes)
