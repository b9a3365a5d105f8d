"""A private Redis Sentinel deployment on loopback: a master, one replica and three sentinels.

Every node is a ``redis-server`` on a free 127.0.0.1 port, without persistence, with its own
folder (a sentinel rewrites its config file). ``start`` returns once all three sentinels agree on
the master and see the replica and each other; ``stop`` ends every node that still runs.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from support import REDIS_SERVER, closed_port, start_redis_server


MASTER_NAME = "sl-master"
QUORUM = 2
SENTINEL_COUNT = 3
# A sentinel marks the master down after this long without a valid reply to its PINGs.
DOWN_AFTER = 1.0
# Bounds one failover attempt. After a failed attempt (such as a split vote), the sentinels try
# again only 2 x FAILOVER_TIMEOUT after its start.
FAILOVER_TIMEOUT = 5.0
# Ports that another Redis or Sentinel on this machine may own.
_RESERVED_PORTS = {6379, 26379}


def _free_ports(count: int) -> list[int]:
    """Return ``count`` different loopback ports on which nothing listens, never a reserved one."""
    ports: list[int] = []
    while len(ports) < count:
        port = closed_port()
        if port not in _RESERVED_PORTS and port not in ports:
            ports.append(port)
    return ports


class SentinelDeployment:
    """A master, a replica of it and three sentinels that monitor the master as MASTER_NAME."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.master_port, self.replica_port, *self.sentinel_ports = _free_ports(2 + SENTINEL_COUNT)
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, master_name: str = MASTER_NAME, **options: str) -> str:
        """Return the redis+sentinel:// URL of this deployment, with every sentinel and ``options``."""
        first, *others = self.sentinel_ports
        query = [f"addr=127.0.0.1:{port}" for port in others]
        query.append(f"master_name={master_name}")
        query.extend(f"{option}={value}" for option, value in options.items())
        return f"redis+sentinel://127.0.0.1:{first}?" + "&".join(query)

    def start(self, timeout: float = 30) -> None:
        """Start every node and return once the sentinels agree on the master, the replica and each other."""
        deadline = time.monotonic() + timeout
        try:
            # The master sends its first full sync at once, not after the default delay of 5 s.
            self._start_data_node("master", self.master_port, ["--repl-diskless-sync-delay", "0"])
            self._wait_until("the master replies to PING", lambda: self._ping(self.master_port), deadline)
            self._start_data_node("replica", self.replica_port, ["--replicaof", "127.0.0.1", str(self.master_port)])
            # Sentinels learn the replicas from the master's INFO, which they read at once on
            # connecting and then every 10 s, so they start only once the replica is attached.
            self._wait_until("the replica is in sync with the master", self._replica_in_sync, deadline)
            for index, port in enumerate(self.sentinel_ports):
                self._start_sentinel(index, port)
            self._wait_until("the sentinels agree on the master, the replica and each other", self._sentinels_ready, deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node that still runs, with SIGTERM and then SIGKILL, and wait until it has exited."""
        for process in self._processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self._processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill_master(self) -> None:
        """Kill the master with SIGKILL and return once it has exited, so it serves nothing more."""
        process = self._processes["master"]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def master_ports(self) -> list[int | None]:
        """Return the master port that each sentinel reports now, or None for a sentinel that did not reply."""
        ports: list[int | None] = []
        for port in self.sentinel_ports:
            client = self._client(port)
            try:
                address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                ports.append(int(address[1]) if address else None)
            except redis.RedisError:
                ports.append(None)
            finally:
                client.close()
        return ports

    def data_client(self, port: int, db: int = 0) -> redis.Redis:
        """Return a redis-py client of database ``db`` of the master or replica on ``port``, with replies decoded to str."""
        return redis.Redis(host="127.0.0.1", port=port, db=db, decode_responses=True, socket_timeout=5)

    def logs(self) -> str:
        """Return the log files of every node, for failure messages."""
        parts = []
        for role in self._processes:
            log = self.folder / role / "redis.log"
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            parts.append(f"--- {role} ---\n{text}")
        return "\n".join(parts)


    def _node_folder(self, role: str) -> Path:
        folder = self.folder / role
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _start_data_node(self, role: str, port: int, extra: list[str]) -> None:
        folder = self._node_folder(role)
        self._processes[role] = start_redis_server(folder, "--port", str(port), "--bind", "127.0.0.1", *extra)

    def _start_sentinel(self, index: int, port: int) -> None:
        role = f"sentinel-{index}"
        folder = self._node_folder(role)
        config = folder / "sentinel.conf"
        config.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    f"dir {folder}",
                    f"logfile {folder / 'redis.log'}",
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} {QUORUM}",
                    f"sentinel down-after-milliseconds {MASTER_NAME} {int(DOWN_AFTER * 1000)}",
                    f"sentinel failover-timeout {MASTER_NAME} {int(FAILOVER_TIMEOUT * 1000)}",
                    f"sentinel parallel-syncs {MASTER_NAME} 1",
                    "",
                ]
            )
        )
        self._processes[role] = subprocess.Popen(
            [REDIS_SERVER, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)

    def _ping(self, port: int) -> bool:
        client = self._client(port)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _replica_in_sync(self) -> bool:
        client = self._client(self.replica_port)
        try:
            return client.info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            client = self._client(port)
            try:
                reply = client.execute_command("SENTINEL", "MASTER", MASTER_NAME)
            except redis.RedisError:
                return False
            finally:
                client.close()
            state = dict(zip(reply[::2], reply[1::2])) if isinstance(reply, list) else reply
            if state.get("flags") != "master" or int(state.get("port", 0)) != self.master_port:
                return False
            if int(state.get("num-slaves", 0)) < 1 or int(state.get("num-other-sentinels", 0)) < SENTINEL_COUNT - 1:
                return False
        return True

    def _wait_until(self, condition: str, predicate, deadline: float) -> None:
        while not predicate():
            exited = [role for role, process in self._processes.items() if process.poll() is not None]
            if exited:
                raise RuntimeError(f"redis-server exited early ({', '.join(exited)}). Logs:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting until {condition}. Logs:\n{self.logs()}")
            time.sleep(0.05)
