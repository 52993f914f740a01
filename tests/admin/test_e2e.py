"""The admin routes against a live `celery worker` started from this checkout."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import account_payload, create_dovecot_account
from tests.support.celery import Celery, running_celery
from tests.support.dovecot import Dovecot
from tests.support.imap_server import FakeImapServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def celery(tmp_path: Path) -> Iterator[Celery]:
    """Starts live workers (with the environment as it is then); all stopped at the end."""
    with running_celery(tmp_path) as processes:
        yield processes


def start_worker(celery: Celery) -> str:
    """One worker on every queue; returns the name the API will show for it."""
    name = f"api-{uuid.uuid4().hex[:6]}"
    celery.worker(name)
    return f"{name}@{socket.gethostname()}"


def wait_for_workers(api: TestClient, count: int) -> None:
    wait_for(lambda: api.get("/admin/celery/workers").json()["total"] == count, "the worker")


def finished(api: TestClient, task_id: str) -> bool:
    body = api.get(f"/admin/celery/tasks/{task_id}").json()
    return bool(body.get("source") == "database" and body["state"] != "running")


def polls_total(api: TestClient) -> float:
    text = api.get("/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mailbeat_polls_total"
    )


def test_admin_routes_against_a_live_worker(
    api: TestClient, celery: Celery, dovecot: Dovecot, mail_user
):
    worker = start_worker(celery)
    wait_for_workers(api, 1)
    [info] = api.get("/admin/celery/workers").json()["workers"]
    assert info["name"] == worker
    assert info["queues"] == ["default", "email", "workflow"]
    assert info["concurrency"] == 1
    assert info["active"] == 0

    health = api.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "healthy"
    assert health.json()["checks"]["celery_worker"] == "ok (1 worker)"

    tasks = api.get("/admin/celery/tasks").json()
    assert set(tasks) == {"active", "reserved", "scheduled"}

    # A poll through the API runs on the worker and is recorded with its task id.
    user, password = mail_user
    dovecot.append(user, b"Subject: via the worker\r\n\r\nhello\r\n")
    account_id = create_dovecot_account(api, dovecot, user, password, poll_interval_seconds=3600)
    before = polls_total(api)
    task_id = api.post(f"/accounts/{account_id}/poll").json()["task_id"]

    wait_for(lambda: finished(api, task_id), "the poll to finish")
    state = api.get(f"/admin/celery/tasks/{task_id}").json()
    assert state["state"] == "success"
    assert state["poll_run"]["messages_count"] == 1
    assert api.get(f"/accounts/{account_id}").json()["message_count"] == 1
    # The worker's poll reached this process's /metrics (multiprocess files).
    assert polls_total(api) >= before + 1

    retried = api.post(f"/admin/celery/tasks/{task_id}/retry")
    assert retried.status_code == 202
    new_task = retried.json()["task_id"]
    wait_for(lambda: finished(api, new_task), "the retried poll to finish")
    assert api.get(f"/admin/celery/tasks/{new_task}").json()["state"] == "success"
    assert api.get(f"/accounts/{account_id}/messages").json()["total"] == 1


def test_a_running_poll_is_listed_active_and_cannot_be_retried_yet(
    api: TestClient, celery: Celery, set_env: Callable[..., None]
):
    # The worker waits this long for a greeting the silent server never sends.
    set_env(IMAP_CONNECT_TIMEOUT="20", IMAP_READ_TIMEOUT="20")
    with FakeImapServer(greeting=None) as silent:
        port = silent.port
        worker = start_worker(celery)
        wait_for_workers(api, 1)
        account_id = api.post(
            "/accounts",
            json=account_payload(imap_host="127.0.0.1", imap_port=port, imap_security="none"),
        ).json()["id"]
        task_id = api.post(f"/accounts/{account_id}/poll").json()["task_id"]

        def active() -> list[dict[str, object]]:
            return [
                t for t in api.get("/admin/celery/tasks").json()["active"] if t["id"] == task_id
            ]

        wait_for(active, "the poll to be active")
        [task] = active()
        assert task["name"] == "mailbox.poll"
        assert task["worker"] == worker
        assert task["args"] == [account_id]
        assert task["time_start"] is not None

        state = api.get(f"/admin/celery/tasks/{task_id}").json()
        assert (state["state"], state["source"], state["worker"]) == ("active", "worker", worker)
        assert state["poll_run"]["outcome"] == "running"
        assert api.get("/admin/celery/workers").json()["workers"][0]["active"] == 1

        refused = api.post(f"/admin/celery/tasks/{task_id}/retry")
        assert refused.status_code == 409
        assert "still running" in refused.json()["detail"]

        wait_for(lambda: finished(api, task_id), "the poll to give up")
    assert api.get(f"/admin/celery/tasks/{task_id}").json()["state"] == "connection_error"
