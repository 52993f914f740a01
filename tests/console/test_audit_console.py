"""The console shows the latest audit on the account page (and audits on request), and
marks a stale mailbox."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import httpx
from playwright.sync_api import Page, expect
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from backend.audit import freshness
from backend.models import Account, Message, utcnow
from tests.conftest import ADMIN_TOKEN
from tests.console.conftest import Server, screenshot
from tests.console.test_console import row, sign_in
from tests.support.dovecot import Dovecot
from tests.support.mail import generated


def test_the_account_page_shows_the_latest_audit_and_the_list_marks_stale_mailboxes(
    page: Page, serve: Callable[..., Server], dovecot: Dovecot, db: Session
):
    server = serve()
    user = f"audit-{uuid.uuid4().hex[:8]}"
    password = dovecot.add_user(user, "pw-audit")
    dovecot.append_many(user, [generated(index) for index in range(3)])
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    account_id = httpx.post(
        f"{server.url}/accounts",
        headers=headers,
        json={
            "email": f"{user}@example.org",
            "imap_host": dovecot.host,
            "imap_port": dovecot.imap_port,
            "imap_security": "none",
            "username": user,
            "password": password,
            "poll_interval_seconds": 3600,
        },
        timeout=30,
    ).json()["id"]
    sign_in(page, server)
    page.goto(f"{server.url}/ui/#/accounts/{account_id}")
    page.click("button[data-action='poll now']")
    expect(page.locator("#poll-runs tbody")).to_contain_text("success", timeout=60_000)

    # A restore from an older backup loses one row; the operator audits.
    db.execute(delete(Message).where(Message.account_id == account_id, Message.uid == 2))
    db.commit()
    page.click("button[data-action='audit']")
    audited = page.locator("#audit-folders tbody tr[data-folder='INBOX'] td")
    expect(audited.nth(2)).to_have_text("complete", timeout=60_000)
    # On server, expected, stored, skipped, missing, repaired.
    expect(audited.nth(3)).to_have_text("3")
    expect(audited.nth(6)).to_have_text("0")
    expect(audited.nth(7)).to_have_text("1")
    expect(audited.nth(8)).to_have_text("1")
    screenshot(page, "20-audit")

    # Its polls stopped 4 hours ago: past 3 intervals of an hour.
    long_ago = utcnow() - timedelta(hours=4)
    db.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(last_success_at=long_ago, created_at=long_ago)
    )
    db.commit()
    freshness.check()  # beat's periodic check (the server's own may have run it first)
    db.expire_all()
    stale = db.get(Account, account_id)
    assert stale is not None and stale.stale_since is not None
    page.goto(f"{server.url}/ui/#/")
    expect(row(page, f"{user}@example.org").locator(".badge.stale")).to_have_text("stale")
    page.goto(f"{server.url}/ui/#/accounts/{account_id}")
    expect(page.locator("h1 .badge.stale")).to_be_visible()
