"""Account events from real polls of the Dovecot fixture, delivered once per change."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import update
from sqlalchemy.orm import Session

from backend import crypto
from backend.mailbox.service import poll_account
from backend.models import Account
from backend.processing.service import after_poll
from tests.support.accounts import MailAccount
from tests.support.receiver import Receiver


def _poll(db: Session, account_id: int) -> None:
    # Now, not when the backoff ends.
    db.execute(update(Account).where(Account.id == account_id).values(backoff_until=None))
    db.commit()
    result = poll_account(account_id)
    after_poll(account_id, result.new_message_ids, result.account_event)


def test_error_and_recovery_are_announced_once_each(
    db: Session,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
) -> None:
    account = mail_account(credentials={"password": "wrong"})

    _poll(db, account.id)
    _poll(db, account.id)  # still failing: no change, no event
    account.credentials_encrypted = crypto.encrypt_json({"password": mail_user[1]})
    db.commit()
    _poll(db, account.id)
    _poll(db, account.id)

    events = [r.json() for r in receiver.delivered()]
    assert [e["type"] for e in events] == ["account.error", "account.recovered"]
    error = events[0]["data"]["account"]
    assert error["id"] == account.id
    assert error["status"] == "error"
    assert error["last_error_kind"] == "auth"
    assert events[1]["data"]["account"]["status"] == "active"


def test_disabling_is_announced(
    db: Session,
    mail_account: MailAccount,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
) -> None:
    webhooks_on(MAX_CONSECUTIVE_FAILURES=2)
    account = mail_account(credentials={"password": "wrong"})

    _poll(db, account.id)
    _poll(db, account.id)
    _poll(db, account.id)  # disabled: skipped

    events = [r.json() for r in receiver.delivered()]
    assert [e["type"] for e in events] == ["account.error", "account.disabled"]
    assert events[1]["data"]["account"]["enabled"] is False
    assert "consecutive failed polls" in events[1]["data"]["account"]["disabled_reason"]
