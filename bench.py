#!/usr/bin/env python3
"""Benchmarks of self_limiters against the limiters users would pick instead, and against the floor.

``python bench.py`` measures, in one run on one Redis server:

- ours: self_limiters built from this repository;
- self-limiters 0.4.0 from PyPI, the Rust original whose Python API ours keeps;
- redis-rate-limiters 0.5.0 from PyPI, the original's pure-Python successor;
- the floor: round trips of PING and of EVALSHA on ``return 1`` through redis-py asyncio, and
  the Go benchmarks of tests_go/bench_test.go (go-redis and the Go core without Python).

Each implementation runs in a virtual environment of its own under .bench/venvs, created on first
use and reused afterwards. ``--rebuild`` creates them again, and ours is reinstalled whenever its
sources change. bench.py itself needs only the standard library: it runs itself again under each
environment's python with ``--worker`` and reads one JSON line back. Without ``--redis-url`` it
starts a private redis-server on a free 127.0.0.1 port and stops it at the end.

    python bench.py                 # the full comparison, about 2.5 minutes on 2 cores once set up
    python bench.py --quick         # a short run for CI
    python bench.py s --count 100 --iterations 12 --target 4    # the original benchmark, on ours
    python bench.py tb --count 100 --iterations 12

The workloads are described in docs/benchmarks.md and in the header of each table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import queue
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BENCH_DIR = ROOT / ".bench"
VENV_DIR = BENCH_DIR / "venvs"
LOG_DIR = BENCH_DIR / "logs"
DEFAULT_CHART = ROOT / "docs" / "benchmarks-w4.png"
QUICK_CHART = BENCH_DIR / "benchmarks-w4-quick.png"

# The worker prints its result as one line that starts with this marker, so that anything a library
# prints on stdout cannot be mistaken for it.
RESULT_MARKER = "BENCH-RESULT "

# Paths whose content goes into ours' installed package. A change to them reinstalls it.
OUR_SOURCES = ("core", "pybridge", "python", "setup.py", "pyproject.toml", "go.mod", "go.sum")

# redis-py 8 gives redis.asyncio.Redis a pool of 100 connections by default and raises
# MaxConnectionsError when they are all in use. Every waiter of redis-rate-limiters' semaphore
# holds a connection in BLPOP, so its client gets a pool as large as any workload here needs;
# Redis's own limit (maxclients, 10,000 by default) still applies.
SUCCESSOR_MAX_CONNECTIONS = 100_000

# Token bucket settings under which neither ours nor redis-rate-limiters ever makes an entry wait:
# both buckets start full, and no refill period ends during a workload. self-limiters 0.4.0 schedules
# every entry one refill period ahead whatever the settings, which the workers detect and report.
NO_WAIT_BUCKET = {"capacity": 10**6, "refill_frequency": 3600.0, "refill_amount": 10**6}
# Refill periods at which the waits of such an implementation are shown instead: the W1 period, and
# 1 µs, at which the schedule of self-limiters 0.4.0 (kept in whole ms) no longer delays entries.
WAITING_PROBE_FREQUENCY = 0.01
WAITING_ALTERNATIVE_FREQUENCY = 1e-6
# An entry slower than this on a bucket that should never wait is counted as a wait for a refill.
WAIT_THRESHOLD = 0.05
WAIT_PROBE_TIMEOUT = 2.0
# Samples per block when ours' entries and the EVALSHA round trip are timed in alternation.
ROUND_TRIP_BLOCK = 250


@dataclass(frozen=True)
class Implementation:
    key: str
    label: str
    venv: str
    requirements: tuple  # pip arguments
    color: str  # of its line in the W4 chart


IMPLEMENTATIONS = (
    Implementation("ours", "ours", "ours", (str(ROOT), "redis==8.2.0", "matplotlib==3.11.2"), "tab:blue"),
    Implementation("original", "self-limiters 0.4.0", "self-limiters-0.4.0", ("self-limiters==0.4.0",), "tab:orange"),
    Implementation("successor", "redis-rate-limiters 0.5.0", "redis-rate-limiters-0.5.0",
                   ("redis-rate-limiters==0.5.0", "redis==8.2.0"), "tab:green"),
)
BY_KEY = {implementation.key: implementation for implementation in IMPLEMENTATIONS}
WORKLOADS = ("floor", "w1", "w2", "w3", "w4", "w5")


@dataclass(frozen=True)
class Settings:
    w1_count: int
    w1_semaphore_iterations: int
    w1_bucket_iterations: int
    w2_samples: int
    w2_warmup: int
    w3_tasks: int
    w3_rounds: int
    w4_sizes: tuple
    w5_processes: int
    w5_tasks: int
    w5_rounds: int
    go_benchtime: str
    go_runs: int


FULL = Settings(
    w1_count=100,
    w1_semaphore_iterations=50,
    w1_bucket_iterations=20,
    w2_samples=5000,
    w2_warmup=500,
    w3_tasks=1000,
    w3_rounds=5,
    w4_sizes=(10, 100, 1000, 10_000),
    w5_processes=4,
    w5_tasks=250,
    w5_rounds=3,
    go_benchtime="1s",
    go_runs=3,
)
QUICK = Settings(
    w1_count=100,
    w1_semaphore_iterations=10,
    w1_bucket_iterations=4,
    w2_samples=1000,
    w2_warmup=100,
    w3_tasks=1000,
    w3_rounds=2,
    w4_sizes=(10, 100, 1000),
    w5_processes=4,
    w5_tasks=250,
    w5_rounds=1,
    go_benchtime="300ms",
    go_runs=1,
)

W1_CAPACITY = 1
W1_REFILL_FREQUENCY = 0.01
W1_REFILL_AMOUNT = 1
W3_CAPACITY = 50
W4_CAPACITY = 10
W4_HOLD = 0.001
W5_CAPACITY = 20
W5_HOLD = 0.001


# --------------------------------------------------------------------------------------------
# Coordinator: progress, child processes, the Redis server
# --------------------------------------------------------------------------------------------

_started = time.monotonic()
_children: set = set()


def progress(message: str) -> None:
    elapsed = int(time.monotonic() - _started)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


def kill_group(process: subprocess.Popen) -> None:
    """Kill a child started with start_new_session, and whatever it started, then reap it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=10)


def start_child(command: list, **options) -> subprocess.Popen:
    process = subprocess.Popen(command, start_new_session=True, **options)
    _children.add(process)
    return process


def kill_children() -> None:
    for process in list(_children):
        kill_group(process)
    _children.clear()


def child_environment() -> dict:
    """Return the environment of workers: this one without settings that would change imports."""
    environment = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        environment.pop(name, None)
    return environment


def redis_address(url: str):
    """Return (host, port, username, password) of a redis:// URL, or None for other schemes."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis":
        return None
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    return parts.hostname or "127.0.0.1", parts.port or 6379, username, password


def _encode_command(args) -> bytes:
    chunks = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = str(arg).encode()
        chunks.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
    return b"".join(chunks)


def _read_reply(stream):
    line = stream.readline()
    if not line:
        raise ConnectionError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(f"Redis replied with an error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        return None if length < 0 else stream.read(length + 2)[:-2].decode()
    if kind == b"*":
        length = int(rest)
        return None if length < 0 else [_read_reply(stream) for _ in range(length)]
    raise RuntimeError(f"unexpected reply from Redis: {line!r}")


def redis_command(url: str, *args, timeout: float = 5.0):
    """Send one command to the server of a redis:// URL with a plain socket and return its reply."""
    address = redis_address(url)
    if address is None:
        raise ValueError("only redis:// URLs can be queried by bench.py itself")
    host, port, username, password = address
    with socket.create_connection((host, port), timeout=timeout) as connection:
        stream = connection.makefile("rb")
        if password is not None:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            connection.sendall(_encode_command(auth))
            _read_reply(stream)
        connection.sendall(_encode_command(args))
        return _read_reply(stream)


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port != 6379:
            return port


