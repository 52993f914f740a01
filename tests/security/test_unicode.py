"""Lone surrogates ("\\ud800" in JSON): a str Python holds but no codec can write.

Issue 31: one in webhook_secret was a 500 on create and PATCH (UnicodeEncodeError in
crypto.encrypt); one in oauth2.refresh_token or client_secret was saved, and then /test
was a 500 and every poll failed with `UnicodeEncodeError: 'utf-8' codec can't encode
character '\\ud800' in position 0` in last_error: a character of a secret, and where."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from backend.mailbox.service import poll_account
from backend.models import Account
from tests.support.accounts import MailAccount, make_account
from tests.support.api import account_payload

SURROGATE = "\ud800"
OAUTH2 = {
    "access_token": "at",
    "refresh_token": "rt",
    "client_id": "cid",
    "client_secret": "cs",
    "token_url": "https://tokens.example.test/token",
}


def send(api: TestClient, method: str, path: str, body: Any) -> Any:
    # ensure_ascii: the surrogate travels as the JSON escape "\ud800", as an attacker's would
    # (httpx's own JSON encoding cannot write it at all).
    return api.request(
        method,
        path,
        content=json.dumps(body, ensure_ascii=True),
        headers={"Content-Type": "application/json"},
    )


def problems(response: Any) -> list[str]:
    """Where the 422 says the problem is, after checking it says what (not valid Unicode,
    in pydantic's words or ours) and nothing of the value."""
    assert response.status_code == 422, response.text
    assert "position" not in response.text and "\\ud800" not in response.text
    errors = response.json()["errors"]
    assert all("unicode" in error["msg"].lower() for error in errors), errors
    return [".".join(map(str, error["loc"][1:])) for error in errors]


@pytest.mark.parametrize(
    ("fields", "location"),
    [
        ({"webhook_secret": SURROGATE}, "webhook_secret"),
        ({"webhook_secret": f"whsec-{SURROGATE}"}, "webhook_secret"),
        ({"oauth2": {**OAUTH2, "refresh_token": SURROGATE}}, "oauth2.refresh_token"),
        ({"oauth2": {**OAUTH2, "client_secret": f"x{SURROGATE}"}}, "oauth2.client_secret"),
        ({"oauth2": {**OAUTH2, "access_token": SURROGATE}}, "oauth2.access_token"),
        ({"oauth2": {**OAUTH2, "client_id": SURROGATE}}, "oauth2.client_id"),
        ({"folders": [f"INBOX{SURROGATE}"]}, "folders.0"),
    ],
)
def test_a_lone_surrogate_in_any_text_field_is_a_422_naming_the_field(
    api: TestClient, fields: dict[str, Any], location: str
) -> None:
    payload = account_payload(**fields)
    if "oauth2" in fields:
        payload.pop("password")
    response = send(api, "POST", "/accounts", payload)
    assert problems(response) == [location]

    account_id = api.post("/accounts", json=account_payload()).json()["id"]
    assert problems(send(api, "PATCH", f"/accounts/{account_id}", fields)) == [location]


@pytest.mark.parametrize("field", ["email", "username", "password", "imap_host", "webhook_url"])
def test_other_text_fields_refuse_it_too(api: TestClient, field: str) -> None:
    value = {
        "email": f"a{SURROGATE}@example.org",
        "webhook_url": f"https://hooks.example.test/{SURROGATE}",
    }.get(field, f"x{SURROGATE}")
    assert problems(send(api, "POST", "/accounts", account_payload(**{field: value}))) == [field]


def test_a_backfill_refuses_it_in_folder_names(api: TestClient, db: Session) -> None:
    account = make_account(db)
    response = send(api, "POST", f"/accounts/{account.id}/backfill", {"folders": [SURROGATE]})
    assert problems(response) == ["folders.0"]


@pytest.mark.parametrize("secret", ["refresh_token", "client_secret"])
def test_a_stored_surrogate_fails_the_poll_without_showing_it(
    api: TestClient, db: Session, mail_account: MailAccount, secret: str
) -> None:
    # As it could have been saved before the API refused it: the access token has expired,
    # so the poll refreshes it with the stored secret.
    credentials = {**OAUTH2, "expires_at": int(time.time()) - 3600, secret: f"s{SURROGATE}"}
    account = mail_account(auth_method="oauth2", credentials=credentials)

    result = poll_account(account.id)

    assert result.outcome == "auth_error", result
    db.expire_all()
    stored = db.get(Account, account.id)
    assert stored is not None and stored.last_error is not None
    assert f"the stored {secret} is not valid Unicode text" in stored.last_error
    for piece in ("\ud800", "\\ud800", "position", "UnicodeEncodeError"):
        assert piece not in stored.last_error

    response = api.post(f"/accounts/{account.id}/test")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ok"] is False and body["stage"] == "auth"
    assert "\\ud800" not in response.text and "position" not in response.text
