from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from backend.models import PollRun, utcnow
from tests.support.accounts import make_account
from tests.support.api import account_payload, auth_headers, make_client
from tests.support.net import free_port
from tests.support.redis_db import RedisDb

SYNC_ROUTES = ("/admin/email-worker/sync", "/admin/celery/tasks/sync")
CELERY_ROUTES = (
    ("GET", "/admin/celery/workers"),
    ("GET", "/admin/celery/tasks"),
    ("GET", "/admin/celery/tasks/some-task-id"),
    ("POST", "/admin/celery/tasks/some-task-id/retry"),
)


@pytest.mark.parametrize("route", SYNC_ROUTES)
def test_sync_rebuilds_the_schedule_from_the_database(api: TestClient, db: Session, route):
    for _ in range(3):
        make_account(db)
    make_account(db, enabled=False, status="disabled")
    response = api.post(route)
    assert response.status_code == 200, response.text
    assert response.json() == {"created": 3, "updated": 0, "deleted": 0, "unchanged": 0}
    assert api.post(route).json() == {"created": 0, "updated": 0, "deleted": 0, "unchanged": 3}


def test_schedules_lists_entries_with_next_run(api: TestClient):
    ids = [
        api.post("/accounts", json=account_payload(poll_interval_seconds=60 * (i + 1))).json()["id"]
        for i in range(2)
    ]
    body = api.get("/admin/schedules").json()
    assert body["mode"] == "celery"
    assert body["total"] == 2
    assert [(e["account_id"], e["name"], e["interval"]) for e in body["items"]] == [
        (ids[0], f"mailbox:{ids[0]}", 60),
        (ids[1], f"mailbox:{ids[1]}", 120),
    ]
    assert all(e["next_run_at"] is not None for e in body["items"])
    page = api.get("/admin/schedules", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == 2
    assert [e["account_id"] for e in page["items"]] == [ids[1]]


def test_no_worker_means_empty_lists_and_a_degraded_health(api: TestClient):
    assert api.get("/admin/celery/workers").json() == {"workers": [], "total": 0}
    assert api.get("/admin/celery/tasks").json() == {"active": [], "reserved": [], "scheduled": []}
    response = api.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"] == "ok"
    assert body["checks"]["celery_worker"].startswith("error: ")
    assert "no worker answered" in body["checks"]["celery_worker"]
    assert body["checks"]["storage"].startswith("ok")


def test_task_state_of_a_queued_poll_and_of_a_recorded_one(api: TestClient, db: Session):
    account_id = api.post("/accounts", json=account_payload()).json()["id"]
    task_id = api.post(f"/accounts/{account_id}/poll").json()["task_id"]
    body = api.get(f"/admin/celery/tasks/{task_id}").json()
    assert body == {
        "task_id": task_id,
        "state": "queued",
        "source": "queue",
        "worker": None,
        "queue": "email",
        "name": "mailbox.poll",
        "poll_run": None,
    }

    db.add(
        PollRun(
            account_id=account_id,
            outcome="auth_error",
            error="authentication failed",
            task_id="finished-task",
            finished_at=utcnow(),
        )
    )
    db.commit()
    body = api.get("/admin/celery/tasks/finished-task").json()
    assert body["state"] == "auth_error"
    assert body["source"] == "database"
    assert body["poll_run"]["account_id"] == account_id
    assert body["poll_run"]["error"] == "authentication failed"

    missing = api.get("/admin/celery/tasks/no-such-task")
    assert missing.status_code == 404
    assert "only polls record their outcome" in missing.json()["detail"]


def test_retry_requeues_a_finished_poll(api: TestClient, db: Session, redis_db: RedisDb):
    account = make_account(db)
    db.add(PollRun(account_id=account.id, outcome="connection_error", task_id="failed-task"))
    db.add(PollRun(account_id=account.id, outcome="running", task_id="busy-task"))
    db.add(
        PollRun(
            account_id=account.id,
            outcome="running",
            task_id="dead-task",
            started_at=utcnow() - timedelta(hours=2),
        )
    )
    db.commit()

    response = api.post("/admin/celery/tasks/failed-task/retry")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["retry_of"] == "failed-task"
    assert body["account_id"] == account.id
    assert body["task_id"] != "failed-task"
    queued = redis_db.client().lrange("email", 0, -1)
    assert any(body["task_id"].encode() in raw for raw in queued)

    busy = api.post("/admin/celery/tasks/busy-task/retry")
    assert busy.status_code == 409
    assert "still running" in busy.json()["detail"]
    # A poll "running" for longer than the hard time limit died with its worker.
    assert api.post("/admin/celery/tasks/dead-task/retry").status_code == 202

    unknown = api.post("/admin/celery/tasks/webhook-task/retry")
    assert unknown.status_code == 404
    assert "Only polls can be retried" in unknown.json()["detail"]


def test_retry_of_a_disabled_account_is_refused(api: TestClient, db: Session):
    account = make_account(db, enabled=False, status="disabled")
    db.add(PollRun(account_id=account.id, outcome="auth_error", task_id="t1"))
    db.commit()
    response = api.post("/admin/celery/tasks/t1/retry")
    assert response.status_code == 409
    assert "enable it first" in response.json()["detail"]


@pytest.fixture
def redis_down(set_env: Callable[..., None]) -> str:
    url = f"redis://127.0.0.1:{free_port()}/0"
    set_env(REDIS_URL=url, SCHEDULER_MODE="celery")
    return url


def test_without_redis_admin_routes_answer_503_with_the_reason(
    api: TestClient, db: Session, redis_down: str
):
    account = make_account(db)
    db.add(PollRun(account_id=account.id, outcome="auth_error", task_id="some-task-id"))
    db.commit()
    routes = [("POST", route) for route in SYNC_ROUTES]
    routes += [("GET", "/admin/schedules"), *CELERY_ROUTES]
    for method, path in routes:
        response = api.request(method, path)
        assert response.status_code == 503, (path, response.text)
        body = response.json()
        assert body["error"] == "ServiceUnavailable"
        assert f"Redis at 127.0.0.1:{redis_down.rsplit(':', 1)[1]}" in body["detail"]
        assert "did not answer" in body["detail"]


def test_health_without_redis_is_degraded(api: TestClient, redis_down: str):
    response = api.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"] == "error: cannot connect"
    assert body["checks"]["celery_worker"] == (
        "error: Redis does not answer, so no worker can be asked"
    )


def test_health_without_the_database_is_unhealthy(
    api: TestClient, set_env: Callable[..., None], caplog: pytest.LogCaptureFixture
):
    port = free_port()
    set_env(DATABASE_URL=f"postgresql+psycopg://mailbeat_role@127.0.0.1:{port}/none")
    response = api.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    # Without a token: what failed, not where the database is or who logs in to it.
    assert body["checks"]["database"] == "error: cannot connect"
    assert str(port) not in response.text
    assert "mailbeat_role" not in response.text
    # The operator finds the detail in the log.
    assert f"port {port} failed" in caplog.text


def test_local_mode_runs_polls_in_the_api_process(set_env: Callable[..., None], db: Session):
    set_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SCHEDULER_MODE="local")
    with make_client(auth_headers()) as api:
        account_id = api.post("/accounts", json=account_payload()).json()["id"]
        schedule = api.get("/admin/schedules").json()
        assert schedule["mode"] == "local"
        assert [e["account_id"] for e in schedule["items"]] == [account_id]
        # force: the scheduler polls a new mailbox at once, and that poll (whose host does
        # not resolve) may already have set a backoff, which a plain poll now answers 409.
        queued = api.post(f"/accounts/{account_id}/poll", params={"force": "true"})
        assert queued.status_code == 202, queued.text
        assert queued.json()["mode"] == "local"
        health = api.get("/health").json()
        assert health["checks"]["redis"] == "not used (local mode)"
        assert health["status"] == "healthy"
        assert api.get("/admin/celery/workers").status_code == 503


