"""The dispatch seam: tasks sent by name to the real Redis broker in Celery mode, run in
this process in local mode, and coalesced to one pending task per key."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backend import dispatch
from backend.celery_app import broker_priority
from backend.models import utcnow
from tests.support.celery import running_celery
from tests.support.redis_db import RedisDb
from tests.support.wait import wait_for


def _queued(redis_db: RedisDb, queue: str) -> list[dict[str, Any]]:
    """The messages waiting in a queue, every priority level (kombu keeps one list per
    level: the queue's name, then a separator and the level)."""
    conn = redis_db.client()
    return [json.loads(raw) for key in conn.keys(f"{queue}*") for raw in conn.lrange(key, 0, -1)]


@pytest.fixture
def celery_mode(set_env: Callable[..., None]) -> None:
    set_env(SCHEDULER_MODE="celery")


@pytest.fixture
def local_mode(set_env: Callable[..., None]) -> None:
    set_env(SCHEDULER_MODE="local")


def test_celery_mode_sends_by_name_with_countdown_and_priority(
    celery_mode: None, redis_db: RedisDb
) -> None:
    before = utcnow()
    task_id = dispatch.enqueue("webhook.deliver", 7, countdown=30, priority=7)
    plain_id = dispatch.enqueue("message.process", 8)

    sent = {message["headers"]["id"]: message for message in _queued(redis_db, "workflow")}
    assert set(sent) == {task_id, plain_id}  # routed by name to the workflow queue
    delayed, plain = sent[task_id], sent[plain_id]
    assert delayed["headers"]["task"] == "webhook.deliver"
    assert delayed["headers"]["argsrepr"] == "[7]"
    eta = datetime.fromisoformat(delayed["headers"]["eta"])
    assert before + timedelta(seconds=29) < eta < utcnow() + timedelta(seconds=31)
    assert delayed["properties"]["priority"] == broker_priority(7) == 2  # kombu: lower first
    assert plain["headers"]["task"] == "message.process"
    assert plain["headers"]["eta"] is None


def test_one_pending_task_per_key_until_the_key_expires(
    celery_mode: None, redis_db: RedisDb
) -> None:
    first = dispatch.enqueue("message.process", 1, coalesce_key="m:1", coalesce_expiry=1)
    assert first is not None
    assert dispatch.enqueue("message.process", 1, coalesce_key="m:1", coalesce_expiry=1) is None
    other = dispatch.enqueue("message.process", 2, coalesce_key="m:2", coalesce_expiry=1)
    assert other is not None
    assert sorted(m["headers"]["id"] for m in _queued(redis_db, "workflow")) == sorted(
        [first, other]
    )
    assert 0 < redis_db.client().pttl(f"{dispatch.COALESCE_PREFIX}m:1") <= 1000

    time.sleep(1.2)  # no worker started the task: the key expires by itself
    again = dispatch.enqueue("message.process", 1, coalesce_key="m:1", coalesce_expiry=1)
    assert again is not None
    assert len(_queued(redis_db, "workflow")) == 3


def test_the_key_outlives_the_countdown(celery_mode: None, redis_db: RedisDb) -> None:
    dispatch.enqueue("webhook.deliver", 1, countdown=60, coalesce_key="d:1", coalesce_expiry=5)
    assert 60_000 < redis_db.client().pttl(f"{dispatch.COALESCE_PREFIX}d:1") <= 65_000


@pytest.mark.e2e
def test_a_worker_frees_the_key_when_the_task_starts(
    celery_mode: None, redis_db: RedisDb, tmp_path: Path
) -> None:
    key = f"{dispatch.COALESCE_PREFIX}m:404"
    with running_celery(tmp_path) as celery:
        # An unknown message: the task starts, finds nothing to do and ends.
        assert dispatch.enqueue("message.process", 404_404, coalesce_key="m:404") is not None
        assert redis_db.client().exists(key)
        celery.worker()
        wait_for(lambda: not redis_db.client().exists(key), f"key freed\n{celery.logs()}", 60)
        assert dispatch.enqueue("message.process", 404_404, coalesce_key="m:404") is not None


def test_local_mode_runs_the_registered_function_here(
    local_mode: None, redis_db: RedisDb, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[int, str]] = []

    def record(number: int) -> None:
        calls.append((number, threading.current_thread().name))

    def broken(number: int) -> None:
        raise RuntimeError(f"broken {number}")

    dispatch.register("test.record", record)
    dispatch.register("test.broken", broken)

    assert dispatch.enqueue("test.record", 1, priority=9) is not None
    assert calls == [(1, threading.current_thread().name)]  # at once, in this thread
    with caplog.at_level(logging.ERROR, logger="backend.dispatch"):
        dispatch.enqueue("test.broken", 2)  # failing as on a worker: logged, not raised
    assert "task test.broken(2,) failed" in caplog.text
    assert redis_db.client().keys("*") == []  # nothing went to Redis
    with pytest.raises(LookupError, match=r"no function registered for task 'test\.unknown'"):
        dispatch.enqueue("test.unknown", 3)


def test_local_mode_countdown_and_coalescing(local_mode: None) -> None:
    calls: list[int] = []
    dispatch.register("test.record", calls.append)

    assert dispatch.enqueue("test.record", 1, countdown=0.3, coalesce_key="r") is not None
    assert dispatch.enqueue("test.record", 2, countdown=0.3, coalesce_key="r") is None
    assert calls == []  # not yet
    wait_for(lambda: calls == [1], "the delayed run", 5)
    # Started, so the key is free again.
    assert dispatch.enqueue("test.record", 3, coalesce_key="r") is not None
    assert calls == [1, 3]


def test_run_in_process_overrides_celery_mode(celery_mode: None, redis_db: RedisDb) -> None:
    calls: list[int] = []
    dispatch.register("test.record", calls.append)
    assert dispatch.mode() == "celery"
    dispatch.run_in_process()

    dispatch.enqueue("test.record", 5)

    assert calls == [5]
    assert _queued(redis_db, "default") == []
