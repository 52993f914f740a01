"""Freshness: a mailbox whose polls stop turns stale, is shown as such, and is announced
once (account.stale), then once more when it recovers (account.fresh)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from backend import crypto
from backend.admin import service as admin
from backend.audit import freshness
from backend.mailbox.service import poll_account
from backend.metrics import generate_latest, state_families
from backend.models import Account, utcnow
from tests.audit.conftest import Inbox
from tests.support.receiver import Receiver


def _events(receiver: Receiver) -> list[tuple[str, int]]:
    return [
        (body["type"], body["data"]["account"]["id"])
        for body in (r.json() for r in receiver.delivered())
        if body["type"] in ("account.stale", "account.fresh")
    ]


def test_a_mailbox_whose_polls_keep_failing_turns_stale_once_and_fresh_when_polled(
    db: Session, inbox: Inbox, receiver: Receiver
) -> None:
    account = inbox.account(password="not-the-password", poll_interval_seconds=60)
    fresh_one = inbox.account(username=f"{inbox.username}-other", poll_interval_seconds=60)
    account_id = account.id
    assert poll_account(account_id).outcome == "auth_error"
    assert freshness.check() == {"account.stale": [], "account.fresh": []}

    # Its polls have failed for an hour: older than 3 intervals, and than the floor.
    hour_ago = utcnow() - timedelta(hours=1)
    db.execute(update(Account).where(Account.id == account_id).values(created_at=hour_ago))
    db.commit()

    assert freshness.check() == {"account.stale": [account_id], "account.fresh": []}
    assert freshness.check() == {"account.stale": [], "account.fresh": []}
    assert _events(receiver) == [("account.stale", account_id)]
    db.expire_all()
    stale = db.get(Account, account_id)
    assert stale is not None and stale.stale_since is not None
    other = db.get(Account, fresh_one.id)
    assert other is not None and other.stale_since is None

    health, _ok = admin.run_checks()
    assert health.status == "degraded"
    assert health.checks["freshness"].startswith("error: 1 stale mailbox ")
    assert f"account {account_id}," in health.checks["freshness"]
    assert admin.capacity(db).stale_mailboxes == 1
    assert b"mailbeat_mailboxes_stale 1.0" in generate_latest(state_families())

    # The password is fixed and it is polled again: fresh, announced once.
    db.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(credentials_encrypted=crypto.encrypt_json({"password": inbox.password}))
    )
    db.commit()
    assert poll_account(account_id, force=True).outcome == "success"
    assert freshness.check() == {"account.stale": [], "account.fresh": [account_id]}
    assert freshness.check() == {"account.stale": [], "account.fresh": []}
    assert _events(receiver) == [("account.stale", account_id), ("account.fresh", account_id)]
    assert admin.capacity(db).stale_mailboxes == 0
    assert admin.run_checks()[0].checks["freshness"] == "ok"


def test_a_disabled_mailbox_is_not_stale_and_leaves_quietly(
    db: Session, inbox: Inbox, receiver: Receiver
) -> None:
    account = inbox.account(password="not-the-password")
    db.execute(
        update(Account)
        .where(Account.id == account.id)
        .values(created_at=utcnow() - timedelta(hours=1))
    )
    db.commit()
    assert freshness.check()["account.stale"] == [account.id]
    db.execute(update(Account).where(Account.id == account.id).values(enabled=False))
    db.commit()

    assert freshness.check() == {"account.stale": [], "account.fresh": []}
    assert freshness.staleness(db).stale == 0
    assert _events(receiver) == [("account.stale", account.id)]
