"""Accounts on the Dovecot fixture, and messages to put in them."""

from __future__ import annotations

from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from backend import crypto
from backend.models import Account
from tests.support.dovecot import Dovecot

DATA = Path(__file__).parent / "data"

MakeAccount = Callable[..., Account]


def corpus() -> list[bytes]:
    """CPython's email test messages, in name order."""
    return [path.read_bytes() for path in sorted(DATA.glob("msg_*.txt"))]


def generated(index: int, *, attachment: bytes | None = None, message_id: bool = True) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Zoë Ünïcode <zoe@example.org>"
    msg["To"] = "Ingest <ingest@example.org>, other@example.org"
    msg["Subject"] = f"Grüße Nr. {index} — 東京"
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0100"
    if message_id:
        msg["Message-ID"] = f"<gen-{index}@example.org>"
    msg.set_content(f"Hallo {index}, schöne Grüße.\n")
    msg.add_alternative(f"<p>Hallo {index}</p>", subtype="html")
    if attachment is not None:
        msg.add_attachment(
            attachment, maintype="application", subtype="pdf", filename="../../etc/Bericht ä.pdf"
        )
    return msg.as_bytes()


@pytest.fixture
def make_account(db: Session, dovecot: Dovecot, mail_user: tuple[str, str]) -> MakeAccount:
    """An account for `mail_user` on the Dovecot fixture (plain IMAP unless told)."""

    def make(**overrides: Any) -> Account:
        username, password = mail_user
        credentials = overrides.pop("credentials", {"password": password})
        values: dict[str, Any] = {
            "email": f"{username}@example.org",
            "imap_host": dovecot.host,
            "imap_port": dovecot.imap_port,
            "imap_security": "none",
            "username": username,
            "auth_method": "password",
            "credentials_encrypted": crypto.encrypt_json(credentials),
            "folders": ["INBOX"],
            "poll_interval_seconds": 60,
        }
        values.update(overrides)
        account = Account(**values)
        db.add(account)
        db.commit()
        return account

    return make
