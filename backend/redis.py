"""Every Redis client mailbeat uses is built here, with explicit timeouts: the leases
(mailboxes, watchers), the admin API's and the metrics' looks at the broker, the health
check, the scheduler-mode probe, and the schedule (RedBeat is handed the client built
here, so its own modules and ours share one pool). Celery's broker connections are
kombu's own, built from what `broker_url` and `broker_transport_options` say.

A URL is read in one function (`target`): `redis://`, `rediss://` and `unix://` name one
Redis; Celery's Sentinel form (`sentinel://h1:26379;sentinel://h2:26379/0`, the master's
name in REDIS_SENTINEL_MASTER) names the sentinels that know where the master is, and
every client here, kombu's and RedBeat's, follows the master through a failover.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

from redis import ConnectionPool, Redis
from redis.backoff import ConstantBackoff, NoBackoff
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from backend.config import Settings, get_settings

__all__ = [
    "LockError",
    "Redis",
    "RedisConnectionError",
    "RedisError",
    "RedisTimeoutError",
    "RedisUrlError",
    "Target",
    "broker_transport_options",
    "broker_url",
    "check_settings",
    "close",
    "connect",
    "location",
    "probe",
    "reset_cache",
    "shared",
    "target",
]

T = TypeVar("T")

# A pooled connection idle this long is pinged before use, so a connection Redis or a
# proxy dropped fails over to a new one instead of failing the caller's command.
HEALTH_CHECK_INTERVAL = 30
SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
# While the master is failed over, a call asks the sentinels again this often.
FAILOVER_RETRY_INTERVAL = 0.5


class RedisUrlError(ValueError):
    """A Redis URL mailbeat cannot use, with what to fix: raised as a process starts."""


@dataclass(frozen=True)
class Target:
    """Where a URL points. `options` are redis-py's connection arguments (host and port
    too for one Redis; database and credentials alone behind Sentinel); `sentinels` is
    empty for one Redis."""

    options: dict[str, Any]
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""

    @property
    def sentinel(self) -> bool:
        return bool(self.sentinels)


def target(url: str) -> Target:
    """What a Redis URL says. Sentinel: one `sentinel://[user:password@]host[:port]` per
    sentinel, joined by `;`, the database (`/0`) on any of them; the credentials are the
    master's. Raises RedisUrlError saying what is wrong."""
    if urlsplit(url).scheme != SENTINEL_SCHEME:
        if ";" in url:
            raise RedisUrlError(
                f"{_hidden(url)}: several addresses joined by ';' are Sentinel's form, "
                "where each one starts with sentinel://"
            )
        try:
            return Target(dict(parse_url(url)))  # type: ignore[no-untyped-call]  # untyped
        except ValueError as exc:
            raise RedisUrlError(
                f"{_hidden(url)}: {exc}; or sentinel:// for Redis Sentinel"
            ) from None
    master = get_settings().redis_sentinel_master
    if not master:
        raise RedisUrlError(
            f"{_hidden(url)} is a Sentinel URL: set REDIS_SENTINEL_MASTER to the master's "
            "name the sentinels monitor (`sentinel monitor NAME ...` in sentinel.conf)"
        )
    sentinels: list[tuple[str, int]] = []
    dbs: set[int] = set()
    credentials: set[tuple[str | None, str | None]] = set()
    for part in url.split(";"):
        host, port, db, username, password = _sentinel_part(part.strip())
        sentinels.append((host, port))
        if db is not None:
            dbs.add(db)
        if username is not None or password is not None:
            credentials.add((username, password))
    if len(dbs) > 1 or len(credentials) > 1:
        raise RedisUrlError(
            f"{_hidden(url)}: the sentinels name different databases or credentials; "
            "give them once (the database at the end: ...;sentinel://host3:26379/0)"
        )
    options: dict[str, Any] = {"db": dbs.pop() if dbs else 0}
    if credentials:
        options["username"], options["password"] = credentials.pop()
    return Target(options, tuple(sentinels), master)


