"""Ingestion to webhook end to end on the Dovecot fixture, and backfill after outages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from backend.mailbox.service import poll_account
from backend.models import FolderCursor, Message
from backend.processing.backfill import Range, backfill
from backend.processing.service import after_poll
from backend.webhooks import signing
from tests.support.accounts import MailAccount
from tests.support.dovecot import Dovecot
from tests.support.receiver import SECRET, Receiver
from tests.support.webhooks import sample_email


@dataclass
class Inbox:
    """A Dovecot mailbox with its account; webhooks go to the receiver."""

    dovecot: Dovecot
    username: str
    account_id: int

    def append(self, *numbers: int, when: datetime | None = None) -> list[int]:
        return self.dovecot.append_many(
            self.username, [sample_email(n) for n in numbers], when=when
        )


@pytest.fixture
def inbox(
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    webhooks_on: Callable[..., None],
) -> Inbox:
    return Inbox(dovecot, mail_user[0], mail_account().id)


def _poll(account_id: int) -> list[int]:
    result = poll_account(account_id)
    assert result.outcome == "success", result.error
    after_poll(account_id, result.new_message_ids, result.account_event)
    return result.new_message_ids


def _delivered_message_ids(receiver: Receiver) -> list[int]:
    return sorted(r.json()["data"]["message"]["id"] for r in receiver.delivered())


def _held(db: Session, account_id: int) -> dict[int, int]:
    """{uid: message id}"""
    db.expire_all()
    rows = db.execute(select(Message.uid, Message.id).where(Message.account_id == account_id))
    return {uid: message_id for uid, message_id in rows}


def test_every_ingested_message_is_delivered_once_signed(
    db: Session, inbox: Inbox, receiver: Receiver
) -> None:
    inbox.append(1, 2, 3, 4)
    first = _poll(inbox.account_id)
    inbox.append(5)
    second = _poll(inbox.account_id)
    assert _poll(inbox.account_id) == []

    assert len(first) == 4 and len(second) == 1
    assert _delivered_message_ids(receiver) == sorted(first + second)
    assert len(receiver.requests) == 5
    for request in receiver.requests:
        assert signing.verify(
            SECRET,
            request.headers["x-mailbeat-timestamp"],
            request.body,
            request.headers["x-mailbeat-signature"],
            tolerance_seconds=300,
        )
    event = receiver.requests[-1].json()["data"]["message"]
    assert event["subject"] == "Grüße 5"
    assert event["text"].rstrip() == "plain body 5"
    assert [a["filename"] for a in event["attachments"]] == ["a.pdf"]


def test_backfill_brings_back_messages_lost_on_our_side(
    db: Session, inbox: Inbox, receiver: Receiver
) -> None:
    inbox.append(1, 2, 3, 4, 5)
    account_id = inbox.account_id
    _poll(account_id)
    held = _held(db, account_id)
    lost = [held[2], held[4]]
    db.execute(delete(Message).where(Message.id.in_(lost)))
    db.commit()
    cursor = db.scalar(select(FolderCursor.last_uid))

    dry = backfill(account_id, window=Range(), dry_run=True)
    [folder] = dry.folders
    assert (folder.on_server, folder.held, folder.missing, folder.stored) == (5, 3, 2, 0)
    assert len(_held(db, account_id)) == 3

    result = backfill(account_id, window=Range())
    assert result.folders[0].stored == 2
    now_held = _held(db, account_id)
    assert sorted(now_held) == [1, 2, 3, 4, 5]
    assert sorted(result.stored_message_ids) == sorted([now_held[2], now_held[4]])
    assert len(receiver.delivered()) == 7  # 5 from the poll, the 2 lost ones again
    assert db.scalar(select(FolderCursor.last_uid)) == cursor

    # Nothing is stored twice, nothing sent twice.
    again = backfill(account_id, window=Range())
    assert again.folders[0].stored == 0 and again.folders[0].missing == 0
    assert len(_held(db, account_id)) == 5
    assert len(receiver.delivered()) == 7

    # On request, held messages are sent again, as new events.
    redone = backfill(account_id, window=Range(uid_from=4), redeliver=True)
    assert redone.folders[0].redelivered == 2
    assert sorted(redone.redelivered_message_ids) == sorted([now_held[4], now_held[5]])
    assert len(receiver.delivered()) == 9
    assert len(set(receiver.event_ids())) == 9


def test_backfill_brings_mail_a_moved_cursor_skipped(
    db: Session, inbox: Inbox, receiver: Receiver
) -> None:
    inbox.append(1, 2)
    account_id = inbox.account_id
    _poll(account_id)
    # Mail arrives while we are down, and the cursor is moved past it (restored from a
    # later backup, set by hand): polls no longer see it.
    missed = inbox.append(3, 4, 5)
    cursor = db.scalar(select(FolderCursor))
    assert cursor is not None
    cursor.last_uid = max(missed)
    db.commit()
    assert _poll(account_id) == []

    result = backfill(account_id, window=Range(uid_from=min(missed)), folders=["INBOX"])

    assert result.folders[0].on_server == 3 and result.folders[0].stored == 3
    assert sorted(_held(db, account_id)) == [1, 2, *missed]
    assert len(receiver.delivered()) == 5
    assert _poll(account_id) == []


def test_backfill_by_date_and_held_messages_never_processed(
    db: Session, inbox: Inbox, receiver: Receiver
) -> None:
    inbox.append(1, 2, when=datetime(2026, 1, 10, 12, tzinfo=UTC))
    inbox.append(3, 4, when=datetime(2026, 11, 20, 12, tzinfo=UTC))
    account_id = inbox.account_id
    # Ingested, but the processing tasks were lost (Redis flushed): never handed on.
    assert poll_account(account_id).outcome == "success"
    held = _held(db, account_id)
    db.execute(delete(Message).where(Message.id == held[4]))
    db.commit()

    window = Range(since=date(2026, 11, 1), before=date(2026, 12, 1))
    result = backfill(account_id, window=window)

    [folder] = result.folders
    assert (folder.on_server, folder.held, folder.stored, folder.handed_on) == (2, 1, 1, 1)
    assert sorted(r.json()["data"]["message"]["uid"] for r in receiver.delivered()) == [3, 4]


def test_backfill_route(
    api: TestClient,
    mail_account: MailAccount,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    webhooks_on: Callable[..., None],
) -> None:
    dovecot.append(mail_user[0], sample_email(1))
    account = mail_account()

    response = api.post(f"/accounts/{account.id}/backfill", json={"dry_run": True})
    # A task: in local mode (the tests) it has run by the time the request answers.
    assert response.status_code == 202, response.text
    dry = response.json()
    assert (dry["status"], dry["error"]) == ("done", None)
    assert dry["request"]["dry_run"] is True
    assert dry["result"]["folders"][0]["missing"] == 1
    assert dry["result"]["stored_message_ids"] == []
    read = api.get(f"/backfills/{dry['id']}")
    assert read.status_code == 200
    assert read.json() == dry
    assert api.get("/backfills/999999").status_code == 404

    bad = api.post(f"/accounts/{account.id}/backfill", json={"uid_from": 5, "uid_to": 2})
    assert bad.status_code == 422
    assert "uid_from must not be above uid_to" in bad.text
    unknown = api.post(f"/accounts/{account.id}/backfill", json={"folders": ["Nope"]})
    assert unknown.status_code == 422
    assert unknown.json()["error"] == "InvalidBackfill"
    assert api.post("/accounts/999999/backfill", json={}).status_code == 404

    response = api.post(f"/accounts/{account.id}/backfill", json={})
    assert response.status_code == 202
    assert response.json()["status"] == "done"
    assert len(response.json()["result"]["stored_message_ids"]) == 1
    assert response.json()["started_at"] <= response.json()["finished_at"]


def test_backfill_reports_a_refused_login(
    api: TestClient, mail_account: MailAccount, webhooks_on: Callable[..., None]
) -> None:
    from backend import crypto

    account = mail_account(credentials_encrypted=crypto.encrypt_json({"password": "wrong"}))

    response = api.post(f"/accounts/{account.id}/backfill", json={"dry_run": True})

    assert response.status_code == 202
    failed = api.get(f"/backfills/{response.json()['id']}").json()
    assert failed["status"] == "failed"
    assert failed["error"].startswith("ImapAuthError")
    assert failed["result"] is None
