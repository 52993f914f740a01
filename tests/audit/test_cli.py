"""`accounts audit ID` and `audit --all | ID...`, run in this process."""

from __future__ import annotations

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session

from backend.mailbox.service import poll_account
from backend.models import Message
from tests.audit.conftest import Inbox
from tests.console.test_commands import cli, cli_json
from tests.support.webhooks import sample_email


def test_audit_commands(capsys: pytest.CaptureFixture[str], db: Session, inbox: Inbox) -> None:
    inbox.append(*(sample_email(n) for n in (1, 2, 3)))
    account_id = inbox.account().id
    assert poll_account(account_id).outcome == "success"
    db.execute(delete(Message).where(Message.account_id == account_id, Message.uid == 2))
    db.commit()

    [folder] = cli_json(capsys, "accounts", "audit", str(account_id))
    assert folder["account_id"] == account_id and folder["folder"] == "INBOX"
    assert (folder["server"], folder["missing"], folder["repaired"]) == (3, 1, 1)

    code, out, err = cli(capsys, "audit", "--all", "--deep")
    assert code == 0, err
    assert "audit [##############################] 1/1 100%" in err
    header, row = out.splitlines()
    assert header.split()[:3] == ["ACCOUNT", "FOLDER", "OUTCOME"]
    assert row.split()[:9] == [str(account_id), "INBOX", "complete", "3", "3", "3", "0", "0", "0"]

    code, _out, err = cli(capsys, "audit")
    assert code == 1 and "name account ids, or --all" in err
    code, _out, err = cli(capsys, "audit", "999999")
    assert code == 1 and "no such account: 999999" in err
    code, _out, err = cli(capsys, "accounts", "audit", "999999")
    assert code == 1 and "account 999999 does not exist" in err
