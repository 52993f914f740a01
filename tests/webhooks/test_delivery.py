"""Webhook delivery against a real HTTP receiver on loopback, in-process (local mode)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend import crypto
from backend.db import session_scope
from backend.models import Account, AccountStatus, Message, WebhookDelivery, utcnow
from backend.processing.service import after_poll, hand_on, process_and_send, process_message
from backend.webhooks import service as webhooks
from tests.support.accounts import make_account
from tests.support.api import account_payload
from tests.support.receiver import SECRET, Receiver, Reply
from tests.support.wait import wait_for
from tests.support.webhooks import store_message


def _deliveries(db: Session) -> list[WebhookDelivery]:
    db.expire_all()
    return list(db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def _settled(db: Session) -> bool:
    return all(d.status != "pending" for d in _deliveries(db))


def _assert_signed(receiver: Receiver) -> None:
    """The receiver checked every request with docs/webhooks.md's code (401 otherwise)."""
    assert receiver.requests
    assert all(r.status != 401 for r in receiver.requests), [r.status for r in receiver.requests]
    assert all("x-mailbeat-signature" in r.headers for r in receiver.requests)


def test_every_message_is_delivered_once_signed(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    ids = [store_message(db, account, uid).id for uid in range(1, 6)]

    hand_on(ids)
    hand_on(ids)  # a repeated hand-off (task redelivered) sends nothing
    for message_id in ids:
        assert process_and_send(message_id) is False

    assert len(receiver.requests) == 5
    events = [r.json() for r in receiver.delivered()]
    assert sorted(e["data"]["message"]["id"] for e in events) == ids
    assert len(set(receiver.event_ids())) == 5
    assert [e["id"] for e in events] == receiver.event_ids()
    _assert_signed(receiver)
    assert all(r.headers["x-mailbeat-event-type"] == "message.received" for r in receiver.requests)
    assert all(m.processed_at for m in db.scalars(select(Message)))
    assert {d.status for d in _deliveries(db)} == {"delivered"}

    # Sent concurrently: the first message's event is not necessarily the first to arrive.
    (event,) = [e for e in events if e["data"]["message"]["id"] == ids[0]]
    message = event["data"]["message"]
    assert event["type"] == "message.received"
    assert event["data"]["account"] == {"id": account.id, "email": account.email}
    assert message["subject"] == "Grüße 1"
    assert message["from"] == "Zoë Sender <zoe@example.org>"
    assert message["to"] == ["inbox@example.com"]
    assert message["text"] == "plain body 1\n"
    assert message["html"] == "<p>html body 1</p>\n"
    assert message["raw_error"] is None
    assert message["text_truncated"] is False
    assert {"name": "Subject", "value": "Grüße 1"} in message["headers"]
    assert message["raw_url"] == f"http://127.0.0.1:8000/messages/{ids[0]}/raw"
    [attachment] = message["attachments"]
    assert attachment["filename"] == "a.pdf"
    assert attachment["url"] == (
        f"http://127.0.0.1:8000/messages/{ids[0]}/attachments/{attachment['id']}"
    )


def test_a_request_signed_with_another_secret_is_refused_and_not_retried(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    webhooks_on(WEBHOOK_SECRET="not-the-receivers-secret")
    account = make_account(db)
    message = store_message(db, account, 1)

    hand_on([message.id])

    [request] = receiver.requests
    assert request.status == 401
    [delivery] = _deliveries(db)
    assert (delivery.status, delivery.last_status_code) == ("dead", 401)


def test_account_target_gets_its_own_signed_copy(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    own = Receiver(secret="account-secret")
    own.up()
    try:
        account = make_account(db)
        # As the accounts API stores them.
        account.webhook_url = own.url
        account.webhook_secret_encrypted = crypto.encrypt("account-secret")
        db.commit()
        assert "account-secret" not in (account.webhook_secret_encrypted or "")
        message = store_message(db, account, 1)

        hand_on([message.id])

        assert len(receiver.delivered()) == 1
        [request] = own.delivered()
        _assert_signed(own)
        # One event per target, each with its own id.
        assert request.headers["x-mailbeat-event-id"] != receiver.event_ids()[0]
    finally:
        own.down()


def test_an_account_webhook_set_through_the_api_is_used(
    db: Session, api: TestClient, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    webhooks_on(WEBHOOK_URL=None)
    payload = account_payload(webhook_url=receiver.url, webhook_secret=SECRET)
    created = api.post("/accounts", json=payload)
    assert created.status_code == 201, created.text
    assert SECRET not in created.text
    account = db.get(Account, created.json()["id"])
    assert account is not None
    message = store_message(db, account, 1)

    hand_on([message.id])

    [request] = receiver.delivered()
    assert request.json()["data"]["account"]["id"] == account.id
    _assert_signed(receiver)


def test_a_receiver_that_fails_then_recovers_gets_everything(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    ids = [store_message(db, account, uid).id for uid in range(1, 4)]
    receiver.fail(2, status=503)
    receiver.reply(Reply(status=502))

    hand_on(ids)
    wait_for(lambda: _settled(db), "deliveries settled")

    assert {d.status for d in _deliveries(db)} == {"delivered"}
    assert sorted(r.json()["data"]["message"]["id"] for r in receiver.delivered()) == ids
    assert len(receiver.requests) == 6
    assert sum(d.attempts for d in _deliveries(db)) == 6
    _assert_signed(receiver)


def test_connection_refused_and_timeouts_are_retried(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    webhooks_on(
        WEBHOOK_MAX_ATTEMPTS=200, WEBHOOK_BACKOFF_BASE_SECONDS=0.05, WEBHOOK_TIMEOUT_SECONDS=0.5
    )
    account = make_account(db)
    first = store_message(db, account, 1)
    receiver.down()

    hand_on([first.id])
    wait_for(lambda: _deliveries(db)[0].attempts >= 2, "two refused attempts")
    assert "connection failed" in (_deliveries(db)[0].last_error or "")
    receiver.reply(Reply(delay=2.0))  # slower than the client's timeout
    receiver.up()
    wait_for(lambda: _settled(db), "delivered after the receiver came back")

    [delivery] = _deliveries(db)
    assert delivery.status == "delivered"
    # Refused twice or more, timed out once (the receiver still got that one), then sent.
    assert delivery.attempts >= 4
    wait_for(lambda: len(receiver.requests) == 2, "the slow request recorded")


def test_a_receiver_down_for_good_fills_the_dead_letters_and_replay_delivers(
    db: Session, api: TestClient, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    other = make_account(db)
    ids = [store_message(db, account, uid).id for uid in range(1, 4)]
    other_id = store_message(db, other, 1).id
    receiver.down()

    hand_on([*ids, other_id])
    wait_for(lambda: _settled(db), "all dead")

    dead = _deliveries(db)
    assert {d.status for d in dead} == {"dead"}
    assert all(d.attempts == 4 and "connection failed" in (d.last_error or "") for d in dead)

    page = api.get("/admin/dead-letters", params={"limit": 2}).json()
    assert page["total"] == 4 and len(page["items"]) == 2
    assert page["items"][0]["last_error"].startswith("connection failed")
    only_account = api.get("/admin/dead-letters", params={"account_id": account.id}).json()
    assert only_account["total"] == 3

    receiver.up()
    response = api.post(f"/admin/dead-letters/{dead[3].id}/replay")
    assert response.status_code == 202, response.text
    wait_for(lambda: len(receiver.delivered()) == 1, "one delivery")
    response = api.post(f"/accounts/{account.id}/dead-letters/replay")
    assert response.status_code == 202 and response.json()["replayed"] == 3
    wait_for(lambda: _settled(db), "deliveries settled")

    assert {d.status for d in _deliveries(db)} == {"delivered"}
    # Replays keep the event id: a receiver that saw a lost attempt can drop the repeat.
    assert sorted(receiver.event_ids()) == sorted(d.event_id for d in dead)
    assert api.get("/admin/dead-letters").json()["total"] == 0
    assert api.post(f"/admin/dead-letters/{dead[0].id}/replay").status_code == 404
    assert api.post("/accounts/999999/dead-letters/replay").status_code == 404
    _assert_signed(receiver)

    # All of them at once, whatever their account (a receiver's long outage).
    db.execute(update(WebhookDelivery).values(status="dead"))
    db.commit()
    replayed = api.post("/admin/dead-letters/replay").json()
    assert replayed == {"replayed": 4, "delivery_ids": sorted(d.id for d in dead)}
    wait_for(lambda: _settled(db), "deliveries settled")
    assert len(receiver.delivered()) == 8
    assert api.post("/admin/dead-letters/replay").json()["replayed"] == 0


def test_a_4xx_is_not_retried(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    message = store_message(db, account, 1)
    receiver.default = Reply(status=422, body=b"bad payload")

    hand_on([message.id])

    [delivery] = _deliveries(db)
    assert delivery.status == "dead"
    assert delivery.attempts == 1
    assert delivery.last_status_code == 422
    # The status only: a receiver's body is never echoed (through the dead letters).
    assert delivery.last_error == "HTTP 422 Unprocessable Entity"
    assert len(receiver.requests) == 1


def test_408_and_429_are_retried_honouring_retry_after(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    webhooks_on(WEBHOOK_BACKOFF_MAX_SECONDS=5)  # Retry-After is honoured up to this
    account = make_account(db)
    message = store_message(db, account, 1)
    receiver.reply(Reply(status=429, headers={"Retry-After": "1"}), Reply(status=408))

    hand_on([message.id])
    [delivery] = _deliveries(db)
    assert delivery.status == "pending"
    assert delivery.last_attempt_at is not None
    assert (delivery.next_attempt_at - delivery.last_attempt_at).total_seconds() >= 1
    wait_for(lambda: _settled(db), "deliveries settled")

    [delivery] = _deliveries(db)
    assert delivery.status == "delivered" and delivery.attempts == 3
    assert [r.status for r in receiver.requests] == [429, 408, 200]
    assert receiver.requests[1].at - receiver.requests[0].at >= 1


def test_account_events_are_delivered_once_per_change(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db, status="error", last_error="LOGIN failed", last_error_kind="auth")
    message = store_message(db, account, 1)

    after_poll(account.id, [message.id], "account.error")
    after_poll(account.id, [], None)

    types = [r.headers["x-mailbeat-event-type"] for r in receiver.delivered()]
    assert types == ["account.error", "message.received"]
    event = receiver.delivered()[0].json()
    assert event["data"]["account"]["status"] == "error"
    assert event["data"]["account"]["last_error"] == "LOGIN failed"
    _assert_signed(receiver)

    account.status = AccountStatus.ACTIVE
    db.commit()
    after_poll(account.id, [], "account.recovered")
    assert receiver.delivered()[-1].json()["data"]["account"]["status"] == "active"
    # The first event keeps the state it announced.
    assert _deliveries(db)[0].data["account"]["status"] == "error"  # type: ignore[index]


def test_without_a_target_messages_are_processed_and_nothing_is_sent(
    db: Session, receiver: Receiver, set_env: Callable[..., None]
) -> None:
    set_env(WEBHOOK_URL=None, SCHEDULER_MODE="local")
    account = make_account(db)
    message = store_message(db, account, 1)

    hand_on([message.id])

    db.refresh(message)
    assert message.processed_at is not None
    assert _deliveries(db) == []
    assert receiver.requests == []


def test_unsigned_without_a_secret_and_bodies_cut_to_size(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    webhooks_on(WEBHOOK_SECRET=None, WEBHOOK_BODY_MAX_BYTES=8)
    receiver.secret = None
    account = make_account(db)
    message = store_message(db, account, 1)

    hand_on([message.id])

    [request] = receiver.delivered()
    assert "x-mailbeat-signature" not in request.headers
    body = request.json()["data"]["message"]
    assert body["text"] == "plain bo" and body["text_truncated"] is True
    assert body["html"] == "<p>html " and body["html_truncated"] is True


def test_a_message_whose_stored_bytes_are_gone_is_still_announced(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    message = store_message(db, account, 1)
    message.storage_key = message.storage_key + ".missing"  # type: ignore[operator]
    db.commit()

    hand_on([message.id])

    [request] = receiver.delivered()
    body = request.json()["data"]["message"]
    assert body["text"] == "plain body 1\n"
    assert body["headers"] == []
    assert body["raw_error"].startswith("the stored message could not be read")


def test_dead_letter_routes_need_the_token(anonymous: TestClient) -> None:
    assert anonymous.get("/admin/dead-letters").status_code == 401
    assert anonymous.post("/admin/dead-letters/1/replay").status_code == 401
    assert anonymous.post("/accounts/1/dead-letters/replay").status_code == 401


def test_an_attempt_that_arrives_early_waits_for_its_time(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    message = store_message(db, account, 1)
    with session_scope() as session:
        assert process_message(session, message.id)
    [delivery] = _deliveries(db)
    # Due in 5 s: the early check below must come well before that even on a loaded
    # machine (a poll up to EARLY_GRACE early already counts as due).
    delivery.next_attempt_at = utcnow() + timedelta(seconds=5)
    db.commit()

    # A duplicate task, or one part of a countdown longer than MAX_COUNTDOWN_SECONDS.
    assert webhooks.deliver(delivery.id) == "not_due"
    assert receiver.requests == []
    wait_for(lambda: _settled(db), "deliveries settled")

    assert [d.status for d in _deliveries(db)] == ["delivered"]
    assert len(receiver.requests) == 1
    assert webhooks.deliver(delivery.id) == "skipped"
