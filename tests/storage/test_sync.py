"""storage.sync: objects that fell back to local files go up to S3 once it answers."""

from __future__ import annotations

from sqlalchemy.orm import Session

from backend.models import Message
from backend.storage import service
from backend.storage.base import message_key
from tests.support.accounts import make_account


def _fallback_messages(db: Session, count: int) -> list[Message]:
    account = make_account(db, commit=False)
    messages = []
    for uid in range(count):
        key = message_key(account.id, "INBOX", 1, uid)
        service.local_storage().put(key, f"m{uid}".encode(), "message/rfc822")
        message = Message(
            account_id=account.id,
            folder="INBOX",
            uidvalidity=1,
            uid=uid,
            storage_backend="local",
            storage_key=key,
        )
        db.add(message)
        messages.append(message)
    db.commit()
    return messages


def test_sync_goes_in_committed_batches(db: Session, s3_bucket: str) -> None:
    messages = _fallback_messages(db, 5)
    progress = service.SyncProgress()
    calls = 0
    while not progress.done:
        with Session(db.get_bind()) as session:
            service.sync_fallback_objects(session, progress, batch_size=2)
            session.commit()
        calls += 1
    assert calls == 3
    assert progress.as_dict() == {"moved": 5, "missing": 0, "failed": 0}
    for message in messages:
        db.refresh(message)
        assert message.storage_backend == "s3"
        assert message.storage_key is not None
        assert service.get_object("s3", message.storage_key) == f"m{message.uid}".encode()
    assert list(service.local_storage().keys()) == []


def test_object_in_no_backend_is_counted_not_retried_forever(db: Session, s3_bucket: str) -> None:
    lost, kept = _fallback_messages(db, 2)
    assert lost.storage_key is not None
    service.local_storage().delete(lost.storage_key)
    progress = service.sync_fallback_objects(db, batch_size=1)
    progress = service.sync_fallback_objects(db, progress, batch_size=1)
    db.commit()
    assert progress.as_dict() == {"moved": 1, "missing": 1, "failed": 0}
    assert (lost.storage_backend, kept.storage_backend) == ("local", "s3")
    progress = service.sync_fallback_objects(db, progress, batch_size=1)
    assert progress.done


def test_moved_but_not_recorded_is_found_and_recorded(db: Session, s3_bucket: str) -> None:
    """A run that moved an object and then failed to commit: reads still find it, and the
    next run records where it is."""
    (message,) = _fallback_messages(db, 1)
    key = message.storage_key
    assert key is not None
    service.backend("s3").put(key, b"m0", "message/rfc822")
    service.local_storage().delete(key)
    assert service.get_object("local", key) == b"m0"
    assert b"".join(service.iter_object("local", key)) == b"m0"
    assert service.sync_fallback_objects(db).as_dict()["moved"] == 1
    db.commit()
    assert message.storage_backend == "s3"


def test_without_s3_there_is_nothing_to_sync(db: Session) -> None:
    (message,) = _fallback_messages(db, 1)
    progress = service.sync_fallback_objects(db)
    assert progress.done
    assert progress.as_dict() == {"moved": 0, "missing": 0, "failed": 0}
    assert message.storage_backend == "local"


def test_the_task_is_registered_and_scheduled() -> None:
    from backend.celery_app import app
    from backend.config import get_settings

    app.loader.import_default_modules()
    assert "storage.sync" in app.tasks
    entry = app.conf.beat_schedule["storage-sync"]
    assert entry["task"] == "storage.sync"
    assert entry["schedule"] == get_settings().storage_sync_interval_seconds


def test_two_runs_never_move_the_same_rows(db: Session, s3_bucket: str) -> None:
    _fallback_messages(db, 2)
    with Session(db.get_bind()) as first, Session(db.get_bind()) as second:
        assert service.sync_fallback_objects(first).moved == 2
        # The first run's rows stay locked until it commits: the second skips them.
        assert service.sync_fallback_objects(second).as_dict()["moved"] == 0
        first.commit()
        second.commit()
