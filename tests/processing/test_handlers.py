"""The registry of processing steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.models import Message, WebhookDelivery
from backend.processing import handlers
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
    assert db.get(Message, first.id).processed_at is None  # type: ignore[union-attr]
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