class PrivateRedis:
    """A redis-server on a free 127.0.0.1 port, without persistence, in a temporary folder."""

    def __init__(self) -> None:
        self.process = None
        self.folder = None
        self.url = ""

    def start(self) -> str:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise RuntimeError("redis-server was not found on PATH or in /usr/bin; install it or pass --redis-url")
        last_error = ""
        for _ in range(5):
            self.folder = tempfile.mkdtemp(prefix="bench-redis-")
            port = free_port()
            log = os.path.join(self.folder, "redis.log")
            command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                       "--dir", self.folder, "--logfile", log]
            self.process = start_child(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.url = f"redis://127.0.0.1:{port}"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if redis_command(self.url, "PING", timeout=1) == "PONG":
                        return self.url
                except (OSError, RuntimeError):
                    time.sleep(0.05)
            with contextlib.suppress(OSError):
                last_error = Path(log).read_text()[-2000:]
            self.stop()
        raise RuntimeError(f"redis-server did not start on a free port in 5 attempts; its last log:\n{last_error}")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    kill_group(self.process)
            _children.discard(self.process)
            self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


# --------------------------------------------------------------------------------------------
# Coordinator: virtual environments
# --------------------------------------------------------------------------------------------


def our_source_hash() -> str:
    digest = hashlib.sha256()
    for entry in OUR_SOURCES:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            relative = file.relative_to(ROOT)
            if "__pycache__" in relative.parts or any(part.endswith(".egg-info") for part in relative.parts):
                continue
            if file.suffix in (".pyc", ".so"):
                continue
            digest.update(str(relative).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def venv_python(implementation: Implementation) -> Path:
    return VENV_DIR / implementation.venv / "bin" / "python"


def run_logged(command: list, log: Path, timeout: float) -> None:
    """Run a setup command with its output in log; raise RuntimeError with the log's end on failure."""
    with open(log, "a") as output:
        output.write(f"\n$ {' '.join(command)}\n")
        output.flush()
        try:
            subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, timeout=timeout, check=True,
                           env=child_environment(), cwd=ROOT)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise RuntimeError(f"{' '.join(command[:4])}... failed ({error}); the end of {log}:\n{tail}") from None


def ensure_venv(implementation: Implementation, base_python: str, rebuild: bool) -> None:
    """Create the environment of an implementation, or reuse it when its stamp still matches."""
    folder = VENV_DIR / implementation.venv
    stamp_file = folder / "bench-stamp.json"
    python_version = subprocess.run([base_python, "-c", "import sys; print(sys.version)"], capture_output=True,
                                    text=True, check=True).stdout.strip()
    stamp = {"python": base_python, "python_version": python_version, "requirements": list(implementation.requirements)}
    sources = our_source_hash() if implementation.key == "ours" else None

    old = {}
    if stamp_file.exists() and not rebuild:
        with contextlib.suppress(ValueError):
            old = json.loads(stamp_file.read_text())
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{implementation.venv}.log"

    if {key: old.get(key) for key in stamp} == stamp and venv_python(implementation).exists():
        if old.get("sources") == sources:
            return
        progress(f"setup: reinstalling ours into {folder}: the repository's sources changed (about a minute)")
        run_logged([str(venv_python(implementation)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                    "--no-deps", "--force-reinstall", str(ROOT)], log, timeout=1800)
    else:
        progress(f"setup: creating {folder} with {' '.join(implementation.requirements)}"
                 + (" (building ours takes about a minute)" if implementation.key == "ours" else ""))
        shutil.rmtree(folder, ignore_errors=True)
        log.write_text("")
        run_logged([base_python, "-m", "venv", str(folder)], log, timeout=300)
        run_logged([str(venv_python(implementation)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                    *implementation.requirements], log, timeout=1800)
    stamp_file.write_text(json.dumps(dict(stamp, sources=sources), indent=1))


# --------------------------------------------------------------------------------------------
# Coordinator: running workers
# --------------------------------------------------------------------------------------------


def parse_worker_output(stdout: str, stderr: str, returncode) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    last = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
    return {"ok": False, "error": f"the worker exited with code {returncode} without a result: " + " | ".join(last)}


def run_worker(implementation: Implementation, task: str, params: dict, redis_url: str, timeout: float) -> dict:
    """Run one task in a fresh worker process of the implementation's environment.

    The worker stops itself a few seconds before timeout; the process group is killed at timeout.
    """
    spec = {"implementation": implementation.key, "task": task, "params": params, "redis_url": redis_url,
            "deadline": max(timeout - 5, 1)}
    command = [str(venv_python(implementation)), str(ROOT / "bench.py"), "--worker", json.dumps(spec)]
    process = start_child(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=child_environment(), cwd=tempfile.gettempdir())
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        return {"ok": False, "error": f"timed out after {timeout:g} s and was killed"}
    finally:
        _children.discard(process)
        kill_group(process)
    return parse_worker_output(stdout, stderr, process.returncode)


def run_together(implementation: Implementation, params: dict, redis_url: str, count: int, timeout: float) -> dict:
    """Run `count` W5 workers that each get ready, then start at one signal; return the wall time."""
    spec = {"implementation": implementation.key, "task": "process_share", "params": params,
            "redis_url": redis_url, "deadline": max(timeout - 5, 1)}
    command = [str(venv_python(implementation)), str(ROOT / "bench.py"), "--worker", json.dumps(spec)]
    ready_lines: queue.Queue = queue.Queue()
    outputs: dict = {}
    readers = []
    processes = []
    error_files = []

    def read(index: int, process: subprocess.Popen) -> None:
        collected = []
        for line in process.stdout:
            collected.append(line)
            if line.strip() == "READY":
                ready_lines.put(index)
        outputs[index] = "".join(collected)
        ready_lines.put(None)  # the worker closed its stdout, so it exited

    deadline = time.monotonic() + timeout
    try:
        for index in range(count):
            error_file = tempfile.TemporaryFile("w+")
            error_files.append(error_file)
            process = start_child(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=error_file,
                                  text=True, env=child_environment(), cwd=tempfile.gettempdir())
            processes.append(process)
            reader = threading.Thread(target=read, args=(index, process), daemon=True)
            reader.start()
            readers.append(reader)

        ready = 0
        while ready < count:
            try:
                item = ready_lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                return {"ok": False, "error": f"the workers were not ready within {timeout:g} s"}
            if item is None:
                break  # a worker exited before it was ready, and its result gives the reason
            ready += 1

        start = time.time()
        for process in processes:
            if ready == count:
                process.stdin.write("GO\n")
                process.stdin.flush()
            else:
                kill_group(process)  # the others would wait for GO until the deadline
        results = []
        for index, process in enumerate(processes):
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                return {"ok": False, "error": f"timed out after {timeout:g} s and was killed"}
            readers[index].join(timeout=10)
            error_files[index].seek(0)
            results.append(parse_worker_output(outputs.get(index, ""), error_files[index].read(), process.returncode))
    finally:
        for process in processes:
            _children.discard(process)
            kill_group(process)
        for error_file in error_files:
            error_file.close()

    # A worker's own error comes before those of the workers killed because of it.
    failed = sorted((result for result in results if not result.get("ok")), key=lambda result: "versions" not in result)
    if failed:
        return failed[0]
    if ready < count:
        return {"ok": False, "error": "a worker exited before it was ready"}
    return {"ok": True, "seconds": max(result["end"] for result in results) - start,
            "versions": results[0].get("versions", {})}


def run_go_benchmarks(redis_url: str, benchtime: str, runs: int) -> dict:
    """Run the Go benchmarks `runs` times and return the median ns/op of each.

    The loopback round trip drifts with the load of the machine, so whole runs are repeated, rather
    than each benchmark, to expose every benchmark to the same moments.
    """
    per_run = []
    for _ in range(runs):
        outcome = run_go_benchmarks_once(redis_url, benchtime)
        if not outcome.get("ok"):
            return outcome
        per_run.append(outcome["benchmarks"])
    figures = {}
    for name in per_run[0]:
        values = [run[name]["ns_per_op"] for run in per_run if name in run]
        figures[name] = {"ns_per_op": statistics.median(values), "runs": values}
    return {"ok": True, "benchmarks": figures}


def run_go_benchmarks_once(redis_url: str, benchtime: str) -> dict:
    go = shutil.which("go")
    if go is None:
        return {"ok": False, "error": "go was not found on PATH"}
    command = [go, "test", "-run", "^$", "-bench", ".", "-benchtime", benchtime, "-count", "1", "./tests_go/"]
    environment = dict(child_environment(), SL_REDIS_URL=redis_url)
    process = start_child(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, cwd=ROOT)
    try:
        output, _ = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        kill_group(process)
        return {"ok": False, "error": "go test -bench timed out after 900 s and was killed"}
    finally:
        _children.discard(process)
    figures = {}
    for match in re.finditer(r"^Benchmark(\w+?)(?:-\d+)?\s+(\d+)\s+([\d.]+) ns/op", output, re.MULTILINE):
        figures[match.group(1)] = {"iterations": int(match.group(2)), "ns_per_op": float(match.group(3))}
    if process.returncode != 0 or not figures:
        tail = " | ".join(output.strip().splitlines()[-5:])
        return {"ok": False, "error": f"go test -bench exited with code {process.returncode}: {tail}"}
    return {"ok": True, "benchmarks": figures}


# --------------------------------------------------------------------------------------------
# Coordinator: the workloads
# --------------------------------------------------------------------------------------------


def discard_first_tenth(values: list) -> list:
    return values[len(values) // 10:]


def run_floor(runner, settings: Settings, redis_url: str) -> dict:
    result = {}
    if "ours" in runner.available:
        progress("floor: PING and EVALSHA round trips through redis-py asyncio")
        result["redis_py"] = runner.run("ours", "floor", {"samples": settings.w2_samples, "warmup": settings.w2_warmup},
                                        timeout=300)
        progress("floor: ours' uncontended entries and EVALSHA, timed in alternating blocks")
        result["round_trips"] = runner.run("ours", "round_trips", {"samples": settings.w2_samples,
                                                                   "warmup": settings.w2_warmup}, timeout=300)
    progress(f"floor: go test -bench ./tests_go/, {settings.go_runs} x -benchtime {settings.go_benchtime} "
             "(compiles first)")
    result["go"] = run_go_benchmarks(redis_url, settings.go_benchtime, settings.go_runs)
    result["go_runs"] = settings.go_runs
    return result


def run_w1(runner, settings: Settings) -> dict:
    result = {"semaphore": {}, "token_bucket": {}}
    for key in runner.available:
        label = BY_KEY[key].label
        progress(f"W1 {settings.w1_count} tasks at once: {label}, semaphore")
        params = {"kind": "semaphore", "count": settings.w1_count, "iterations": settings.w1_semaphore_iterations,
                  "capacity": W1_CAPACITY, "hold": 0.0}
        outcome = runner.run(key, "at_once", params, timeout=120 + settings.w1_semaphore_iterations * 5)
        if outcome.get("ok"):
            kept = discard_first_tenth(outcome["seconds"])
            outcome["ms_per_entry_median"] = statistics.median(kept) / settings.w1_count * 1000
            outcome["ms_per_entry_mean"] = statistics.mean(kept) / settings.w1_count * 1000
        result["semaphore"][key] = outcome

        progress(f"W1 {settings.w1_count} tasks at once: {label}, token bucket (about {settings.w1_bucket_iterations} s)")
        bucket = {"capacity": W1_CAPACITY, "refill_frequency": W1_REFILL_FREQUENCY, "refill_amount": W1_REFILL_AMOUNT}
        initial = runner.run(key, "initial_tokens", {"capacity": W1_CAPACITY, "refill_amount": W1_REFILL_AMOUNT,
                                                      "period": 0.5}, timeout=60)
        if not initial.get("ok"):
            result["token_bucket"][key] = initial
            continue
        params = dict(bucket, kind="token_bucket", count=settings.w1_count, iterations=settings.w1_bucket_iterations, hold=0.0)
        schedule_per_iteration = settings.w1_count * W1_REFILL_FREQUENCY * 3 + 5
        outcome = runner.run(key, "at_once", params, timeout=120 + settings.w1_bucket_iterations * schedule_per_iteration)
        outcome["initial_tokens"] = initial["initial_tokens"]
        if outcome.get("ok"):
            schedule = max(settings.w1_count - initial["initial_tokens"], 0) * W1_REFILL_FREQUENCY
            kept = discard_first_tenth(outcome["seconds"])
            outcome["schedule_seconds"] = schedule
            outcome["wall_ms_per_entry_median"] = statistics.median(kept) / settings.w1_count * 1000
            outcome["ms_per_entry_median"] = (statistics.median(kept) - schedule) / settings.w1_count * 1000
            outcome["ms_per_entry_mean"] = (statistics.mean(kept) - schedule) / settings.w1_count * 1000
        result["token_bucket"][key] = outcome
    return result


def run_w2(runner, settings: Settings) -> dict:
    result = {"semaphore": {}, "token_bucket": {}}
    for key in runner.available:
        label = BY_KEY[key].label
        for kind in ("semaphore", "token_bucket"):
            progress(f"W2 uncontended latency: {label}, {kind.replace('_', ' ')}")
            params = {"kind": kind, "samples": settings.w2_samples, "warmup": settings.w2_warmup,
                      "capacity": 1, **(NO_WAIT_BUCKET if kind == "token_bucket" else {})}
            result[kind][key] = runner.run(key, "latency", params, timeout=300)
    return result


def run_w3(runner, settings: Settings) -> dict:
    result = {"semaphore": {}, "token_bucket": {}}
    for key in runner.available:
        label = BY_KEY[key].label
        for kind in ("semaphore", "token_bucket"):
            progress(f"W3 throughput, {settings.w3_tasks} tasks: {label}, {kind.replace('_', ' ')}")
            params = {"kind": kind, "tasks": settings.w3_tasks, "rounds": settings.w3_rounds,
                      **(NO_WAIT_BUCKET if kind == "token_bucket" else {"capacity": W3_CAPACITY})}
            outcome = runner.run(key, "throughput", params, timeout=180)
            if outcome.get("ok"):
                outcome["entries_per_second"] = settings.w3_tasks / statistics.median(outcome["seconds"])
            result[kind][key] = outcome
    return result


def run_w4(runner, settings: Settings) -> dict:
    result = {}
    for key in runner.available:
        label = BY_KEY[key].label
        result[key] = {}
        for size in settings.w4_sizes:
            progress(f"W4 scaling, {size:,} tasks waiting: {label}")
            params = {"tasks": size, "capacity": W4_CAPACITY, "hold": W4_HOLD}
            result[key][str(size)] = runner.run(key, "scaling", params, timeout=60 + size * 0.01)
    return result


def run_w5(runner, settings: Settings, redis_url: str) -> dict:
    result = {}
    for key in runner.available:
        label = BY_KEY[key].label
        progress(f"W5 {settings.w5_processes} processes x {settings.w5_tasks} tasks: {label}")
        rounds = []
        for _ in range(settings.w5_rounds):
            params = {"name": f"bench-{uuid.uuid4().hex}", "tasks": settings.w5_tasks, "capacity": W5_CAPACITY,
                      "hold": W5_HOLD}
            outcome = run_together(BY_KEY[key], params, redis_url, settings.w5_processes, timeout=120)
            if outcome.get("versions"):
                runner.versions[key] = outcome["versions"]
            if not outcome.get("ok"):
                progress(f"  {label} failed: {outcome.get('error')}")
                rounds = outcome
                break
            rounds.append(outcome["seconds"])
        if isinstance(rounds, dict):
            result[key] = rounds
        else:
            seconds = statistics.median(rounds)
            result[key] = {"ok": True, "seconds_per_round": rounds, "seconds": seconds,
                           "entries_per_second": settings.w5_processes * settings.w5_tasks / seconds}
    return result


class Runner:
    """Runs worker tasks of the implementations whose environment could be set up."""

    def __init__(self, redis_url: str, available: list, setup_errors: dict) -> None:
        self.redis_url = redis_url
        self.available = available
        self.setup_errors = setup_errors
        self.versions: dict = {}

    def run(self, key: str, task: str, params: dict, timeout: float) -> dict:
        outcome = run_worker(BY_KEY[key], task, params, self.redis_url, timeout)
        if outcome.get("versions"):
            self.versions[key] = outcome["versions"]
        if not outcome.get("ok"):
            progress(f"  {BY_KEY[key].label} failed: {outcome.get('error')}")
        return outcome


# --------------------------------------------------------------------------------------------
# Coordinator: the report
# --------------------------------------------------------------------------------------------


class Table:
    """A Markdown table, padded so that it also reads well in a terminal, with numbered notes."""

    def __init__(self, title: str, description: str, headers: list, text_columns: int = 1) -> None:
        self.title = title
        self.description = description
        self.headers = headers
        self.text_columns = text_columns  # the first columns hold text and are aligned left; the rest right
        self.rows: list = []
        self.notes: list = []

    def note(self, text: str) -> str:
        self.notes.append(text)
        return f"[{len(self.notes)}]"

    def add(self, *cells) -> None:
        self.rows.append([str(cell) for cell in cells])

    def render(self) -> str:
        widths = [max(len(row[i]) for row in [self.headers, *self.rows]) for i in range(len(self.headers))]

        def line(cells) -> str:
            padded = [cell.ljust(widths[i]) if i < self.text_columns else cell.rjust(widths[i])
                      for i, cell in enumerate(cells)]
            return "| " + " | ".join(padded) + " |"

        rules = ["-" * width if i < self.text_columns else "-" * (width - 1) + ":" for i, width in enumerate(widths)]
        separator = "| " + " | ".join(rules) + " |"
        out = [f"### {self.title}", "", self.description, "", line(self.headers), separator]
        out += [line(row) for row in self.rows]
        if self.notes:
            out.append("")
            out += [f"[{i}] {text}" for i, text in enumerate(self.notes, 1)]
        return "\n".join(out) + "\n"


def fmt_ms(seconds) -> str:
    milliseconds = seconds * 1000
    if abs(milliseconds) >= 100:
        return f"{milliseconds:.0f}"
    if abs(milliseconds) >= 10:
        return f"{milliseconds:.1f}"
    if abs(milliseconds) >= 1:
        return f"{milliseconds:.2f}"
    return f"{milliseconds:.3f}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def fmt_ratio(value, ours) -> str:
    if value is None or ours is None or ours <= 0 or value <= 0:
        return "n/a"
    return f"{value / ours:.2f}"


def failure_cell(table: Table, label: str, outcome: dict, where: str = "") -> str:
    reason = outcome.get("error", "unknown error")
    return "failed " + table.note(f"{label}{where}: {reason}")


def labels_in(results: dict) -> list:
    return [key for key in BY_KEY if key in results]


def render_floor(floor: dict) -> str:
    table = Table("Floor: one Redis round trip", "One caller, each call awaited before the next. redis-py: p50 and p99 "
                  "of single calls; Go: mean ns/op of `go test -bench` in tests_go/bench_test.go, median of "
                  f"{plural(floor.get('go_runs', 1), 'run')}.",
                  ["client", "call", "p50 ms", "p99 ms", "mean ms"], text_columns=2)
    redis_py = floor.get("redis_py")
    if redis_py is not None:
        if redis_py.get("ok"):
            for name, call in (("ping", "PING"), ("evalsha", "EVALSHA of `return 1`")):
                stats = redis_py[name]
                table.add("redis-py asyncio", call, fmt_ms(stats["p50"]), fmt_ms(stats["p99"]), fmt_ms(stats["mean"]))
        else:
            table.add("redis-py asyncio", failure_cell(table, "redis-py", redis_py), "", "", "")
    go = floor.get("go", {})
    if go.get("ok"):
        names = {"Ping": ("go-redis", "PING"), "EvalSha": ("go-redis", "EVALSHA of `return 1`"),
                 "SemaphoreAcquireRelease": ("Go core, no Python", "Semaphore Acquire + Release"),
                 "TokenBucketReserve": ("Go core, no Python", "TokenBucket Reserve")}
        for name, (client, call) in names.items():
            figure = go["benchmarks"].get(name)
            if figure:
                table.add(client, call, "", "", fmt_ms(figure["ns_per_op"] / 1e9))
    else:
        table.add("go test -bench", failure_cell(table, "go test -bench", go), "", "", "")
    return table.render()


def render_w1(w1: dict, settings: Settings) -> str:
    parts = []
    semaphore = w1["semaphore"]
    table = Table(
        "W1: the original's benchmark, semaphore",
        f"{settings.w1_count} tasks enter one semaphore of capacity {W1_CAPACITY} at once, each `async with "
        f"limiter: pass`, over {settings.w1_semaphore_iterations} fresh names; wall time of all entries divided by "
        f"{settings.w1_count}, first tenth of the iterations discarded. Ratio: figure / ours, lower is faster.",
        ["implementation", "median ms per entry", "mean ms per entry", "median x ours"])
    ours = semaphore.get("ours", {}).get("ms_per_entry_median")
    for key in labels_in(semaphore):
        outcome = semaphore[key]
        label = BY_KEY[key].label
        if outcome.get("ok"):
            table.add(label, f"{outcome['ms_per_entry_median']:.3f}", f"{outcome['ms_per_entry_mean']:.3f}",
                      fmt_ratio(outcome["ms_per_entry_median"], ours))
        else:
            table.add(label, failure_cell(table, label, outcome), "", "")
    parts.append(table.render())

    bucket = w1["token_bucket"]
    table = Table(
        "W1: the original's benchmark, token bucket",
        f"{settings.w1_count} tasks enter one token bucket at once (capacity {W1_CAPACITY}, refill_amount "
        f"{W1_REFILL_AMOUNT} every refill_frequency={W1_REFILL_FREQUENCY} s), over {settings.w1_bucket_iterations} "
        f"fresh names. Each implementation's own schedule is subtracted: (entries - initial tokens) x "
        f"refill_frequency, where the initial tokens of a fresh bucket are measured (entries done within half a "
        f"0.5 s period). What remains is the time beyond the schedule, per entry; it can be close to zero or "
        f"negative when an implementation grants entries slightly ahead of its schedule.",
        ["implementation", "initial tokens", "schedule subtracted s", "wall ms per entry",
         "median ms per entry beyond schedule", "x ours"])
    ours = bucket.get("ours", {}).get("ms_per_entry_median")
    for key in labels_in(bucket):
        outcome = bucket[key]
        label = BY_KEY[key].label
        if outcome.get("ok"):
            table.add(label, outcome["initial_tokens"], f"{outcome['schedule_seconds']:.2f}",
                      f"{outcome['wall_ms_per_entry_median']:.3f}", f"{outcome['ms_per_entry_median']:.3f}",
                      fmt_ratio(outcome["ms_per_entry_median"], ours))
        else:
            table.add(label, failure_cell(table, label, outcome), "", "", "", "")
    parts.append(table.render())
    return "\n".join(parts)


def waiting_note(outcome: dict) -> str:
    text = f"waits for a refill on every entry: {outcome['probe']}."
    short = outcome.get("waits_at_probe_frequency")
    if short is not None:
        text += (f" With refill_frequency={WAITING_PROBE_FREQUENCY} s and capacity {NO_WAIT_BUCKET['capacity']:,}, "
                 f"its median entry took {fmt_ms(short)} ms.")
    return text


def render_w2(w2: dict, settings: Settings) -> str:
    parts = []
    descriptions = {
        "semaphore": "One task enters and leaves a semaphore of capacity 1, one entry at a time; time of each entry + "
                     "exit",
        "token_bucket": f"One task enters a token bucket (capacity {NO_WAIT_BUCKET['capacity']:,}, refill_amount "
                        f"{NO_WAIT_BUCKET['refill_amount']:,} every {NO_WAIT_BUCKET['refill_frequency']:g} s, so "
                        "neither ours nor redis-rate-limiters ever waits), one entry at a time; time of each entry + "
                        "exit",
    }
    for kind in ("semaphore", "token_bucket"):
        results = w2[kind]
        table = Table(f"W2: uncontended latency, {kind.replace('_', ' ')}",
                      f"{descriptions[kind]}; {settings.w2_samples:,} samples after {settings.w2_warmup:,} warm-up "
                      "entries. Ratio: figure / ours, lower is faster.",
                      ["implementation", "p50 ms", "p99 ms", "p50 x ours", "p99 x ours"])
        ours = results.get("ours", {})
        for key in labels_in(results):
            outcome = results[key]
            label = BY_KEY[key].label
            if not outcome.get("ok"):
                table.add(label, failure_cell(table, label, outcome), "", "", "")
            elif outcome.get("waits"):
                note = waiting_note(outcome)
                alternative = outcome.get("alternative")
                if alternative:
                    note += (f" With refill_frequency={WAITING_ALTERNATIVE_FREQUENCY:g} s it measured p50 "
                             f"{fmt_ms(alternative['p50'])} ms and p99 {fmt_ms(alternative['p99'])} ms.")
                table.add(label, "waits " + table.note(f"{label} {note}"), "", "", "")
            else:
                table.add(label, fmt_ms(outcome["p50"]), fmt_ms(outcome["p99"]),
                          fmt_ratio(outcome["p50"], ours.get("p50")), fmt_ratio(outcome["p99"], ours.get("p99")))
        parts.append(table.render())
    return "\n".join(parts)


def render_w3(w3: dict, settings: Settings) -> str:
    parts = []
    descriptions = {
        "semaphore": f"{settings.w3_tasks:,} tasks enter one semaphore of capacity {W3_CAPACITY} at once and leave at "
                     "once (no hold time)",
        "token_bucket": f"{settings.w3_tasks:,} tasks enter one token bucket at once (capacity "
                        f"{NO_WAIT_BUCKET['capacity']:,}, refill_amount {NO_WAIT_BUCKET['refill_amount']:,} every "
                        f"{NO_WAIT_BUCKET['refill_frequency']:g} s, so that no entry waits)",
    }
    for kind in ("semaphore", "token_bucket"):
        results = w3[kind]
        table = Table(f"W3: throughput, {kind.replace('_', ' ')}",
                      f"{descriptions[kind]}; entries per second of the median of {plural(settings.w3_rounds, 'round')}, each "
                      "on a fresh name after one warm-up round. Ratio: figure / ours, higher is faster.",
                      ["implementation", "entries per s", "x ours"])
        ours = results.get("ours", {}).get("entries_per_second")
        for key in labels_in(results):
            outcome = results[key]
            label = BY_KEY[key].label
            if not outcome.get("ok"):
                table.add(label, failure_cell(table, label, outcome), "")
            elif outcome.get("waits"):
                note = waiting_note(outcome)
                note += (f" With refill_frequency={WAITING_ALTERNATIVE_FREQUENCY:g} s it passed "
                         f"{outcome['entries_per_second']:,.0f} entries per s.")
                table.add(label, "waits " + table.note(f"{label} {note}"), "")
            else:
                table.add(label, f"{outcome['entries_per_second']:,.0f}", fmt_ratio(outcome["entries_per_second"], ours))
        parts.append(table.render())
    return "\n".join(parts)


def render_w4(w4: dict, settings: Settings) -> str:
    sizes = [str(size) for size in settings.w4_sizes]
    parts = []
    for figure, title, unit in (("seconds", "wall time", "s"), ("peak_rss_kib", "peak RSS", "MiB")):
        description = (f"N tasks wait at once on one semaphore of capacity {W4_CAPACITY}, each holding it "
                       f"{W4_HOLD * 1000:g} ms; a fresh worker process per N. ")
        if figure == "seconds":
            description += (f"Wall time from the first entry to the last exit; the hold times alone take N / "
                            f"{W4_CAPACITY} x {W4_HOLD * 1000:g} ms.")
        else:
            description += ("Peak resident memory of the worker process (ru_maxrss), which includes the Python "
                            "interpreter and the library; the RSS after the warm-up entry, before the tasks, is in "
                            "brackets.")
        table = Table(f"W4: scaling, {title} ({unit})", description + " Ratio to ours in parentheses.",
                      ["implementation", *[f"N = {int(size):,}" for size in sizes]])
        for key in labels_in(w4):
            label = BY_KEY[key].label
            cells = []
            for size in sizes:
                outcome = w4[key].get(size, {})
                ours = w4.get("ours", {}).get(size, {})
                if not outcome.get("ok"):
                    if figure == "seconds":
                        cells.append(failure_cell(table, label, outcome, f" at N = {int(size):,}"))
                    else:
                        cells.append("failed")
                    continue
                value = outcome[figure]
                ratio = fmt_ratio(value, ours.get(figure) if ours.get("ok") else None)
                if figure == "seconds":
                    cells.append(f"{value:.3f} ({ratio})")
                else:
                    cells.append(f"{value / 1024:.0f} [{outcome['rss_before_kib'] / 1024:.0f}] ({ratio})")
            table.add(label, *cells)
        parts.append(table.render())
    return "\n".join(parts)


def render_w5(w5: dict, settings: Settings) -> str:
    total = settings.w5_processes * settings.w5_tasks
    table = Table(
        "W5: several processes",
        f"{settings.w5_processes} processes x {settings.w5_tasks} tasks on one semaphore of capacity {W5_CAPACITY}, "
        f"each holding it {W5_HOLD * 1000:g} ms. The processes start, import, connect with one warm-up entry on "
        "another name, then start their tasks at one signal; wall time from the signal to the last exit, median of "
        f"{plural(settings.w5_rounds, 'round')} with fresh processes. Ratio: figure / ours, lower is faster.",
        ["implementation", "wall s", f"entries per s ({total:,} entries)", "wall x ours"])
    ours = w5.get("ours", {}).get("seconds")
    for key in labels_in(w5):
        outcome = w5[key]
        label = BY_KEY[key].label
        if outcome.get("ok"):
            table.add(label, f"{outcome['seconds']:.3f}", f"{outcome['entries_per_second']:,.0f}",
                      fmt_ratio(outcome["seconds"], ours))
        else:
            table.add(label, failure_cell(table, label, outcome), "", "")
    return table.render()


def round_trip_lines(results: dict) -> list:
    """Return the lines that set ours' uncontended figures against the EVALSHA round trip."""
    lines = ["### Ours against the floor", ""]
    floor = results.get("floor", {})
    round_trips = floor.get("round_trips", {})
    if round_trips.get("ok"):
        evalsha = round_trips["evalsha"]["p50"]
        semaphore = round_trips["semaphore"]["p50"]
        bucket = round_trips["token_bucket"]["p50"]
        lines.append(f"Timed in one process, in alternating blocks of {ROUND_TRIP_BLOCK} calls, "
                     f"{round_trips['evalsha']['n']:,} samples each (p50):")
        lines.append("")
        lines.append(f"- Semaphore entry + exit: {fmt_ms(semaphore)} ms = {semaphore / evalsha:.2f} x the redis-py "
                     f"EVALSHA round trip ({fmt_ms(evalsha)} ms). The entry waits for one script, acquire; an exit "
                     "that waits for its release script adds a second round trip.")
        lines.append(f"- Token bucket entry: {fmt_ms(bucket)} ms = {bucket / evalsha:.2f} x the redis-py EVALSHA "
                     "round trip. It runs one script.")
    elif "round_trips" in floor:
        lines.append(f"- Not available: {round_trips.get('error')}")
    else:
        lines.append("- Not available: the floor workload was not run with ours.")

    go = floor.get("go", {})
    benchmarks = go.get("benchmarks", {}) if go.get("ok") else {}
    if {"EvalSha", "SemaphoreAcquireRelease", "TokenBucketReserve"} <= set(benchmarks):
        evalsha = benchmarks["EvalSha"]["ns_per_op"]
        semaphore = benchmarks["SemaphoreAcquireRelease"]["ns_per_op"]
        bucket = benchmarks["TokenBucketReserve"]["ns_per_op"]
        lines.append(f"- The Go core without Python (go test -bench): Acquire + Release {fmt_ms(semaphore / 1e9)} "
                     f"ms = {semaphore / evalsha:.2f} x the go-redis EVALSHA round trip ({fmt_ms(evalsha / 1e9)} ms); "
                     f"Reserve {fmt_ms(bucket / 1e9)} ms = {bucket / evalsha:.2f} x.")
    return lines


def machine_lines(info: dict) -> list:
    lines = ["### Machine and versions", ""]
    lines.append(f"- CPU: {info['cpu']}, {info['cores']} cores; memory {info['memory']}; {info['os']}")
    lines.append(f"- Python: {info.get('python', 'unknown')}")
    lines.append(f"- Redis: {info['redis']}")
    lines.append(f"- Go: {info['go']}")
    for key, versions in info.get("packages", {}).items():
        listed = ", ".join(f"{name} {version}" for name, version in sorted(versions.items()))
        lines.append(f"- {BY_KEY[key].label} environment: {listed}")
    lines.append(f"- ours = self_limiters built from this repository at {info['commit']}")
    lines.append(f"- redis-rate-limiters gets `redis.asyncio.Redis(max_connections={SUCCESSOR_MAX_CONNECTIONS:,})`; "
                 "the others use their default connection pools. Event loop: asyncio's default.")
    lines.append(f"- Mode: {info['mode']}; total run time {info['run_seconds']:.0f} s")
    return lines


def machine_info(redis_url: str, private: bool, base_python: str) -> dict:
    cpu = platform.processor() or "unknown CPU"
    memory = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"

    redis = "unknown (bench.py queries redis:// URLs only)"
    with contextlib.suppress(Exception):
        server = redis_command(redis_url, "INFO", "server")
        version = re.search(r"redis_version:(\S+)", server).group(1)
        redis = f"{version}, {'private redis-server on 127.0.0.1' if private else 'the server of --redis-url'}"
        with contextlib.suppress(Exception):
            redis += f", maxclients {redis_command(redis_url, 'CONFIG', 'GET', 'maxclients')[1]}"

    go = "not found"
    with contextlib.suppress(Exception):
        go = subprocess.run(["go", "version"], capture_output=True, text=True, timeout=30).stdout.strip()

    commit = "unknown commit"
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=30).stdout.strip() or commit
        changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *OUR_SOURCES],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        if changed:
            commit += " with uncommitted changes to its sources"

    python = subprocess.run([base_python, "-c", "import platform; print(platform.python_implementation(), "
                            "platform.python_version())"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": memory, "redis": redis, "go": go, "commit": commit,
            "python": python, "os": f"{platform.system()} {platform.release()}"}


def render_report(results: dict, info: dict, settings: Settings, setup_errors: dict) -> str:
    sections = ["## Results", ""]
    sections += machine_lines(info)
    if setup_errors:
        sections += ["", "### Implementations that could not be installed", ""]
        sections += [f"- {BY_KEY[key].label}: {error}" for key, error in setup_errors.items()]
    sections.append("")
    renderers = {"floor": lambda: render_floor(results["floor"]), "w1": lambda: render_w1(results["w1"], settings),
                 "w2": lambda: render_w2(results["w2"], settings), "w3": lambda: render_w3(results["w3"], settings),
                 "w4": lambda: render_w4(results["w4"], settings), "w5": lambda: render_w5(results["w5"], settings)}
    for workload in WORKLOADS:
        if workload in results:
            sections.append(renderers[workload]())
    sections += round_trip_lines(results)
    return "\n".join(sections) + "\n"


def ours_failures(results: dict) -> list:
    """Return a description of every measurement of ours (and of the floor) that failed."""
    failures = []

    def visit(path: str, node) -> None:
        if isinstance(node, dict):
            if node.get("ok") is False:
                failures.append(f"{path}: {node.get('error')}")
                return
            for name, child in node.items():
                if name in ("original", "successor", "versions"):
                    continue
                visit(f"{path}/{name}" if path else name, child)

    visit("", results)
    return failures


# --------------------------------------------------------------------------------------------
# Coordinator: entry points
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(url):
    """Yield (url, private): the given URL, or that of a private redis-server stopped at the end."""
    if url:
        yield url, False
        return
    server = PrivateRedis()
    progress("starting a private redis-server on a free 127.0.0.1 port")
    try:
        yield server.start(), True
    finally:
        server.stop()
        progress("stopped the private redis-server")


def setup_implementations(keys: list, base_python: str, rebuild: bool):
    available, errors = [], {}
    for key in keys:
        try:
            ensure_venv(BY_KEY[key], base_python, rebuild)
            available.append(key)
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            errors[key] = str(error)
            progress(f"setup of {BY_KEY[key].label} failed: {error}")
    return available, errors


def draw_chart(runner: Runner, w4: dict, path: Path, settings: Settings, info: dict) -> None:
    if "ours" not in runner.available:
        progress("chart skipped: it is drawn in ours' environment, which is not available")
        return
    series = {}
    for key in labels_in(w4):
        points = {size: outcome for size, outcome in w4[key].items() if outcome.get("ok")}
        failed = [int(size) for size, outcome in w4[key].items() if not outcome.get("ok")]
        series[BY_KEY[key].label] = {
            "sizes": [int(size) for size in points],
            "seconds": [outcome["seconds"] for outcome in points.values()],
            "peak_rss_mib": [outcome["peak_rss_kib"] / 1024 for outcome in points.values()],
            "failed": failed,
            "color": BY_KEY[key].color,
        }
    progress(f"drawing the W4 chart into {path}")
    params = {"series": series, "path": str(path), "capacity": W4_CAPACITY, "hold_ms": W4_HOLD * 1000,
              "ideal": {str(size): size / W4_CAPACITY * W4_HOLD for size in settings.w4_sizes},
              "subtitle": f"bench.py {info['mode']}, {info['cpu']}, {info['cores']} cores, Redis {info['redis'].split(',')[0]}, "
                          f"Python {info['python']}; one run, indicative"}
    path.parent.mkdir(parents=True, exist_ok=True)
    outcome = runner.run("ours", "chart", params, timeout=180)
    if not outcome.get("ok"):
        progress(f"the chart could not be drawn: {outcome.get('error')}")


def comparison_main(argv: list) -> int:
    parser = argparse.ArgumentParser(
        description="Compare self_limiters (this repository) with self-limiters 0.4.0 and redis-rate-limiters 0.5.0, "
                    "and with the Redis round trip, on one Redis server. Legacy single-limiter mode: "
                    "python bench.py {s,tb} [--count N --iterations N --target MS ...] (see bench.py s --help).")
    parser.add_argument("--quick", action="store_true",
                        help="short run for CI: fewer iterations and samples, W4 up to 1,000 tasks")
    parser.add_argument("--redis-url", help="use this Redis server instead of starting a private redis-server "
                                            "(limiter names are fresh, nothing is deleted)")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures as JSON to FILE")
    parser.add_argument("--chart", metavar="FILE", help=f"PNG chart of W4 (default {DEFAULT_CHART.relative_to(ROOT)}, "
                                                        f"or {QUICK_CHART.relative_to(ROOT)} with --quick)")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the W4 chart")
    parser.add_argument("--rebuild", action="store_true", help="create the virtual environments in .bench/venvs again")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter on which the virtual environments are based (default: the one running "
                             "bench.py; ours needs a CPython built with its shared library)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    parser.add_argument("--implementations", default=",".join(BY_KEY),
                        help=f"comma-separated subset of {','.join(BY_KEY)}: original is self-limiters 0.4.0, "
                             "successor is redis-rate-limiters 0.5.0 (default: all)")
    args = parser.parse_args(argv)

    workloads = [name.strip().lower() for name in args.workloads.split(",") if name.strip()]
    keys = [name.strip().lower() for name in args.implementations.split(",") if name.strip()]
    unknown = [name for name in workloads if name not in WORKLOADS] + [name for name in keys if name not in BY_KEY]
    if unknown:
        parser.error(f"unknown workload or implementation: {', '.join(unknown)}")
    settings = QUICK if args.quick else FULL

    available, setup_errors = setup_implementations(keys, args.python, args.rebuild)
    with redis_server(args.redis_url) as (redis_url, private):
        runner = Runner(redis_url, available, setup_errors)
        results: dict = {}
        if "floor" in workloads:
            results["floor"] = run_floor(runner, settings, redis_url)
        if "w1" in workloads:
            results["w1"] = run_w1(runner, settings)
        if "w2" in workloads:
            results["w2"] = run_w2(runner, settings)
        if "w3" in workloads:
            results["w3"] = run_w3(runner, settings)
        if "w4" in workloads:
            results["w4"] = run_w4(runner, settings)
        if "w5" in workloads:
            results["w5"] = run_w5(runner, settings, redis_url)
        info = machine_info(redis_url, private, args.python)

    info["packages"] = runner.versions
    info["mode"] = "--quick" if args.quick else "full"
    info["run_seconds"] = time.monotonic() - _started
    print(render_report(results, info, settings, setup_errors))

    if "w4" in results and not args.no_chart:
        chart = DEFAULT_CHART
        if args.quick:
            chart = QUICK_CHART
        if args.chart:
            chart = Path(args.chart)
        draw_chart(runner, results["w4"], chart.resolve(), settings, info)
    if args.json:
        document = {"machine": info, "settings": asdict(settings), "setup_errors": setup_errors, "results": results}
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
        progress(f"wrote the raw figures to {args.json}")

    failures = ([f"setup: {setup_errors['ours']}"] if "ours" in setup_errors else []) + ours_failures(results)
    if failures:
        print("Measurements of ours or of the floor failed:\n" + "\n".join(f"- {line}" for line in failures),
              file=sys.stderr)
        return 1
    return 0


def legacy_main(argv: list) -> int:
    """Run the original single-limiter benchmark on ours: python bench.py {s,tb} [options]."""
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="The original benchmark of self-limiters, run against ours: COUNT tasks enter one limiter at "
                    "once, for ITERATIONS fresh names; prints the average and median ms per entry, after "
                    "discarding the first tenth of the iterations. The token bucket refills 1 token every 0.01 s, "
                    "and its schedule, (count - initial tokens) x 0.01 s, is subtracted.")
    parser.add_argument("type", help="s or semaphore, t or token_bucket (any word starting with s or t)")
    parser.add_argument("--count", type=int, default=10, help="tasks that enter one limiter at once (default 10)")
    parser.add_argument("--iterations", type=int, default=10, help="fresh limiters to run (default 10)")
    parser.add_argument("--target", type=float, help="maximum median in ms per entry; exit with 1 above it")
    parser.add_argument("--capacity", type=int, default=1, help="limiter capacity (default 1)")
    parser.add_argument("--max-sleep", "--max_sleep", dest="max_sleep", type=float, default=0.0,
                        help="limiter max_sleep in seconds (default 0: no limit)")
    parser.add_argument("--redis-url", "--redis_url", dest="redis_url",
                        help="Redis server to use (default: a private redis-server on a free 127.0.0.1 port)")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to hold the limiter inside the block")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the virtual environment of ours")
    parser.add_argument("--rebuild", action="store_true", help="create the virtual environment of ours again")
    args = parser.parse_args(argv)

    if args.type.startswith("s"):
        kind = "semaphore"
    elif args.type.startswith("t"):
        kind = "token_bucket"
    else:
        print(f"type must be 'semaphore' or 'token_bucket', not {args.type}", file=sys.stderr)
        return 1
    if args.count < 1 or args.iterations < 1 or args.capacity < 1:
        print("--count, --iterations and --capacity must be at least 1", file=sys.stderr)
        return 1

    available, errors = setup_implementations(["ours"], args.python, args.rebuild)
    if not available:
        return 1
    with redis_server(args.redis_url) as (redis_url, _):
        runner = Runner(redis_url, available, errors)
        params = {"kind": kind, "count": args.count, "iterations": args.iterations, "capacity": args.capacity,
                  "max_sleep": args.max_sleep, "hold": args.sleep, "refill_frequency": W1_REFILL_FREQUENCY,
                  "refill_amount": 1}
        schedule = 0.0
        if kind == "token_bucket":
            initial = runner.run("ours", "initial_tokens", {"capacity": args.capacity, "refill_amount": 1,
                                                             "period": 0.5}, timeout=60)
            if not initial.get("ok"):
                print(f"Measuring the initial tokens failed: {initial.get('error')}", file=sys.stderr)
                return 1
            schedule = max(args.count - initial["initial_tokens"], 0) * W1_REFILL_FREQUENCY
        print("Testing semaphore..." if kind == "semaphore" else "Testing token bucket...")
        per_iteration = args.count * W1_REFILL_FREQUENCY * 3  # three times the token bucket's schedule
        outcome = runner.run("ours", "at_once", params,
                             timeout=120 + args.iterations * (per_iteration + args.sleep * args.count + 5))
    if not outcome.get("ok"):
        print(f"The benchmark failed: {outcome.get('error')}", file=sys.stderr)
        return 1

    seconds = [value - schedule for value in outcome["seconds"]]
    discarded = len(seconds) // 10
    print(f"Discarding {discarded} first samples")
    if kind == "token_bucket":
        print(f"Subtracting the schedule of {schedule:.2f} s per iteration")
    kept = seconds[discarded:]
    average = statistics.mean(kept) / args.count * 1000
    median = statistics.median(kept) / args.count * 1000
    print(f"Average was {average:.3f}ms per entry")
    print(f"Median was {median:.3f}ms per entry")
    if args.target is not None:
        if median > args.target:
            print(f"Median time of {median:.3f}ms per entry exceeded the target of {args.target}ms", file=sys.stderr)
            return 1
        print(f"Median time was below target of {args.target}ms")
    return 0


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        if argv and not argv[0].startswith("-"):
            return legacy_main(argv)
        return comparison_main(argv)
    finally:
        kill_children()


# --------------------------------------------------------------------------------------------
# Worker: runs under the python of one implementation's environment
# --------------------------------------------------------------------------------------------


class SelfLimitersAdapter:
    """Ours and self-limiters 0.4.0: both are imported as self_limiters and share one API."""

    def __init__(self, redis_url: str) -> None:
        import self_limiters

        self.module = self_limiters
        self.redis_url = redis_url

    def semaphore(self, name: str, capacity: int, max_sleep: float = 0.0):
        return self.module.Semaphore(name=name, capacity=capacity, max_sleep=max_sleep or None, redis_url=self.redis_url)

    def token_bucket(self, name: str, capacity: int, refill_frequency: float, refill_amount: int, max_sleep: float = 0.0):
        return self.module.TokenBucket(name=name, capacity=capacity, refill_frequency=refill_frequency,
                                       refill_amount=refill_amount, max_sleep=max_sleep or None, redis_url=self.redis_url)

    async def close(self) -> None:
        return None


class SuccessorAdapter:
    """redis-rate-limiters: limiters on one redis.asyncio.Redis client per worker."""

    def __init__(self, redis_url: str) -> None:
        import limiters
        import redis.asyncio

        self.limiters = limiters
        self.redis_url = redis_url
        self.client = redis.asyncio.Redis.from_url(redis_url, max_connections=SUCCESSOR_MAX_CONNECTIONS)

    def semaphore(self, name: str, capacity: int, max_sleep: float = 0.0):
        return self.limiters.AsyncSemaphore(connection=self.client, name=name, capacity=capacity, max_sleep=max_sleep,
                                            expiry=30)

    def token_bucket(self, name: str, capacity: int, refill_frequency: float, refill_amount: int, max_sleep: float = 0.0):
        return self.limiters.AsyncTokenBucket(connection=self.client, name=name, capacity=capacity,
                                              refill_frequency=refill_frequency, refill_amount=refill_amount,
                                              max_sleep=max_sleep)

    async def close(self) -> None:
        await self.client.aclose()


def make_adapter(key: str, redis_url: str):
    return SuccessorAdapter(redis_url) if key == "successor" else SelfLimitersAdapter(redis_url)


def fresh_name() -> str:
    return f"bench-{uuid.uuid4().hex}"


def make_limiter(adapter, params: dict, name: str = ""):
    name = name or fresh_name()
    max_sleep = params.get("max_sleep", 0.0)
    if params["kind"] == "semaphore":
        return adapter.semaphore(name, params["capacity"], max_sleep)
    return adapter.token_bucket(name, params["capacity"], params["refill_frequency"], params["refill_amount"], max_sleep)


async def enter_and_leave(limiter, hold: float = 0.0) -> None:
    async with limiter:
        if hold:
            await asyncio.sleep(hold)


async def run_at_once(limiter, count: int, hold: float) -> float:
    """Start `count` tasks that enter the limiter, and return the seconds until all have left."""
    tasks = [asyncio.ensure_future(enter_and_leave(limiter, hold)) for _ in range(count)]
    start = time.perf_counter()
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return time.perf_counter() - start


def percentile(ordered: list, fraction: float) -> float:
    """Return the nearest-rank percentile of an ascending list."""
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def summarize(samples: list) -> dict:
    ordered = sorted(samples)
    return {"n": len(ordered), "p50": percentile(ordered, 0.5), "p90": percentile(ordered, 0.9),
            "p99": percentile(ordered, 0.99), "p999": percentile(ordered, 0.999), "mean": statistics.mean(ordered),
            "min": ordered[0], "max": ordered[-1]}


async def time_calls(call, samples: int, warmup: int) -> dict:
    for _ in range(warmup):
        await call()
    durations = []
    for _ in range(samples):
        start = time.perf_counter()
        await call()
        durations.append(time.perf_counter() - start)
    return summarize(durations)


async def probe_waiting(adapter, params: dict):
    """Return a description of the wait when entries of a fresh bucket that should never wait do wait.

    Returns None when the first entries take less than WAIT_THRESHOLD each.
    """
    bucket = make_limiter(adapter, params)
    for index in range(3):
        start = time.perf_counter()
        try:
            await asyncio.wait_for(enter_and_leave(bucket), WAIT_PROBE_TIMEOUT)
        except asyncio.TimeoutError:
            return (f"with refill_frequency={params['refill_frequency']:g} s, entry {index + 1} of a fresh bucket of "
                    f"{params['capacity']:,} tokens did not finish within {WAIT_PROBE_TIMEOUT:g} s")
        took = time.perf_counter() - start
        if took > WAIT_THRESHOLD:
            return (f"with refill_frequency={params['refill_frequency']:g} s, entry {index + 1} of a fresh bucket of "
                    f"{params['capacity']:,} tokens took {took * 1000:.0f} ms")
    return None


async def describe_waiting(adapter, params: dict, probe: str) -> dict:
    """Measure the waits of an implementation that waits for a refill where it should not."""
    short = dict(params, refill_frequency=WAITING_PROBE_FREQUENCY)
    bucket = make_limiter(adapter, short)
    durations = []
    for _ in range(20):
        start = time.perf_counter()
        await enter_and_leave(bucket)
        durations.append(time.perf_counter() - start)
    return {"waits": True, "probe": probe, "waits_at_probe_frequency": statistics.median(durations[2:])}


async def task_at_once(adapter, params: dict) -> dict:
    seconds = []
    for _ in range(params["iterations"]):
        limiter = make_limiter(adapter, params)
        seconds.append(await run_at_once(limiter, params["count"], params.get("hold", 0.0)))
    return {"seconds": seconds}


async def task_initial_tokens(adapter, params: dict) -> dict:
    """Count the entries that a fresh bucket grants before half of its first refill period."""
    warmup = adapter.token_bucket(fresh_name(), 10, 0.001, 10)
    await enter_and_leave(warmup)  # loads the library and connects, outside the measured window

    period = params["period"]
    bucket = adapter.token_bucket(fresh_name(), params["capacity"], period, params["refill_amount"])
    tasks = [asyncio.ensure_future(enter_and_leave(bucket)) for _ in range(params["capacity"] + 1)]
    done, pending = await asyncio.wait(tasks, timeout=period / 2)
    for task in pending:
        task.cancel()
    for task in done:
        task.result()  # raises the error of a failed entry
    return {"initial_tokens": len(done), "period": period}


async def task_latency(adapter, params: dict) -> dict:
    if params["kind"] == "token_bucket":
        probe = await probe_waiting(adapter, params)
        if probe is not None:
            result = await describe_waiting(adapter, params, probe)
            alternative = dict(params, refill_frequency=WAITING_ALTERNATIVE_FREQUENCY)
            limiter = make_limiter(adapter, alternative)
            result["alternative"] = await time_calls(lambda: enter_and_leave(limiter), params["samples"], params["warmup"])
            return result
    limiter = make_limiter(adapter, params)
    return await time_calls(lambda: enter_and_leave(limiter), params["samples"], params["warmup"])


async def task_throughput(adapter, params: dict) -> dict:
    result: dict = {}
    if params["kind"] == "token_bucket":
        probe = await probe_waiting(adapter, params)
        if probe is not None:
            result = await describe_waiting(adapter, params, probe)
            params = dict(params, refill_frequency=WAITING_ALTERNATIVE_FREQUENCY)
    await run_at_once(make_limiter(adapter, params), params["tasks"], 0.0)  # warm-up round
    result["seconds"] = [await run_at_once(make_limiter(adapter, params), params["tasks"], 0.0)
                         for _ in range(params["rounds"])]
    return result


def current_rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def task_scaling(adapter, params: dict) -> dict:
    await enter_and_leave(adapter.semaphore(fresh_name(), 1))  # loads the library and connects
    rss_before = current_rss_kib()
    seconds = await run_at_once(adapter.semaphore(fresh_name(), params["capacity"]), params["tasks"], params["hold"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"seconds": seconds, "rss_before_kib": rss_before, "peak_rss_kib": peak}


async def task_process_share(adapter, params: dict) -> dict:
    """Get ready, wait for GO on stdin, then run the tasks; return when the last one left."""
    await enter_and_leave(adapter.semaphore(fresh_name(), 1))
    limiter = adapter.semaphore(params["name"], params["capacity"])
    print("READY", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "GO":
        raise RuntimeError(f"expected GO on stdin, got {line!r}")
    start = time.time()
    await run_at_once(limiter, params["tasks"], params["hold"])
    return {"start": start, "end": time.time()}


async def task_floor(adapter, params: dict) -> dict:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(adapter.redis_url)
    try:
        await client.ping()
        sha = await client.script_load("return 1")
        ping = await time_calls(client.ping, params["samples"], params["warmup"])
        evalsha = await time_calls(lambda: client.evalsha(sha, 0), params["samples"], params["warmup"])
    finally:
        await client.aclose()
    return {"ping": ping, "evalsha": evalsha}


async def task_round_trips(adapter, params: dict) -> dict:
    """Time ours' uncontended entries and the EVALSHA round trip in alternating blocks of one process.

    Alternating blocks expose all three figures to the same background load, so their ratios change
    less with the load of the machine than figures timed minutes apart.
    """
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(adapter.redis_url)
    try:
        sha = await client.script_load("return 1")
        semaphore = adapter.semaphore(fresh_name(), 1)
        bucket = adapter.token_bucket(fresh_name(), **NO_WAIT_BUCKET)
        calls = {
            "semaphore": lambda: enter_and_leave(semaphore),
            "token_bucket": lambda: enter_and_leave(bucket),
            "evalsha": lambda: client.evalsha(sha, 0),
        }
        durations: dict = {name: [] for name in calls}
        for call in calls.values():
            for _ in range(params["warmup"]):
                await call()
        names = list(calls)
        for block in range(max(params["samples"] // ROUND_TRIP_BLOCK, 1)):
            for name in names[block % 3:] + names[:block % 3]:
                call = calls[name]
                for _ in range(ROUND_TRIP_BLOCK):
                    start = time.perf_counter()
                    await call()
                    durations[name].append(time.perf_counter() - start)
    finally:
        await client.aclose()
    return {name: summarize(values) for name, values in durations.items()}


def task_chart(params: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, data in params["series"].items():
        name = label + (f" (failed at N = {', '.join(f'{n:,}' for n in data['failed'])})" if data["failed"] else "")
        left.plot(data["sizes"], data["seconds"], marker="o", label=name, color=data["color"])
        right.plot(data["sizes"], data["peak_rss_mib"], marker="o", label=name, color=data["color"])
    ideal = sorted((int(size), seconds) for size, seconds in params["ideal"].items())
    left.plot([size for size, _ in ideal], [seconds for _, seconds in ideal], linestyle=":", color="gray",
              label=f"hold times alone (N / {params['capacity']} x {params['hold_ms']:g} ms)")
    left.set(xscale="log", yscale="log", xlabel="tasks waiting at once (N)", ylabel="wall time (s)",
             title=f"W4: N tasks, one semaphore of capacity {params['capacity']}")
    right.set(xscale="log", xlabel="tasks waiting at once (N)", ylabel="peak RSS of the process (MiB)",
              title="W4: peak memory (ru_maxrss)")
    right.set_ylim(bottom=0)
    for axes in (left, right):
        axes.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.suptitle(params["subtitle"], fontsize=9, color="dimgray", y=0.02, va="bottom")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(params["path"], dpi=110)
    return {"path": params["path"]}


ASYNC_TASKS = {
    "at_once": task_at_once,
    "initial_tokens": task_initial_tokens,
    "latency": task_latency,
    "throughput": task_throughput,
    "scaling": task_scaling,
    "process_share": task_process_share,
    "floor": task_floor,
    "round_trips": task_round_trips,
}


def package_versions() -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("self-limiters", "redis-rate-limiters", "redis", "matplotlib"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def worker_main(spec_text: str) -> int:
    """Run one task of the coordinator and print its result as one JSON line, then exit at once."""
    # The script's folder comes first on sys.path. It contains no module to import, so drop it.
    sys.path[:] = [entry for entry in sys.path if entry and Path(entry).resolve() != ROOT]
    spec = json.loads(spec_text)
    try:
        if spec["task"] == "chart":
            result = task_chart(spec["params"])
        else:
            async def run() -> dict:
                adapter = make_adapter(spec["implementation"], spec["redis_url"])
                try:
                    return await asyncio.wait_for(ASYNC_TASKS[spec["task"]](adapter, spec["params"]), spec["deadline"])
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(adapter.close(), 5)

            result = asyncio.run(run())
        result["ok"] = True
    except asyncio.TimeoutError:
        result = {"ok": False, "error": f"timed out after {spec['deadline']:g} s"}
    except BaseException as error:  # noqa: B902 - every failure is reported to the coordinator
        result = {"ok": False, "error": f"{type(error).__name__}: {error}".strip()}
    result["versions"] = package_versions()
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without interpreter shutdown: tasks still waiting after a failure, and the threads of the
    # Rust and Go runtimes, must not keep the process alive.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
