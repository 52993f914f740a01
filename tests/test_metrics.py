from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from backend import metrics
from backend.metrics import record_poll
from backend.models import utcnow
from backend.push.leases import WATCHERS_KEY, watcher_name
from tests.support.accounts import make_account
from tests.support.api import auth_headers
from tests.support.net import free_port
from tests.support.redis_db import RedisDb


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_needs_no_token_and_lists_poll_metrics_before_any_poll(anonymous):
    samples = scrape(anonymous)
    assert ("mailbeat_polls_total", (("outcome", "auth_error"),)) in samples
    assert ("mailbeat_messages_ingested_total", ()) in samples


def test_record_poll_counts_outcomes_messages_bytes_and_duration(anonymous):
    before = scrape(anonymous)
    record_poll("success", 3, 4096, 1.5)
    record_poll("connection_error", 0, 0, 0.2)
    after = scrape(anonymous)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("mailbeat_polls_total", outcome="success") == 1
    assert delta("mailbeat_polls_total", outcome="connection_error") == 1
    assert delta("mailbeat_messages_ingested_total") == 3
    assert delta("mailbeat_bytes_ingested_total") == 4096
    assert delta("mailbeat_poll_duration_seconds_count", outcome="success") == 1
    assert delta("mailbeat_poll_duration_seconds_bucket", outcome="success", le="2.5") == 1
    assert delta("mailbeat_poll_duration_seconds_bucket", outcome="success", le="1.0") == 0


def test_polls_recorded_by_another_process_reach_the_scrape(anonymous):
    before = scrape(anonymous)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from backend.metrics import record_poll; record_poll('success', 7, 700, 2.0)",
        ],
        check=True,
        env=os.environ.copy(),
    )
    after = scrape(anonymous)
    key = ("mailbeat_messages_ingested_total", ())
    assert after[key] - before.get(key, 0.0) == 7


def test_state_gauges_from_the_database_and_redis(
    anonymous, db: Session, redis_db: RedisDb, set_env: Callable[..., None]
):
    set_env(METRICS_CACHE_SECONDS=0)  # the second scrape below must see the sync
    make_account(db, last_success_at=utcnow() - timedelta(minutes=10))
    make_account(db, last_success_at=utcnow() - timedelta(minutes=1))
    make_account(db, status="error")
    # Disabled mailboxes do not count toward the lag, however old.
    make_account(
        db, status="disabled", enabled=False, last_success_at=utcnow() - timedelta(days=30)
    )
    redis_db.client().rpush("email", "a", "b", "c")
    redis_db.client().rpush("workflow", "x")

    samples = scrape(anonymous)

    assert samples[("mailbeat_mailboxes", (("status", "active"),))] == 2
    assert samples[("mailbeat_mailboxes", (("status", "error"),))] == 1
    assert samples[("mailbeat_mailboxes", (("status", "disabled"),))] == 1
    # The error account never succeeded: its age counts from creation (just now), so the
    # oldest is the one that last succeeded ten minutes ago.
    assert 590 <= samples[("mailbeat_ingestion_lag_seconds", ())] < 3600
    assert samples[("mailbeat_queue_length", (("queue", "email"),))] == 3
    assert samples[("mailbeat_queue_length", (("queue", "workflow"),))] == 1
    assert samples[("mailbeat_queue_length", (("queue", "default"),))] == 0
    assert samples[("mailbeat_metrics_source_up", (("source", "redis"),))] == 1
    # Rows written straight to the database have no schedule entry until a sync.
    assert samples[("mailbeat_schedule_entries", ())] == 0
    anonymous.post("/admin/email-worker/sync", headers=auth_headers())
    # The two active mailboxes and the failing one (it keeps its entry and backs off).
    assert scrape(anonymous)[("mailbeat_schedule_entries", ())] == 3


def test_scrape_still_answers_with_redis_unreachable(anonymous, set_env: Callable[..., None]):
    set_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    samples = scrape(anonymous)
    assert samples[("mailbeat_metrics_source_up", (("source", "redis"),))] == 0
    assert samples[("mailbeat_metrics_source_up", (("source", "database"),))] == 1
    assert not any(name == "mailbeat_queue_length" for name, _ in samples)


