"""Constraints that exactly-once and cascade delete rely on, on the real PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from backend.models import Account, AccountStatus, Attachment, FolderCursor, Message, PollRun
from tests.support.accounts import make_account


def _message(account: Account, uid: int, uidvalidity: int = 1) -> Message:
    return Message(account_id=account.id, folder="INBOX", uidvalidity=uidvalidity, uid=uid, size=1)


def test_defaults(db: Session) -> None:
    account = make_account(db, commit=False)
    db.commit()
    assert account.folders == ["INBOX"]
    assert account.status == "active"
    assert account.enabled is True
    assert account.consecutive_failures == 0
    assert account.created_at.tzinfo is not None


def test_message_identity_is_unique(db: Session) -> None:
    account = make_account(db, commit=False)
    db.add(_message(account, uid=7))
    db.add(_message(account, uid=7, uidvalidity=2))  # another UIDVALIDITY: another message
    db.commit()
    db.add(_message(account, uid=7))
    with pytest.raises(IntegrityError):
        db.commit()


def test_duplicate_mailbox_is_refused(db: Session) -> None:
    make_account(db, username="same", commit=False)
    db.commit()
    with pytest.raises(IntegrityError):
        make_account(db, username="same", commit=False)


def test_deleting_an_account_deletes_what_it_owns(db: Session) -> None:
    doomed, kept = (
        make_account(db, username="doomed", commit=False),
        make_account(db, username="kept", commit=False),
    )
    for account in (doomed, kept):
        message = _message(account, uid=1)
        message.attachments.append(
            Attachment(
                safe_name="a.txt",
                content_type="text/plain",
                size=1,
                content_hash="0" * 64,
                storage_backend="local",
                storage_key="k",
            )
        )
        db.add_all(
            [
                message,
                FolderCursor(account_id=account.id, folder="INBOX", uidvalidity=1, last_uid=1),
                PollRun(account_id=account.id, outcome="success"),
            ]
        )
    db.commit()

    # A bulk DELETE goes straight to the database: the foreign keys do the cascade.
    db.execute(
        delete(Account).where(Account.id == doomed.id).execution_options(synchronize_session=False)
    )
    db.commit()

    for model in (Message, Attachment, FolderCursor, PollRun):
        assert db.scalar(select(func.count()).select_from(model)) == 1


def test_enum_columns_read_back_members_and_refuse_unknown_values(db: Session) -> None:
    account = make_account(db, commit=False)
    # Written as plain SQL, as a migration or an operator would.
    db.execute(text("UPDATE accounts SET status = 'error' WHERE id = :id"), {"id": account.id})
    db.commit()
    db.expire_all()
    stored = db.get(Account, account.id)
    assert stored is not None
    assert stored.status is AccountStatus.ERROR
    stored.status = AccountStatus.DISABLED
    db.commit()
    # The database keeps the plain value.
    raw = db.scalar(text("SELECT status FROM accounts WHERE id = :id"), {"id": account.id})
    assert raw == "disabled"
    db.add(PollRun(account_id=account.id, outcome="not-an-outcome"))
    with pytest.raises(StatementError, match="not-an-outcome"):
        db.flush()
