"""The console lists quarantined messages with the reason (a page of their own and the
account page) and replays them."""

from __future__ import annotations

from collections.abc import Callable

from playwright.sync_api import Page, expect
from sqlalchemy import update
from sqlalchemy.orm import Session

from backend.models import Message, utcnow
from tests.console.conftest import Server, screenshot
from tests.console.test_console import sign_in
from tests.support.accounts import make_account
from tests.support.webhooks import store_message


def test_quarantined_messages_are_shown_with_the_reason_and_replayed(
    page: Page, serve: Callable[..., Server], db: Session
):
    server = serve()
    account = make_account(db, enabled=False)  # never polled: only its stored messages
    first, bad = store_message(db, account, 1), store_message(db, account, 2)
    # As processing leaves a poison message (tests/processing/test_quarantine.py).
    db.execute(
        update(Message)
        .where(Message.id == bad.id)
        .values(
            process_failures=10, process_error="ValueError: no CRM contact", quarantined_at=utcnow()
        )
    )
    db.commit()
    sign_in(page, server)

    page.click("nav a[data-view='quarantine']")
    listed = page.locator(f"#quarantine tbody tr[data-message='{bad.id}'] td")
    expect(listed.nth(2)).to_have_text("Grüße 2")
    expect(listed.nth(4)).to_have_text("10")
    expect(listed.nth(6)).to_have_text("ValueError: no CRM contact")
    expect(page.locator(f"#quarantine tbody tr[data-message='{first.id}']")).to_have_count(0)
    screenshot(page, "30-quarantine")

    page.goto(f"{server.url}/ui/#/accounts/{account.id}")
    held = page.locator(f"#quarantine tbody tr[data-message='{bad.id}']")
    expect(held).to_contain_text("ValueError: no CRM contact")
    held.locator("button[data-action='replay']").click()
    # Local mode: processed in the server's process at once.
    expect(page.locator("#quarantine tbody")).to_contain_text("None: every message")
    expect(page.locator("#quarantine")).to_contain_text("0 quarantined")
    db.expire_all()
    row = db.get(Message, bad.id)
    assert row is not None and row.processed_at is not None and row.quarantined_at is None
