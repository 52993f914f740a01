from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from backend.metrics import record_poll
from backend.models import utcnow
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


def test_state_gauges_from_the_database_and_redis(anonymous, db: Session, redis_db: RedisDb):
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
