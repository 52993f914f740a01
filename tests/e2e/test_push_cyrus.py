"""What broke against Cyrus IMAP before errors stayed where they happen: a folder deleted
and recreated under IDLE (Cyrus sends only EXPUNGEs and keeps the session on the deleted
folder), a deleted folder beside INBOX under push, and a stored message put back into a
recreated folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.mailbox.service import poll_account
from backend.models import Account, FolderCursor, Message, PushStatus, utcnow
from tests.support.accounts import make_account
from tests.support.celery import Celery, running_celery
from tests.support.cyrus import Cyrus
from tests.support.mail import generated
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def celery(tmp_path: Path, set_env: Callable[..., None]) -> Iterator[Celery]:
    set_env(WATCHER_LEASE_SECONDS=2, MIN_POLL_INTERVAL_SECONDS=1, SCHEDULER_MODE="celery")
    with running_celery(tmp_path) as processes:
        yield processes


def stored(db: Session, account_id: int, folder: str | None = None) -> int:
    db.rollback()
    query = select(func.count(Message.id)).where(Message.account_id == account_id)
    if folder is not None:
        query = query.where(Message.folder == folder)
    return int(db.scalar(query) or 0)


def cursor_validity(db: Session, account_id: int, folder: str) -> int | None:
    db.rollback()
    return db.scalar(
        select(FolderCursor.uidvalidity).where(
            FolderCursor.account_id == account_id, FolderCursor.folder == folder
        )
    )


def pushed(db: Session, cyrus: Cyrus, folders: list[str]) -> Account:
    account = make_account(db, cyrus, push=True, folders=folders, poll_interval_seconds=300)
    for folder in folders:
        if folder != "INBOX":
            cyrus.create_folder(account.username, folder)
    account.last_polled_at = utcnow()  # the schedule would not poll it for 300 s
    db.commit()
    return account


def test_a_folder_deleted_and_recreated_under_idle_is_watched_again(
    celery: Celery, db: Session, cyrus: Cyrus
) -> None:
    """Cyrus tells the IDLE session only `* n EXPUNGE` and keeps it on the deleted
    folder: the watcher must select the new folder of that name."""
    archive = cyrus.folder("Archive")
    account = pushed(db, cyrus, [archive])
    cyrus.append(account.username, generated(1), archive)
    celery.worker()
    celery.watcher()
    wait_for(lambda: stored(db, account.id) == 1, "the first message", details=celery.logs)

    cyrus.delete_folder(account.username, archive)
    cyrus.create_folder(account.username, archive)
    new_validity = cyrus.folder_status(account.username, archive)[b"UIDVALIDITY"]
    # The poll the EXPUNGE sent has seen the new folder; only push can find what follows.
    wait_for(
        lambda: cursor_validity(db, account.id, archive) == new_validity,
        "a poll of the recreated folder",
        details=celery.logs,
    )
    cyrus.append(account.username, generated(2), archive)
    wait_for(
        lambda: stored(db, account.id) == 2,
        "new mail in the recreated folder, through push",
        details=celery.logs,
    )


def test_a_folder_gone_stops_neither_the_other_folders_nor_push(
    celery: Celery, db: Session, cyrus: Cyrus
) -> None:
    archive = cyrus.folder("Archive")
    account = pushed(db, cyrus, ["INBOX", archive])
    celery.worker()
    celery.watcher()

    def status() -> tuple[PushStatus | None, dict[str, dict[str, Any]] | None]:
        db.rollback()
        db.refresh(account)
        return account.push_status, account.folder_errors

    wait_for(lambda: status()[0] == PushStatus.WATCHING, "IDLE", details=celery.logs)
    cyrus.delete_folder(account.username, archive)
    wait_for(lambda: archive in (status()[1] or {}), "the folder's error", details=celery.logs)
    cyrus.append(account.username, generated(1))
    wait_for(lambda: stored(db, account.id, "INBOX") == 1, "INBOX mail", details=celery.logs)
    cyrus.append(account.username, generated(2))
    wait_for(lambda: stored(db, account.id, "INBOX") == 2, "more of it", details=celery.logs)


def test_the_same_message_put_back_into_a_recreated_folder_is_followed_not_stored_again(
    db: Session, cyrus: Cyrus
) -> None:
    """A folder recreated (a new UIDVALIDITY) and the same bytes put back in later.
    Cyrus names a message by its content (EMAILID), so by the server's word it is the
    message stored before: its row follows it to the new UID, and it is not stored or
    handed on again. (Dovecot, with no OBJECTID, stores such a copy as new mail:
    tests/mailbox/test_service.py.)"""
    archive = cyrus.folder("Archive")
    account = make_account(db, cyrus, folders=[archive])
    raw = generated(1)
    cyrus.append(account.username, raw, archive)
    assert poll_account(account.id).messages == 1
    cyrus.delete_folder(account.username, archive)
    cyrus.create_folder(account.username, archive)
    assert poll_account(account.id, force=True).messages == 0

    cyrus.append(account.username, raw, archive)
    assert poll_account(account.id, force=True).messages == 0
    db.rollback()
    (message,) = db.scalars(select(Message).where(Message.account_id == account.id)).all()
    assert message.email_id is not None
    assert message.uidvalidity == cyrus.folder_status(account.username, archive)[b"UIDVALIDITY"]
