from __future__ import annotations

import os
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.mailbox.parser import displayable
from backend.mailbox.service import poll_account
from backend.models import Attachment, Message
from backend.storage import service as storage
from tests.support.accounts import make_account
from tests.support.api import create_dovecot_account
from tests.support.dovecot import Dovecot


def mail(subject: str, *, attachment: tuple[str, bytes] | None = None) -> bytes:
    message = EmailMessage()
    message["From"] = "Alice <alice@example.com>"
    message["To"] = "bob@example.com"
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '-')}@example.com>"
    message.set_content("Hello,\r\nthis is the body.\r\n")
    if attachment is not None:
        name, data = attachment
        message.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return bytes(message)


@pytest.fixture
def polled(api: TestClient, dovecot: Dovecot, mail_user) -> tuple[int, str, list[int]]:
    """An account on Dovecot with three messages (the last with an attachment), polled."""
    user, password = mail_user
    uids = dovecot.append_many(user, [mail("first"), mail("second")])
    uids += [
        dovecot.append(
            user, mail("third", attachment=('re"port\r\n"; x=..\\..ö.pdf', b"%PDF-1.4 \x00\xff"))
        )
    ]
    account_id = create_dovecot_account(api, dovecot, user, password)
    result = poll_account(account_id)
    assert result.outcome == "success", result.error
    assert result.messages == 3
    return account_id, user, uids


def test_list_is_newest_first_and_paginated(api: TestClient, polled):
    account_id, _, _ = polled
    page = api.get(f"/accounts/{account_id}/messages").json()
    assert page["total"] == 3
    assert [m["subject"] for m in page["items"]] == ["third", "second", "first"]
    second_page = api.get(
        f"/accounts/{account_id}/messages", params={"limit": 2, "offset": 2}
    ).json()
    assert second_page["total"] == 3
    assert [m["subject"] for m in second_page["items"]] == ["first"]
    assert api.get(f"/accounts/{account_id}", params={}).json()["message_count"] == 3


def test_flags_and_deletion_on_the_server_show_in_the_api(
    api: TestClient, dovecot: Dovecot, polled
):
    account_id, user, uids = polled
    first = api.get(f"/accounts/{account_id}/messages").json()["items"][-1]
    assert (first["flags"], first["deleted_at"]) == ([], None)
    with dovecot.client(user) as client:
        client.select_folder("INBOX")
        client.add_flags([uids[0]], [b"\\Answered"])
        client.add_flags([uids[1]], [b"\\Deleted"])
        client.uid_expunge([uids[1]])
        client.logout()
    assert poll_account(account_id).outcome == "success"

    items = {m["uid"]: m for m in api.get(f"/accounts/{account_id}/messages").json()["items"]}
    assert items[uids[0]]["flags"] == ["\\Answered"]
    assert items[uids[0]]["deleted_at"] is None
    assert items[uids[1]]["deleted_at"] is not None
    one = api.get(f"/messages/{items[uids[1]]['id']}").json()
    assert one["deleted_at"] == items[uids[1]]["deleted_at"]


def test_list_of_an_unknown_account_is_404(api: TestClient):
    response = api.get("/accounts/31337/messages")
    assert response.status_code == 404
    assert response.json()["detail"] == "account 31337 does not exist"


def test_message_with_attachments(api: TestClient, polled):
    account_id, _, _ = polled
    newest = api.get(f"/accounts/{account_id}/messages", params={"limit": 1}).json()["items"][0]
    body = api.get(f"/messages/{newest['id']}").json()
    assert body["subject"] == "third"
    assert body["from_addr"].endswith("alice@example.com>")
    assert body["message_id"] == "<third@example.com>"
    assert body["storage_backend"] == "local"
    [attachment] = body["attachments"]
    assert attachment["size"] == len(b"%PDF-1.4 \x00\xff")
    assert attachment["content_type"] == "application/octet-stream"
    assert "storage_key" not in attachment


