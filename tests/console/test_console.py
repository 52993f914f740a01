"""The web console at /ui/, in chromium, over a real Dovecot."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
from playwright.sync_api import Browser, Locator, Page, expect
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from backend.models import Account, WebhookDelivery, utcnow
from tests.conftest import ADMIN_TOKEN
from tests.console.conftest import Server, screenshot
from tests.support.accounts import make_account
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.receiver import SECRET, Receiver


def sign_in(page: Page, server: Server) -> None:
    page.goto(f"{server.url}/ui/")
    page.fill("#token", ADMIN_TOKEN)
    page.click("#signin button[type=submit]")
    expect(page.locator("h1")).to_have_text("Mailboxes")


def row(page: Page, email: str) -> Locator:
    return page.locator("#mailboxes tbody tr", has_text=email)


def test_sign_in_keeps_the_token_in_the_tab_only(page: Page, serve: Callable[..., Server]):
    server = serve()
    page.goto(f"{server.url}/ui")  # without the slash: redirected
    expect(page.locator("#signin")).to_be_visible()
    screenshot(page, "01-sign-in")

    page.fill("#token", "not-the-token")
    page.click("#signin button[type=submit]")
    expect(page.locator("#signin .message")).to_contain_text("token was refused")
    expect(page.locator("#nav")).to_be_hidden()

    sign_in(page, server)
    expect(page.locator("#mailboxes")).to_contain_text("No mailbox yet")
    assert page.evaluate("sessionStorage.getItem('mailbeat.token')") == ADMIN_TOKEN
    assert page.evaluate("localStorage.length") == 0
    assert page.context.cookies() == []

    # Another tab of the same browser does not get it; signing out forgets it.
    other = page.context.new_page()
    other.goto(f"{server.url}/ui/")
    expect(other.locator("#signin")).to_be_visible()
    page.click("#sign-out")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_mailboxes_add_test_poll_edit_disable_delete(
    page: Page, serve: Callable[..., Server], dovecot: Dovecot, db: Session
):
    server = serve()
    user = f"console-{uuid.uuid4().hex[:8]}"
    password = dovecot.add_user(user, "pw-console")
    dovecot.append_many(user, [generated(index) for index in range(3)])
    broken = make_account(
        db,
        email="broken@example.org",
        imap_host="127.0.0.1",
        imap_port=1,
        imap_security="none",
        status="error",
        last_error="cannot connect to 127.0.0.1:1: connection refused",
        last_error_kind="connection",
        message_count=7,
    )
    broken_id = broken.id
    sign_in(page, server)
    expect(row(page, "broken@example.org")).to_contain_text("connection refused")

    # Add, trying the settings first (wrong password, then the right one).
    page.click("#add-account")
    page.fill("#field-email", f"{user}@example.org")
    page.fill("#field-imap_host", dovecot.host)
    page.fill("#field-imap_port", str(dovecot.imap_port))
    page.select_option("#field-imap_security", "none")
    page.fill("#field-username", user)
    page.fill("#field-password", "wrong-password")
    page.click("#test-settings")
    expect(page.locator("#form-result")).to_contain_text("Failed at auth")
    page.fill("#field-password", password)
    page.fill("#field-poll_interval_seconds", "3600")
    page.click("#test-settings")
    expect(page.locator("#form-result")).to_contain_text("Login and folders ok")
    expect(page.locator("#form-result")).to_contain_text("INBOX: 3 messages")
    screenshot(page, "02-add-mailbox")
    page.click("#account-form button[type=submit]")

    # Its page; a poll now brings the messages in.
    expect(page.locator("h1")).to_contain_text(f"{user}@example.org")
    page.click("button[data-action='poll now']")
    expect(page.locator("#toast")).to_contain_text("poll queued (local")
    expect(page.locator("#messages tbody tr")).to_have_count(3)
    expect(page.locator("#poll-runs tbody")).to_contain_text("success")
    expect(page.locator("#folders tbody")).to_contain_text("INBOX")
    expect(page.locator("#folders tbody td").nth(2)).to_have_text("3")  # last UID
    screenshot(page, "03-mailbox")
    with page.expect_download() as download:
        page.locator("#messages a.raw").first.click()
    raw = download.value.path().read_bytes()
    assert raw.startswith(b"From:") or b"Subject:" in raw

    # Back to the list: sort, filter, test, disable, enable, edit, delete.
    page.click("nav a[data-view=mailboxes]")
    expect(page.locator("#mailboxes tbody tr")).to_have_count(2)
    expect(row(page, user)).to_contain_text("active")
    page.click("th[data-sort=message_count]")
    expect(page.locator("#mailboxes tbody tr").first).to_contain_text(user)  # 3 before 7
    page.click("th[data-sort=message_count]")
    expect(page.locator("#mailboxes tbody tr").first).to_contain_text("broken@example.org")
    page.fill("#filter", "refused")
    expect(page.locator("#mailboxes tbody tr")).to_have_count(1)
    page.fill("#filter", "")
    page.select_option("#status-filter", "active")
    expect(page.locator("#mailboxes tbody tr")).to_have_count(1)
    expect(page.locator("#mailboxes tbody tr")).to_contain_text(user)
    page.select_option("#status-filter", "")
    screenshot(page, "04-mailboxes")

    row(page, "broken@example.org").locator("button[data-action=test]").click()
    expect(page.locator("#toast")).to_contain_text("failed at connect")
    row(page, user).locator("button[data-action=disable]").click()
    expect(row(page, user)).to_contain_text("disabled")
    row(page, user).locator("button[data-action=enable]").click()
    expect(row(page, user)).to_contain_text("active")

    row(page, user).locator("button[data-action=edit]").click()
    expect(page.locator("#field-password")).to_have_attribute("placeholder", "unchanged")
    page.fill("#field-poll_interval_seconds", "120")
    page.fill("#field-priority", "9")
    page.click("#account-form button[type=submit]")
    expect(page.locator("#main")).to_contain_text("2 min")
    expect(page.locator("#main dl.facts")).to_contain_text("Priority9")
    account_id = int(page.url.rsplit("/", 1)[1])
    check = httpx.get(
        f"{server.url}/accounts/{account_id}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ).json()
    assert (check["poll_interval_seconds"], check["priority"]) == (120, 9)
    page.click("nav a[data-view=mailboxes]")
    page.click("th[data-sort=priority]")
    expect(page.locator("#mailboxes tbody tr").first).to_contain_text("broken@example.org")
    page.click("th[data-sort=priority]")
    expect(page.locator("#mailboxes tbody tr").first).to_contain_text(user)

    # The activity chart counts the polls so far and the messages they stored.
    page.click("nav a[data-view=system]")
    expect(page.locator("#activity-chart")).to_have_attribute("data-messages", "3")
    assert int(page.locator("#activity-chart").get_attribute("data-polls") or 0) >= 1

    page.click("nav a[data-view=mailboxes]")
    page.once("dialog", lambda dialog: dialog.accept())
    row(page, "broken@example.org").locator("button[data-action=delete]").click()
    expect(page.locator("#mailboxes tbody tr")).to_have_count(1)
    db.rollback()
    assert db.scalar(select(func.count()).where(Account.id == broken_id)) == 0


def test_dead_letters_replay_and_the_activity_chart(
    page: Page,
    serve: Callable[..., Server],
    db: Session,
    receiver: Receiver,
):
    server = serve(WEBHOOK_URL=receiver.url, WEBHOOK_SECRET=SECRET)
    account = make_account(db, email="dead@example.org")
    delivery = WebhookDelivery(
        event_id=f"evt_{uuid.uuid4().hex}",
        event_type="account.error",
        dedupe_key=f"account.error:{account.id}:1",
        target="global",
        account_id=account.id,
        data={"account_id": account.id, "error": "test"},
        url=receiver.url,
        status="dead",
        attempts=8,
        last_status_code=500,
        last_error="the receiver answered 500",
    )
    db.add(delivery)
    db.commit()

    sign_in(page, server)
    page.click("nav a[data-view=dead-letters]")
    expect(page.locator("#dead-letters tbody tr")).to_have_count(1)
    expect(page.locator("#dead-letters tbody")).to_contain_text("the receiver answered 500")
    screenshot(page, "05-dead-letters")
    page.click("#dead-letters button[data-action=replay]")
    expect(page.locator("#toast")).to_contain_text("Replayed 1")
    expect(page.locator("#dead-letters tbody")).to_contain_text("No dead letters")
    assert delivery.event_id in receiver.event_ids()
    replay_all = page.locator("button[data-action='replay all']")
    expect(replay_all).to_be_hidden()
    # Dead again (the receiver went away once more): all of them at once.
    db.execute(update(WebhookDelivery).values(status="dead"))
    db.commit()
    page.reload()
    replay_all.click()
    expect(page.locator("#toast")).to_contain_text("Replayed 1 delivery")
    expect(page.locator("#dead-letters tbody")).to_contain_text("No dead letters")
    assert receiver.event_ids() == [delivery.event_id] * 2

    page.click("nav a[data-view=system]")
    expect(page.locator("#system-stats")).to_contain_text("local")
    expect(page.locator("#activity-chart")).to_be_visible()
    expect(page.locator("#workers")).to_contain_text("Local mode")
    expect(page.locator("#health")).to_contain_text("database")
    screenshot(page, "06-system")


def test_a_first_sync_fills_its_progress_bar(
    page: Page, serve: Callable[..., Server], dovecot: Dovecot
):
    """A real Dovecot mailbox, one message per batch so the sync takes a while: the bar
    is seen part-way, then at 100 %."""
    server = serve(IMAP_FETCH_BATCH_SIZE=1)
    user = f"sync-{uuid.uuid4().hex[:8]}"
    password = dovecot.add_user(user, "pw-sync")
    total = 400
    dovecot.write_maildir(user, (generated(index) for index in range(total)))
    account_id = httpx.post(
        f"{server.url}/accounts",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
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
    expect(page.locator("h1")).to_contain_text(f"{user}@example.org")
    # Every value the bar shows, as the page redraws it.
    page.evaluate(
        """() => {
          window.seen = [];
          const record = () => {
            const bar = document.getElementById("sync-progress");
            if (bar) window.seen.push(Number(bar.getAttribute("aria-valuenow")));
          };
          new MutationObserver(record).observe(document.getElementById("first-sync"),
            { childList: true, subtree: true });
        }"""
    )
    page.click("button[data-action='poll now']")
    page.wait_for_function(
        """() => {
          const bar = document.getElementById("sync-progress");
          const value = bar && Number(bar.getAttribute("aria-valuenow"));
          return value > 0 && value < 100;
        }""",
        timeout=60_000,
    )
    screenshot(page, "07-first-sync-part-way")
    bar = page.locator("#sync-progress")
    expect(bar).to_have_attribute("aria-valuenow", "100", timeout=120_000)
    expect(bar).to_contain_text(f"{total} / {total} (100 %)")
    screenshot(page, "08-first-sync-done")
    seen = page.evaluate("window.seen")
    assert any(0 < value < 100 for value in seen), seen
    assert seen == sorted(seen), seen  # it only fills
    expect(page.locator("#folders tbody td").nth(4)).to_have_text(f"{total} / {total}")


def test_push_and_its_fallback_show_and_push_can_be_switched_on(
    page: Page, serve: Callable[..., Server], db: Session
):
    server = serve()
    make_account(
        db,
        email="watched@example.org",
        push=True,
        push_status="watching",
        push_confirmed_at=utcnow(),
    )
    # Watching once, but no live watcher has confirmed it since (it was killed).
    make_account(db, email="orphan@example.org", push=True, push_status="watching")
    make_account(db, email="noidle@example.org", push=True, push_status="unsupported")
    plain = make_account(db, email="plain@example.org").id
    sign_in(page, server)
    expect(row(page, "watched@example.org")).to_contain_text("watching")
    expect(row(page, "orphan@example.org")).to_contain_text("stale: no watcher")
    expect(row(page, "noidle@example.org").locator(".badge.degraded")).to_have_text("polling only")
    row(page, "noidle@example.org").locator("a").first.click()
    expect(page.locator("#main dl.facts")).to_contain_text("polling only: the server has no IDLE")
    screenshot(page, "05-push-fallback")

    page.click("nav a[data-view=mailboxes]")
    row(page, "plain@example.org").locator("button[data-action=edit]").click()
    expect(page.locator("#field-push")).not_to_be_checked()
    page.check("#field-push")
    page.click("#account-form button[type=submit]")
    expect(page.locator("#main dl.facts")).to_contain_text("Push")
    check = httpx.get(
        f"{server.url}/accounts/{plain}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ).json()
    assert (check["push"], check["push_status"]) == (True, None)


def test_the_console_is_served_with_a_strict_csp(
    browser: Browser, serve: Callable[..., Server]
) -> None:
    server = serve()
    for path in ("/ui", "/ui/", "/ui/app.js", "/ui/style.css"):
        headers = httpx.get(server.url + path, timeout=10).headers
        assert "script-src 'self';" in headers["content-security-policy"], path
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
        assert headers["x-frame-options"] == "DENY", path
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["referrer-policy"] == "no-referrer", path
    # Not the `page` fixture: that one fails on any CSP refusal, and here it is wanted.
    page = browser.new_page()
    try:
        sign_in(page, server)
        # Markup that reached the page anyway runs no script of its own.
        with page.expect_console_message(lambda m: "Content Security Policy" in m.text):
            page.evaluate(
                "const s = document.createElement('script');"
                "s.textContent = 'window.injected = 1'; document.body.append(s);"
            )
        assert page.evaluate("window.injected") is None
    finally:
        page.close()
