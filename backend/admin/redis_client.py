"""The Redis client the API uses to look at the broker (health, queue lengths)."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from backend.config import get_settings
from backend.errors import ServiceUnavailable


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


def ensure_redis(what: str) -> None:
    """Answer 503 at once, saying why, when Redis does not answer; `what` names what
    needs it ("the Celery workers", "the schedule")."""
    timeout = get_settings().health_check_timeout_seconds
    client = redis_client(timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ServiceUnavailable(
            f"{what} cannot be reached: Redis at {redis_location()} did not answer within "
            f"{timeout:g}s ({type(exc).__name__})"
        ) from exc
    finally:
        client.close()


def redis_location() -> str:
    """host:port/db of the broker, without credentials (for messages and logs)."""
    url = urlsplit(get_settings().redis_url)
    return f"{url.hostname}:{url.port or 6379}{url.path}"
