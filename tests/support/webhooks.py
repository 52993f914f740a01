"""Fixtures for webhook tests: a live receiver, webhook settings, stored messages.

Imported by the conftest of every test folder that needs them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from email.message import EmailMessage

import pytest
from sqlalchemy.orm import Session

from backend.mailbox.parser import parse_message
from backend.models import Account, Attachment, Message
from backend.storage import service as storage
from backend.storage.base import attachment_key, message_key
from tests.support.receiver import SECRET, Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.up()
    yield server
    server.down()


@pytest.fixture
def webhooks_on(set_env: Callable[..., None], receiver: Receiver) -> Callable[..., None]:
    """The receiver as the global target, short backoff, in-process delivery. Returns
    set_env, for a test to change more."""
    set_env(
        WEBHOOK_URL=receiver.url,
        WEBHOOK_SECRET=SECRET,
        WEBHOOK_BACKOFF_BASE_SECONDS=0.01,
        WEBHOOK_BACKOFF_MAX_SECONDS=0.05,
        WEBHOOK_MAX_ATTEMPTS=4,
        WEBHOOK_TIMEOUT_SECONDS=5,
        SCHEDULER_MODE="local",
    )
    return set_env


def sample_email(n: int, *, attachment: bool = True) -> bytes:
    mail = EmailMessage()
    mail["From"] = "Zoë Sender <zoe@example.org>"
    mail["To"] = "inbox@example.com"
    mail["Subject"] = f"Grüße {n}"
    mail["Message-ID"] = f"<m{n}@example.org>"
    mail.set_content(f"plain body {n}\n")
    mail.add_alternative(f"<p>html body {n}</p>", subtype="html")
    if attachment:
        mail.add_attachment(
            b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="a.pdf"
        )
    return mail.as_bytes()


def store_message(db: Session, account: Account, uid: int, raw: bytes | None = None) -> Message:
    """A message as ingestion leaves it: raw bytes stored, rows committed, not processed."""
    raw = raw if raw is not None else sample_email(uid)
    key = message_key(account.id, "INBOX", 1, uid)
    parsed = parse_message(raw)
    message = Message(
        account_id=account.id,
        folder="INBOX",
        uidvalidity=1,
        uid=uid,
        message_id=parsed.message_id,
        subject=parsed.subject,
        from_addr=parsed.from_addr,
        to_addrs=parsed.to_addrs,
        text_body=parsed.text_body,
        html_body=parsed.html_body,
        size=len(raw),
        content_hash=hashlib.sha256(raw).hexdigest(),
        storage_backend=storage.put_object(key, raw, "message/rfc822"),
        storage_key=key,
    )
    db.add(message)
    db.flush()
    data = b"%PDF-1.4 fake"
    akey = attachment_key(account.id, "INBOX", 1, uid, index=0, safe_name="a.pdf")
    message.attachments.append(
        Attachment(
            filename="a.pdf",
            safe_name="a.pdf",
            content_type="application/pdf",
            size=len(data),
            content_hash=hashlib.sha256(data).hexdigest(),
            storage_backend=storage.put_object(akey, data, "application/pdf"),
            storage_key=akey,
        )
    )
    db.commit()
    return message
