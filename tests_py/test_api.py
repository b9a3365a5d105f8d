"""The public API without Redis traffic: signatures, attributes, argument checks, lazy loading."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest

import self_limiters
from self_limiters import ForkedProcessError, MaxSleepExceededError, RedisError, Semaphore, TokenBucket
from support import start_child

REPOSITORY = Path(__file__).resolve().parent.parent


def _parameters(function: object) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def test_package_installed_copy_imported() -> None:
    imported = Path(self_limiters.__file__).resolve()
    assert REPOSITORY / "python" not in imported.parents, (
        f"expected the installed package, imported {imported} from the source tree"
    )


def test_package_exports() -> None:
    expected = {"ForkedProcessError", "MaxSleepExceededError", "RedisError", "Semaphore", "TokenBucket"}
    assert set(self_limiters.__all__) == expected, f"expected __all__ {expected}, got {self_limiters.__all__}"
    assert issubclass(ForkedProcessError, RuntimeError), "expected ForkedProcessError to be a RuntimeError"
    assert issubclass(MaxSleepExceededError, Exception), "expected MaxSleepExceededError to be an Exception"
    assert issubclass(RedisError, Exception), "expected RedisError to be an Exception"


def test_semaphore_signature() -> None:
    expected = [
        ("self", inspect.Parameter.empty),
        ("name", inspect.Parameter.empty),
        ("capacity", inspect.Parameter.empty),
        ("max_sleep", None),
        ("expiry", None),
        ("redis_url", None),
        ("connection_pool_size", None),
    ]
    seen = _parameters(Semaphore.__init__)
    assert seen == expected, f"expected parameters {expected}, got {seen}"


def test_token_bucket_signature() -> None:
    expected = [
        ("self", inspect.Parameter.empty),
        ("name", inspect.Parameter.empty),
        ("capacity", inspect.Parameter.empty),
        ("refill_frequency", inspect.Parameter.empty),
        ("refill_amount", inspect.Parameter.empty),
        ("redis_url", None),
        ("max_sleep", None),
        ("connection_pool_size", None),
    ]
    seen = _parameters(TokenBucket.__init__)
    assert seen == expected, f"expected parameters {expected}, got {seen}"


def test_semaphore_defaults() -> None:
    semaphore = Semaphore("defaults", 3)

    assert semaphore.name == "__self-limiters:defaults", f"expected the prefixed name, got {semaphore.name!r}"
    assert semaphore.capacity == 3, f"expected capacity 3, got {semaphore.capacity!r}"
    assert semaphore.max_sleep == 0.0, f"expected max_sleep 0.0 (no limit), got {semaphore.max_sleep!r}"
    assert semaphore.expiry == 30.0, f"expected expiry 30.0, got {semaphore.expiry!r}"


def test_semaphore_positional_arguments() -> None:
    semaphore = Semaphore("positional", 2, 1.5, 4.0, "redis://127.0.0.1:1", 3)

    assert semaphore.capacity == 2, f"expected capacity 2, got {semaphore.capacity!r}"
    assert semaphore.max_sleep == 1.5, f"expected max_sleep 1.5, got {semaphore.max_sleep!r}"
    assert semaphore.expiry == 4.0, f"expected expiry 4.0, got {semaphore.expiry!r}"


def test_token_bucket_attributes() -> None:
    bucket = TokenBucket("positional", 5, 0.25, 2, "redis://127.0.0.1:1", 1.5, 3)

    assert bucket.name == "__self-limiters:positional", f"expected the prefixed name, got {bucket.name!r}"
    assert bucket.capacity == 5, f"expected capacity 5, got {bucket.capacity!r}"
    assert bucket.refill_frequency == 0.25, f"expected refill_frequency 0.25, got {bucket.refill_frequency!r}"
    assert bucket.refill_amount == 2, f"expected refill_amount 2, got {bucket.refill_amount!r}"
    assert bucket.max_sleep == 1.5, f"expected max_sleep 1.5, got {bucket.max_sleep!r}"


def test_token_bucket_defaults() -> None:
    bucket = TokenBucket("defaults", 1, 1, 1)

    assert bucket.max_sleep == 0.0, f"expected max_sleep 0.0 (no limit), got {bucket.max_sleep!r}"
    assert bucket.refill_frequency == 1.0, f"expected refill_frequency 1.0, got {bucket.refill_frequency!r}"


@pytest.mark.parametrize("value", [None, 0, 0.0, math.inf])
def test_max_sleep_no_limit_values(value: object) -> None:
    assert Semaphore("n", 1, max_sleep=value).max_sleep == 0.0, f"expected max_sleep={value!r} to mean 0.0"
    assert TokenBucket("n", 1, 1, 1, max_sleep=value).max_sleep == 0.0, f"expected max_sleep={value!r} to mean 0.0"


@pytest.mark.parametrize(
    "limiter, attribute",
    [
        (Semaphore("read-only", 1), "name"),
        (Semaphore("read-only", 1), "capacity"),
        (Semaphore("read-only", 1), "max_sleep"),
        (Semaphore("read-only", 1), "expiry"),
        (TokenBucket("read-only", 1, 1, 1), "name"),
        (TokenBucket("read-only", 1, 1, 1), "capacity"),
        (TokenBucket("read-only", 1, 1, 1), "max_sleep"),
        (TokenBucket("read-only", 1, 1, 1), "refill_frequency"),
        (TokenBucket("read-only", 1, 1, 1), "refill_amount"),
    ],
)
def test_attribute_read_only(limiter: object, attribute: str) -> None:
    before = getattr(limiter, attribute)
    with pytest.raises(AttributeError):
        setattr(limiter, attribute, before)
    assert getattr(limiter, attribute) == before, f"expected {attribute} to stay {before!r}"


def test_semaphore_repr() -> None:
    seen = repr(Semaphore("shown", 1))
    assert seen == "Semaphore instance for queue __self-limiters:shown", f"got {seen!r}"


def test_token_bucket_repr() -> None:
    seen = repr(TokenBucket("shown", 1, 1, 1))
    assert seen == "Token bucket instance for queue __self-limiters:shown", f"got {seen!r}"


SEMAPHORE_TYPE_ERRORS = [
    ("name", {"name": 1}),
    ("name", {"name": b"bytes"}),
    ("name", {"name": None}),
    ("capacity", {"capacity": "1"}),
    ("capacity", {"capacity": 1.0}),
    ("capacity", {"capacity": True}),
    ("capacity", {"capacity": None}),
    ("max_sleep", {"max_sleep": "1"}),
    ("max_sleep", {"max_sleep": True}),
    ("expiry", {"expiry": "1"}),
    ("expiry", {"expiry": False}),
    ("redis_url", {"redis_url": 6379}),
    ("redis_url", {"redis_url": b"redis://127.0.0.1"}),
    ("connection_pool_size", {"connection_pool_size": 1.5}),
    ("connection_pool_size", {"connection_pool_size": True}),
    ("connection_pool_size", {"connection_pool_size": "2"}),
]


@pytest.mark.parametrize("argument, change", SEMAPHORE_TYPE_ERRORS)
def test_semaphore_type_error(argument: str, change: dict[str, object]) -> None:
    arguments: dict[str, object] = {"name": "typed", "capacity": 1, **change}
    with pytest.raises(TypeError) as caught:
        Semaphore(**arguments)
    assert argument in str(caught.value), f"expected the message to name {argument}, got {str(caught.value)!r}"


TOKEN_BUCKET_TYPE_ERRORS = [
    ("name", {"name": 1}),
    ("capacity", {"capacity": "1"}),
    ("capacity", {"capacity": 2.0}),
    ("capacity", {"capacity": True}),
    ("refill_frequency", {"refill_frequency": "1"}),
    ("refill_frequency", {"refill_frequency": True}),
    ("refill_frequency", {"refill_frequency": None}),
    ("refill_amount", {"refill_amount": 1.0}),
    ("refill_amount", {"refill_amount": True}),
    ("refill_amount", {"refill_amount": None}),
    ("redis_url", {"redis_url": 6379}),
    ("max_sleep", {"max_sleep": "0.5"}),
    ("max_sleep", {"max_sleep": False}),
    ("connection_pool_size", {"connection_pool_size": 2.0}),
    ("connection_pool_size", {"connection_pool_size": False}),
]


@pytest.mark.parametrize("argument, change", TOKEN_BUCKET_TYPE_ERRORS)
def test_token_bucket_type_error(argument: str, change: dict[str, object]) -> None:
    arguments: dict[str, object] = {"name": "typed", "capacity": 1, "refill_frequency": 1.0, "refill_amount": 1, **change}
    with pytest.raises(TypeError) as caught:
        TokenBucket(**arguments)
    assert argument in str(caught.value), f"expected the message to name {argument}, got {str(caught.value)!r}"


SEMAPHORE_VALUE_ERRORS = [
    ("name", {"name": "nul\0inside"}),
    ("name", {"name": "lone surrogate \udc80"}),
    ("capacity", {"capacity": 0}),
    ("capacity", {"capacity": -1}),
    ("capacity", {"capacity": 2**53 + 1}),
    ("max_sleep", {"max_sleep": -0.1}),
    ("max_sleep", {"max_sleep": -math.inf}),
    ("max_sleep", {"max_sleep": math.nan}),
    ("expiry", {"expiry": 0}),
    ("expiry", {"expiry": -1.0}),
    ("expiry", {"expiry": 0.001}),
    ("expiry", {"expiry": math.nan}),
    ("expiry", {"expiry": math.inf}),
    ("connection_pool_size", {"connection_pool_size": 0}),
    ("connection_pool_size", {"connection_pool_size": -5}),
]


@pytest.mark.parametrize("argument, change", SEMAPHORE_VALUE_ERRORS)
def test_semaphore_value_error(argument: str, change: dict[str, object]) -> None:
    arguments: dict[str, object] = {"name": "valued", "capacity": 1, **change}
    with pytest.raises(ValueError) as caught:
        Semaphore(**arguments)
    assert argument in str(caught.value), f"expected the message to name {argument}, got {str(caught.value)!r}"


TOKEN_BUCKET_VALUE_ERRORS = [
    ("name", {"name": "nul\0inside"}),
    ("capacity", {"capacity": 0}),
    ("capacity", {"capacity": -3}),
    ("refill_frequency", {"refill_frequency": 0}),
    ("refill_frequency", {"refill_frequency": 0.0}),
    ("refill_frequency", {"refill_frequency": -1}),
    ("refill_frequency", {"refill_frequency": 1e-9}),
    ("refill_frequency", {"refill_frequency": math.nan}),
    ("refill_frequency", {"refill_frequency": math.inf}),
    ("refill_amount", {"refill_amount": 0}),
    ("refill_amount", {"refill_amount": -1}),
    ("max_sleep", {"max_sleep": -1}),
    ("max_sleep", {"max_sleep": math.nan}),
    ("connection_pool_size", {"connection_pool_size": 0}),
]


@pytest.mark.parametrize("argument, change", TOKEN_BUCKET_VALUE_ERRORS)
def test_token_bucket_value_error(argument: str, change: dict[str, object]) -> None:
    arguments: dict[str, object] = {"name": "valued", "capacity": 1, "refill_frequency": 1.0, "refill_amount": 1, **change}
    with pytest.raises(ValueError) as caught:
        TokenBucket(**arguments)
    assert argument in str(caught.value), f"expected the message to name {argument}, got {str(caught.value)!r}"


MALFORMED_URLS = [
    "not a url",
    "127.0.0.1:6379",
    "http://127.0.0.1:6379",
    "redis://127.0.0.1:port",
    "redis://127.0.0.1:99999",
    "redis://127.0.0.1:",
    "redis://[::1",
    "unix://",
    "redis://127.0.0.1:1\0",
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_semaphore_malformed_url(url: str) -> None:
    with pytest.raises(RedisError) as caught:
        Semaphore("malformed", 1, redis_url=url)
    assert "redis_url" in str(caught.value), f"expected the message to name redis_url, got {str(caught.value)!r}"


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_token_bucket_malformed_url(url: str) -> None:
    with pytest.raises(RedisError) as caught:
        TokenBucket("malformed", 1, 1, 1, redis_url=url)
    assert "redis_url" in str(caught.value), f"expected the message to name redis_url, got {str(caught.value)!r}"


@pytest.mark.parametrize(
    "url",
    [
        "http://user:hunter2secret@127.0.0.1:6379",
        "redis://user:hunter2secret@127.0.0.1:port",
        "redis://:hunter2secret@127.0.0.1:99999/0",
        "redis://user:hunter2secret@127.0.0.1:",
        "redis://user:hunter2secret@[::1",
    ],
)
def test_malformed_url_message_hides_password(url: str) -> None:
    with pytest.raises(RedisError) as caught:
        Semaphore("malformed", 1, redis_url=url)
    assert "hunter2secret" not in str(caught.value), f"password shown in {str(caught.value)!r}"


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2#secret@127.0.0.1:6379",
        "redis://user:hunter2?secret@127.0.0.1:6379",
        "redis://user:hunter2/secret@127.0.0.1:6379",
    ],
)
def test_malformed_url_hides_unescaped_password(url: str) -> None:
    # An unescaped "#", "?" or "/" in the password ends the authority, so urlsplit takes the start
    # of the password for the port, and its error repeats that port text.
    with pytest.raises(RedisError) as caught:
        Semaphore("malformed", 1, redis_url=url)
    assert "hunter2" not in str(caught.value), f"password or its start shown in {str(caught.value)!r}"


def test_construction_loads_no_go(tmp_path: Path, redis_url: str) -> None:
    child = start_child("loading", redis_url, f"loading-{tmp_path.name}", cwd=tmp_path)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, f"expected exit code 0, got {child.returncode}; stderr:\n{stderr}"
    steps = json.loads(stdout)

    assert steps["after_import"] is False, "expected self_limiters._slbridge not loaded by the import"
    assert steps["after_construction"] is False, "expected self_limiters._slbridge not loaded by construction"
    assert steps["after_entry"] is True, "expected self_limiters._slbridge loaded by the first entry"


def test_package_imports_from_other_folder(tmp_path: Path, redis_url: str) -> None:
    child = start_child("loading", redis_url, f"folder-{tmp_path.name}", cwd=tmp_path)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, f"expected exit code 0, got {child.returncode}; stderr:\n{stderr}"
    steps = json.loads(stdout)

    imported = Path(steps["file"]).resolve()
    assert REPOSITORY / "python" not in imported.parents, f"expected the installed package, got {imported}"
    assert steps["folder_kept"] is True, "expected the working folder unchanged by loading the Go extension"


def test_fork_after_load_raises(tmp_path: Path, redis_url: str) -> None:
    child = start_child("fork", redis_url, f"fork-{tmp_path.name}", cwd=tmp_path)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, f"expected exit code 0, got {child.returncode}; stderr:\n{stderr}"
    steps = json.loads(stdout)

    assert steps["before_load"] == "entered", f"expected a child forked before loading to enter, got {steps['before_load']!r}"
    assert steps["after_load"].startswith("ForkedProcessError: "), (
        f"expected ForkedProcessError in a child forked after loading, got {steps['after_load']!r}"
    )
