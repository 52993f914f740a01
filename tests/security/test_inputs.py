"""Bad input is a 4xx that says what to fix, never a 500, and never repeats a secret
(issue: webhook_url over 2048 characters, a 64-character host label and non-ASCII
credentials were 500s; CR/LF in a username was sent to the IMAP server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from backend.models import Account, WebhookDelivery
from backend.webhooks import service as webhooks
from tests.support.accounts import make_account
from tests.support.api import account_payload

CONTROL = "must not contain control characters (CR, LF, NUL, tab and the like)"
ASCII = "must be printable ASCII (IMAP LOGIN cannot send other characters)"


def errors(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {".".join(map(str, e["loc"][1:])): e["msg"] for e in response.json()["errors"]}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("username", "me\r\nA1 CREATE injected", CONTROL),
        ("username", "me\x00", CONTROL),
        ("username", "me\x85", CONTROL),  # C1: NEL
        ("username", "zoë", ASCII),
        ("password", "pw\r\nA1 CREATE injected", CONTROL),
        ("password", "pw\x7f", CONTROL),
        ("password", "pässwörd-s3cret", ASCII),
        ("folders", ["INBOX\r\nA1 DELETE INBOX"], CONTROL),
        ("folders", ["Archive\t2024"], CONTROL),
    ],
)
def test_control_characters_and_non_ascii_credentials_are_refused(
    api: TestClient, field: str, value: Any, message: str
) -> None:
    response = api.post("/accounts", json=account_payload(**{field: value}))
    found = errors(response)
    location = f"{field}.0" if field == "folders" else field
    assert found == {location: f"Value error, {message}"}
    if field == "password":
        # Nothing of the secret, not even the character that was refused or where.
        for piece in ("s3cret", "injected", "ä", "\\u00e4", "\\u007f", "position"):
            assert piece not in response.text
    # The same rules on a change.
    account_id = api.post("/accounts", json=account_payload()).json()["id"]
    assert errors(api.patch(f"/accounts/{account_id}", json={field: value})) == found


def test_secrets_refuse_control_characters_too(api: TestClient) -> None:
    oauth2 = {"access_token": "tok\r\nen"}
    response = api.post("/accounts", json=account_payload(password=None, oauth2=oauth2))
    assert errors(response) == {"oauth2.access_token": f"Value error, {CONTROL}"}
    response = api.post("/accounts", json=account_payload(webhook_secret="s\ne"))
    assert errors(response) == {"webhook_secret": f"Value error, {CONTROL}"}


def test_a_backfill_refuses_control_characters_in_folder_names(
    api: TestClient, db: Session
) -> None:
    account = make_account(db)
    response = api.post(
        f"/accounts/{account.id}/backfill", json={"folders": ["INBOX\r\nA1 DELETE INBOX"]}
    )
    assert errors(response) == {"folders.0": f"Value error, {CONTROL}"}


def test_a_webhook_url_over_2048_characters_is_a_422(api: TestClient) -> None:
    url = "https://hooks.example.com/" + "a" * 2048
    response = api.post("/accounts", json=account_payload(webhook_url=url))
    assert errors(response) == {"webhook_url": "URL should have at most 2048 characters"}


@pytest.mark.parametrize(
    "host",
    ["a" * 64 + ".example.com", "imap..example.com", "imap:993", "[imap.example.com]"],
)
def test_a_host_that_is_no_host_name_is_a_422(api: TestClient, host: str) -> None:
    response = api.post("/accounts", json=account_payload(imap_host=host))
    [message] = errors(response).values()
    assert "host name" in message


def test_a_host_label_of_63_characters_and_ip_literals_are_fine(api: TestClient) -> None:
    for host in ("a" * 63 + ".example.com", "192.0.2.10", "2001:db8::1", "imap.example.com."):
        response = api.post("/accounts", json=account_payload(imap_host=host))
        assert response.status_code == 201, (host, response.text)


def test_webhook_urls_are_returned_without_their_userinfo(
    api: TestClient, db: Session, set_env: Callable[..., None]
) -> None:
    url = "https://hook-user:hook-s3cret@hooks.example.com:8443/in?x=1"
    created = api.post("/accounts", json=account_payload(webhook_url=url))
    assert created.status_code == 201, created.text
    redacted = "https://***@hooks.example.com:8443/in?x=1"
    assert created.json()["webhook_url"] == redacted
    account_id = created.json()["id"]
    for response in (
        api.get(f"/accounts/{account_id}"),
        api.get("/accounts"),
        api.patch(f"/accounts/{account_id}", json={"enabled": False}),
    ):
        assert "hook-s3cret" not in response.text
        assert "hook-user" not in response.text
        assert redacted in response.text
    # Dead letters show where the last attempt went, redacted the same way.
    db.add(
        WebhookDelivery(
            event_id="evt_1",
            event_type="message.received",
            dedupe_key="k",
            target="account",
            account_id=account_id,
            url=url,
            status="dead",
        )
    )
    db.commit()
    letters = api.get("/admin/dead-letters")
    assert letters.json()["items"][0]["url"] == redacted
    assert "hook-s3cret" not in letters.text


def test_webhook_url_userinfo_is_encrypted_at_rest(api: TestClient, db: Session) -> None:
    # Issue 31: the API hid it, but accounts.webhook_url held it in clear.
    url = "https://hook-user:hook-s3cret@hooks.example.com:8443/in?x=1"
    account_id = api.post("/accounts", json=account_payload(webhook_url=url)).json()["id"]
    account = db.get(Account, account_id)
    assert account is not None
    assert account.webhook_url == "https://***@hooks.example.com:8443/in?x=1"
    assert account.webhook_userinfo_encrypted is not None
    assert "s3cret" not in account.webhook_userinfo_encrypted
    # What a delivery is sent to is the whole URL again.
    [target] = [t for t in webhooks.targets(account) if t.kind == "account"]
    assert target.url == url

    # A new URL without userinfo drops the old userinfo; null drops both.
    def stored() -> tuple[str | None, str | None]:
        db.expire_all()
        found = db.get(Account, account_id)
        assert found is not None
        return found.webhook_url, found.webhook_userinfo_encrypted

    api.patch(f"/accounts/{account_id}", json={"webhook_url": "https://hooks.example.com/b"})
    assert stored() == ("https://hooks.example.com/b", None)
    api.patch(f"/accounts/{account_id}", json={"webhook_url": url})
    api.patch(f"/accounts/{account_id}", json={"webhook_url": None})
    assert stored() == (None, None)
