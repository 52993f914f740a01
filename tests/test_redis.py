"""backend/redis.py builds every Redis client with its timeouts (ruff's TID251 keeps it
the only module that imports redis)."""

from __future__ import annotations

from redbeat.schedulers import get_redis

from backend import redis
from backend.celery_app import app
from backend.config import get_settings
from tests.support.redis_db import RedisDb


def test_clients_carry_the_configured_timeouts(redis_db: RedisDb) -> None:
    settings = get_settings()
    shared = redis.shared().connection_pool.connection_kwargs
    assert shared["socket_timeout"] == settings.redis_socket_timeout
    assert shared["socket_connect_timeout"] == settings.redis_socket_timeout
    assert shared["health_check_interval"] == redis.HEALTH_CHECK_INTERVAL
    assert redis.shared().ping()
    with redis.probe(0.5) as client:
        probe = client.connection_pool.connection_kwargs
        assert probe["socket_timeout"] == probe["socket_connect_timeout"] == 0.5
        assert probe["retry"].get_retries() == 0  # a dead Redis answers at once
        assert client.ping()


def test_redbeat_uses_the_factory_client() -> None:
    client = get_redis(app)
    assert client is app.redbeat_redis
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == get_settings().redis_socket_timeout
    assert kwargs["decode_responses"] is True


def test_location_hides_credentials() -> None:
    assert redis.location("redis://user:secret@cache.internal:6380/2") == "cache.internal:6380/2"
    assert redis.location("redis://cache.internal") == "cache.internal:6379"
