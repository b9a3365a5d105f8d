"""Exceptions raised by self_limiters, and the mapping from the Go core's error classes."""

from __future__ import annotations


class MaxSleepExceededError(Exception):
    """Raised when a limiter would make the caller wait longer than its ``max_sleep``.

    The caller holds nothing afterwards: no semaphore slot and no token.
    """


class RedisError(Exception):
    """Raised when Redis cannot be used: an invalid URL, a refused, dropped or timed-out
    connection, or an error reply such as WRONGTYPE. The message states the cause."""


class ForkedProcessError(RuntimeError):
    """Raised in a process forked after its parent had started the Go runtime of self_limiters.

    A Go runtime does not survive ``fork()``, so such a child cannot use the limiters.
    """


# The Go bridge names the class of each error it reports; this is the only place that turns
# those names into exceptions.
_CLASSES: dict[str, type[Exception]] = {
    "MaxSleepExceededError": MaxSleepExceededError,
    "RedisError": RedisError,
    "ValueError": ValueError,
}


def error_from_bridge(text: str) -> Exception:
    """Build the exception for an error of the Go bridge, given as ``"<class>:<message>"``."""
    class_name, _, message = text.partition(":")
    return _CLASSES.get(class_name, RuntimeError)(message)
