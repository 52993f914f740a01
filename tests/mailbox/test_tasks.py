"""The `mailbox.poll` task body, run in this process (tests/e2e runs it in workers)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.mailbox.lock import MailboxLock
from backend.mailbox.tasks import poll
from backend.models import AccountStatus, Message, PollRun
from backend.schedules import service
from tests.support.accounts import MailAccount
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.redis_db import RedisDb


def _entry_ids() -> set[int]:
    return {entry.account_id for entry in service.list_entries()}


@pytest.fixture
def celery_mode(set_env: Callable[..., None]) -> None:
    """Pinned: under SCHEDULER_MODE=auto a Redis PING slower than its timeout (a loaded
    machine) picks the local mode, which runs the hand-on in this process and leaves the
    workflow queue empty."""
    set_env(SCHEDULER_MODE="celery")


@pytest.mark.usefixtures("celery_mode")
def test_polls_and_hands_on(
    db: Session,
    redis_db: RedisDb,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
) -> None:
    dovecot.append_many(mail_user[0], [generated(index) for index in range(3)])
    account = mail_account()
    service.sync_account(account)

    assert poll.apply(args=[account.id]).get() == "success"

    ids = db.scalars(select(Message.id).where(Message.account_id == account.id)).all()
    assert len(ids) == 3
    # The poll's new messages went to the workflow queue as one batch.
    (body,) = redis_db.client().lrange("workflow", 0, -1)
    headers = json.loads(body)["headers"]
    assert headers["task"] == "message.process"
    assert sorted(json.loads(headers["argsrepr"])[0]) == sorted(ids)
    assert _entry_ids() == {account.id}


def test_a_deleted_or_disabled_account_loses_its_stale_entry(
    db: Session, mail_account: MailAccount
) -> None:
    account = mail_account()
    service.sync_account(account)
    account.enabled = False
    db.commit()  # as if the removal after this commit had failed
    assert _entry_ids() == {account.id}

    assert poll.apply(args=[account.id]).get() == "stale"
    assert _entry_ids() == set()
    assert db.scalars(select(PollRun)).all() == []
    assert poll.apply(args=[account.id + 1000]).get() == "stale"


def test_skips_politely_when_another_poll_holds_the_mailbox(
    db: Session, mail_account: MailAccount
) -> None:
    account = mail_account()
    holder = MailboxLock(account.id)
    assert holder.acquire()

    result = poll.apply(args=[account.id])

    assert result.get() == "locked"
    [run] = db.scalars(select(PollRun).where(PollRun.account_id == account.id)).all()
    assert run.outcome == "skipped"
    assert run.task_id == result.id
    assert run.error == "another poll of this mailbox is running"
    assert holder.release()  # the skipped poll left the holder's lock alone


def test_a_poll_that_disables_the_account_removes_its_entry(
    db: Session, set_env: Callable[..., None], mail_account: MailAccount
) -> None:
    set_env(MAX_CONSECUTIVE_FAILURES=1)
    account = mail_account(credentials={"password": "wrong"})
    service.sync_account(account)

    assert poll.apply(args=[account.id]).get() == "auth_error"

    db.refresh(account)
    assert (account.enabled, account.status) == (False, "disabled")
    assert account.disabled_reason
    assert _entry_ids() == set()
    # Re-enabled (the accounts API does this, then syncs): the entry is back.
    account.enabled, account.status = True, AccountStatus.ACTIVE
    db.commit()
    service.sync_account(account)
    assert _entry_ids() == {account.id}
