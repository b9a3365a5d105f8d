"""A private redis-server that the fault tests may stop, restart and flush without harming others."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from support import closed_port, start_python, start_redis_server



class PrivateRedis:
    """A redis-server without persistence on a free loopback port, in its own folder.

    ``stop`` and ``start`` keep the port, so clients that know the URL reach the new server.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = closed_port()
        while self.port == 6379:  # never the default port, which another server may own
            self.port = closed_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> None:
        """Start the server and return once it replies to PING."""
        log = self.folder / "redis.log"
        self._process = start_redis_server(self.folder, "--port", str(self.port), "--bind", "127.0.0.1")
        client = self.client()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        self._process.kill()
                        text = log.read_text(errors="replace") if log.exists() else ""
                        raise RuntimeError(f"redis-server on port {self.port} failed to start. Its log:\n{text}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def pause(self) -> None:
        """Freeze the server with SIGSTOP. It keeps its connections open but sends no reply."""
        assert self._process is not None, "the server is not running"
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused server with SIGCONT."""
        assert self._process is not None, "the server is not running"
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server with SIGTERM (it saves nothing) and wait until it has exited."""
        if self._process is None:
            return
        self._process.send_signal(signal.SIGCONT)  # a paused server would not act on SIGTERM
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def client(self) -> redis.Redis:
        """Return a new redis-py client of this server, with replies decoded to str."""
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=10)


HOLDER_SCRIPT = Path(__file__).with_name("fault_child.py")


def start_holder_child(url: str, name: str, expiry: float, cwd: Path) -> subprocess.Popen[str]:
    """Start fault_child.py, which holds a slot until a line arrives on its stdin, with text pipes."""
    return start_python(HOLDER_SCRIPT, url, name, expiry, cwd=cwd)
