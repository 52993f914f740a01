from __future__ import annotations

import io
import logging
import os
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.accounts import service as accounts
from backend.models import AccountCleanup, Attachment, Message, utcnow
from backend.storage import service
from backend.storage.base import (
    ObjectNotFound,
    StorageError,
    account_prefix,
    attachment_key,
    message_key,
)
from tests.support.accounts import make_account
from tests.support.s3 import MotoS3, Outage


def _in_bucket(moto_s3: MotoS3, bucket: str, prefix: str = "") -> list[str]:
    listing = moto_s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


def test_without_s3_everything_is_local(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend.storage.service")
    assert service.put_object("a/1", b"one", "text/plain") == "local"
    assert service.put_object("a/2", io.BytesIO(b"two"), "text/plain") == "local"
    assert service.get_object("local", "a/1") == b"one"
    assert b"".join(service.iter_object("local", "a/2")) == b"two"
    said = [r for r in caplog.records if "not configured" in r.getMessage()]
    assert len(said) == 1
    assert service.health() == (True, "local files (object storage not configured)")
    with pytest.raises(StorageError):
        service.get_object("s3", "a/1")


def test_with_s3_objects_go_to_the_bucket(s3_bucket: str, moto_s3: MotoS3) -> None:
    key = message_key(1, "INBOX", 9, 1)
    assert service.put_object(key, b"raw", "message/rfc822") == "s3"
    assert _in_bucket(moto_s3, s3_bucket) == [key]
    assert list(service.local_storage().keys()) == []
    assert service.get_object("s3", key) == b"raw"
    data = os.urandom(150_000)
    assert service.put_object("big", io.BytesIO(data), "application/octet-stream") == "s3"
    assert b"".join(service.iter_object("s3", "big")) == data
    service.delete_object("s3", key)
    with pytest.raises(ObjectNotFound):
        service.get_object("s3", key)
    chunks = service.iter_object("s3", key)  # asks nothing yet
    with pytest.raises(ObjectNotFound):
        next(chunks)
    ok, detail = service.health()
    assert ok
    assert detail == f"S3 bucket {s3_bucket}"


def test_missing_bucket_falls_back_to_local(set_env, moto_s3: MotoS3) -> None:
    set_env(S3_ENDPOINT_URL=moto_s3.endpoint_url, S3_BUCKET="never-created")
    assert service.put_object("k", b"kept", "text/plain") == "local"
    assert service.get_object("local", "k") == b"kept"
    ok, detail = service.health()
    assert not ok
    assert "never-created" in detail


def test_unseekable_stream_survives_a_failed_upload(s3_outage: Outage) -> None:
    s3_outage.begin()
    read, write = os.pipe()
    os.write(write, b"from a pipe")
    os.close(write)
    with os.fdopen(read, "rb", buffering=0) as pipe:
        assert service.put_object("p", pipe, "text/plain") == "local"
    assert service.get_object("local", "p") == b"from a pipe"


def test_stream_is_rewound_for_the_local_copy(set_env, s3_outage: Outage) -> None:
    set_env(S3_RETRY_AFTER_SECONDS=0)  # every put tries S3 first
    s3_outage.begin()
    stream = io.BytesIO(b"header|payload of a large message")
    stream.seek(7)
    assert service.put_object("s", stream, "text/plain") == "local"
    assert service.get_object("local", "s") == b"payload of a large message"


def test_s3_down_then_back(db: Session, s3_outage: Outage, moto_s3: MotoS3) -> None:
    account = make_account(db, commit=False)
    stored: dict[str, bytes] = {}

    def ingest(uid: int) -> Message:
        key = message_key(account.id, "INBOX", 5, uid)
        raw = f"message {uid}".encode()
        message = Message(account_id=account.id, folder="INBOX", uidvalidity=5, uid=uid)
        message.storage_key = key
        message.storage_backend = service.put_object(key, raw, "message/rfc822")
        stored[key] = raw
        db.add(message)
        db.flush()
        akey = attachment_key(account.id, "INBOX", 5, uid, index=0, safe_name="a.pdf")
        attachment = Attachment(
            message_id=message.id,
            safe_name="a.pdf",
            content_type="application/pdf",
            size=3,
            content_hash="0" * 64,
            storage_key=akey,
            storage_backend=service.put_object(akey, b"pdf", "application/pdf"),
        )
        stored[akey] = b"pdf"
        db.add(attachment)
        db.commit()
        return message

    assert ingest(1).storage_backend == "s3"
    s3_outage.begin()
    fallen = [ingest(uid) for uid in range(2, 6)]
    assert {m.storage_backend for m in fallen} == {"local"}
    assert {a.storage_backend for m in fallen for a in m.attachments} == {"local"}
    for message in fallen:
        assert message.storage_key is not None
        assert service.get_object("local", message.storage_key) == stored[message.storage_key]
    assert not service.health()[0]
    # S3 still down: the sync leaves everything where it is.
    progress = service.sync_fallback_objects(db)
    db.commit()
    assert (progress.moved, progress.failed, progress.done) == (0, 1, True)
    assert len(list(service.local_storage().keys())) == 8

    s3_outage.end()  # moto forgets everything: the bucket is new and empty
    # Within the retry window writes still go to local files, without waiting on S3.
    assert ingest(6).storage_backend == "local"
    ok, detail = service.health()
    assert ok
    assert "answers; writes go to local files" in detail
    from backend.storage.tasks import sync_all

    assert sync_all() == {"moved": 10, "missing": 0, "failed": 0}
    db.expire_all()
    for message in fallen:
        assert message.storage_backend == "s3"
        assert {a.storage_backend for a in message.attachments} == {"s3"}
    assert list(service.local_storage().keys()) == []
    first = message_key(account.id, "INBOX", 5, 1)
    moved = {key for key in stored if not key.startswith(first.removesuffix(".eml"))}
    assert len(moved) == 10
    assert set(_in_bucket(moto_s3, s3_outage.bucket)) == moved
    for key in moved:
        assert service.get_object("s3", key) == stored[key]
    # A sync that succeeded closes the retry window.
    assert ingest(7).storage_backend == "s3"
    assert service.health() == (True, f"S3 bucket {s3_outage.bucket}")


def test_delete_prefix_empties_both_backends(db: Session, s3_bucket: str, moto_s3: MotoS3) -> None:
    gone, kept = make_account(db, commit=False), make_account(db, commit=False)
    db.commit()
    for account in (gone, kept):
        for uid in range(3):
            key = message_key(account.id, "INBOX", 1, uid)
            assert service.put_object(key, b"in s3", "message/rfc822") == "s3"
            # As if S3 had failed for some of them.
            service.local_storage().put(f"{key}.local", b"local", "message/rfc822")
    assert service.delete_prefix(account_prefix(gone.id)) == 6
    assert _in_bucket(moto_s3, s3_bucket, account_prefix(gone.id)) == []
    assert list(service.local_storage().keys(account_prefix(gone.id))) == []
    assert len(_in_bucket(moto_s3, s3_bucket, account_prefix(kept.id))) == 3
    assert len(list(service.local_storage().keys(account_prefix(kept.id)))) == 3
    with pytest.raises(StorageError):
        service.delete_prefix("/")


def test_delete_prefix_with_s3_down_deletes_nothing(s3_outage: Outage) -> None:
    """S3 goes first: when it fails the local files stay too, and the delete is repeated."""
    service.local_storage().put("accounts/1/x", b"x", "text/plain")
    s3_outage.begin()
    with pytest.raises(StorageError):
        service.delete_prefix(account_prefix(1))
    assert list(service.local_storage().keys()) == ["accounts/1/x"]
    s3_outage.end()
    assert service.delete_prefix(account_prefix(1)) == 1
    assert list(service.local_storage().keys()) == []


def test_a_deletion_cut_short_is_finished_by_the_sweep(db: Session) -> None:
    """The process died after committing the deletion, before deleting the objects; and a
    poll that was running then wrote one more object afterwards."""
    account = make_account(db, commit=False)
    key = message_key(account.id, "INBOX", 1, 1)
    assert service.put_object(key, b"raw", "message/rfc822") == "local"
    accounts.delete_account(db, account)
    db.commit()  # ...and the process dies here

    assert service.purge_deleted_accounts(db) == 1
    db.commit()
    service.put_object(message_key(account.id, "INBOX", 1, 2), b"late", "message/rfc822")
    assert service.purge_deleted_accounts(db) == 1  # the record outlives running polls
    db.commit()
    assert list(service.local_storage().keys()) == []

    cleanup = db.scalar(select(AccountCleanup))
    assert cleanup is not None
    cleanup.deleted_at = utcnow() - timedelta(hours=1)  # past every poll's time limit
    db.commit()
    assert service.purge_deleted_accounts(db) == 0
    db.commit()
    assert db.scalar(select(AccountCleanup)) is None
