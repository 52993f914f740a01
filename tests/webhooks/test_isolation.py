"""One bad message never costs the others their events: a header that cannot be decoded,
a stored object that cannot be read, an event that cannot be built at all. Through the
real poll, processing, delivery and sweep, in-process (local mode), a real receiver."""

from __future__ import annotations

import errno
from collections.abc import Callable
from datetime import timedelta
from email.errors import HeaderParseError
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.mailbox.parser import decode_words as decode
from backend.mailbox.service import poll_account
from backend.models import Message, WebhookDelivery, utcnow
from backend.processing.service import after_poll, hand_on, process_batch, sweep
from backend.storage import service as storage
from backend.storage.base import message_key
from backend.storage.local import LocalStorage
from backend.webhooks import events
from backend.webhooks import service as webhooks
from tests.support.accounts import MailAccount, make_account
from tests.support.api import auth_headers, make_client
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.receiver import Receiver
from tests.support.webhooks import store_message

# A base64 encoded word one character long: Python's email package raises
# HeaderParseError ("Base64 decoding error") on it.
MALFORMED_SUBJECT = "=?utf-8?B?5?="
MALFORMED = (
    "From: Bad Sender <bad@example.org>\r\n"
    "To: ingest@example.org\r\n"
    f"Subject: {MALFORMED_SUBJECT}\r\n"
    "Message-ID: <malformed@example.org>\r\n"
    "\r\n"
    "the body is fine\r\n"
).encode()


def _events(receiver: Receiver) -> dict[int, dict[str, Any]]:
    """The message events the receiver took, by message id (each exactly once)."""
    found: dict[int, dict[str, Any]] = {}
    for request in receiver.delivered():
        message = request.json()["data"]["message"]
        assert message["id"] not in found, f"message {message['id']} delivered twice"
        found[message["id"]] = message
    return found


def _statuses(db: Session) -> dict[int, tuple[str, str | None]]:
    db.expire_all()
    return {
        d.message_id: (d.status, d.last_error)
        for d in db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id))
        if d.message_id is not None
    }


def _header(message: dict[str, Any], name: str) -> str:
    [value] = [h["value"] for h in message["headers"] if h["name"] == name]
    return str(value)


