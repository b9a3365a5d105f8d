"""The link to the Go core: loading it on first use, and completions through one pipe per loop.

The Go extension is imported on first use only, never by ``import self_limiters`` or by building
a limiter, because a Go runtime does not survive ``fork()``: servers that import, then fork
workers (gunicorn --preload, Celery prefork, multiprocessing) must fork before it starts.

A Go call that could wait returns a request id at once and works in a goroutine. Its outcome
comes back as a 16-byte record (request id, value) on a pipe that the running event loop watches
with ``add_reader``, so no thread of the executor ever waits for Redis and the loop wakes up
exactly when an outcome is ready.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import os
import struct
import threading
from types import ModuleType

from ._errors import ForkedProcessError, error_from_bridge

logger = logging.getLogger("self_limiters")

_RECORD = struct.Struct("<qq")
_READ_SIZE = _RECORD.size * 4096

# Outcome values of a semaphore release, as the Go bridge reports them.
_LEASE_LOST = 1

# How long the process waits at exit for releases still in flight, in seconds.
EXIT_RELEASE_TIMEOUT = 5.0

_library: ModuleType | None = None
_library_pid = 0
_forked_after_load = False
_load_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _forked_after_load
    if _library is not None:
        _forked_after_load = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def library() -> ModuleType:
    """Return the Go extension, loading it on first use.

    Raises ForkedProcessError in a child forked after the parent loaded it.
    """
    global _library, _library_pid
    if _forked_after_load:
        raise ForkedProcessError(
            f"self_limiters cannot run in this process (pid {os.getpid()}): it was forked from pid "
            f"{_library_pid} after that process had started the Go runtime of self_limiters, and a Go "
            "runtime does not survive fork(). Use the limiters in a parent only after forking its "
            "workers, or start workers with the 'spawn' or 'forkserver' multiprocessing start method."
        )
    if _library is None:
        with _load_lock:
            if _library is None:
                # Importing the extension module directly skips gopy's generated wrapper, which
                # changes the working directory while it imports.
                _library_pid = os.getpid()
                _library = importlib.import_module("self_limiters._slbridge")
                atexit.register(_finish_releases_at_exit)
    return _library


def close_handle(handle: int) -> None:
    """Drop one open of a Go limiter handle; called when a limiter object is collected.

    It does nothing in a process forked after the library was loaded, where Go cannot run, or
    once the interpreter is shutting down.
    """
    library_ = _library
    if library_ is None or _forked_after_load:
        return
    try:
        library_.pybridge_CloseLimiter(handle, False)
    except Exception:  # the interpreter is shutting down; the process ends anyway
        pass


def check(result: int) -> int:
    """Return ``result`` of a Go call, or raise the error whose negated id it is."""
    if result < 0:
        raise error_from_bridge(library().pybridge_TakeError(-result))
    return result


class LoopPort:
    """The completion pipe of one event loop, and the futures of its requests in flight."""

    __slots__ = ("loop", "queue", "_read_fd", "_futures", "_releases")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        lib = library()
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        queue = lib.pybridge_OpenQueue(write_fd)
        if queue < 0:
            os.close(read_fd)
            os.close(write_fd)
            check(queue)
        # From here on the write end belongs to the Go side, which closes it in CloseQueue.
        self.loop = loop
        self.queue = queue
        self._read_fd = read_fd
        self._futures: dict[int, asyncio.Future[int]] = {}
        # Releases that nobody waits for, by request id: the name and expiry of their semaphore.
        self._releases: dict[int, tuple[str, float]] = {}
        loop.add_reader(read_fd, self._read_records)

    def expect(self, request_id: int) -> asyncio.Future[int]:
        """Return the future that the outcome of ``request_id`` will complete."""
        future = self.loop.create_future()
        self._futures[request_id] = future
        return future

    def release(self, acquire_id: int, name: str, expiry: float) -> None:
        """Start giving back the slot that ``acquire_id`` holds, without waiting for Redis.

        The Go side sends the release at once; its outcome is logged when it arrives, and at
        interpreter exit the process waits for releases still in flight.
        """
        release_id = check(library().pybridge_SemaphoreRelease(acquire_id, self.queue))
        self._releases[release_id] = (name, expiry)

    def forget(self, request_id: int) -> None:
        """Stop waiting for ``request_id``; a record that still arrives for it is dropped."""
        self._futures.pop(request_id, None)

    def _read_records(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, _READ_SIZE)
            except BlockingIOError:
                return
            # Each record is written by one write() of 16 bytes, which a pipe keeps whole, and
            # _READ_SIZE is a multiple of 16, so a read never splits a record.
            self._dispatch(data)
            if len(data) < _READ_SIZE:
                return

    def _dispatch(self, data: bytes) -> None:
        for request_id, value in _RECORD.iter_unpack(data):
            release = self._releases.pop(request_id, None)
            if release is not None:
                _log_release(release, value)
                continue
            future = self._futures.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(value)

    def read_left_over_releases(self) -> None:
        """Log the outcomes of releases that arrived after the loop stopped, at exit."""
        while self._releases:
            try:
                data = os.read(self._read_fd, _READ_SIZE)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self._dispatch(data)

    def close(self) -> None:
        """Release the pipe of a loop that was closed."""
        library().pybridge_CloseQueue(self.queue, False)
        os.close(self._read_fd)
        self._futures.clear()


_ports: dict[asyncio.AbstractEventLoop, LoopPort] = {}
_ports_lock = threading.Lock()


def port() -> LoopPort:
    """Return the completion port of the running event loop, creating it on first use."""
    loop = asyncio.get_running_loop()
    found = _ports.get(loop)
    if found is not None:
        library()  # raises in a process forked after the library was loaded
        return found

    with _ports_lock:
        for closed in [other for other in _ports if other.is_closed()]:
            _ports.pop(closed).close()
        created = LoopPort(loop)
        _ports[loop] = created
        return created


def _log_release(release: tuple[str, float], value: int) -> None:
    name, expiry = release
    if value == _LEASE_LOST:
        logger.warning(
            "the lease on a slot of %s had expired before its release, so another holder may "
            "have run at the same time: renewals did not reach Redis within expiry=%gs "
            "(the process was stopped, or Redis was unreachable)",
            name,
            expiry,
        )
    elif value < 0:
        error = error_from_bridge(library().pybridge_TakeError(-value))
        logger.warning("releasing a slot of %s failed, so it returns to others within expiry=%gs: %s", name, expiry, error)
    elif logger.isEnabledFor(logging.DEBUG):
        logger.debug("released a slot of %s", name)


def _finish_releases_at_exit() -> None:
    """Wait for the releases still in flight and log their outcomes (an atexit hook)."""
    if _forked_after_load:
        return
    if not library().pybridge_WaitForReleases(EXIT_RELEASE_TIMEOUT):
        logger.warning(
            "releases of semaphore slots were still in flight after %gs at exit; those slots return "
            "to others within their expiry",
            EXIT_RELEASE_TIMEOUT,
        )
    for port_ in list(_ports.values()):
        port_.read_left_over_releases()


async def wait_for_outcome(port_: LoopPort, request_id: int, cancel_on_exit: bool = True) -> int:
    """Wait for the outcome value of ``request_id`` and return it, or raise its error.

    When the waiting task is cancelled and ``cancel_on_exit`` is true, the Go request is cancelled
    too: a wait stops, and a slot granted meanwhile is given back exactly once by the Go side,
    whether or not its record was read already.
    """
    future = port_.expect(request_id)
    try:
        value = await future
    except BaseException:
        port_.forget(request_id)
        if cancel_on_exit:
            library().pybridge_Cancel(request_id, False)
        raise
    return check(value)
