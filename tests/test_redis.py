"""backend/redis.py is the one place Redis clients are built, each with its timeouts."""

from __future__ import annotations

import ast
from pathlib import Path

from redbeat.schedulers import get_redis

from backend import redis
from backend.celery_app import app
from backend.config import get_settings
from tests.support.redis_db import RedisDb

BACKEND = Path(__file__).resolve().parents[1] / "backend"


def _imports_redis(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(
            alias.name.split(".")[0] == "redis" for alias in node.names
        ):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "redis"
        ):
            return True
    return False


def test_only_the_factory_imports_redis() -> None:
    importers = sorted(
        str(path.relative_to(BACKEND)) for path in BACKEND.rglob("*.py") if _imports_redis(path)
    )
    assert importers == ["redis.py"]


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
