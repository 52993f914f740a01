from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from backend.models import Message
from backend.processing.service import hand_on, process_message
from tests.support.accounts import make_account


def _message(db: Session) -> Message:
    account = make_account(db, commit=False)
    message = Message(account_id=account.id, folder="INBOX", uidvalidity=1, uid=1)
    db.add(message)
    db.commit()
    return message


def test_process_is_idempotent(db: Session) -> None:
    message = _message(db)
    assert process_message(db, message.id) is True
    db.commit()
    first = message.processed_at
    assert first is not None
    assert process_message(db, message.id) is False
    db.commit()
    db.refresh(message)
    assert message.processed_at == first
    assert process_message(db, 999_999) is False


def test_hand_on_in_process(db: Session, set_env: Callable[..., None]) -> None:
    set_env(SCHEDULER_MODE="local")
    message = _message(db)
    hand_on([message.id])
    db.refresh(message)
    assert message.processed_at is not None