def _sentinel_part(part: str) -> tuple[str, int, int | None, str | None, str | None]:
    where = repr(_hidden(part))
    parts = urlsplit(part)
    if parts.scheme != SENTINEL_SCHEME:
        raise RedisUrlError(f"{where} does not start with sentinel:// (every address must)")
    try:
        port = parts.port or SENTINEL_PORT
    except ValueError:
        raise RedisUrlError(f"{where}: the port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise RedisUrlError(f"{where} names no host")
    if parts.query or parts.fragment:
        raise RedisUrlError(f"{where}: options after ? or # are not read; remove them")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise RedisUrlError(f"{where}: the database must be a number (/0)")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port, int(path) if path else None, username, password


def _hidden(url: str) -> str:
    """A URL as it may be shown: passwords replaced by ***."""
    shown = []
    for part in url.split(";"):
        parts = urlsplit(part)
        if parts.password is not None:
            address = parts.netloc.rsplit("@", 1)[1]
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{address}")
        shown.append(parts.geturl())
    return ";".join(shown)


def check_settings(settings: Settings) -> None:
    """REDIS_URL and REDBEAT_REDIS_URL can be used; RedisUrlError says what to fix."""
    for name, url in (
        ("REDIS_URL", settings.redis_url),
        ("REDBEAT_REDIS_URL", settings.effective_redbeat_redis_url),
    ):
        try:
            target(url)
        except RedisUrlError as exc:
            raise RedisUrlError(f"{name}: {exc}") from None


def broker_url(url: str) -> str:
    """The URL Celery's broker (kombu) is given. Sentinel: the database and credentials
    on every address, since kombu reads them from the address it is using, and moves to
    the next one when a sentinel does not answer."""
    found = target(url)
    if not found.sentinel:
        return url
    db, username, password = (found.options.get(k) for k in ("db", "username", "password"))
    auth = ""
    if username is not None or password is not None:
        auth = f"{username or ''}:{password or ''}@"
    addresses = [f"{host}:{port}" for host, port in found.sentinels]
    return ";".join(f"{SENTINEL_SCHEME}://{auth}{address}/{db}" for address in addresses)


def broker_transport_options(url: str) -> dict[str, Any]:
    """What kombu (and Flower) need besides the URL: with Sentinel, the master's name and
    the sentinels' timeouts."""
    found = target(url)
    if not found.sentinel:
        return {}
    return {"master_name": found.master, "sentinel_kwargs": _sentinel_kwargs()}


def _sentinel_kwargs() -> dict[str, Any]:
    seconds = get_settings().redis_sentinel_timeout
    return {"socket_timeout": seconds, "socket_connect_timeout": seconds}


class _UntilFailedOver(Retry):
    """redis-py's retry bounded by time rather than by count: a call that cannot reach
    the master, which Sentinel is replacing, asks the sentinels again every
    FAILOVER_RETRY_INTERVAL until `seconds` have passed. redis-py nests retries (a
    command's, then its reconnection's); each gives up at its deadline, so the whole
    call fails after about `seconds`, not a multiple of it."""

    def __init__(self, seconds: float) -> None:
        super().__init__(ConstantBackoff(FAILOVER_RETRY_INTERVAL), -1)
        self.seconds = seconds

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        deadline = time.monotonic() + self.seconds

        def retryable(error: Exception) -> bool:
            if is_retryable is not None and not is_retryable(error):
                return False
            return time.monotonic() + FAILOVER_RETRY_INTERVAL < deadline

        return super().call_with_retry(do, fail, retryable, with_failure_count)


class _SentinelConnection(SentinelManagedConnection):
    """redis-py's connection behind Sentinel, except that every reconnection asks the
    sentinels where the master is. redis-py reconnects a connection that broke during a
    command through `connect_check_health`, which dials the address it had: the dead
    master, again and again until the failover retry gives up."""

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if retry_socket_connect:  # a reconnection, not the sentinels' own connect_to
            self.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            return
        super().connect_check_health(check_health, retry_socket_connect)


def connect(
    url: str | None = None,
    *,
    timeout: float | None = None,
    retries: bool = True,
    decode_responses: bool = False,
) -> Redis:
    """A client with its own pool on `url` (REDIS_URL by default). Every command gives up
    after `timeout` seconds (REDIS_SOCKET_TIMEOUT by default). Through Sentinel, a call
    that cannot reach the master tries again for REDIS_SENTINEL_FAILOVER_SECONDS (a
    failover), unless `retries=False`: for an answer wanted at once. (On one Redis a
    pool built here makes one attempt either way.)"""
    settings = get_settings()
    seconds = settings.redis_socket_timeout if timeout is None else timeout
    found = target(url or settings.redis_url)
    options = dict(found.options)
    options.update(
        socket_timeout=seconds,
        socket_connect_timeout=seconds,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        decode_responses=decode_responses,
    )
    if not retries:
        options["retry"] = Retry(NoBackoff(), 0)
    elif found.sentinel:
        options["retry"] = _UntilFailedOver(settings.redis_sentinel_failover_seconds)
    if not found.sentinel:
        return Redis.from_pool(ConnectionPool(**options))
    # The pool asks the sentinels where the master is for each new connection, and
    # drops its connections when the answer changes (a failover).
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        list(found.sentinels), sentinel_kwargs=_sentinel_kwargs(), **options
    )
    master = sentinel.master_for(  # type: ignore[no-untyped-call]
        found.master, connection_class=_SentinelConnection
    )
    return cast(Redis, master)


@lru_cache
def shared() -> Redis:
    """This process's long-lived client on REDIS_URL (the leases): thread-safe,
    one pool per process (redis-py opens a new pool in a forked child)."""
    return connect()


@contextmanager
def probe(timeout: float | None = None) -> Iterator[Redis]:
    """A short-lived client for one look at Redis (health, queue lengths, is it there at
    all): no retries, every call bounded by `timeout` (HEALTH_CHECK_TIMEOUT_SECONDS by
    default), closed afterwards."""
    seconds = get_settings().health_check_timeout_seconds if timeout is None else timeout
    client = connect(timeout=seconds, retries=False)
    try:
        yield client
    finally:
        close(client)


def close(client: Redis) -> None:
    """Close a client's connections, and those to the sentinels it asked."""
    client.close()
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        pool.sentinel_manager.close()


def location(url: str | None = None) -> str:
    """Where a Redis URL (REDIS_URL by default) points, without credentials: host:port/db,
    or the master's name and the sentinels."""
    found = target(url or get_settings().redis_url)
    if found.sentinel:
        hosts = ",".join(f"{host}:{port}" for host, port in found.sentinels)
        return f"master {found.master} via sentinels {hosts}/{found.options['db']}"
    parts = urlsplit(url or get_settings().redis_url)
    return f"{parts.hostname}:{parts.port or 6379}{parts.path}"


def reset_cache() -> None:
    if shared.cache_info().currsize:
        close(shared())
    shared.cache_clear()
