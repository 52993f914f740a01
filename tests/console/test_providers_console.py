"""The account form's provider presets, in chromium against a real uvicorn."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
from playwright.sync_api import Page, expect

from tests.conftest import ADMIN_TOKEN
from tests.console.conftest import Server, screenshot
from tests.console.test_console import sign_in


def test_a_preset_fills_the_form_and_says_what_the_provider_needs(
    page: Page, serve: Callable[..., Server]
) -> None:
    server = serve()
    user = f"preset-{uuid.uuid4().hex[:8]}"
    sign_in(page, server)
    page.click("#add-account")
    page.fill("#field-email", f"{user}@qq.com")
    page.fill("#field-username", f"{user}@qq.com")
    page.fill("#field-password", "authorization-code")
    page.uncheck("#field-enabled")  # never dialled

    # Microsoft takes OAuth2 only: a password is refused with the reason.
    page.select_option("#field-provider", "outlook")
    expect(page.locator("#field-imap_host")).to_have_value("outlook.office365.com")
    page.click("#account-form button[type=submit]")
    expect(page.locator("#form-result")).to_contain_text("accepts only oauth2 logins")

    page.select_option("#field-provider", "qq")
    expect(page.locator("#field-imap_host")).to_have_value("imap.qq.com")
    expect(page.locator("#field-imap_port")).to_have_value("993")
    expect(page.locator("#field-imap_security")).to_have_value("ssl")
    expect(page.locator("#provider-needs")).to_contain_text("authorization code")
    page.fill("#field-imap_port", "1993")  # a field given wins over the preset
    screenshot(page, "10-provider-preset")
    page.click("#account-form button[type=submit]")

    expect(page.locator("h1")).to_contain_text(f"{user}@qq.com")
    account_id = int(page.url.rsplit("/", 1)[1])
    saved = httpx.get(
        f"{server.url}/accounts/{account_id}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ).json()
    assert (saved["provider"], saved["imap_host"], saved["imap_port"]) == (
        "qq",
        "imap.qq.com",
        1993,
    )

    # Editing offers the preset it was made from.
    page.goto(f"{server.url}/ui/#/accounts/{account_id}/edit")
    expect(page.locator("#field-provider")).to_have_value("qq")
    expect(page.locator("#provider-needs")).to_contain_text("authorization code")
