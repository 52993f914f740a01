"""`python -m backend.cli` operator commands, run in this process against the test bed
(real PostgreSQL, Redis and Dovecot)."""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from backend.cli import main
from backend.console.commands import ProgressBar
from backend.models import Account, Message, WebhookDelivery
from backend.processing import reparse
from backend.processing.service import hand_on
from backend.schedules import service as schedules
from tests.support.accounts import make_account
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.receiver import SECRET, Receiver
from tests.support.webhooks import store_message


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run one command: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    out, err = capsys.readouterr()
    code = done.value.code
    return (code if isinstance(code, int) else 1), out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def mailbox(dovecot: Dovecot) -> tuple[str, str]:
    user = f"cli-{uuid.uuid4().hex[:8]}"
    password = dovecot.add_user(user, "pw-cli")
    dovecot.append_many(user, [generated(index) for index in range(3)])
    return user, password


def add(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    dovecot: Dovecot,
    user: str,
    password: str,
    *extra: str,
) -> dict[str, Any]:
    monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
    return dict(
        cli_json(
            capsys,
            "accounts",
            "add",
            "--email",
            f"{user}@example.org",
            "--host",
            dovecot.host,
            "--port",
            str(dovecot.imap_port),
            "--security",
            "none",
            "--username",
            user,
            "--password-stdin",
            *extra,
        )
    )


def test_accounts_add_list_show_test_poll(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    dovecot: Dovecot,
    mailbox: tuple[str, str],
    db: Session,
):
    user, password = mailbox
    added = add(capsys, monkeypatch, dovecot, user, password, "--interval", "600")
    assert (added["email"], added["status"], added["poll_interval_seconds"]) == (
        f"{user}@example.org",
        "active",
        600,
    )
    assert password not in json.dumps(added)
    assert [e.account_id for e in schedules.list_entries()] == [added["id"]]
    account_id = str(added["id"])

    code, out, _ = cli(capsys, "accounts", "list")
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["ID", "MAILBOX", "STATUS"]
    assert f"{user}@example.org" in out and "never" in out
    assert [a["id"] for a in cli_json(capsys, "accounts", "list", "--status", "active")] == [
        added["id"]
    ]
    assert cli_json(capsys, "accounts", "list", "--status", "error") == []

    code, out, _ = cli(capsys, "accounts", "test", account_id)
    assert (code, out.splitlines()[0]) == (0, "ok: login and folders work")
    assert "INBOX: 3 messages" in out

    code, out, err = cli(capsys, "accounts", "poll", account_id)
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["messages"] == 3
    # The progress the poll reports, batch by batch (one batch of 3 here).
    assert [line for line in err.splitlines() if line.startswith("poll ")] == [
        f"poll {account_id} [{'.' * 30}] 0/3 0%",
        f"poll {account_id} [{'#' * 30}] 3/3 100%",
    ]
    assert db.scalar(select(func.count(Message.id))) == 3

    shown = cli_json(capsys, "accounts", "show", account_id)
    assert shown["message_count"] == 3
    assert shown["folders_state"][0]["name"] == "INBOX"
    assert shown["folders_state"][0]["last_uid"] == 3
    assert shown["poll_runs"][0]["outcome"] == "success"
    code, out, _ = cli(capsys, "accounts", "show", account_id)
    assert "recent polls:" in out and "success" in out

    # A wrong password: test says where it failed, with exit status 1.
    wrong = add(capsys, monkeypatch, dovecot, f"{user}-x", "nope", "--disabled")
    assert wrong["status"] == "disabled"
    dovecot.add_user(f"{user}-x", "the-right-one")
    code, out, _ = cli(capsys, "accounts", "test", str(wrong["id"]))
    assert code == 1
    assert out.startswith("failed at auth: ")


