"""Checks of the limiters' arguments. They run at construction and never touch Redis or Go."""

from __future__ import annotations

import math

# The Go core keeps counts and times exact in the float64 numbers of Redis's Lua up to these.
MAX_COUNT = 2**53
MAX_SECONDS = 100 * 365 * 24 * 3600.0
MIN_EXPIRY = 0.01
MIN_REFILL_FREQUENCY = 1e-6


def check_name(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"name must be a str, got {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"name must not contain NUL characters, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"name must be encodable as UTF-8, got {value!r}") from exc
    return value


def check_count(argument: str, value: object, default: int | None = None) -> int:
    """Return ``value`` as a count from 1 to MAX_COUNT; None means ``default`` when one is given."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{argument} must be at least 1, got {value}")
    if value > MAX_COUNT:
        raise ValueError(f"{argument} must be at most 2**53, got {value}")
    return value


def _seconds(argument: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{argument} must be a number of seconds (int or float), got {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds):
        raise ValueError(f"{argument} must be a number of seconds, got nan")
    return seconds


def check_max_sleep(value: object) -> float:
    """Return the maximum wait in seconds, 0.0 meaning no limit (None, 0 and inf alike)."""
    if value is None:
        return 0.0
    seconds = _seconds("max_sleep", value)
    if seconds < 0:
        raise ValueError(f"max_sleep must be 0 (no limit) or a positive number of seconds, got {value}")
    if math.isinf(seconds):
        return 0.0
    return min(seconds, MAX_SECONDS) + 0.0  # + 0.0 turns -0.0 into 0.0


def check_duration(argument: str, value: object, minimum: float) -> float:
    """Return a positive duration in seconds from ``minimum`` to MAX_SECONDS."""
    seconds = _seconds(argument, value)
    if seconds <= 0 or math.isinf(seconds):
        raise ValueError(f"{argument} must be a positive, finite number of seconds, got {value}")
    if seconds < minimum:
        raise ValueError(f"{argument} must be at least {minimum:g} seconds, got {value}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{argument} must be at most {MAX_SECONDS:.0f} seconds (100 years), got {value}")
    return seconds
