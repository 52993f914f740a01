"""Local mode end to end: no Redis, the in-process scheduler polls the Dovecot fixture."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend import crypto, dispatch
from backend.mailbox.polling import run_poll
from backend.main import local_housekeeping
from backend.models import Account, Message
from backend.schedules import service
from tests.mailbox.conftest import generated
from tests.schedules.processes import wait_for
from tests.support.dovecot import Dovecot
from tests.support.net import free_port


@pytest.fixture
def without_redis(set_env: Callable[..., None]) -> Iterator[None]:
    # Nothing listens there: SCHEDULER_MODE=auto must choose the local scheduler.
    set_env(
        SCHEDULER_MODE="auto",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        REDIS_SOCKET_TIMEOUT=1,
        MIN_POLL_INTERVAL_SECONDS=1,
    )
    yield
    service.stop_local_scheduler()


def _count(db: Session, account: Account) -> int:
    db.rollback()
    return int(
        db.scalar(select(func.count(Message.id)).where(Message.account_id == account.id)) or 0
    )


def test_local_mode_polls_without_redis(
    db: Session, dovecot: Dovecot, without_redis: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="backend.dispatch"):
        assert service.start_local_scheduler_if_needed(
            poll=run_poll, housekeeping=local_housekeeping
        )
    assert dispatch.mode() == "local"
    assert "cannot be reached" in caplog.text

    username = f"local-{uuid.uuid4().hex[:10]}"
    password = dovecot.add_user(username, "pw-local")
    account = Account(
        email=f"{username}@example.org",
        imap_host=dovecot.host,
        imap_port=dovecot.imap_port,
        imap_security="none",
        username=username,
        credentials_encrypted=crypto.encrypt_json({"password": password}),
        poll_interval_seconds=1,
    )
    db.add(account)
    db.commit()
    service.sync_account(account)  # as the accounts API does after its commit
    dovecot.append_many(username, [generated(index) for index in range(3)])

    wait_for(lambda: _count(db, account) == 3, "the first messages")
    dovecot.append_many(username, [generated(index) for index in range(3, 5)])
    wait_for(lambda: _count(db, account) == 5, "later messages")
    db.rollback()
    held = list(db.scalars(select(Message).where(Message.account_id == account.id)))
    assert len({message.uid for message in held}) == 5
    # Handed on in this process: no Celery.
    wait_for(lambda: all(m.processed_at for m in _refreshed(db, held)), "processing in process")

    [entry] = service.list_entries()
    assert (entry.account_id, entry.interval) == (account.id, 1)
    assert entry.last_run_at is not None

    # A poll on request runs here too.
    assert service.enqueue_poll(account.id)

    account.enabled = False
    db.commit()
    service.sync_account(account)
    assert service.list_entries() == []


def _refreshed(db: Session, messages: list[Message]) -> list[Message]:
    db.rollback()
    for message in messages:
        db.refresh(message)
    return messages
