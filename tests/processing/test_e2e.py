"""Processing through a real `celery worker`: message.process and webhook.deliver tasks
on the workflow queue, retries as countdown tasks, replay from the API."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.models import Message, WebhookDelivery
from backend.processing import handlers, progress, service
from backend.processing.service import hand_on
from tests.support.accounts import make_account
from tests.support.celery import Celery, running_celery
from tests.support.receiver import Receiver
from tests.support.wait import wait_for
from tests.support.webhooks import store_message

pytestmark = pytest.mark.e2e


@pytest.fixture
def worker(tmp_path: Path, webhooks_on: Callable[..., None]) -> Iterator[Celery]:
    # A loaded machine can take seconds to answer: a request that times out and is taken
    # by the receiver all the same is a second delivery, which the counts below forbid.
    webhooks_on(SCHEDULER_MODE="celery", WEBHOOK_TIMEOUT_SECONDS=30)
    with running_celery(tmp_path) as celery:
        celery.worker(concurrency=2)
        yield celery


def _statuses(db: Session) -> list[str]:
    db.expire_all()
    return list(db.scalars(select(WebhookDelivery.status).order_by(WebhookDelivery.id)))


def test_through_a_worker_every_message_is_delivered_once(
    db: Session, receiver: Receiver, worker: Celery
) -> None:
    account = make_account(db)
    ids = [store_message(db, account, uid).id for uid in range(1, 5)]
    receiver.fail(3, status=503)

    hand_on(ids)
    hand_on(ids)  # duplicate tasks (a redelivery) change nothing

    wait_for(lambda: _statuses(db) == ["delivered"] * 4, f"all delivered\n{worker.logs()}")
    assert len(receiver.delivered()) == 4
    assert sorted(r.json()["data"]["message"]["id"] for r in receiver.delivered()) == ids
    assert len(receiver.requests) == 7


def test_dead_letters_replayed_from_the_api_go_through_the_worker(
    db: Session, api: TestClient, receiver: Receiver, worker: Celery
) -> None:
    account = make_account(db)
    ids = [store_message(db, account, uid).id for uid in range(1, 3)]
    receiver.down()

    hand_on(ids)
    wait_for(lambda: _statuses(db) == ["dead"] * 2, f"dead letters\n{worker.logs()}")
    receiver.up()
    response = api.post(f"/accounts/{account.id}/dead-letters/replay")
    assert response.status_code == 202 and response.json()["replayed"] == 2

    wait_for(lambda: _statuses(db) == ["delivered"] * 2, f"replayed\n{worker.logs()}")
    assert sorted(r.json()["data"]["message"]["id"] for r in receiver.delivered()) == ids


def test_a_quarantined_message_replayed_from_the_api_is_delivered_once_by_the_worker(
    db: Session,
    api: TestClient,
    receiver: Receiver,
    worker: Celery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = make_account(db)
    ids = [store_message(db, account, uid).id for uid in range(1, 4)]
    bad = ids[1]
    monkeypatch.setattr(service, "MAX_PROCESS_FAILURES", 2)

    # Only this process has the broken step; the worker runs the fixed code.
    def broken(session: Session, message: Message) -> None:
        if message.id == bad:
            raise ValueError("the CRM refuses this sender")

    handlers.register(handlers.Handler("broken", broken))
    try:
        with pytest.raises(service.ProcessingFailed):
            service.process_and_send_batch(ids)
        progress.succeeded()  # other mailboxes' messages went through meanwhile
        assert service.process_and_send_batch(ids) == 0  # quarantined
    finally:
        handlers.unregister("broken")
    wait_for(lambda: _statuses(db) == ["delivered"] * 2, f"the others\n{worker.logs()}")
    assert api.get("/admin/quarantine").json()["items"][0]["id"] == bad

    assert api.post(f"/messages/{bad}/replay").status_code == 202

    wait_for(lambda: _statuses(db) == ["delivered"] * 3, f"replayed\n{worker.logs()}")
    assert api.post(f"/messages/{bad}/replay").status_code == 409
    assert sorted(r.json()["data"]["message"]["id"] for r in receiver.delivered()) == ids
    assert api.get("/admin/quarantine").json()["total"] == 0
