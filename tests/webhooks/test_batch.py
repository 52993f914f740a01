"""Deliveries sent as a batch: concurrent requests, at most WEBHOOK_CONCURRENCY at a time
to one receiver, answers recorded in bulk; in-process (local mode), real receivers on
loopback."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend import crypto
from backend.db import session_scope
from backend.models import Account, DeliveryTarget, WebhookDelivery
from backend.processing.service import hand_on, process_batch
from backend.webhooks import service as webhooks
from tests.support.accounts import make_account
from tests.support.receiver import Receiver, Reply
from tests.support.wait import wait_for
from tests.support.webhooks import store_message


@pytest.fixture
def own() -> Iterator[Receiver]:
    """A second receiver: an account's own target."""
    server = Receiver(secret="account-secret")
    server.up()
    yield server
    server.release()
    server.down()


def _with_own_target(db: Session, receiver: Receiver) -> Account:
    account = make_account(db)
    account.webhook_url = receiver.url
    account.webhook_secret_encrypted = crypto.encrypt("account-secret")
    db.commit()
    return account


def _deliveries(db: Session, target: DeliveryTarget | None = None) -> list[WebhookDelivery]:
    db.expire_all()
    query = select(WebhookDelivery).order_by(WebhookDelivery.id)
    if target is not None:
        query = query.where(WebhookDelivery.target == target)
    return list(db.scalars(query))


def test_each_receiver_gets_at_most_the_concurrency_limit_at_once(
    db: Session, receiver: Receiver, own: Receiver, webhooks_on: Callable[..., None]
) -> None:
    webhooks_on(WEBHOOK_CONCURRENCY=3)
    # Slow answers: each request is still open when the lanes' next ones are sent.
    receiver.default = own.default = Reply(delay=0.5)
    account = _with_own_target(db, own)
    ids = [store_message(db, account, uid).id for uid in range(1, 13)]

    hand_on(ids)

    # The limit is per receiver: three at once at each, six in all.
    assert (receiver.max_in_flight, own.max_in_flight) == (3, 3)
    assert sorted(receiver.accepted().values()) == [1] * 12
    assert sorted(own.accepted().values()) == [1] * 12
    assert {d.status for d in _deliveries(db)} == {"delivered"}


def test_a_stalled_receiver_does_not_hold_up_another_ones_records(
    db: Session, receiver: Receiver, own: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = _with_own_target(db, own)
    ids = [store_message(db, account, uid).id for uid in range(1, 5)]
    receiver.hold_all()  # the global target answers nothing until released

    sending = threading.Thread(target=hand_on, args=(ids,))
    sending.start()
    try:
        wait_for(lambda: receiver.held == 4, "the global target's four requests in flight")
        wait_for(
            lambda: (
                [d.status for d in _deliveries(db, DeliveryTarget.ACCOUNT)] == ["delivered"] * 4
            ),
            "the account target's deliveries recorded while the other's are in flight",
        )
        stalled = _deliveries(db, DeliveryTarget.GLOBAL)
        assert [(d.status, d.attempts) for d in stalled] == [("pending", 1)] * 4
        assert all(d.claimed_until is not None for d in stalled)
    finally:
        receiver.release()
        sending.join(timeout=60)
    assert {d.status for d in _deliveries(db)} == {"delivered"}
    assert len(receiver.accepted()) == len(own.accepted()) == 4


def test_retries_and_dead_letters_from_one_batch(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    ids = [store_message(db, account, uid).id for uid in range(1, 7)]
    # The first three requests to arrive (in whatever order the lanes send them): two
    # answers worth a retry, one refusal that is final.
    receiver.reply(Reply(status=503), Reply(status=429), Reply(status=422))

    hand_on(ids)
    wait_for(lambda: all(d.status != "pending" for d in _deliveries(db)), "settled")

    deliveries = _deliveries(db)
    assert sorted(d.status for d in deliveries) == ["dead"] + ["delivered"] * 5
    [dead] = [d for d in deliveries if d.status == "dead"]
    assert (dead.attempts, dead.last_status_code) == (1, 422)
    assert sorted(d.attempts for d in deliveries) == [1, 1, 1, 1, 2, 2]
    assert len(receiver.requests) == 8
    assert sorted(receiver.accepted().values()) == [1] * 5


def test_two_attempts_at_the_same_batch_at_once_send_each_delivery_once(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    """A redelivered task racing the first (or the sweep racing a batch): the claim lets
    one of them send each delivery."""
    receiver.default = Reply(delay=0.3)
    account = make_account(db)
    ids = [store_message(db, account, uid).id for uid in range(1, 9)]
    with session_scope() as session:
        assert process_batch(session, ids) == ids
        delivery_ids = webhooks.pending_for_messages(session, ids)

    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(webhooks.deliver_batch, [delivery_ids, delivery_ids])

    assert sorted(receiver.accepted().values()) == [1] * 8
    assert len(receiver.requests) == 8
    for delivery_id in delivery_ids:
        # One sent it; the other found it claimed (in flight) or already delivered.
        assert sorted([first[delivery_id], second[delivery_id]]) in (
            ["delivered", "in_flight"],
            ["delivered", "skipped"],
        )
    assert [d.attempts for d in _deliveries(db)] == [1] * 8


def test_a_batch_processed_twice_creates_its_deliveries_once(
    db: Session, receiver: Receiver, own: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = _with_own_target(db, own)
    ids = [store_message(db, account, uid).id for uid in range(1, 4)]
    with session_scope() as session:
        process_batch(session, ids[:2])
    with session_scope() as session:
        # The first two are processed: only the third is processed now.
        assert process_batch(session, ids) == ids[2:]
        # The webhook step's bulk insert leaves rows that exist as they are.
        webhooks.create_batch_deliveries(session, ids)

    deliveries = _deliveries(db)
    assert sorted((d.message_id, d.target) for d in deliveries) == sorted(
        (message_id, target) for message_id in ids for target in ("account", "global")
    )
    assert len({d.event_id for d in deliveries}) == 6
