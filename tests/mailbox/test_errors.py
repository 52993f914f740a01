"""Connection errors say what happened and what to do, in plain words (through
POST /accounts/test, against the real Dovecot)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from tests.support.dovecot import Dovecot


def settings(dovecot: Dovecot, user: str, **fields: Any) -> dict[str, Any]:
    return {
        "imap_host": dovecot.host,
        "imap_port": dovecot.imap_port,
        "imap_security": "none",
        "username": user,
        "password": "wrong-password",
        **fields,
    }


def test_a_wrong_password_is_plain_text(api: TestClient, dovecot: Dovecot, mail_user):
    user, _ = mail_user
    body = api.post("/accounts/test", json=settings(dovecot, user)).json()
    assert (body["ok"], body["stage"]) == (False, "auth")
    # The response code, not the server's free text (a hostile server's words are not
    # repeated), and what to do.
    assert body["detail"] == (
        "authentication failed: [AUTHENTICATIONFAILED]. Check the username and password "
        "(some providers want an app password)"
    )
    assert "b'" not in body["detail"] and "wrong-password" not in body["detail"]


def test_a_missing_ca_bundle_is_named(
    api: TestClient, dovecot: Dovecot, mail_user, set_env: Callable[..., None]
):
    user, password = mail_user
    set_env(IMAP_CA_BUNDLE="/no/such/dir/private-ca.pem")
    body = api.post(
        "/accounts/test",
        json=settings(
            dovecot, user, imap_port=dovecot.imaps_port, imap_security="ssl", password=password
        ),
    ).json()
    assert (body["ok"], body["stage"]) == (False, "tls")
    assert body["detail"] == (
        "IMAP_CA_BUNDLE is /no/such/dir/private-ca.pem, which does not exist: point it at "
        "a PEM file of the CA certificates to trust, or unset it"
    )


def test_plain_imap_on_a_tls_port_is_named_at_once(
    api: TestClient, dovecot: Dovecot, mail_user, set_env: Callable[..., None]
):
    user, password = mail_user
    set_env(IMAP_CONNECT_TIMEOUT="30")
    started = time.monotonic()
    body = api.post(
        "/accounts/test",
        json=settings(dovecot, user, imap_port=dovecot.imaps_port, password=password),
    ).json()
    waited = time.monotonic() - started
    assert (body["ok"], body["stage"]) == (False, "tls")
    assert body["detail"] == (
        f"{dovecot.host}:{dovecot.imaps_port} expects TLS from the first byte (implicit "
        "TLS, as on port 993): set imap_security to 'ssl'"
    )
    # Named after a short wait for the greeting, not after the 30 s connect timeout.
    assert waited < 20, waited

    for security in ("starttls", "none"):
        again = api.post(
            "/accounts/test",
            json=settings(
                dovecot,
                user,
                imap_port=dovecot.imaps_port,
                imap_security=security,
                password=password,
            ),
        ).json()
        assert again["detail"] == body["detail"], security


def test_tls_on_a_plain_port_is_named(api: TestClient, dovecot: Dovecot, mail_user):
    user, password = mail_user
    body = api.post(
        "/accounts/test",
        json=settings(dovecot, user, imap_security="ssl", password=password),
    ).json()
    assert (body["ok"], body["stage"]) == (False, "tls")
    assert body["detail"] == (
        f"{dovecot.host}:{dovecot.imap_port} answered in plain text, not TLS: set "
        "imap_security to 'starttls' (or 'none' on a trusted network), or use the "
        "server's TLS port (usually 993)"
    )