def test_raw_is_byte_identical_to_what_dovecot_holds(api: TestClient, dovecot: Dovecot, polled):
    account_id, user, uids = polled
    with dovecot.client(user) as client:
        client.select_folder("INBOX", readonly=True)
        held = {uid: data[b"BODY[]"] for uid, data in client.fetch(uids, ["BODY.PEEK[]"]).items()}
        client.logout()
    items = api.get(f"/accounts/{account_id}/messages").json()["items"]
    assert {m["uid"] for m in items} == set(uids)
    for item in items:
        response = api.get(f"/messages/{item['id']}/raw")
        assert response.status_code == 200
        assert response.headers["content-type"] == "message/rfc822"
        assert response.headers["content-disposition"] == (
            f'attachment; filename="message-{item["id"]}.eml"'
        )
        assert response.content == held[item["uid"]]


def test_attachment_download_has_a_safe_content_disposition(api: TestClient, polled):
    account_id, _, _ = polled
    newest = api.get(f"/accounts/{account_id}/messages", params={"limit": 1}).json()["items"][0]
    message = api.get(f"/messages/{newest['id']}").json()
    [attachment] = message["attachments"]
    response = api.get(f"/messages/{message['id']}/attachments/{attachment['id']}")
    assert response.status_code == 200
    assert response.content == b"%PDF-1.4 \x00\xff"
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-content-type-options"] == "nosniff"
    disposition = response.headers["content-disposition"]
    plain = disposition.split('filename="', 1)[1].split('"', 1)[0]
    assert all(c.isalnum() or c in "._ ()+-" for c in plain), disposition
    assert "\r" not in disposition and "\n" not in disposition
    encoded = disposition.split("filename*=UTF-8''", 1)[1]
    # The sender's name, without what would hide or reorder it (here its CR LF).
    assert unquote(encoded) == displayable(attachment["filename"])
    assert "\r" not in unquote(encoded)
    assert ";" not in encoded and '"' not in encoded

    other = api.get(f"/messages/{message['id']}/attachments/{attachment['id'] + 1000}")
    assert other.status_code == 404


def test_missing_message_body_and_object(api: TestClient, db: Session):
    account = make_account(db)
    skipped = Message(
        account_id=account.id,
        folder="INBOX",
        uidvalidity=1,
        uid=1,
        size=10**9,
        skipped_reason="larger than MAX_MESSAGE_BYTES",
    )
    lost = Message(
        account_id=account.id,
        folder="INBOX",
        uidvalidity=1,
        uid=2,
        storage_backend="local",
        storage_key="accounts/1/INBOX/1/2.eml",
    )
    db.add_all([skipped, lost])
    db.commit()
    response = api.get(f"/messages/{skipped.id}/raw")
    assert response.status_code == 404
    assert "larger than MAX_MESSAGE_BYTES" in response.json()["detail"]
    response = api.get(f"/messages/{lost.id}/raw")
    assert response.status_code == 404
    assert "missing from local storage" in response.json()["detail"]
    assert api.get("/messages/99999").status_code == 404
    assert api.get("/messages/99999/raw").status_code == 404


def test_empty_stored_object_downloads_empty(api: TestClient, db: Session):
    account = make_account(db)
    key = f"accounts/{account.id}/INBOX/1/1.eml"
    backend = storage.put_object(key, b"", "message/rfc822")
    message = Message(
        account_id=account.id,
        folder="INBOX",
        uidvalidity=1,
        uid=1,
        storage_backend=backend,
        storage_key=key,
    )
    db.add(message)
    db.commit()
    response = api.get(f"/messages/{message.id}/raw")
    assert response.status_code == 200
    assert response.content == b""


def _with_parts(subject: str, small: bytes, large: bytes) -> bytes:
    message = EmailMessage()
    message["From"] = "alice@example.com"
    message["To"] = "bob@example.com"
    message["Subject"] = subject
    message.set_content("Two files.\r\n")
    message.add_attachment(small, maintype="image", subtype="png", filename="small é.png")
    message.add_attachment(large, maintype="application", subtype="pdf", filename="large.pdf")
    return bytes(message)


