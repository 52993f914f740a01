"""Re-parsing stored messages from their raw bytes: rows an older parser left wrong are
fixed, nothing else changes, and nothing is sent unless asked. Real PostgreSQL, local
storage, a real receiver; the API route in local mode runs its task in the request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from backend.models import Attachment, Message, WebhookDelivery
from backend.processing import reparse
from backend.processing.service import hand_on
from backend.storage import service as storage
from tests.support.accounts import make_account
from tests.support.receiver import Receiver
from tests.support.webhooks import store_message


def _row(db: Session, message_id: int) -> dict[str, Any]:
    """Every column of a message and of its attachments."""
    db.expire_all()
    message = db.get(Message, message_id)
    assert message is not None
    columns = {c.name: getattr(message, c.key) for c in Message.__mapper__.columns}
    columns["attachments"] = [
        {c.name: getattr(a, c.key) for c in Attachment.__mapper__.columns}
        for a in message.attachments
    ]
    return columns


def _corrupt(db: Session, message: Message) -> None:
    """What an older parser left: raw 8-bit headers as U+FFFD, a lost body, a bad name."""
    db.execute(
        update(Message)
        .where(Message.id == message.id)
        .values(
            subject="Gr\ufffd\ufffde",
            from_addr="Zo\ufffd\ufffd Sender <zoe@example.org>",
            to_addrs=[],
            text_body=None,
            html_body="\ufffd",
            parse_error="HeaderParseError: Base64 decoding error",
        )
    )
    db.execute(
        update(Attachment)
        .where(Attachment.message_id == message.id)
        .values(filename="\ufffd.pdf", safe_name="attachment-1.bin", content_type="text/plain")
    )
    db.commit()


def _deliveries(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(WebhookDelivery)) or 0


def test_reparse_fixes_the_parsed_fields_only_and_sends_nothing(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    other = make_account(db)
    messages = [store_message(db, account, uid) for uid in range(1, 4)]
    elsewhere = store_message(db, other, 1)
    hand_on([m.id for m in [*messages, elsewhere]])
    assert len(receiver.delivered()) == 4
    good = {m.id: _row(db, m.id) for m in [*messages, elsewhere]}
    for message in (messages[0], messages[2], elsewhere):
        _corrupt(db, message)
    deliveries = _deliveries(db)

    done = reparse.reparse_page(account.id)

    assert (done.reparsed, done.changed, done.unreadable, done.notified) == (3, 2, [], 0)
    assert done.last_id == messages[-1].id
    for message in messages:
        assert _row(db, message.id) == good[message.id]
    # Another account's messages are not this run's.
    assert _row(db, elsewhere.id)["subject"] == "Gr\ufffd\ufffde"
    assert len(receiver.delivered()) == 4
    assert _deliveries(db) == deliveries
    assert reparse.reparse_page(account.id, done.last_id).last_id == 0


def test_with_notify_a_changed_message_gets_one_message_reparsed_event(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    changed, same = store_message(db, account, 1), store_message(db, account, 2)
    hand_on([changed.id, same.id])
    _corrupt(db, changed)

    done = reparse.reparse_page(None, notify=True)

    assert (done.reparsed, done.changed, done.notified) == (2, 1, 1)
    [event] = [r.json() for r in receiver.delivered() if r.json()["type"] == "message.reparsed"]
    assert event["data"]["message"]["id"] == changed.id
    assert event["data"]["message"]["subject"] == "Grüße 1"
    assert event["data"]["message"]["attachments"][0]["filename"] == "a.pdf"
    assert len(receiver.delivered()) == 3  # two message.received, one message.reparsed


def test_a_message_whose_raw_bytes_cannot_be_read_is_reported_and_the_rest_fixed(
    db: Session,
) -> None:
    account = make_account(db)
    messages = [store_message(db, account, uid) for uid in range(1, 4)]
    lost = messages[1]
    good = {m.id: _row(db, m.id) for m in messages}
    for message in messages:
        _corrupt(db, message)
    assert lost.storage_backend is not None and lost.storage_key is not None
    storage.delete_object(lost.storage_backend, lost.storage_key)
    corrupted = _row(db, lost.id)

    done = reparse.reparse_page(account.id)

    assert (done.reparsed, done.changed) == (2, 2)
    [unreadable] = done.unreadable
    assert unreadable.message_id == lost.id
    assert unreadable.reason.startswith("ObjectNotFound")
    assert _row(db, lost.id) == corrupted  # left as it was
    for message in (messages[0], messages[2]):
        assert _row(db, message.id) == good[message.id]


def test_attachments_whose_bytes_differ_are_kept_as_they_were(db: Session) -> None:
    account = make_account(db)
    message = store_message(db, account, 1)
    good = _row(db, message.id)
    _corrupt(db, message)
    db.execute(update(Attachment).values(content_hash="0" * 64))  # not what the raw holds
    db.commit()
    kept = _row(db, message.id)["attachments"]

    done = reparse.reparse_page(account.id)

    assert (done.changed, done.attachments_kept) == (1, 1)
    fixed = _row(db, message.id)
    assert fixed["attachments"] == kept
    assert {k: v for k, v in fixed.items() if k != "attachments"} == {
        k: v for k, v in good.items() if k != "attachments"
    }


def test_the_task_goes_page_by_page_and_sends_itself_on(
    db: Session, set_env: Callable[..., None], monkeypatch: Any
) -> None:
    set_env(SCHEDULER_MODE="local")
    monkeypatch.setattr(reparse, "PAGE", 2)
    monkeypatch.setattr(reparse, "TASK_PAGES", 2)
    account = make_account(db)
    messages = [store_message(db, account, uid) for uid in range(1, 10)]
    good = {m.id: _row(db, m.id) for m in messages}
    for message in messages:
        _corrupt(db, message)

    first = reparse.run(account.id, 0, False)  # two pages, then the rest on its own

    assert first["reparsed"] == 4
    for message in messages:
        assert _row(db, message.id) == good[message.id]


def test_the_routes_reparse_as_a_task(
    db: Session, api: TestClient, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    other = make_account(db)
    mine, theirs = store_message(db, account, 1), store_message(db, other, 1)
    hand_on([mine.id, theirs.id])
    good = {m.id: _row(db, m.id) for m in (mine, theirs)}
    _corrupt(db, mine)
    _corrupt(db, theirs)

    response = api.post(f"/accounts/{account.id}/reparse")

    assert response.status_code == 202
    assert response.json() == {"account_id": account.id, "messages": 1, "notify": False}
    assert _row(db, mine.id) == good[mine.id]  # local mode: the task ran in the request
    assert _row(db, theirs.id)["subject"] == "Gr\ufffd\ufffde"
    assert len(receiver.delivered()) == 2

    response = api.post("/admin/reparse", json={"notify": True})

    assert response.status_code == 202
    assert response.json() == {"account_id": None, "messages": 2, "notify": True}
    assert _row(db, theirs.id) == good[theirs.id]
    assert [r.json()["type"] for r in receiver.delivered()][2:] == ["message.reparsed"]

    assert api.post("/accounts/999999/reparse").status_code == 404
    for wrong in ("often", 0, None):
        assert api.post("/admin/reparse", json={"notify": wrong}).status_code == 422