def test_accounts_add_says_what_is_wrong(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    code, _, err = cli(
        capsys,
        "accounts",
        "add",
        "--email",
        "not-an-address",
        "--host",
        "imap.example.com",
        "--password-stdin",
        "--interval",
        "1",
    )
    assert code == 1
    assert "invalid account:" in err
    assert "email: Value error, must be an email address" in err
    assert "poll_interval_seconds: Value error, must be at least 10 seconds" in err
    assert "Traceback" not in err

    code, _, err = cli(capsys, "accounts", "show", "424242")
    assert (code, err.strip()) == (1, "mailbeat: account 424242 does not exist")


def test_accounts_enable_disable_delete(capsys: pytest.CaptureFixture[str], db: Session):
    account = make_account(db, email="toggle@example.org")
    account_id = str(account.id)
    assert cli_json(capsys, "accounts", "disable", account_id)["status"] == "disabled"
    assert schedules.list_entries() == []
    code, out, _ = cli(capsys, "accounts", "enable", account_id)
    assert (code, out.strip()) == (0, f"account {account_id} (toggle@example.org): active")
    assert [e.account_id for e in schedules.list_entries()] == [account.id]

    # Not at a terminal, delete needs --yes.
    code, _, err = cli(capsys, "accounts", "delete", account_id)
    assert code == 1 and "add --yes" in err
    code, out, _ = cli(capsys, "accounts", "delete", account_id, "--yes")
    assert (code, out.strip()) == (0, f"deleted account {account_id} (toggle@example.org)")
    db.rollback()
    assert db.scalar(select(func.count(Account.id))) == 0
    assert schedules.list_entries() == []


def test_status_and_schedules(capsys: pytest.CaptureFixture[str], db: Session):
    make_account(db, email="ok@example.org")
    make_account(db, email="bad@example.org", status="error", last_error="authentication failed")
    make_account(db, email="off@example.org", enabled=False, status="disabled")

    assert cli_json(capsys, "schedules", "sync") == {
        "created": 2,
        "updated": 0,
        "deleted": 0,
        "unchanged": 0,
    }
    code, out, _ = cli(capsys, "schedules", "sync")
    assert out.strip() == "0 created, 0 updated, 0 deleted, 2 unchanged"
    listed = cli_json(capsys, "schedules", "list")
    assert (listed["mode"], listed["total"]) == ("celery", 2)
    code, out, _ = cli(capsys, "schedules", "list")
    assert out.startswith("mode: celery, 2 entries")

    data = cli_json(capsys, "status")
    assert data["mailboxes"] == {"active": 1, "error": 1, "disabled": 1}
    assert data["queue_length"] == 0
    assert data["workers"] == []  # no worker runs in this test
    assert [f["email"] for f in data["failing"]] == ["bad@example.org", "off@example.org"]
    code, out, _ = cli(capsys, "status")
    assert code == 0
    assert "mailboxes:  1 active, 1 error, 1 disabled (3 in all)" in out
    assert "authentication failed" in out


def test_dead_letters_list_and_replay(
    capsys: pytest.CaptureFixture[str],
    db: Session,
    receiver: Receiver,
    set_env: Any,
):
    set_env(WEBHOOK_URL=receiver.url, WEBHOOK_SECRET=SECRET, SCHEDULER_MODE="local")
    account = make_account(db)
    dead = []
    for index in range(2):
        delivery = WebhookDelivery(
            event_id=f"evt_{uuid.uuid4().hex}",
            event_type="account.error",
            dedupe_key=f"account.error:{account.id}:{index}",
            target="global",
            account_id=account.id,
            data={"account_id": account.id},
            url=receiver.url,
            status="dead",
            attempts=8,
            last_status_code=500,
            last_error="the receiver answered 500",
        )
        db.add(delivery)
        dead.append(delivery)
    db.commit()

    listed = cli_json(capsys, "dead-letters", "list", "--account", str(account.id))
    assert listed["total"] == 2
    code, out, _ = cli(capsys, "dead-letters", "list")
    assert out.startswith("2 dead letters") and "the receiver answered 500" in out

    code, out, _ = cli(capsys, "dead-letters", "replay", str(dead[0].id))
    assert (code, out.strip()) == (0, f"replayed 1: {dead[0].id}")
    assert cli_json(capsys, "dead-letters", "replay", "--account", str(account.id)) == {
        "replayed": 1,
        "delivery_ids": [dead[1].id],
    }
    assert sorted(receiver.event_ids()) == sorted(d.event_id for d in dead)
    assert cli_json(capsys, "dead-letters", "list")["total"] == 0
    code, _, err = cli(capsys, "dead-letters", "replay")
    assert code == 1 and "name dead letter ids" in err

    # Every dead letter, whatever its account.
    db.execute(update(WebhookDelivery).values(status="dead"))
    db.commit()
    assert cli_json(capsys, "dead-letters", "replay", "--all")["replayed"] == 2
    assert len(receiver.event_ids()) == 4


def test_backfill_with_progress(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    dovecot: Dovecot,
    mailbox: tuple[str, str],
    set_env: Any,
):
    set_env(SCHEDULER_MODE="local")
    user, password = mailbox
    dovecot.create_folder(user, "Archive")
    added = add(capsys, monkeypatch, dovecot, user, password, "--folders", "INBOX,Archive")
    account_id = str(added["id"])

    code, out, err = cli(capsys, "backfill", account_id, "--dry-run")
    assert code == 0, err
    assert "dry run: nothing fetched or sent" in out
    assert err.splitlines() == [
        f"backfill {account_id} [{'.' * 30}] 0/2 0%",
        f"backfill {account_id} [{'#' * 15}{'.' * 15}] 1/2 50%",
        f"backfill {account_id} [{'#' * 30}] 2/2 100%",
    ]
    result = cli_json(capsys, "backfill", account_id, "--folder", "INBOX")
    assert [(f["folder"], f["missing"], f["stored"]) for f in result["folders"]] == [
        ("INBOX", 3, 3)
    ]
    assert len(result["stored_message_ids"]) == 3


def test_messages_reparse_with_progress(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    db: Session,
    receiver: Receiver,
    set_env: Any,
):
    set_env(WEBHOOK_URL=receiver.url, WEBHOOK_SECRET=SECRET, SCHEDULER_MODE="local")
    monkeypatch.setattr(reparse, "PAGE", 2)
    account = make_account(db)
    ids = [store_message(db, account, uid).id for uid in range(1, 4)]
    hand_on(ids)
    db.execute(update(Message).where(Message.id != ids[1]).values(subject="Gr\ufffd\ufffde"))
    db.commit()

    code, out, err = cli(capsys, "messages", "reparse", "--account", str(account.id))

    assert code == 0, err
    assert err.splitlines() == [
        f"reparse account {account.id} [{'.' * 30}] 0/3 0%",
        f"reparse account {account.id} [{'#' * 20}{'.' * 10}] 2/3 66%",
        f"reparse account {account.id} [{'#' * 30}] 3/3 100%",
    ]
    assert out.splitlines()[1].split() == ["3", "2", "0", "0", "0"]
    db.expire_all()
    assert db.scalars(select(Message.subject).order_by(Message.id)).all() == [
        f"Grüße {uid}" for uid in range(1, 4)
    ]
    assert len(receiver.delivered()) == 3  # the message.received events only

    db.execute(update(Message).where(Message.id == ids[0]).values(to_addrs=[]))
    db.commit()
    result = cli_json(capsys, "messages", "reparse", "--all", "--notify")
    assert result == {
        "reparsed": 3,
        "changed": 1,
        "attachments_kept": 0,
        "notified": 1,
        "unreadable": [],
    }
    assert receiver.delivered()[-1].json()["type"] == "message.reparsed"
    code, _, err = cli(capsys, "messages", "reparse")
    assert code == 1 and "--account ID, or --all" in err
    code, _, err = cli(capsys, "messages", "reparse", "--account", "999999")
    assert code == 1 and "account 999999 not found" in err


def test_progress_bar_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = ProgressBar("sync", screen)
    bar.update(1, 4)
    bar.update(1, 4)  # unchanged: not drawn again
    bar.update(4, 4)
    bar.finish()
    assert screen.getvalue() == (
        f"\rsync [{'#' * 7}{'.' * 23}] 1/4 25%\rsync [{'#' * 30}] 4/4 100%\n"
    )
