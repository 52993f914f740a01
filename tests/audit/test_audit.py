"""The audit on the Dovecot fixture: losses from outside the poll (rows and local object
files deleted, as a restore from an older backup would) are found and repaired once,
byte for byte, and nothing is handed on twice."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from backend.audit.service import audit_account, schedule_due
from backend.celery_app import queue_keys
from backend.mailbox import credentials
from backend.mailbox.imap import open_account
from backend.mailbox.service import poll_account
from backend.metrics import generate_latest, state_families
from backend.models import Account, Attachment, AuditOutcome, FolderAudit, Message, utcnow
from backend.processing.service import after_poll
from backend.storage import service as storage
from tests.audit.conftest import Inbox
from tests.support.accounts import make_accounts
from tests.support.receiver import Receiver
from tests.support.redis_db import RedisDb
from tests.support.webhooks import sample_email

COUNTERS = ("messages_missing", "messages_repaired", "objects_missing", "objects_repaired")


def _poll(account_id: int) -> list[int]:
    result = poll_account(account_id)
    assert result.outcome == "success", result.error
    after_poll(account_id, result.new_message_ids, result.account_event)
    return result.new_message_ids


def _rows(db: Session, account_id: int) -> dict[int, Message]:
    db.expire_all()
    rows = db.scalars(select(Message).where(Message.account_id == account_id))
    return {row.uid: row for row in rows}


def _raw(row: Message | Attachment) -> bytes:
    assert row.storage_backend is not None and row.storage_key is not None
    return storage.get_object(row.storage_backend, row.storage_key)


def _delivered_uids(receiver: Receiver) -> list[int]:
    return sorted(
        r.json()["data"]["message"]["uid"]
        for r in receiver.delivered()
        if r.json()["type"] == "message.received"
    )


def _metric(name: str) -> float:
    for line in generate_latest(state_families()).decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not scraped")


def _events(receiver: Receiver, kind: str) -> list[dict[str, object]]:
    return [r.json()["data"] for r in receiver.delivered() if r.json()["type"] == kind]


def test_an_audit_repairs_rows_and_objects_lost_to_a_restore_once_byte_for_byte(
    db: Session, inbox: Inbox, set_env: Callable[..., None], receiver: Receiver
) -> None:
    # Attachments as objects of their own, as rows stored before inline attachments.
    set_env(MAX_MESSAGE_BYTES=20_000, ATTACHMENT_INLINE_MAX_BYTES=0)
    inbox.append(*(sample_email(n) for n in range(1, 7)))
    inbox.append(sample_email(7) + b"x" * 30_000)  # too large: skipped
    account_id = inbox.account().id
    _poll(account_id)
    before = _rows(db, account_id)
    assert sorted(before) == [1, 2, 3, 4, 5, 6, 7] and before[7].skipped_reason
    originals = {uid: _raw(row) for uid, row in before.items() if uid != 7}
    attachment = db.scalars(select(Attachment).where(Attachment.message_id == before[4].id)).one()
    attachment_bytes = _raw(attachment)
    assert _delivered_uids(receiver) == [1, 2, 3, 4, 5, 6, 7]

    # The restore: rows 2 and 5 gone (their deliveries go with them), the local files of
    # message 3, of message 4's attachment and of message 5 gone too.
    local = storage.local_storage()
    for key in (before[3].storage_key, attachment.storage_key, before[5].storage_key):
        assert key is not None
        local.path_for(key).unlink()
    db.execute(delete(Message).where(Message.id.in_([before[2].id, before[5].id])))
    db.commit()

    counted = [_metric(f"mailbeat_audit_{name}_total") for name in COUNTERS]
    result = audit_account(account_id)

    [folder] = result.folders
    assert folder.outcome == AuditOutcome.COMPLETE
    assert (folder.server, folder.expected, folder.stored, folder.skipped) == (7, 7, 4, 1)
    assert (folder.missing, folder.repaired) == (2, 2)
    # The four stored messages with an attachment each (the skipped one has no objects).
    assert folder.objects_checked == 8
    assert (folder.objects_missing, folder.objects_repaired) == (2, 2)
    after = _rows(db, account_id)
    assert sorted(after) == [1, 2, 3, 4, 5, 6, 7]
    for uid, raw in originals.items():
        assert _raw(after[uid]) == raw, uid
    assert _raw(attachment) == attachment_bytes
    # The restored rows are handed on once (nothing recorded that they had been); the
    # ones whose objects came back are not handed on again.
    assert _delivered_uids(receiver) == [1, 2, 2, 3, 4, 5, 5, 6, 7]
    [event] = _events(receiver, "account.audit")
    audit = event["audit"]
    assert isinstance(audit, dict)
    [counts] = audit["folders"]
    assert (counts["missing"], counts["repaired"], counts["objects_missing"]) == (2, 2, 2)
    row = db.scalars(select(FolderAudit).where(FolderAudit.account_id == account_id)).one()
    assert (row.missing, row.repaired, row.objects_repaired) == (2, 2, 2)
    now_counted = [_metric(f"mailbeat_audit_{name}_total") for name in COUNTERS]
    assert [after - before for after, before in zip(now_counted, counted, strict=True)] == [2] * 4

    # Exactly once: a second audit finds everything in place and sends nothing.
    again = audit_account(account_id)
    [folder] = again.folders
    assert (folder.missing, folder.objects_missing, folder.stored) == (0, 0, 6)
    assert len(_events(receiver, "account.audit")) == 1
    assert _delivered_uids(receiver) == [1, 2, 2, 3, 4, 5, 5, 6, 7]
    db.expire_all()
    row = db.scalars(select(FolderAudit).where(FolderAudit.account_id == account_id)).one()
    assert (row.missing, row.repaired, row.stored) == (0, 0, 6)


def test_a_deep_audit_finds_an_altered_object_and_writes_the_original_back(
    db: Session, inbox: Inbox, receiver: Receiver
) -> None:
    inbox.append(sample_email(1), sample_email(2))
    account_id = inbox.account().id
    _poll(account_id)
    row = _rows(db, account_id)[2]
    original = _raw(row)
    assert row.storage_key is not None
    storage.local_storage().path_for(row.storage_key).write_bytes(b"not the message")

    shallow = audit_account(account_id)
    assert shallow.folders[0].objects_missing == 0  # it exists: only a deep audit reads it

    deep = audit_account(account_id, deep=True)
    assert (deep.folders[0].objects_missing, deep.folders[0].objects_repaired) == (1, 1)
    assert _raw(_rows(db, account_id)[2]) == original
    assert audit_account(account_id, deep=True).folders[0].objects_missing == 0
    assert _delivered_uids(receiver) == [1, 2]


def test_attachments_kept_inside_the_raw_message_are_not_missing_objects(
    db: Session, inbox: Inbox, set_env: Callable[..., None], receiver: Receiver
) -> None:
    """An attachment below ATTACHMENT_INLINE_MAX_BYTES has no object: the audits check the
    raw message that holds it, and the objects of the rows stored before still count."""
    set_env(ATTACHMENT_INLINE_MAX_BYTES=0)
    inbox.append(sample_email(1))
    account_id = inbox.account().id
    _poll(account_id)
    set_env(ATTACHMENT_INLINE_MAX_BYTES=1_000)
    inbox.append(sample_email(2), sample_email(3))
    _poll(account_id)
    parts = db.scalars(select(Attachment).order_by(Attachment.id)).all()
    assert [part.storage_key is None for part in parts] == [False, True, True]

    for deep in (False, True):
        [folder] = audit_account(account_id, deep=deep).folders
        assert folder.outcome == AuditOutcome.COMPLETE
        # Three raw messages and the one attachment object.
        assert (folder.objects_checked, folder.objects_missing) == (4, 0), deep
    assert _delivered_uids(receiver) == [1, 2, 3]


def test_what_the_initial_sync_left_out_and_new_mail_are_not_missing(
    db: Session, inbox: Inbox
) -> None:
    inbox.append(*(sample_email(n) for n in range(1, 6)))
    account_id = inbox.account(initial_sync="newest", initial_sync_count=2).id
    _poll(account_id)
    assert sorted(_rows(db, account_id)) == [4, 5]
    inbox.append(sample_email(6))  # above the cursor: the next poll's

    [folder] = audit_account(account_id).folders
    assert (folder.server, folder.expected, folder.stored, folder.missing) == (6, 2, 2, 0)
    assert sorted(_rows(db, account_id)) == [4, 5]


def test_a_folder_not_polled_yet_is_skipped(db: Session, inbox: Inbox) -> None:
    account_id = inbox.account().id
    [folder] = audit_account(account_id).folders
    assert folder.outcome == AuditOutcome.SKIPPED and folder.error == "not polled yet"


def test_uid_ranges_come_compact_from_the_server(db: Session, inbox: Inbox) -> None:
    inbox.append(*(sample_email(n, attachment=False) for n in range(1, 8)))
    with inbox.dovecot.client(inbox.username) as client:
        client.select_folder("INBOX")
        client.delete_messages([3, 4, 6])
        client.expunge()
    account = inbox.account()
    with open_account(account, credentials=credentials.loader(account)) as mailbox:
        mailbox.select("INBOX")
        assert mailbox.uid_ranges() == [(1, 2), (5, 5), (7, 7)]


def test_audit_routes(api: TestClient, db: Session, inbox: Inbox) -> None:
    inbox.append(*(sample_email(n) for n in (1, 2, 3)))
    account_id = inbox.account().id
    _poll(account_id)
    db.execute(delete(Message).where(Message.account_id == account_id, Message.uid == 2))
    db.commit()

    empty = api.get(f"/accounts/{account_id}/audit")
    assert empty.status_code == 200 and empty.json()["folders"] == []

    # A task: in local mode (the tests) it has run by the time the request answers.
    queued = api.post(f"/accounts/{account_id}/audit?deep=true")
    assert queued.status_code == 202, queued.text
    assert queued.json()["deep"] is True
    body = api.get(f"/accounts/{account_id}/audit").json()
    [folder] = body["folders"]
    assert folder["folder"] == "INBOX" and folder["outcome"] == "complete" and folder["deep"]
    assert (folder["server"], folder["missing"], folder["repaired"]) == (3, 1, 1)
    assert body["audited_at"] is not None
    account = db.get(Account, account_id)
    assert account is not None and account.audited_at is not None

    assert api.post(f"/accounts/{account_id}/audit").status_code == 202  # shallow
    assert api.post("/accounts/999999/audit").status_code == 404
    assert api.get("/accounts/999999/audit").status_code == 404
    assert api.post(f"/accounts/{account_id}/audit?deeper=1").status_code == 422
    assert api.post(f"/accounts/{account_id}/audit?deep=maybe").status_code == 422


def _queued(redis_db: RedisDb, queue: str, task: str) -> int:
    client = redis_db.client()
    bodies = [raw for key in queue_keys(queue) for raw in client.lrange(key, 0, -1)]
    return sum(1 for raw in bodies if json.loads(raw)["headers"]["task"] == task)


def test_scheduled_audits_spread_over_the_interval(
    db: Session, set_env: Callable[..., None], redis_db: RedisDb
) -> None:
    # Celery mode (Redis answers): the audits due are sent to the email queue.
    set_env(AUDIT_INTERVAL_SECONDS=120)
    accounts = make_accounts(db, 10, last_success_at=utcnow())
    make_accounts(db, 3)  # never polled successfully: nothing to audit yet
    ids = sorted(account.id for account in accounts)
    now = utcnow()

    # 10 mailboxes, a tick of 60 s, a pass every 120 s: 5 a tick, never audited first.
    first = schedule_due(now)
    second = schedule_due(now)
    assert (first, second) == (ids[:5], ids[5:])
    assert schedule_due(now) == []
    assert schedule_due(now + timedelta(seconds=121)) == ids[:5]
    assert _queued(redis_db, "email", "audit.run") == 15
    # The local scheduler's housekeeping comes once per refresh: a share per refresh.
    assert sorted(schedule_due(now + timedelta(seconds=300), tick_seconds=120)) == ids

    set_env(AUDIT_INTERVAL_SECONDS=0)
    assert schedule_due(now + timedelta(days=1)) == []
