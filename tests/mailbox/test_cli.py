"""`python -m backend.cli poll ACCOUNT_ID`: a poll without Celery, handed on in-process."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.cli import main
from backend.models import Message
from tests.mailbox.conftest import MakeAccount, generated
from tests.support.dovecot import Dovecot


def test_poll_command(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    make_account: MakeAccount,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dovecot.append_many(mail_user[0], [generated(1), generated(2)])
    account = make_account()
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

    account_with_bad_password = make_account(
        username=mail_user[0],
        credentials={"password": "no"},
        email="other@example.org",
        imap_host="localhost",
    )
    with pytest.raises(SystemExit) as failed:
        main(["poll", str(account_with_bad_password.id)])
    assert failed.value.code == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outcome"] == "auth_error"
