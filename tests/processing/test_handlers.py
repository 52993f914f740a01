"""The registry of processing steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.models import Message, WebhookDelivery, utcnow
from backend.processing import handlers, progress, service
from backend.processing.service import hand_on, process_and_send
from tests.support.accounts import make_account
from tests.support.receiver import Receiver
from tests.support.webhooks import store_message


@pytest.fixture
def registry() -> Iterator[None]:
    saved = handlers.registered()
    yield
    for handler in handlers.registered():
        handlers.unregister(handler.name)
    for handler in saved:
        handlers.register(handler)


def test_steps_run_in_order_after_the_builtin_webhook(
    db: Session, registry: None, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    calls: list[tuple[str, int]] = []

    def step(name: str) -> Callable[[Session, Message], None]:
        def run(session: Session, message: Message) -> None:
            # Inside the processing transaction: the webhook step's rows are there.
            assert session.scalar(select(WebhookDelivery).filter_by(message_id=message.id))
            calls.append((name, message.id))

        return run

    handlers.register(handlers.Handler("tag", step("tag")))
    handlers.register(handlers.Handler("crm", step("crm"), lambda mid: calls.append(("sent", mid))))
    handlers.register(handlers.Handler("tag", step("tag2")))  # replaced in place
    assert [h.name for h in handlers.registered()] == ["webhook", "tag", "crm"]
    message = store_message(db, make_account(db), 1)

    assert process_and_send(message.id) is True
    assert process_and_send(message.id) is False

    assert calls == [
        ("tag2", message.id),
        ("crm", message.id),
        ("sent", message.id),
        ("sent", message.id),
    ]
    assert len(receiver.delivered()) == 1


def test_a_failing_step_leaves_the_message_unprocessed(
    db: Session, registry: None, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    def broken(session: Session, message: Message) -> None:
        raise RuntimeError("CRM is down")

    handlers.register(handlers.Handler("crm", broken))
    account = make_account(db)
    first, second = store_message(db, account, 1), store_message(db, account, 2)

    hand_on([first.id, second.id])  # logged; the others still run

    db.expire_all()
    row = db.get(Message, first.id)
    assert row is not None and row.processed_at is None
    # Every message failed: not one message's fault, so not counted against it.
    assert (row.process_failures, row.process_error) == (0, "RuntimeError: CRM is down")
    # The webhook step's rows went with the failed transaction: nothing was sent.
    assert db.scalars(select(WebhookDelivery)).all() == []
    assert receiver.requests == []

    handlers.unregister("crm")
    hand_on([first.id, second.id])
    assert len(receiver.delivered()) == 2


def test_one_failing_message_does_not_hold_back_the_rest_of_its_batch(
    db: Session, registry: None, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    first, bad, last = (store_message(db, account, uid) for uid in (1, 2, 3))

    def picky(session: Session, message: Message) -> None:
        if message.id == bad.id:
            raise RuntimeError("this one cannot be processed")

    handlers.register(handlers.Handler("picky", picky))

    hand_on([first.id, bad.id, last.id])  # one batch; its failure is logged (local mode)

    db.expire_all()
    processed = {m.id for m in db.scalars(select(Message).where(Message.processed_at.is_not(None)))}
    assert processed == {first.id, last.id}
    delivered = sorted(r.json()["data"]["message"]["id"] for r in receiver.delivered())
    assert delivered == [first.id, last.id]
    # The bad one's webhook rows went with its failed transaction.
    assert db.scalars(select(WebhookDelivery).filter_by(message_id=bad.id)).all() == []


def test_a_message_that_keeps_failing_becomes_a_dead_letter_the_sweep_leaves(
    db: Session,
    registry: None,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service, "MAX_PROCESS_FAILURES", 3)
    account = make_account(db)
    messages = [store_message(db, account, uid) for uid in range(1, 6)]
    bad = messages[2]

    def picky(session: Session, message: Message) -> None:
        if message.id == bad.id:
            raise ValueError("no CRM contact for this sender")

    handlers.register(handlers.Handler("picky", picky))
    ids = [m.id for m in messages]

    with pytest.raises(service.ProcessingFailed, match=str(bad.id)):
        service.process_and_send_batch(ids)

    assert sorted(r.json()["data"]["message"]["id"] for r in receiver.delivered()) == [
        m.id for m in messages if m is not bad
    ]
    db.expire_all()
    row = db.get(Message, bad.id)
    assert row is not None
    assert (row.processed_at, row.process_failures) == (None, 1)
    assert row.process_error == "ValueError: no CRM contact for this sender"

    # Its task's retries: each counts, since other messages go through between them
    # (other mailboxes', by other workers: what they record), until the last is not
    # retried.
    progress.succeeded()
    with pytest.raises(service.ProcessingFailed):
        service.process_and_send_batch(ids)
    progress.succeeded()
    assert service.process_and_send_batch(ids) == 0  # the third failure: left alone
    db.expire_all()
    assert db.get(Message, bad.id).process_failures == 3  # type: ignore[union-attr]
    db.execute(update(Message).values(ingested_at=utcnow() - timedelta(hours=1)))
    db.commit()
    assert service.sweep()["messages"] == 0
    assert len(receiver.delivered()) == 4

    # Handed on again once the cause is fixed (a backfill does this), it goes through.
    handlers.unregister("picky")
    assert service.process_and_send_batch([bad.id]) == 1
    assert len(receiver.delivered()) == 5
