"""Private redis-servers for the TLS, unix socket and ACL tests, and the certificates they use.

Certificates come from /usr/bin/openssl and belong to throwaway certificate authorities made in a
temporary folder. Every server listens on 127.0.0.1 or on a socket in its own temporary folder,
keeps no data on disk, and is stopped when its fixture ends, also after a failure.

Run as a script, this file is the child process of the wake-up tests: ``tls_support.py hold URL
NAME CAPACITY EXPIRY`` enters a semaphore, prints "holding", leaves once a line arrives on stdin,
and then prints "released".
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis

from support import closed_port, start_python, start_redis_server

OPENSSL = "/usr/bin/openssl"
ADMIN_PASSWORD = "admin-secret"


@dataclass(frozen=True)
class Certificates:
    """PEM files of one test run: a CA, a server and a client certificate signed by it, and a
    second CA that signed nothing that the servers use."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed with exit code {result.returncode}:\n{result.stderr}")


def _make_ca(folder: Path, stem: str) -> tuple[Path, Path]:
    """Create a self-signed CA as STEM.pem and STEM.key, valid for two days."""
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{stem}.key", "-out", f"{stem}.pem", "-days", "2",
        "-subj", f"/CN=self-limiters test {stem}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )
    return folder / f"{stem}.pem", folder / f"{stem}.key"


def _make_leaf(folder: Path, stem: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    """Create STEM.pem and STEM.key signed by ``ca``, for 127.0.0.1 and localhost.

    ``usage`` is the extended key usage, serverAuth or clientAuth. Go verifies the IP address
    against the subjectAltName only, never against the common name.
    """
    extensions = folder / f"{stem}.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN=self-limiters test {stem}",
        cwd=folder,
    )
    _openssl(
        "x509", "-req", "-in", f"{stem}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-out", f"{stem}.pem", "-days", "2", "-extfile", extensions.name,
        cwd=folder,
    )
    return folder / f"{stem}.pem", folder / f"{stem}.key"


def make_certificates(folder: Path) -> Certificates:
    """Create the certificates of a test run in ``folder``."""
    ca = _make_ca(folder, "ca")
    server = _make_leaf(folder, "server", ca, "serverAuth")
    client = _make_leaf(folder, "client", ca, "clientAuth")
    wrong_ca, _ = _make_ca(folder, "wrong-ca")
    return Certificates(ca[0], server[0], server[1], client[0], client[1], wrong_ca)


def free_port() -> int:
    """Return a free loopback port other than 6379, which another server may own."""
    port = closed_port()
    while port == 6379:
        port = closed_port()
    return port


class PrivateServer:
    """A redis-server started with ``listen_args`` in its own folder, without persistence.

    ``admin`` builds a redis-py client of the server with full rights.
    """

    def __init__(self, folder: Path, listen_args: list[str], admin: Callable[..., redis.Redis]) -> None:
        self.folder = folder
        self.log = folder / "redis.log"
        self._admin = admin
        self._process = start_redis_server(folder, *listen_args)
        try:
            self._wait_ready(timeout=10)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            client = self._admin()
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    text = self.log.read_text(errors="replace") if self.log.exists() else ""
                    raise RuntimeError(f"redis-server failed to start. Its log:\n{text}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def admin(self, db: int = 0) -> redis.Redis:
        """Return a new redis-py client with full rights, with replies decoded to str."""
        return self._admin(db=db)

    def stop(self) -> None:
        """Stop the server with SIGTERM, or SIGKILL after 10 s, and wait until it has exited."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


@pytest.fixture(scope="module")
def certificates() -> Iterator[Certificates]:
    folder = Path(tempfile.mkdtemp(prefix="sl-tls-"))
    try:
        yield make_certificates(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _start_tls_server(certificates: Certificates, auth_clients: bool) -> tuple[PrivateServer, str]:
    """Start a TLS-only server and return it with its URL without query options."""
    folder = Path(tempfile.mkdtemp(prefix="sl-tls-redis-"))
    port = free_port()
    listen_args = [
        "--port", "0",
        "--bind", "127.0.0.1",
        "--tls-port", str(port),
        "--tls-cert-file", str(certificates.server_cert),
        "--tls-key-file", str(certificates.server_key),
        "--tls-ca-cert-file", str(certificates.ca),
        "--tls-auth-clients", "yes" if auth_clients else "no",
    ]

    def admin(db: int = 0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=port, db=db, ssl=True, ssl_ca_certs=str(certificates.ca),
            ssl_certfile=str(certificates.client_cert), ssl_keyfile=str(certificates.client_key),
            decode_responses=True, socket_timeout=10,
        )

    try:
        return PrivateServer(folder, listen_args, admin), f"rediss://127.0.0.1:{port}"
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


@pytest.fixture(scope="module")
def tls_server(certificates: Certificates) -> Iterator[tuple[PrivateServer, str]]:
    """A TLS server that requests no client certificate, with its URL without query options."""
    server, url = _start_tls_server(certificates, auth_clients=False)
    try:
        yield server, url
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mutual_tls_server(certificates: Certificates) -> Iterator[tuple[PrivateServer, str]]:
    """A TLS server that requires a client certificate signed by the CA (tls-auth-clients yes)."""
    server, url = _start_tls_server(certificates, auth_clients=True)
    try:
        yield server, url
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def unix_server() -> Iterator[tuple[PrivateServer, Path]]:
    """A server that listens only on a unix socket, with the socket's path."""
    # mkdtemp under /tmp keeps the path far below the 107 bytes that a socket address allows.
    folder = Path(tempfile.mkdtemp(prefix="sl-unix-"))
    socket_path = folder / "redis.sock"
    listen_args = ["--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"]

    def admin(db: int = 0) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(socket_path), db=db, decode_responses=True, socket_timeout=10)

    try:
        server = PrivateServer(folder, listen_args, admin)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        yield server, socket_path
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def acl_server() -> Iterator[tuple[PrivateServer, int]]:
    """A TCP server whose default user needs the password ADMIN_PASSWORD, with its port.

    Without that password a connection runs nothing before it authenticates, so every command of
    a limiter is checked against the ACL user of its URL.
    """
    folder = Path(tempfile.mkdtemp(prefix="sl-acl-redis-"))
    port = free_port()
    listen_args = ["--port", str(port), "--bind", "127.0.0.1", "--requirepass", ADMIN_PASSWORD]

    def admin(db: int = 0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=port, db=db, password=ADMIN_PASSWORD, decode_responses=True, socket_timeout=10
        )

    try:
        server = PrivateServer(folder, listen_args, admin)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        yield server, port
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def start_holder(url: str, name: str, capacity: int, expiry: float, cwd: Path) -> subprocess.Popen[str]:
    """Start this file as a child that holds a semaphore slot until a line arrives on its stdin."""
    return start_python(Path(__file__), "hold", url, name, capacity, expiry, cwd=cwd)


async def _hold_until_stdin_line(url: str, name: str, capacity: str, expiry: str) -> None:
    from self_limiters import Semaphore

    async with Semaphore(name, int(capacity), expiry=float(expiry), redis_url=url):
        print("holding", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
    print("released", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["hold"] or len(sys.argv) != 6:
        sys.exit("usage: tls_support.py hold URL NAME CAPACITY EXPIRY")
    asyncio.run(_hold_until_stdin_line(*sys.argv[2:]))
