"""The one account factory of the test suite: an account row as the accounts service
leaves it (committed), optionally a real mailbox on the Dovecot or Cyrus fixture."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from backend import crypto
from backend.models import Account
from tests.support.servers import RealServer

# The `mail_account` fixture (tests/conftest.py): accounts on the `mail_user` mailbox.
MailAccount = Callable[..., Account]


def make_account(
    db: Session, dovecot: RealServer | None = None, *, commit: bool = True, **values: Any
) -> Account:
    """`dovecot` (or the Cyrus fixture): the account logs in to a user there (created
    unless it exists), over plain IMAP. Without it the address is never dialled.
    `password` or `credentials` set the stored secrets; any other keyword is a column."""
    username = values.pop("username", None) or f"user-{uuid.uuid4().hex[:10]}"
    known = dovecot.passwords.get(username) if dovecot is not None else None
    password = values.pop("password", None) or known or f"pw-{uuid.uuid4().hex[:8]}"
    credentials = values.pop("credentials", None) or {"password": password}
    fields: dict[str, Any] = {
        "email": f"{username}@example.org",
        "imap_host": "imap.example.test",
        "imap_port": 993,
        "imap_security": "ssl",
        "username": username,
        "auth_method": "password",
        "credentials_encrypted": crypto.encrypt_json(credentials),
        "folders": ["INBOX"],
        "poll_interval_seconds": 60,
    }
    if dovecot is not None:
        if known is None:
            dovecot.add_user(username, password)
        fields.update(imap_host=dovecot.host, imap_port=dovecot.imap_port, imap_security="none")
    fields.update(values)
    account = Account(**fields)
    db.add(account)
    if commit:
        db.commit()
    else:
        db.flush()
    return account


def make_accounts(db: Session, count: int, **values: Any) -> list[Account]:
    """Many accounts at once (schedule and capacity tests); never dialled. One encrypted
    secret for all: encrypting per row would be most of the time spent."""
    credentials = crypto.encrypt_json({"password": "never-used"})
    run = uuid.uuid4().hex[:6]
    accounts = [
        Account(
            email=f"bulk-{index}-{run}@example.org",
            imap_host="imap.example.test",
            imap_port=993,
            username=f"bulk-{index}-{run}",
            credentials_encrypted=credentials,
            **{"poll_interval_seconds": 60, **values},
        )
        for index in range(count)
    ]
    db.add_all(accounts)
    db.commit()
    return accounts
