"""The Redis client the API uses to look at the broker (health, queue lengths)."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from backend.config import get_settings


def redis_client(timeout: float | None = None) -> redis.Redis:
    """A client on the broker's Redis whose every call gives up after `timeout` seconds.
    No retries: redis-py's default (3 retries with backoff) would turn a dead Redis into a
    wait of many seconds, and the API must answer 503 at once instead."""
    settings = get_settings()
    seconds = timeout if timeout is not None else settings.redis_socket_timeout
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=seconds,
        socket_connect_timeout=seconds,
        retry=Retry(NoBackoff(), 0),
    )
