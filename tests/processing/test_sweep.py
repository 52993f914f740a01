"""Work whose task was lost is picked up by the sweep."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.models import Message, WebhookDelivery, utcnow
from backend.processing.service import process_message, sweep
from tests.support.accounts import make_account
from tests.support.receiver import Receiver
from tests.support.webhooks import store_message


def test_lost_processing_and_lost_deliveries_are_sent(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    lost_task = store_message(db, account, 1)  # its message.process task was lost
    fresh = store_message(db, account, 2)  # its task may still be on its way
    lost_delivery = store_message(db, account, 3)
    process_message(db, lost_delivery.id)  # committed, then the worker died before sending
    db.commit()
    long_ago = utcnow() - timedelta(hours=1)
    db.execute(update(Message).where(Message.id != fresh.id).values(ingested_at=long_ago))
    db.execute(update(WebhookDelivery).values(next_attempt_at=long_ago))
    db.commit()

    assert sweep() == {"messages": 1, "deliveries": 1}

    assert sorted(r.json()["data"]["message"]["id"] for r in receiver.delivered()) == [
        lost_task.id,
        lost_delivery.id,
    ]
    db.expire_all()
    assert db.get(Message, fresh.id).processed_at is None  # type: ignore[union-attr]
    assert set(db.scalars(select(WebhookDelivery.status))) == {"delivered"}
    assert sweep() == {"messages": 0, "deliveries": 0}


def test_an_attempt_that_died_mid_request_is_sent_again_once_its_claim_ran_out(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    """Left as a killed worker leaves it: claimed, pending, due a moment ago. Not five
    minutes later: as soon as the claim has run out."""
    account = make_account(db)
    died, running = store_message(db, account, 1), store_message(db, account, 2)
    process_message(db, died.id)
    process_message(db, running.id)
    db.commit()
    now = utcnow()
    for message, claimed_until in ((died, now), (running, now + timedelta(seconds=30))):
        db.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.message_id == message.id)
            .values(attempts=1, next_attempt_at=now, claimed_until=claimed_until)
        )
    db.commit()

    assert sweep() == {"messages": 0, "deliveries": 1}

    [request] = receiver.delivered()
    assert request.json()["data"]["message"]["id"] == died.id
    assert request.headers["x-mailbeat-delivery-attempt"] == "2"
