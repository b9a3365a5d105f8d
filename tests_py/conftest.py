"""Fixtures: one Redis server per session, an independent redis-py client, unique limiter names.

The server is the one at ``SL_REDIS_URL`` when that is set, otherwise a private ``redis-server``
on a free loopback port, without persistence, in its own temporary folder, stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis

from support import closed_port, start_redis_server



def _start_private_server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = closed_port()
    while port == 6379:  # never the default port, which another server may own
        port = closed_port()
    server = start_redis_server(folder, "--port", str(port), "--bind", "127.0.0.1")
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                log = (folder / "redis.log").read_text(errors="replace") if (folder / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server on port {port} failed to start. Its log:\n{log}") from None
            time.sleep(0.02)
        finally:
            client.close()
    return server, url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the Redis server of this session."""
    configured_url = os.environ.get("SL_REDIS_URL")
    if configured_url:
        yield configured_url
        return

    server, url = _start_private_server(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def observer(redis_url: str) -> Iterator[redis.Redis]:
    """A redis-py client that watches and tampers with the limiters' keys from outside."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A limiter name that no other test uses."""
    return f"{request.node.originalname}-{uuid.uuid4().hex[:12]}"
