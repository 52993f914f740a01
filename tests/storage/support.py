"""Helpers for the storage tests."""

from __future__ import annotations

from sqlalchemy.orm import Session

from backend import crypto
from backend.models import Account


def make_account(db: Session, n: int = 1) -> Account:
    account = Account(
        email=f"a{n}@example.test",
        imap_host="imap.example.test",
        imap_port=993,
        username=f"user{n}",
        credentials_encrypted=crypto.encrypt_json({"password": "p"}),
    )
    db.add(account)
    db.flush()
    return account
