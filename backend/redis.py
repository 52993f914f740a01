"""Every Redis client mailbeat uses is built here, with explicit timeouts: the mailbox
locks, the admin API's and the metrics' looks at the broker, the health check, the
scheduler-mode probe, and the schedule (RedBeat is handed the client built here, so its
own modules and ours share one pool). Celery's broker connections are kombu's own.

A URL is read in one function (`connection_options`), so another kind of URL (Sentinel)
is added in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from redis import ConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.lock import Lock
from redis.retry import Retry

from backend.config import get_settings

__all__ = [
    "Lock",
    "LockError",
    "Redis",
    "RedisConnectionError",
    "RedisError",
    "RedisTimeoutError",
    "connect",
    "connection_options",
    "location",
    "lock",
    "probe",
    "reset_cache",
    "shared",
]

# A pooled connection idle this long is pinged before use, so a connection Redis or a
# proxy dropped fails over to a new one instead of failing the caller's command.
HEALTH_CHECK_INTERVAL = 30


def connection_options(url: str) -> dict[str, Any]:
    """What a redis://, rediss:// or unix:// URL says: host, port, db, credentials, TLS."""
    return dict(parse_url(url))  # type: ignore[no-untyped-call]  # redis-py leaves it untyped


def connect(
    url: str | None = None,
    *,
    timeout: float | None = None,
    retries: bool = True,
    decode_responses: bool = False,
) -> Redis:
    """A client with its own pool on `url` (REDIS_URL by default). Every command gives up
    after `timeout` seconds (REDIS_SOCKET_TIMEOUT by default). `retries=False` drops
    redis-py's retries (3, with backoff), which would turn a dead Redis into a wait of
    many seconds where an answer is wanted at once."""
    settings = get_settings()
    seconds = settings.redis_socket_timeout if timeout is None else timeout
    options = connection_options(url or settings.redis_url)
    options.update(
        socket_timeout=seconds,
        socket_connect_timeout=seconds,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        decode_responses=decode_responses,
    )
    if not retries:
        options["retry"] = Retry(NoBackoff(), 0)
    return Redis.from_pool(ConnectionPool(**options))


@lru_cache
def shared() -> Redis:
    """This process's long-lived client on REDIS_URL (the mailbox locks): thread-safe,
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
        client.close()


def lock(client: Redis, name: str, timeout: float) -> Lock:
    """redis-py's lock: SET NX with a random token and an expiry, released by a Lua
    compare-and-delete so only the holder frees it. Never blocks: a caller that does not
    get it goes on without. Not thread-local: one poll's lock, whichever thread ends it."""
    return Lock(client, name, timeout=timeout, blocking=False, thread_local=False)


def location(url: str | None = None) -> str:
    """host:port/db of a Redis URL (REDIS_URL by default), without credentials."""
    parts = urlsplit(url or get_settings().redis_url)
    return f"{parts.hostname}:{parts.port or 6379}{parts.path}"


def reset_cache() -> None:
    if shared.cache_info().currsize:
        shared().close()
    shared.cache_clear()