@pytest.fixture
def unreadable(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Object keys whose local file fails to read with an I/O error (a bad disk sector):
    an OSError the storage layer does not turn into a StorageError."""
    keys: set[str] = set()
    read = LocalStorage.get

    def get(self: LocalStorage, key: str) -> bytes:
        if key in keys:
            raise OSError(errno.EIO, "Input/output error", str(self.path_for(key)))
        return read(self, key)

    monkeypatch.setattr(LocalStorage, "get", get)
    return keys


def test_a_malformed_encoded_word_in_a_batch_of_200_costs_no_other_message_its_event(
    db: Session,
    dovecot: Dovecot,
    mail_account: MailAccount,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
) -> None:
    account = mail_account()
    raws = [generated(index) for index in range(199)]
    raws.insert(100, MALFORMED)
    dovecot.write_maildir(account.username, raws)

    result = poll_account(account.id)
    after_poll(account.id, result.new_message_ids, result.account_event)

    assert len(result.new_message_ids) == 200
    delivered = _events(receiver)
    assert sorted(delivered) == sorted(result.new_message_ids)
    [bad] = [m for m in delivered.values() if m["from"] is None or "bad@" in m["from"]]
    # Handed on with what could be decoded: the other headers, the body, and the Subject
    # decoded or, where it could not be, as it was sent and named in decode_errors.
    assert _header(bad, "From") == "Bad Sender <bad@example.org>"
    assert bad["text"] == "the body is fine\r\n" or bad["parse_error"]
    subject = _header(bad, "Subject")
    assert subject == MALFORMED_SUBJECT or not bad["decode_errors"]
    assert bad["decode_errors"] == [] or bad["decode_errors"][0]["header"] == "Subject"
    assert {status for status, _ in _statuses(db).values()} == {"delivered"}


def test_a_header_that_cannot_be_decoded_goes_as_sent_and_is_named(
    db: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the decoder raises on one header, the event carries the others decoded."""
    account = make_account(db)
    message = store_message(db, account, 1)

    def failing(value: Any) -> str:
        text = decode(value)
        if text.startswith("Grüße"):
            raise HeaderParseError("Base64 decoding error")
        return text

    monkeypatch.setattr("backend.webhooks.events.decode_words", failing)
    data = events.message_data(message, account)["message"]

    assert data["decode_errors"] == [
        {"header": "Subject", "error": "HeaderParseError: Base64 decoding error"}
    ]
    assert _header(data, "Subject").startswith("=?utf-8?")  # as it was sent
    assert _header(data, "From") == "Zoë Sender <zoe@example.org>"
    assert data["subject"] == "Grüße 1"  # the parsed field, as ingestion kept it


def test_a_missing_object_costs_its_message_the_headers_only(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    account = make_account(db)
    messages = [store_message(db, account, uid) for uid in range(1, 11)]
    lost = messages[4]
    assert lost.storage_backend is not None and lost.storage_key is not None
    storage.delete_object(lost.storage_backend, lost.storage_key)

    hand_on([m.id for m in messages])

    delivered = _events(receiver)
    assert sorted(delivered) == [m.id for m in messages]
    assert delivered[lost.id]["headers"] == []
    assert "could not be read" in delivered[lost.id]["raw_error"]
    assert delivered[lost.id]["subject"] == "Grüße 5"
    assert all(delivered[m.id]["raw_error"] is None for m in messages if m is not lost)


def test_an_event_that_cannot_be_built_is_a_dead_letter_alone_with_its_reason(
    db: Session,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
    unreadable: set[str],
) -> None:
    account = make_account(db)
    messages = [store_message(db, account, uid) for uid in range(1, 21)]
    broken = messages[7]
    assert broken.storage_key is not None
    unreadable.add(broken.storage_key)

    hand_on([m.id for m in messages])

    assert sorted(_events(receiver)) == [m.id for m in messages if m is not broken]
    statuses = _statuses(db)
    status, reason = statuses.pop(broken.id)
    assert status == "dead"
    assert reason is not None
    assert reason.startswith("the event could not be built: OSError: [Errno 5]")
    assert {status for status, _ in statuses.values()} == {"delivered"}

    # Replayed once the disk is read again, it goes out like the others.
    unreadable.clear()
    delivery = db.scalars(
        select(WebhookDelivery).where(WebhookDelivery.message_id == broken.id)
    ).one()
    with_replay = webhooks.replay_dead_letters(db, delivery_id=delivery.id)
    db.commit()
    webhooks.dispatch(with_replay)
    assert broken.id in _events(receiver)


def test_the_sweep_sends_a_batch_with_a_bad_message_in_it(
    db: Session,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
    unreadable: set[str],
) -> None:
    """Lost work picked up by the sweep: deliveries whose task was lost, one of them an
    event that cannot be built, and messages never processed, one of them with a header
    that does not decode."""
    account = make_account(db)
    lost_deliveries = [store_message(db, account, uid) for uid in range(1, 11)]
    with_lost_task = [store_message(db, account, uid) for uid in range(11, 16)]
    bad = Message(
        account_id=account.id,
        folder="INBOX",
        uidvalidity=1,
        uid=16,
        size=len(MALFORMED),
        parse_error="HeaderParseError: Base64 decoding error",
        storage_key=message_key(account.id, "INBOX", 1, 16),
    )
    bad.storage_backend = storage.put_object(bad.storage_key or "", MALFORMED, "message/rfc822")
    db.add(bad)
    db.commit()
    with_lost_task.append(bad)
    process_batch(db, [m.id for m in lost_deliveries])  # committed, the worker then died
    db.commit()
    broken = lost_deliveries[3]
    assert broken.storage_key is not None
    unreadable.add(broken.storage_key)
    long_ago = utcnow() - timedelta(hours=1)
    db.execute(update(Message).values(ingested_at=long_ago))
    db.execute(update(WebhookDelivery).values(next_attempt_at=long_ago))
    db.commit()

    assert sweep() == {"messages": 6, "deliveries": 10}

    everyone = lost_deliveries + with_lost_task
    delivered = _events(receiver)
    assert sorted(delivered) == sorted(m.id for m in everyone if m is not broken)
    assert _header(delivered[bad.id], "From") == "Bad Sender <bad@example.org>"
    statuses = _statuses(db)
    assert statuses.pop(broken.id)[0] == "dead"
    assert {status for status, _ in statuses.values()} == {"delivered"}
    assert sweep() == {"messages": 0, "deliveries": 0}


def test_a_guessed_field_is_named_in_the_api_and_the_event(
    dovecot: Dovecot,
    mail_account: MailAccount,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
    set_env: Callable[..., None],
) -> None:
    """A Subject of raw GBK bytes (no RFC 2047, no charset anywhere in the message) is
    read in HEADER_FALLBACK_CHARSET, and the message says that its subject is a guess."""
    set_env(HEADER_FALLBACK_CHARSET="gb18030")
    account = mail_account()
    raw = (
        b"From: a@example.org\r\nTo: b@example.org\r\nSubject: "
        + "管理费用报告".encode("gbk")
        + b"\r\nMessage-ID: <gbk@example.org>\r\n\r\nplain ascii body\r\n"
    )
    dovecot.write_maildir(account.username, [raw, generated(1)])

    result = poll_account(account.id)
    after_poll(account.id, result.new_message_ids, result.account_event)

    delivered = _events(receiver)
    [guessed] = [m for m in delivered.values() if m["message_id"] == "<gbk@example.org>"]
    assert (guessed["subject"], guessed["decode_fallbacks"]) == ("管理费用报告", ["subject"])
    [other] = [m for m in delivered.values() if m is not guessed]
    assert other["decode_fallbacks"] == []
    with make_client(auth_headers()) as api:
        listed = api.get(f"/messages/{guessed['id']}").json()
    assert (listed["subject"], listed["decode_fallbacks"]) == ("管理费用报告", ["subject"])