def _download(api: TestClient, attachment: Attachment) -> tuple[bytes, str, str]:
    response = api.get(f"/messages/{attachment.message_id}/attachments/{attachment.id}")
    assert response.status_code == 200, response.text
    return (
        response.content,
        response.headers["content-type"],
        response.headers["content-disposition"],
    )


def test_small_attachments_live_in_the_raw_message_and_download_as_before(
    api: TestClient, db: Session, dovecot: Dovecot, mail_user, set_env
):
    """Below ATTACHMENT_INLINE_MAX_BYTES an attachment has no object of its own and is
    decoded from the raw message on request: the same bytes, type and name as a row
    stored before (with its own object), which still downloads from that object."""
    user, password = mail_user
    small, large = bytes(range(256)) * 3, os.urandom(5_000)
    account_id = create_dovecot_account(api, dovecot, user, password)
    set_env(ATTACHMENT_INLINE_MAX_BYTES=0)  # as every row was stored before
    dovecot.append(user, _with_parts("old", small, large))
    assert poll_account(account_id).messages == 1
    set_env(ATTACHMENT_INLINE_MAX_BYTES=1_000)
    dovecot.append(user, _with_parts("new", small, large))
    assert poll_account(account_id).messages == 1

    parts: dict[str, list[Attachment]] = {}
    for message in db.scalars(select(Message).where(Message.account_id == account_id)):
        parts[message.subject or ""] = sorted(message.attachments, key=lambda a: a.id)
    old_small, old_large = parts["old"]
    new_small, new_large = parts["new"]
    assert old_small.storage_key is not None and old_large.storage_key is not None
    assert (new_small.storage_backend, new_small.storage_key) == (None, None)
    assert new_large.storage_key is not None
    assert storage.get_object(new_large.storage_backend or "", new_large.storage_key) == large
    # The new message's only attachment object is the large one.
    assert [
        path.name
        for path in storage.local_storage().path_for(new_large.storage_key).parent.iterdir()
    ] == [Path(new_large.storage_key).name]
    assert (new_small.size, new_small.content_hash) == (old_small.size, old_small.content_hash)

    for old, new, data, content_type in (
        (old_small, new_small, small, "image/png"),
        (old_large, new_large, large, "application/pdf"),
    ):
        assert _download(api, old) == _download(api, new)
        content, served_type, disposition = _download(api, new)
        assert (content, served_type) == (data, content_type)
        assert quote(new.filename or "") in disposition

    # Listed the same way, with the same fields, whether an object or not.
    listed = api.get(f"/messages/{new_small.message_id}").json()["attachments"]
    assert [a["content_hash"] for a in listed] == [new_small.content_hash, new_large.content_hash]


def test_an_inline_attachment_whose_raw_message_is_lost_is_404(
    api: TestClient, db: Session, dovecot: Dovecot, mail_user
):
    user, password = mail_user
    dovecot.append(user, _with_parts("lost", b"tiny", os.urandom(2_000_000)))
    account_id = create_dovecot_account(api, dovecot, user, password)
    assert poll_account(account_id).messages == 1
    message = db.scalars(select(Message).where(Message.account_id == account_id)).one()
    small = next(a for a in message.attachments if a.storage_key is None)
    url = f"/messages/{message.id}/attachments/{small.id}"
    # Bytes that are not the ones the row describes: not served in their place.
    small.content_hash = "0" * 64
    db.commit()
    response = api.get(url)
    assert response.status_code == 404
    assert "no longer found" in response.json()["detail"]
    assert message.storage_key is not None
    storage.local_storage().path_for(message.storage_key).unlink()
    response = api.get(url)
    assert response.status_code == 404
    assert "missing from local storage" in response.json()["detail"]