def test_metric_files_are_named_by_host_and_pid():
    # Containers sharing the directory repeat pids; the host name keeps their files apart.
    import socket

    from backend.metrics import multiproc_dir

    record_poll("success", 1, 10, 0.1)
    names = [p.name for p in multiproc_dir().glob("*.db")]
    assert any(f"{socket.gethostname()}-{os.getpid()}" in name for name in names), names


def test_scrape_time_gauges_are_cached_but_counters_are_not(
    anonymous, db: Session, set_env: Callable[..., None]
):
    set_env(METRICS_CACHE_SECONDS=3600)
    make_account(db)
    first = scrape(anonymous)
    make_account(db)
    record_poll("success", 1, 1, 0.1)
    second = scrape(anonymous)
    # The account added since is not counted yet: the gauges are the first scrape's.
    active = ("mailbeat_mailboxes", (("status", "active"),))
    assert first[active] == second[active] == 1
    polls = ("mailbeat_polls_total", (("outcome", "success"),))
    assert second[polls] == first[polls] + 1


def test_concurrent_scrapes_share_one_computation(
    anonymous, monkeypatch: pytest.MonkeyPatch, set_env: Callable[..., None]
):
    set_env(METRICS_CACHE_SECONDS=3600)
    calls = []
    started = threading.Event()
    release = threading.Event()
    database = metrics.STATE_SOURCES["database"]

    def counted() -> Iterator[GaugeMetricFamily]:
        calls.append(1)
        started.set()
        release.wait(30)  # held until every scrape has been sent
        return database()

    monkeypatch.setitem(metrics.STATE_SOURCES, "database", counted)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(scrape, anonymous)
        assert started.wait(30)
        others = [pool.submit(scrape, anonymous) for _ in range(7)]
        release.set()
        results = [first.result(), *(other.result() for other in others)]
    assert len(calls) == 1
    assert all(("mailbeat_ingestion_lag_seconds", ()) in result for result in results)


def test_metrics_token(anonymous, set_env: Callable[..., None]):
    set_env(METRICS_TOKEN="scraper-token-0123456789")
    assert anonymous.get("/metrics").status_code == 401
    assert "METRICS_TOKEN" in anonymous.get("/metrics").json()["detail"]
    wrong = anonymous.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.json() == {"error": "Unauthorized", "detail": "the metrics token is wrong"}
    scraper = {"Authorization": "Bearer scraper-token-0123456789"}
    assert anonymous.get("/metrics", headers=scraper).status_code == 200
    assert anonymous.get("/metrics", headers=auth_headers()).status_code == 200
    # The metrics token opens nothing else.
    assert anonymous.get("/accounts", headers=scraper).status_code == 401


def test_imap_host_names_only_when_asked_for(
    anonymous, set_env: Callable[..., None], redis_db: RedisDb
):
    set_env(METRICS_CACHE_SECONDS=0)
    # The push gauge counts only live watchers' processes: this one announces itself.
    redis_db.client().zadd(WATCHERS_KEY, {watcher_name(os.getpid(), "test"): time.time()})
    metrics.set_push_connections({"imap.internal-host.example": 3, "imap.other.example": 2})
    try:
        text = anonymous.get("/metrics").text
        assert "internal-host" not in text
        assert "mailbeat_push_connections 5.0" in text
        set_env(METRICS_HOST_LABEL="true")
        text = anonymous.get("/metrics").text
        assert 'mailbeat_push_connections{host="imap.internal-host.example"} 3.0' in text
    finally:
        metrics.set_push_connections({"imap.internal-host.example": 0, "imap.other.example": 0})


def test_the_connection_budget_is_in_the_scrape(anonymous, set_env: Callable[..., None]):
    from backend.mailbox import budget

    set_env(METRICS_HOST_LABEL="true")
    held = [budget.claim("imap.one.example", f"u{i}", "test") for i in range(2)]
    budget.throttled("imap.two.example", 600)

    samples = scrape(anonymous)

    assert samples[("mailbeat_connection_slots", (("host", "imap.one.example"),))] == 2
    assert samples[("mailbeat_hosts_throttled", ())] == 1
    assert samples[("mailbeat_metrics_source_up", (("source", "budget"),))] == 1
    for slot in held:
        assert slot is not None
        slot.release()
