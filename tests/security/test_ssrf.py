"""The outbound policy: in production mailbeat connects to no loopback, link-local,
private, multicast or reserved address unless OUTBOUND_ALLOWLIST names it; token URLs
must be https; a receiver's answer is never echoed (real HTTP receivers on loopback)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend import netpolicy
from backend.mailbox import oauth
from backend.mailbox.imap import ImapAuthError
from backend.models import WebhookDelivery
from backend.processing.service import hand_on
from tests.support.accounts import make_account
from tests.support.api import account_payload, auth_headers, make_client
from tests.support.celery import running_celery
from tests.support.receiver import Receiver, Reply
from tests.support.wait import wait_for
from tests.support.webhooks import store_message

REFUSED = "refused by the outbound policy (name the host or its network in OUTBOUND_ALLOWLIST"


@pytest.fixture
def production(set_env: Callable[..., None]) -> Callable[..., None]:
    set_env(ENVIRONMENT="production")
    return set_env


def _deliveries(db: Session) -> list[WebhookDelivery]:
    db.expire_all()
    return list(db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("localhost", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.0.0.5", "private"),
        ("192.168.1.1", "private"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "non-public"),
        # IPv6 forms that lead to an IPv4 address are judged by it (issue 31: 6to4 of
        # loopback and of the metadata service, and site-local, passed).
        ("2002:7f00:1::1", "loopback"),
        ("2002:a9fe:a9fe::1", "link-local"),
        ("2002:0a00:0005::1", "private"),
        ("64:ff9b::127.0.0.1", "loopback"),
        ("64:ff9b::169.254.169.254", "link-local"),
        ("::127.0.0.1", "loopback"),
        ("::ffff:10.0.0.5", "private"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
        ("fec0::1", "site-local"),
    ],
)
def test_production_refuses_internal_addresses_when_they_are_saved(
    production: Callable[..., None], host: str, kind: str
) -> None:
    with make_client(auth_headers()) as api:
        for field, value in (
            ("imap_host", host),
            ("webhook_url", f"http://{'[' + host + ']' if ':' in host else host}:8080/hook"),
        ):
            response = api.post("/accounts", json=account_payload(**{field: value}))
            assert response.status_code == 422, (field, response.text)
            [problem] = response.json()["errors"]
            assert problem["loc"] == ["body", field]
            # "::1 is a loopback address, ..." or "2002:7f00:1::1 embeds 127.0.0.1, a ..."
            assert f"a {kind} address, {REFUSED}" in problem["msg"]


def test_the_allowlist_lets_internal_hosts_through(production: Callable[..., None]) -> None:
    production(OUTBOUND_ALLOWLIST="10.1.0.0/16, mail.internal")
    with make_client(auth_headers()) as api:
        for host in ("10.1.2.3", "mail.internal", "1.1.1.1"):
            response = api.post("/accounts", json=account_payload(imap_host=host))
            assert response.status_code == 201, (host, response.text)
        assert api.post("/accounts", json=account_payload(imap_host="10.2.0.1")).status_code == 422


def test_development_keeps_internal_addresses_open(api: TestClient) -> None:
    response = api.post("/accounts", json=account_payload(imap_host="127.0.0.1"))
    assert response.status_code == 201


def test_production_token_urls_must_be_https_and_public(production: Callable[..., None]) -> None:
    def oauth2(token_url: str) -> dict[str, str]:
        return {
            "access_token": "at",
            "refresh_token": "rt",
            "client_id": "c",
            "token_url": token_url,
        }

    with make_client(auth_headers()) as api:
        for url, message in (
            ("http://oauth.example.com/token", "must be an https URL outside development"),
            ("https://127.0.0.1:8443/token", REFUSED),
        ):
            body = account_payload(password=None, oauth2=oauth2(url))
            response = api.post("/accounts", json=body)
            assert response.status_code == 422, response.text
            assert message in response.json()["detail"]
        body = account_payload(password=None, oauth2=oauth2("https://oauth.example.com/token"))
        assert api.post("/accounts", json=body).status_code == 201


def test_a_refresh_sends_no_secret_to_a_plain_http_or_internal_token_url(
    production: Callable[..., None], receiver: Receiver
) -> None:
    # As stored before the policy existed: the refresh checks again before sending.
    for url in (receiver.url, receiver.url.replace("http://", "https://")):
        credentials = {"refresh_token": "rt-secret", "client_secret": "cs", "token_url": url}
        with pytest.raises(ImapAuthError, match="the token URL is refused"):
            oauth.refresh({**credentials, "client_id": "c"})
    assert receiver.requests == []


def test_production_webhooks_do_not_reach_internal_receivers(
    db: Session,
    api: TestClient,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
) -> None:
    # WEBHOOK_URL is a setting, so the check that matters is the one at connect time.
    webhooks_on(ENVIRONMENT="production")
    account = make_account(db)
    message = store_message(db, account, 1)

    hand_on([message.id])

    [delivery] = _deliveries(db)
    assert delivery.status == "dead"
    assert delivery.attempts == 1  # refused is final: retrying cannot change the answer
    assert delivery.last_error is not None
    assert "127.0.0.1 is a loopback address, " + REFUSED in delivery.last_error
    assert receiver.requests == []

    webhooks_on(ENVIRONMENT="production", OUTBOUND_ALLOWLIST="127.0.0.1/32")
    assert api.post(f"/admin/dead-letters/{delivery.id}/replay").status_code == 202
    [delivery] = _deliveries(db)
    assert delivery.status == "delivered"
    assert len(receiver.delivered()) == 1


@pytest.mark.e2e
def test_a_worker_in_production_does_not_reach_an_internal_receiver(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None], tmp_path: Path
) -> None:
    # Deliveries run in the workers: the check must hold in their process too.
    webhooks_on(ENVIRONMENT="production", SCHEDULER_MODE="celery")
    account = make_account(db)
    message = store_message(db, account, 1)
    with running_celery(tmp_path) as celery:
        celery.worker()
        hand_on([message.id])
        wait_for(
            lambda: [d.status for d in _deliveries(db)] == ["dead"], f"refused\n{celery.logs()}"
        )
    [delivery] = _deliveries(db)
    assert delivery.last_error is not None and REFUSED in delivery.last_error
    assert receiver.requests == []


def test_dead_letters_do_not_echo_the_receivers_answer(
    db: Session, api: TestClient, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    receiver.default = Reply(status=403, body=b"internal-admin-console v2.1: access denied")
    account = make_account(db)
    hand_on([store_message(db, account, 1).id])

    letters = api.get("/admin/dead-letters")
    [letter] = letters.json()["items"]
    assert letter["last_status_code"] == 403
    assert letter["last_error"] == "HTTP 403 Forbidden"
    assert "internal-admin-console" not in letters.text


@pytest.mark.parametrize(
    "address",
    ["2002:808:808::1", "64:ff9b::8.8.8.8", "::ffff:8.8.8.8", "2606:4700:4700::1111"],
)
def test_ipv6_forms_of_a_public_ipv4_address_are_allowed(
    production: Callable[..., None], address: str
) -> None:
    assert netpolicy.refusal(ipaddress.ip_address(address)) is None


def test_an_embedded_address_the_allowlist_names_is_allowed(
    production: Callable[..., None],
) -> None:
    production(OUTBOUND_ALLOWLIST="10.1.0.0/16")
    assert netpolicy.refusal(ipaddress.ip_address("2002:0a01:0203::1")) is None
    refused = netpolicy.refusal(ipaddress.ip_address("2002:0a02:0203::1"))
    assert refused is not None and refused.startswith("2002:a02:203::1 embeds 10.2.2.3, a private")
