"""backend/redis.py builds every Redis client with its timeouts (ruff's TID251 keeps it
the only module that imports redis)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from redbeat.schedulers import get_redis
from redis.sentinel import SentinelConnectionPool

from backend import redis
from backend.celery_app import app
from backend.config import get_settings
from tests.support.celery import ROOT
from tests.support.redis_db import RedisDb
from tests.support.sentinel import MASTER_NAME, running_sentinels
from tests.support.wait import wait_for


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


# -- Sentinel: Celery's URL form, the master's name in REDIS_SENTINEL_MASTER ------------

THREE = "sentinel://s1:26379;sentinel://s2:26380;sentinel://s3/2"


@pytest.fixture
def master(set_env: Callable[..., None]) -> None:
    set_env(REDIS_SENTINEL_MASTER="mymaster")


def test_a_sentinel_url_names_the_sentinels_and_the_masters_database(master: None) -> None:
    found = redis.target(THREE)
    assert found.sentinels == (("s1", 26379), ("s2", 26380), ("s3", 26379))
    assert found.master == "mymaster"
    assert found.options == {"db": 2}
    # The master's credentials, given once (kombu reads them from the first address).
    found = redis.target("sentinel://u:p%40ss@s1;sentinel://s2/0")
    assert found.options == {"db": 0, "username": "u", "password": "p@ss"}
    assert redis.target("redis://cache:6380/4").options["port"] == 6380
    assert not redis.target("redis://cache:6380/4").sentinel


def test_kombu_gets_the_database_and_credentials_on_every_address(master: None) -> None:
    # Kombu moves to the next address when a sentinel does not answer, and reads the
    # database and credentials from the address it is on.
    assert redis.broker_url(THREE) == (
        "sentinel://s1:26379/2;sentinel://s2:26380/2;sentinel://s3:26379/2"
    )
    assert redis.broker_url("sentinel://:pw@s1;sentinel://s2") == (
        "sentinel://:pw@s1:26379/0;sentinel://:pw@s2:26379/0"
    )
    options = redis.broker_transport_options(THREE)
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"]["socket_timeout"] == get_settings().redis_sentinel_timeout
    assert redis.broker_url("redis://cache/1") == "redis://cache/1"
    assert redis.broker_transport_options("redis://cache/1") == {}


def test_location_of_a_sentinel_url_hides_credentials(master: None) -> None:
    assert redis.location("sentinel://:secret@s1;sentinel://:secret@s2:26380/1") == (
        "master mymaster via sentinels s1:26379,s2:26380/1"
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://s1;redis://s2", "'redis://s2' does not start with sentinel://"),
        ("sentinel://s1:notaport", "the port is not a number"),
        ("sentinel://s1:99999", "the port is not a number"),
        ("sentinel://:26379", "names no host"),
        ("sentinel://s1/zero", "the database must be a number"),
        ("sentinel://s1/1;sentinel://s2/2", "different databases or credentials"),
        ("sentinel://:a@s1;sentinel://:b@s2", "different databases or credentials"),
        ("sentinel://s1?master=x", "options after ? or # are not read"),
        ("redis://h1:6379;redis://h2:6379", "each one starts with sentinel://"),
        ("http://cache:6379", "sentinel:// for Redis Sentinel"),
    ],
)
def test_a_bad_url_says_what_is_wrong(master: None, url: str, says: str) -> None:
    with pytest.raises(redis.RedisUrlError, match=re.escape(says)):
        redis.target(url)


def test_a_password_is_never_in_the_message(master: None) -> None:
    with pytest.raises(redis.RedisUrlError) as raised:
        redis.target("sentinel://:hunter2@s1:port")
    assert "hunter2" not in str(raised.value) and "***" in str(raised.value)


def test_a_sentinel_url_without_a_master_name_is_refused(set_env: Callable[..., None]) -> None:
    set_env(REDIS_SENTINEL_MASTER=None, REDBEAT_REDIS_URL=THREE)
    with pytest.raises(redis.RedisUrlError, match=r"^REDBEAT_REDIS_URL: .*REDIS_SENTINEL_MASTER"):
        redis.check_settings(get_settings())


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"REDIS_URL": THREE}, "REDIS_URL: sentinel://s1:26379;sentinel://s2:26380;"),
        ({"REDIS_URL": "sentinel://s1:x", "REDIS_SENTINEL_MASTER": "m"}, "port is not a number"),
    ],
)
def test_a_process_with_a_bad_url_stops_as_it_starts_saying_why(
    env: dict[str, str], says: str
) -> None:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    environment.pop("REDIS_SENTINEL_MASTER", None)
    environment.update(env)
    finished = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "backend.celery_app", "worker"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert finished.returncode != 0
    assert says in finished.stdout + finished.stderr
    if "REDIS_SENTINEL_MASTER" not in env:
        assert "set REDIS_SENTINEL_MASTER" in finished.stdout + finished.stderr


def test_sentinel_clients_carry_the_timeouts_and_follow_a_failover(master: None) -> None:
    settings = get_settings()
    client = redis.connect(THREE)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    kwargs = pool.connection_kwargs
    assert kwargs["socket_timeout"] == settings.redis_socket_timeout
    assert kwargs["db"] == 2
    # A call that cannot reach the master retries for the failover's length, not 0 times.
    assert kwargs["retry"].seconds == settings.redis_sentinel_failover_seconds
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380, 26379]
    asked = sentinels[0].connection_pool.connection_kwargs
    assert asked["socket_timeout"] == settings.redis_sentinel_timeout
    redis.close(client)
    with redis.probe(0.5) as probe:
        assert probe.connection_pool.connection_kwargs["retry"].get_retries() == 0


class _Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise redis.RedisConnectionError("no master")
        return "answer"


def test_the_failover_retry_tries_again_until_its_time_is_up(master: None) -> None:
    retry = redis._UntilFailedOver(seconds=60)
    flaky = _Flaky(failures=3)
    assert retry.call_with_retry(flaky, lambda _error: None) == "answer"
    assert flaky.calls == 4
    # With no time left the first failure is the answer.
    hopeless = _Flaky(failures=1)
    with pytest.raises(redis.RedisConnectionError):
        redis._UntilFailedOver(seconds=0).call_with_retry(hopeless, lambda _error: None)
    assert hopeless.calls == 1
    # A caller's own "not retryable" still wins.
    refused = _Flaky(failures=1)
    with pytest.raises(redis.RedisConnectionError):
        retry.call_with_retry(refused, lambda _error: None, lambda _error: False)
    assert refused.calls == 1


def test_a_command_in_flight_when_the_master_dies_goes_on_on_the_new_one(
    tmp_path: Path, set_env: Callable[..., None]
) -> None:
    """A blocking pop waits on the master when it is killed: the client reconnects to
    the replica the sentinels promote (redis-py would dial the dead master until the
    failover retry gives up), and the pop gets what is pushed there."""
    with running_sentinels(tmp_path) as sentinels:
        set_env(
            REDIS_URL=sentinels.url,
            REDIS_SENTINEL_MASTER=MASTER_NAME,
            REDIS_SENTINEL_FAILOVER_SECONDS=300,
        )
        client = redis.connect()
        popped: list[object] = []

        def pop() -> None:
            try:
                while not popped:
                    answer = client.blpop(["failover"], timeout=1)
                    if answer:
                        popped.append(answer)
            except redis.RedisError as exc:
                popped.append(exc)

        waiter = threading.Thread(target=pop, daemon=True)
        waiter.start()
        master = sentinels.master.client()
        wait_for(lambda: any(c["cmd"] == "blpop" for c in master.client_list()), "the pop")
        sentinels.master.kill()
        wait_for(lambda: sentinels.master_port() == sentinels.replica.port, "the promotion")
        sentinels.replica.client().rpush("failover", "after")
        wait_for(lambda: popped, "the pop to get what was pushed on the new master", 60)
        assert popped == [(b"failover", b"after")]
        redis.close(client)
