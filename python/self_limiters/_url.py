"""Checks and redaction of ``redis_url`` values, done at construction without Go or a connection.

The checks follow the URL parsers of go-redis 9.23, which the Go core uses, so that a URL that
passes here is rejected later only for what needs a server (a wrong password, a missing socket,
an unknown master set).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

from ._errors import RedisError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"

# Each scheme names a deployment: one server (redis, rediss, unix), Redis Cluster or Sentinel.
_SINGLE, _CLUSTER, _SENTINEL = "single server", "cluster", "sentinel"
_SCHEMES = {
    "redis": _SINGLE,
    "rediss": _SINGLE,
    "unix": _SINGLE,
    "redis+cluster": _CLUSTER,
    "rediss+cluster": _CLUSTER,
    "redis+sentinel": _SENTINEL,
    "rediss+sentinel": _SENTINEL,
}

# Query options of go-redis's URL parsers, by the kind of value each takes.
_COMMON_INT = {"protocol", "max_retries", "min_idle_conns", "max_idle_conns", "max_active_conns",
               "max_concurrent_dials", "pipeline_pool_size", "pipeline_read_buffer_size", "pipeline_write_buffer_size"}
_COMMON_DURATION = {"min_retry_backoff", "max_retry_backoff", "dial_timeout", "read_timeout", "write_timeout",
                    "pool_timeout", "conn_max_idle_time", "conn_max_lifetime", "conn_max_lifetime_jitter"}
_ROUTING_BOOL = {"route_by_latency", "route_randomly"}
_OPTIONS: dict[str, dict[str, set[str]]] = {
    _SINGLE: {
        "int": _COMMON_INT | {"db"},
        "duration": _COMMON_DURATION | {"idle_timeout", "max_conn_age"},
        "bool": {"pool_fifo"},
        "string": {"client_name"},
    },
    _CLUSTER: {
        "int": _COMMON_INT | {"max_redirects", "dialer_retries"},
        "duration": _COMMON_DURATION | {"route_by_latency_tolerance", "dialer_retry_timeout"},
        "bool": {"pool_fifo", "read_only"} | _ROUTING_BOOL,
        "string": {"client_name"},
        "address": {"addr"},
    },
    _SENTINEL: {
        "int": _COMMON_INT | {"db", "dialer_retries"},
        "duration": _COMMON_DURATION | {"route_by_latency_tolerance", "dialer_retry_timeout"},
        "bool": {"pool_fifo", "replica_only", "use_disconnected_replicas"} | _ROUTING_BOOL,
        # username and password here are those of the master; the user info is the sentinels'.
        "string": {"client_name", "master_name", "username", "password"},
        "address": {"addr"},
    },
}
# TLS options of rediss URLs: redis-py's file names, and go-redis's skip_verify (for tests only).
_TLS_FILES = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"}
_TLS_BOOL = {"skip_verify"}
_REPLACED_OPTIONS = {
    "pool_size": "use the connection_pool_size argument instead",
    "password": "put the password in the user info instead: redis://user:password@host:6379",
    "username": "put the user name in the user info instead: redis://user:password@host:6379",
}

# A duration as go-redis reads it: whole seconds, or Go's duration syntax such as 1.5s or 300ms.
_DURATION = re.compile(r"[+-]?\d+|[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+")
_INTEGER = re.compile(r"[+-]?\d+")
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]/]+):\d{1,5}")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_QUERY_PASSWORD = re.compile(r"([?&](?:password|pass|pwd|sentinel_password)=)[^&#]*", re.IGNORECASE)
# A query value with user info of its own, such as addr=user:password@host:port.
_QUERY_USERINFO = re.compile(r"([?&][^=&#]*=[^:&#@]*):[^&#]*@")


def check_redis_url(value: object) -> str:
    """Return the URL when it is usable as far as can be told without connecting.

    A malformed URL raises RedisError, as self-limiters 0.4.0 did, with a message that says which
    part is wrong and never contains the password.
    """
    if value is None:
        return DEFAULT_REDIS_URL
    if not isinstance(value, str):
        raise TypeError(f"redis_url must be a str, got {type(value).__name__}")

    def invalid(reason: str) -> RedisError:
        return RedisError(f"invalid redis_url {redact_url(value)}: {reason}")

    if "\0" in value:
        raise invalid("it contains a NUL character")
    _, _, rest = value.partition("://")
    userinfo_end = _userinfo_end(rest)
    if userinfo_end >= 0 and re.search(r"[/?#]", rest[:userinfo_end]):
        # An unescaped '/', '?' or '#' in the user info ends the host part early, so a parser
        # would read part of the password as the port or the path.
        raise invalid("the user name or password contains '/', '?' or '#'; percent-encode them (%2F, %3F, %23)")
    if _BAD_ESCAPE.search(value):
        raise invalid("a '%' is not followed by two hex digits; write a literal '%' as %25")

    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        # ValueError's text may repeat parts of the URL, so it is not shown.
        if "IPv6" in str(exc):
            raise invalid("an IPv6 host needs both brackets, as in redis://[::1]:6379") from None
        raise invalid("the port must be a number from 1 to 65535") from None
    if port == 0:
        raise invalid("the port must be a number from 1 to 65535")

    deployment = _SCHEMES.get(parts.scheme)
    if deployment is None:
        scheme = repr(parts.scheme) if parts.scheme else "no scheme"
        known = ", ".join(f"{name}://" for name in _SCHEMES)
        raise invalid(f"the scheme must be one of {known}; got {scheme}")
    if parts.scheme == "unix":
        if not parts.path.strip():
            raise invalid("a unix:// URL needs the socket path, as in unix:///run/redis.sock")
    else:
        if not parts.hostname:
            raise invalid("the host is missing, as in redis://127.0.0.1:6379")
        if parts.netloc.endswith(":"):
            raise invalid("the port after ':' is empty")
        _check_database_path(parts.path, deployment, invalid)

    options = parse_qsl(parts.query, keep_blank_values=True)
    _check_options(options, deployment, parts.scheme.startswith("rediss"), invalid)
    if deployment == _SENTINEL and not any(name == "master_name" and option for name, option in options):
        raise invalid("a redis+sentinel:// URL needs master_name=, the name of the master set")
    return value


def _check_database_path(path: str, deployment: str, invalid) -> None:
    segments = [segment for segment in path.split("/") if segment]
    if deployment == _CLUSTER and segments:
        raise invalid("a Redis Cluster has only database 0, so the path must be empty")
    if len(segments) > 1:
        raise invalid("the path must be empty or one database number, as in /0")
    if segments and not segments[0].isdigit():
        raise invalid(f"the database number in the path must be a non-negative integer, got {segments[0]!r}")


def _check_options(options: list[tuple[str, str]], deployment: str, tls: bool, invalid) -> None:
    kinds = _OPTIONS[deployment]
    for name, option_value in options:
        if name in _REPLACED_OPTIONS and name not in kinds.get("string", ()):
            raise invalid(f"the option {name} is not supported; {_REPLACED_OPTIONS[name]}")
        if name in _TLS_FILES | _TLS_BOOL and not tls:
            raise invalid(f"the option {name} needs a TLS URL (rediss://)")
        if name in kinds["int"]:
            valid = bool(_INTEGER.fullmatch(option_value))
        elif name in kinds["duration"]:
            valid = bool(_DURATION.fullmatch(option_value))
        elif name in kinds["bool"] or name in _TLS_BOOL:
            valid = option_value in ("true", "false", "1", "0", "")
        elif name in kinds.get("address", ()):
            valid = bool(_ADDRESS.fullmatch(option_value)) and 1 <= int(option_value.rpartition(":")[2]) <= 65535
        elif name in kinds["string"] or name in _TLS_FILES:
            valid = True
        else:
            raise invalid(f"unknown option {name!r} for a {deployment} URL")
        if not valid:
            redacted_value = "xxxxx" if name == "password" else repr(_redact_userinfo(option_value))
            hint = "; use host:port with a port from 1 to 65535" if name in kinds.get("address", ()) else ""
            raise invalid(f"the option {name} has an invalid value {redacted_value}{hint}")


def redact_url(url: str) -> str:
    """Return ``url`` with its passwords, if any, replaced by ``xxxxx``: the password of the user
    info (see _userinfo_end), passwords given as query options, and those in the user info of an
    option such as addr=."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return "(not a URL)"
    url = f"{scheme}://{_redact_userinfo(rest)}"
    url = _QUERY_PASSWORD.sub(r"\1xxxxx", url)
    return _QUERY_USERINFO.sub(r"\1:xxxxx@", url)


def _userinfo_end(rest: str) -> int:
    """Return the index of the '@' that ends the user info of ``rest``, a URL without its scheme,
    or -1 when it has none.

    That '@' is the last one before the query. When no '@' comes before the first '?' or '#', an
    unescaped '?' or '#' in the password cut it short, and the first '@' after it ends the user
    info, unless an '=' shows that the '@' belongs to a query option such as addr=.
    """
    cut = len(re.split(r"[?#]", rest, maxsplit=1)[0])
    at = rest.rfind("@", 0, cut)
    if at < 0:
        at = rest.find("@", cut)
        if "=" in rest[cut:max(at, cut)]:
            return -1
    return at


def _redact_userinfo(text: str) -> str:
    """Return ``text``, a URL without its scheme or an address, with the password of its user info hidden."""
    end = _userinfo_end(text)
    user, colon, _ = text[:max(end, 0)].partition(":")
    if end < 0 or not colon:
        return text
    return f"{user}:xxxxx{text[end:]}"
