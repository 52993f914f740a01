"""Accounts for the scheduling tests, committed the way the account service leaves them."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from backend import crypto
from backend.models import Account


def make_account(db: Session, **values: Any) -> Account:
    password = values.pop("password", "secret")
    name = values.pop("username", f"user-{uuid.uuid4().hex[:10]}")
    fields: dict[str, Any] = {
        "email": f"{name}@example.test",
        "imap_host": "127.0.0.1",
        "imap_port": 993,
        "imap_security": "ssl",
        "username": name,
        "credentials_encrypted": crypto.encrypt_json({"password": password}),
        "poll_interval_seconds": 60,
        **values,
    }
    account = Account(**fields)
    db.add(account)
    db.commit()
    return account


def make_accounts(db: Session, count: int, **values: Any) -> list[Account]:
    accounts = [
        Account(
            email=f"bulk-{index}@example.test",
            imap_host="127.0.0.1",
            imap_port=993,
            username=f"bulk-{index}-{uuid.uuid4().hex[:6]}",
            credentials_encrypted="unused",
            **{"poll_interval_seconds": 60, **values},
        )
        for index in range(count)
    ]
    db.add_all(accounts)
    db.commit()
    return accounts
