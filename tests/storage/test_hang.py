"""An S3 that accepts connections and never answers (moto frozen with SIGSTOP): writes
fall back to local files after seconds, one process's discovery spares the others, and
nothing is lost once S3 answers again."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.mailbox.service import poll_account
from backend.models import Message
from backend.storage import service
from backend.storage.base import message_key
from backend.storage.tasks import sync_all
from tests.support.accounts import MailAccount, make_account
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.net import free_port
from tests.support.s3 import MotoS3, Outage

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")
# A second process (another worker) writing while S3 hangs.
OTHER_PROCESS = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from backend.storage import service
print(service.put_object(sys.argv[1], b"from the other process", "message/rfc822"))
"""


@pytest.fixture
def frozen(moto_s3: MotoS3, s3_bucket: str) -> Iterator[MotoS3]:
    """The moto server, writes going to its bucket, to freeze."""
    yield moto_s3
    moto_s3.thaw()  # the server is shared by the session


def _put_within(seconds: float, put: Callable[[], T]) -> T:
    """The put's result; fails if it is still waiting after `seconds` (it used to wait
    read timeout x attempts, 90 s by default)."""
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(put()), daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert result, f"the write was still waiting on S3 after {seconds}s"
    return result[0]


def test_a_hung_s3_costs_seconds_once_and_loses_nothing(
    db: Session, s3_bucket: str, frozen: MotoS3, set_env: Callable[..., None]
) -> None:
    set_env(S3_WRITE_TIMEOUT_SECONDS=2)
    account = make_account(db, commit=False)
    raws = {message_key(account.id, "INBOX", 5, uid): f"message {uid}".encode() for uid in (1, 2)}
    first, second = raws
    assert service.put_object(message_key(account.id, "INBOX", 5, 0), b"before", "x/y") == "s3"

    frozen.freeze()
    assert _put_within(20, lambda: service.put_object(first, raws[first], "x/y")) == "local"
    other = subprocess.run(
        [sys.executable, "-c", OTHER_PROCESS, second],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=60,
        check=True,
    )
    # The other process did not try S3 at all: the breaker was open in Redis.
    assert other.stdout.split() == [b"local"], other.stderr
    assert b"another process found S3 failing" in other.stderr, other.stderr
    assert b"S3 write failed" not in other.stderr
    raws[second] = b"from the other process"
    for key in raws:
        db.add(
            Message(
                account_id=account.id,
                folder="INBOX",
                uidvalidity=5,
                uid=int(key.rsplit("/", 1)[1].removesuffix(".eml")),
                storage_backend="local",
                storage_key=key,
            )
        )
    db.commit()

    frozen.thaw()
    assert sync_all() == {"moved": 2, "missing": 0, "failed": 0}
    for key, raw in raws.items():
        assert service.get_object("s3", key) == raw
    assert list(service.local_storage().keys()) == []
    assert service.put_object(message_key(account.id, "INBOX", 5, 3), b"after", "x/y") == "s3"


def test_with_redis_down_the_breaker_stays_per_process(
    db: Session, s3_outage: Outage, set_env: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    set_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    s3_outage.begin()
    assert service.put_object("a/1", b"one", "x/y") == "local"
    assert service.put_object("a/2", b"two", "x/y") == "local"
    said = [record.getMessage() for record in caplog.records]
    assert sum("S3 write failed" in text for text in said) == 1  # the second skipped S3
    assert any("Redis does not answer" in text for text in said)


def test_a_first_sync_through_a_hung_s3_keeps_everything_on_local_files(
    db: Session,
    dovecot: Dovecot,
    mail_account: MailAccount,
    frozen: MotoS3,
    set_env: Callable[..., None],
) -> None:
    """The batch's rows, inserted naming S3 while its writes hang, say where the objects
    went once the writes have fallen back to local files: nothing points into the
    bucket, and the poll ends within the write timeout, not S3's."""
    set_env(S3_WRITE_TIMEOUT_SECONDS=2, ATTACHMENT_INLINE_MAX_BYTES=20)
    account = mail_account()
    dovecot.append_many(account.username, [generated(i, attachment=b"%PDF-" * 8) for i in range(6)])
    frozen.freeze()

    result = _put_within(60, lambda: poll_account(account.id))

    assert (result.outcome, result.messages) == ("success", 6)
    db.expire_all()
    rows = list(db.scalars(select(Message).where(Message.account_id == account.id)))
    objects = [(m.storage_backend, m.storage_key) for m in rows] + [
        (a.storage_backend, a.storage_key) for m in rows for a in m.attachments
    ]
    assert len(objects) == 12 and {backend for backend, _key in objects} == {"local"}
    for _backend, key in objects:
        assert key is not None and service.local_storage().exists(key)