def test_activity_counts_polls_and_messages_per_bucket(api: TestClient, db: Session):
    account = make_account(db)
    now = utcnow()
    runs = [
        # (minutes ago, outcome, messages)
        (1, "success", 4),
        (1, "connection_error", 0),
        (31, "success", 2),
        (59, "success", 1),
        (90, "success", 100),  # outside the hour
    ]
    for minutes, outcome, messages in runs:
        started = now - timedelta(minutes=minutes)
        db.add(
            PollRun(
                account_id=account.id,
                started_at=started,
                finished_at=started + timedelta(seconds=1),
                outcome=outcome,
                messages_count=messages,
            )
        )
    db.commit()

    body = api.get("/admin/activity", params={"minutes": 60}).json()
    assert body["bucket_seconds"] == 120
    buckets = body["buckets"]
    assert len(buckets) == 30
    assert sum(b["polls"] for b in buckets) == 4
    assert sum(b["messages"] for b in buckets) == 7
    assert buckets[-1] == {**buckets[-1], "polls": 2, "failed": 1, "messages": 4}
    assert buckets[0]["messages"] == 1  # 59 minutes ago: the first bucket
    assert buckets[14]["messages"] == 2  # 29 minutes after the start, in 2-minute buckets
    assert api.get("/admin/activity", params={"minutes": 5}).status_code == 422
