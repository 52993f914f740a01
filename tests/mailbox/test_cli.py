"""`python -m backend.cli poll ACCOUNT_ID`: a poll without Celery, handed on in-process."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.cli import main
from backend.mailbox.lock import MailboxLock
from backend.models import Message, PollRun
from backend.schedules import service as schedules
from tests.support.accounts import MailAccount
from tests.support.dovecot import Dovecot
from tests.support.mail import generated


def test_poll_command(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dovecot.append_many(mail_user[0], [generated(1), generated(2)])
    account = mail_account()
    with pytest.raises(SystemExit) as exit_info:
        main(["poll", str(account.id)])
    assert exit_info.value.code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["outcome"], summary["messages"], summary["error"]) == ("success", 2, None)
    processed = list(
        db.scalars(select(Message.processed_at).where(Message.account_id == account.id))
    )
    assert len(processed) == 2
    assert None not in processed  # handed on in-process

    account_with_bad_password = mail_account(
        username=mail_user[0],
        credentials={"password": "no"},
        email="other@example.org",
        imap_host="localhost",
    )
    with pytest.raises(SystemExit) as failed:
        main(["poll", str(account_with_bad_password.id)])
    assert failed.value.code == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outcome"] == "auth_error"


def _last_line(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    return dict(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))


def test_poll_command_respects_the_lock_and_a_disabled_account(
    db: Session, mail_account: MailAccount, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same wrap-up as a scheduled poll: a mailbox another poll holds is left alone,
    and a disabled account is not polled (its stale schedule entry goes)."""
    account = mail_account()
    holder = MailboxLock(account.id)
    assert holder.acquire()
    with pytest.raises(SystemExit) as locked:
        main(["poll", str(account.id)])
    assert locked.value.code == 1
    assert _last_line(capsys)["outcome"] == "locked"
    [run] = db.scalars(select(PollRun).where(PollRun.account_id == account.id)).all()
    assert (run.outcome, run.error) == ("skipped", "another poll of this mailbox is running")
    assert holder.release()

    schedules.sync_account(account)
    account.enabled = False
    db.commit()
    with pytest.raises(SystemExit) as stale:
        main(["poll", str(account.id)])
    assert stale.value.code == 1
    assert _last_line(capsys)["outcome"] == "stale"
    assert schedules.list_entries() == []
    assert len(db.scalars(select(PollRun)).all()) == 1  # no second run recorded
