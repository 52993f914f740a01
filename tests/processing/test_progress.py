"""The evidence that processing works: written to Redis at a pace, never once per message,
read back by other processes; Redis away costs a process its shared view, nothing else."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from backend.processing import progress
from tests.support.redis_db import RedisDb


def test_successes_are_written_at_a_pace_and_read_by_other_processes(
    redis_db: RedisDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "WRITE_EVERY_SECONDS", 3600.0)  # one write in this test
    shared = redis_db.client()
    assert progress.last_success() is None

    progress.succeeded()
    assert shared.exists(progress.SUCCESS_KEY)
    first = progress.last_success()
    shared.delete(progress.SUCCESS_KEY)
    for _ in range(50):  # a busy worker: its successes stay in the process
        progress.succeeded()
    assert not shared.exists(progress.SUCCESS_KEY)
    latest = progress.last_success()
    assert first is not None and latest is not None and latest > first

    # Another process knows what Redis says, once this one writes again.
    progress.forget()
    assert progress.last_success() is None
    progress.succeeded()
    written = progress.last_success()
    progress.forget()
    assert progress.last_success() == written


def test_without_redis_a_process_goes_on_its_own_successes(
    set_env: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    set_env(REDIS_URL="redis://127.0.0.1:9/0")  # nothing listens there
    progress.forget()
    assert progress.last_success() is None
    progress.succeeded()  # does not raise: processing goes on
    assert progress.last_success() is not None
    assert "Redis does not answer (ConnectionError)" in caplog.text
