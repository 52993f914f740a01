"""Provider presets on account create and update (backend/mailbox/providers.py)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from backend.mailbox import providers
from tests.support.api import account_payload


def preset_payload(**fields: Any) -> dict[str, Any]:
    """A POST /accounts body without the server's fields: the preset gives them."""
    payload = account_payload(**fields)
    for name in ("imap_host", "imap_port", "imap_security"):
        if name not in fields:
            payload.pop(name)
    return payload


def test_a_preset_fills_the_server(api: TestClient) -> None:
    response = api.post("/accounts", json=preset_payload(provider="qq"))

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["imap_host"], body["imap_port"], body["imap_security"]) == (
        "imap.qq.com",
        993,
        "ssl",
    )
    assert body["provider"] == "qq"


def test_fields_given_win_over_the_preset(api: TestClient) -> None:
    response = api.post(
        "/accounts",
        json=preset_payload(provider="NetEase", imap_host="imap.126.com", imap_port=1993),
    )

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["imap_host"], body["imap_port"], body["imap_security"]) == (
        "imap.126.com",
        1993,
        "ssl",
    )


def test_an_unknown_provider_is_refused_naming_the_known_ones(api: TestClient) -> None:
    response = api.post("/accounts", json=preset_payload(provider="hotmale"))

    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "unknown provider 'hotmale'" in detail
    for name in ("gmail", "outlook", "qq", "netease", "exmail", "aliyun", "yahoo", "icloud"):
        assert name in detail


def test_a_provider_that_takes_only_oauth2_refuses_a_password(api: TestClient) -> None:
    response = api.post("/accounts", json=preset_payload(provider="outlook"))

    assert response.status_code == 422, response.text
    assert "accepts only oauth2 logins, not password" in response.json()["detail"]


def test_oauth2_gets_the_providers_token_url(api: TestClient) -> None:
    payload = preset_payload(
        provider="gmail",
        oauth2={"access_token": "a", "refresh_token": "r", "client_id": "c.apps"},
    )
    payload.pop("password")

    response = api.post("/accounts", json=payload)

    # A refresh token without a token_url would be refused: the preset gave one.
    assert response.status_code == 201, response.text
    assert response.json()["imap_host"] == "imap.gmail.com"
    assert response.json()["auth_method"] == "oauth2"


def test_update_to_a_provider_moves_the_server(api: TestClient) -> None:
    created = api.post("/accounts", json=account_payload()).json()

    response = api.patch(f"/accounts/{created['id']}", json={"provider": "icloud"})

    assert response.status_code == 200, response.text
    assert (response.json()["imap_host"], response.json()["provider"]) == (
        "imap.mail.me.com",
        "icloud",
    )
    cleared = api.patch(f"/accounts/{created['id']}", json={"provider": None})
    assert (cleared.json()["imap_host"], cleared.json()["provider"]) == ("imap.mail.me.com", None)


def test_the_presets_are_listed_with_what_each_needs(api: TestClient) -> None:
    response = api.get("/accounts/providers")

    assert response.status_code == 200, response.text
    items = {item["name"]: item for item in response.json()["items"]}
    assert set(items) == set(providers.PROVIDERS)
    assert "authorization code" in items["qq"]["needs"]
    assert items["outlook"]["auth_methods"] == ["oauth2"]
    assert items["gmail"]["account_limit"] == providers.PROVIDERS["gmail"].account_limit
